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
