"""``python -m mpicdc.bench SUITE [options]``: run one benchmark (``--help`` lists them)."""
import importlib
import sys

SUITES = {
    "kernels": "batch-1 forward time of mpicdc's kernels against PyTorch on one thread",
    "codes": "decode error and decode time of every code against the layer's compute time",
    "runtime": "coded against uncoded MPI inference, and recovery latency after a SIGKILL",
    "prepare": "peak memory of the HDF5 weight preparation tool",
    "plan": "time to plan, print and assign blocks for up to 100,000 devices",
    "speedup": "latency of a Pi cluster against one Pi, per plan and link rate (simulator; --ranks: on ranks; "
               "--cluster: measured on the namespace cluster)",
    "integrity": "false alarms and detection of wrong replies checked against the code (no MPI)",
    "strict": "latency cost of --integrity strict against off and opportunistic on real ranks (MPI)",
    "healing": "time from a worker's loss to full tolerance with a spare rank, latency meanwhile (MPI)",
    "wire": "float16/bfloat16 wire formats: bytes per request, output error, top-1 agreement, modeled speedup",
    "cluster": "per fault kind on a namespace cluster (root): requests lost, detection, hit latency, relaunch delay",
}

USAGE = "usage: python -m mpicdc.bench SUITE [options]   (python -m mpicdc.bench SUITE --help for its options)"

EXAMPLES = """\
examples:
  python -m mpicdc.bench kernels --models alexnet vgg16   # our kernels against PyTorch, one thread
  python -m mpicdc.bench codes --quick                    # decode error and time of every code
  python -m mpicdc.bench runtime --model tiny             # coded vs uncoded, recovery after a SIGKILL (MPI)
  python -m mpicdc.bench prepare --check                  # exit 1 if preparing VGG16 peaks over budget
  python -m mpicdc.bench plan --workers 10000             # planning 10,000 devices
  python -m mpicdc.bench speedup --plot docs/img/speedup.png  # cluster vs one Pi, 100 and 20 Mbit/s
  python -m mpicdc.bench integrity                        # false alarms, detection, MDS correction
  python -m mpicdc.bench strict --model tiny              # what strict integrity costs on real ranks (MPI)
  python -m mpicdc.bench healing                          # loss -> full tolerance with a spare (MPI)
  python -m mpicdc.bench wire --models alexnet            # half the bytes: error, top-1, modeled speedup
  sudo python -m mpicdc.bench cluster --model alexnet     # every device fault on a namespace cluster (root)
  make bench                                              # the usual suites, one after the other"""


def _help() -> str:
    lines = [USAGE, "", "Benchmarks of mpicdc; each prints a table.", "", "suites:"]
    lines += [f"  {name:<9} {what}" for name, what in SUITES.items()]
    return "\n".join(lines + ["", EXAMPLES])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(_help())
        return 0
    if not argv or argv[0] not in SUITES:
        print(_help(), file=sys.stderr)
        print("\npython -m mpicdc.bench: error: " + (f"unknown suite {argv[0]!r}" if argv else "name a suite"),
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"mpicdc.bench.{argv[0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
