#!/usr/bin/env bash
#SBATCH --job-name=mpicdc-fig3
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:05:00
#SBATCH --output=results/%x-%j.out
# Fig. 3: coverage of one device failure against additional devices, 2MR vs CDC+2MR, for the
# paper's five distributions (mpicdc.sim.coverage; see docs/coverage.md).
#
#   bash jobs/fig3.sh [--quick] [options]     here (--quick and full: ~2 s (exact computation))
#   sbatch jobs/fig3.sh [--quick]             on Slurm, from the repository root (mkdir -p results first)
#   bash jobs/fig3.sh --help                  every option
#
# Writes CSV data, PNG plots and summary.txt under results/fig3/ (--out DIR elsewhere) and prints
# a one-paragraph summary with the headline numbers.
if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "$SLURM_SUBMIT_DIR/jobs/lib.sh" ]]; then
    source "$SLURM_SUBMIT_DIR/jobs/lib.sh"     # sbatch runs a copy of this script from a spool folder
else
    source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
fi
exec "$PY" -m mpicdc.experiments.fig3 "$@"
