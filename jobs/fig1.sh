#!/usr/bin/env bash
#SBATCH --job-name=mpicdc-fig1
#SBATCH --ntasks=4
#SBATCH --time=00:20:00
#SBATCH --output=results/%x-%j.out
# Fig. 1: histogram of reply arrival times, FC layer of size 2048 on a master + 3 workers (emulated Pi 3s)
# under the paper's WiFi straggler model; measured on MPI ranks and simulated.
#
#   bash jobs/fig1.sh [--quick] [options]     here (--quick: ~20 s; full: ~4 min on 2 cores)
#   sbatch jobs/fig1.sh [--quick]             on Slurm, from the repository root (mkdir -p results first)
#   bash jobs/fig1.sh --help                  every option
#   sudo bash jobs/fig1.sh --cluster [--rate 30mbit]   the same on a cluster of network namespaces (root):
#                                             replies cross real shaped links, compute emulated (~1 min)
#
# Writes CSV data, a PNG plot and summary.txt under results/fig1/ (--out DIR elsewhere) and prints
# a one-paragraph summary with the headline numbers.  Under Slurm the allocation becomes the MPI
# hostfile; prepared shards go to results/weights/, which every node must see.
if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "$SLURM_SUBMIT_DIR/jobs/lib.sh" ]]; then
    source "$SLURM_SUBMIT_DIR/jobs/lib.sh"     # sbatch runs a copy of this script from a spool folder
else
    source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
fi
exec "$PY" -m mpicdc.experiments.fig1 "$@" "${HOSTFILE_ARGS[@]}"
