# Two commands do all the set-up on a fresh machine (root or not):
#   make demo   -- build the venv, then run the main job on the embedded default (VGG16)
#   make test   -- build the venv, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@# one rank per device: never bind ranks to cores, so a hostfile may list more slots than this
	@# machine has cores (Open MPI otherwise refuses `mpirun -hostfile hostfile -np 6` on 2 cores)
	@conf=$(VENV)/etc/prte-mca-params.conf; if [ -f $$conf ] && ! grep -q "^hwloc_default_binding_policy" $$conf; then \
		echo "hwloc_default_binding_policy = none" >> $$conf; fi
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m mpicdc.demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m mpicdc.bench kernels
	$(PY) -m mpicdc.bench codes
	$(PY) -m mpicdc.bench runtime
	$(PY) -m mpicdc.bench prepare

clean:
	rm -rf $(VENV) build *.egg-info

.PHONY: venv demo test bench clean
