"""``python -m mpicdc.launch``: the launcher (:mod:`mpicdc.runtime.launch`)."""
import sys

from mpicdc.runtime.launch import main

if __name__ == "__main__":
    sys.exit(main())
