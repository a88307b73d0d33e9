#!/usr/bin/env bash
#SBATCH --job-name=mpicdc-mds_vs_groups
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:15:00
#SBATCH --output=results/%x-%j.out
# MDS vs multi-group parity at equal parity devices r = 2, 3 over n = 4, 8, 12 workers: survival of
# k failures (exact enumeration), tail latency (simulator, AlexNet), decode cost and float32 error.
#
#   bash jobs/mds_vs_groups.sh [--quick] [options]     here (--quick: ~6 s; full: ~30 s)
#   sbatch jobs/mds_vs_groups.sh [--quick]             on Slurm, from the repository root (mkdir -p results first)
#   bash jobs/mds_vs_groups.sh --help                  every option
#
# Writes CSV data, PNG plots and summary.txt under results/mds_vs_groups/ (--out DIR elsewhere) and prints
# a one-paragraph summary with the headline numbers.
if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "$SLURM_SUBMIT_DIR/jobs/lib.sh" ]]; then
    source "$SLURM_SUBMIT_DIR/jobs/lib.sh"     # sbatch runs a copy of this script from a spool folder
else
    source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
fi
exec "$PY" -m mpicdc.experiments.mds_vs_groups "$@"
