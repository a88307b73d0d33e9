#!/usr/bin/env bash
#SBATCH --job-name=mpicdc-recovery
#SBATCH --ntasks=6
#SBATCH --time=00:20:00
#SBATCH --output=results/%x-%j.out
# Recovery latency after a real SIGKILL: CDC+1 decodes around the dead rank; restart-based
# recovery detects, relaunches without it on a new plan, reloads shards and redoes the request.
#
#   bash jobs/recovery.sh [--quick] [options]     here (--quick: ~35 s; full: ~2 min on 2 cores)
#   sbatch jobs/recovery.sh [--quick]             on Slurm, from the repository root (mkdir -p results first)
#   bash jobs/recovery.sh --help                  every option
#   sudo bash jobs/recovery.sh --cluster [--model alexnet] [--rate 20mbit]   per fault kind on a cluster of
#                                                 network namespaces (root): in-job decoding vs supervisor relaunch (~3 min;
#                                                 --trials N, --plot PNG: the hit request per fault kind)
#
# Writes CSV data, a PNG plot and summary.txt under results/recovery/ (--out DIR elsewhere) and prints
# a one-paragraph summary with the headline numbers.  Under Slurm the allocation becomes the MPI
# hostfile; prepared shards go to results/weights/, which every node must see.
if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "$SLURM_SUBMIT_DIR/jobs/lib.sh" ]]; then
    source "$SLURM_SUBMIT_DIR/jobs/lib.sh"     # sbatch runs a copy of this script from a spool folder
else
    source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
fi
exec "$PY" -m mpicdc.experiments.recovery "$@" "${HOSTFILE_ARGS[@]}"
