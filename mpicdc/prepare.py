"""``python -m mpicdc.prepare``: the shard preparation tool (:mod:`mpicdc.store.prepare_cli`)."""
import sys

from mpicdc.store.prepare_cli import main

if __name__ == "__main__":
    sys.exit(main())
