"""``python -m mpicdc.bench {kernels,codes,runtime,prepare} [options]``: run one benchmark."""
import importlib
import sys

SUITES = {
    "kernels": "batch-1 forward time of mpicdc's kernels against PyTorch on one thread",
    "codes": "decode error and decode time of every code against the layer's compute time",
    "runtime": "coded against uncoded MPI inference, and recovery latency after a SIGKILL",
    "prepare": "peak memory of the HDF5 weight preparation tool",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        print("usage: python -m mpicdc.bench SUITE [options]\n\nsuites:")
        for name, what in SUITES.items():
            print(f"  {name:<9} {what}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"mpicdc.bench.{argv[0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
