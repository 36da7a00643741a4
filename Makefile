# Each target first installs what it needs into a local virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# setuptools reports every editable install with a multi-line "Editable installation" notice
# (information, not a warning); keep pip's -q output to real warnings and errors.
PIP_INSTALL := PYTHONWARNINGS="ignore:Editable installation:UserWarning" $(PY) -m pip install -q
RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test
# Test files run in parallel processes (pytest-xdist), one file per worker at a time so a
# module's fixtures are built once; most tests compile or run XLA on one core.
TEST_WORKERS ?= 2

.PHONY: demo test lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The demo needs only the runtime dependencies (no torch).
$(RUNTIME): setup.py | $(VENV)/bin/python
	$(PIP_INSTALL) -e .
	touch $@

# Tests add pytest, ruff, nbclient and the CPU build of torch (HF parity references).
$(TESTDEPS): setup.py | $(VENV)/bin/python
	$(PIP_INSTALL) -e '.[test]'
	touch $(RUNTIME) $@

demo: $(RUNTIME)
	rm -rf results/demo
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) experiments/estimate.py --out=results/demo

test: $(TESTDEPS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(TESTDEPS)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) results
