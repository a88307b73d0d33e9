# Sourced by every job script: find the package's Python and a hostfile, here or under Slurm.
# shellcheck shell=bash
set -euo pipefail
JOBS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$JOBS_DIR")"
cd "$REPO"
if [[ -n "${MPICDC_PYTHON:-}" ]]; then
    PY="$MPICDC_PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
    PY="$REPO/.venv/bin/python"
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
else
    make -s venv >/dev/null
    PY="$REPO/.venv/bin/python"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Under Slurm, turn the allocation into an Open MPI hostfile (one slot per task per node).
HOSTFILE_ARGS=()
if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    HOSTFILE="$REPO/results/hostfile.$SLURM_JOB_ID"
    mkdir -p "$REPO/results"
    # SLURM_TASKS_PER_NODE looks like "6" or "2(x3),1": expand it to one count per node
    counts=()
    IFS=, read -ra parts <<< "${SLURM_TASKS_PER_NODE:-1}"
    for part in "${parts[@]}"; do
        if [[ "$part" =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
            for ((i = 0; i < BASH_REMATCH[2]; i++)); do counts+=("${BASH_REMATCH[1]}"); done
        else
            counts+=("$part")
        fi
    done
    : > "$HOSTFILE"
    i=0
    while read -r host; do
        echo "$host slots=${counts[$i]:-${counts[-1]}}" >> "$HOSTFILE"
        i=$((i + 1))
    done < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    HOSTFILE_ARGS=(--hostfile "$HOSTFILE")
fi
export MPICDC_HOSTFILE="${HOSTFILE:-}"
