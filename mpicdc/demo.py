"""The README's main job: VGG16 on localhost through the hostfile, with a worker killed mid-request.

Runs ``mpirun --with-ft ulfm -hostfile hostfile python -m mpicdc.run vgg16`` with
three requests; worker 2 SIGKILLs itself during request 1 at layer conv3_1,
and every output is checked against the serial fault-free reference forward.
"""
import shlex
import sys
from pathlib import Path

from mpicdc.runtime.launch import mpirun_command, run

DEMO_ARGS = ["vgg16", "--repeat", "3", "--inject", "crash:2@1:conv3_1", "--check"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    hostfile = Path("hostfile")
    ranks = 6  # master + 4 workers + 1 sum-parity worker
    cmd = mpirun_command(ranks, DEMO_ARGS + list(argv), str(hostfile) if hostfile.exists() else None)
    # the repo's hostfile is this one machine: share its cores among the ranks
    print("$ " + shlex.join(cmd), flush=True)
    print("(first run: prepares VGG16's random-weight shards under weights/, about 0.7 GB)", flush=True)
    return run(cmd, ranks)


if __name__ == "__main__":
    sys.exit(main())
