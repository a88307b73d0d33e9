#!/usr/bin/env bash
#SBATCH --job-name=mpicdc-sim_validation
#SBATCH --ntasks=6
#SBATCH --time=00:30:00
#SBATCH --output=results/%x-%j.out
# Simulator validation: mean/p95/p99 of the Fig. 5b systems, simulator vs MPI emulation
# (--from-fig5b results/fig5b reuses a finished fig5b run instead of running the systems again).
#
#   bash jobs/sim_validation.sh [--quick] [options]     here (--quick: ~1 min; full: ~14 min on 2 cores)
#   sbatch jobs/sim_validation.sh [--quick]             on Slurm, from the repository root (mkdir -p results first)
#   bash jobs/sim_validation.sh --help                  every option
#   sudo bash jobs/sim_validation.sh --cluster [--from-fig5b DIR] [--check]   against a namespace cluster (root)
#
# Writes CSV data, a PNG plot and summary.txt under results/sim_validation/ (--out DIR elsewhere) and prints
# a one-paragraph summary with the headline numbers.  Under Slurm the allocation becomes the MPI
# hostfile; prepared shards go to results/weights/, which every node must see.
if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "$SLURM_SUBMIT_DIR/jobs/lib.sh" ]]; then
    source "$SLURM_SUBMIT_DIR/jobs/lib.sh"     # sbatch runs a copy of this script from a spool folder
else
    source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
fi
exec "$PY" -m mpicdc.experiments.simval "$@" "${HOSTFILE_ARGS[@]}"
