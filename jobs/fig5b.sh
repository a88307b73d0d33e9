#!/usr/bin/env bash
#SBATCH --job-name=mpicdc-fig5b
#SBATCH --ntasks=6
#SBATCH --time=00:30:00
#SBATCH --output=results/%x-%j.out
# Fig. 5b: straggler mitigation on AlexNet -- mean/p95/p99 latency of uncoded (5 ranks), 2MR+1 (6)
# and CDC+1 sum parity (6) on emulated Pi 3s with WiFi stragglers, on MPI ranks and simulated.
#
#   bash jobs/fig5b.sh [--quick] [options]     here (--quick: ~1 min; full: ~14 min on 2 cores)
#   sbatch jobs/fig5b.sh [--quick]             on Slurm, from the repository root (mkdir -p results first)
#   bash jobs/fig5b.sh --help                  every option
#   sudo bash jobs/fig5b.sh --cluster [--rate 30mbit]   the same on clusters of network namespaces (root):
#                                              transfers cross real shaped links, compute emulated (~10 min, 40 requests)
#
# Writes CSV data, a PNG plot and summary.txt under results/fig5b/ (--out DIR elsewhere) and prints
# a one-paragraph summary with the headline numbers.  Under Slurm the allocation becomes the MPI
# hostfile; prepared shards go to results/weights/, which every node must see.
if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "$SLURM_SUBMIT_DIR/jobs/lib.sh" ]]; then
    source "$SLURM_SUBMIT_DIR/jobs/lib.sh"     # sbatch runs a copy of this script from a spool folder
else
    source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
fi
exec "$PY" -m mpicdc.experiments.fig5b "$@" "${HOSTFILE_ARGS[@]}"
