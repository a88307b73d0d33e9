"""``python -m mpicdc.sim``: see :func:`mpicdc.sim.engine.main`."""
import sys

from mpicdc.sim.engine import main

sys.exit(main())
