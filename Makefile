# Two commands: `make lab` (read the notebooks) and `make test` (run every test and notebook).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-requirements

.PHONY: lab test test-portable notebooks notebooks-refresh lint

# Set-up: create .venv on first use; redo it only when requirements.txt or pyproject.toml change.
# pip byte-compiles one file at a time; compileall -j 0 does the same files on every core
# (a fresh set-up took 111-132 s instead of 126-161 s on 2 cores). The .pyc files are needed:
# where PYTHONDONTWRITEBYTECODE is set, nothing writes them later and every process recompiles.
# Like pip, it skips the few files that are not Python 3.11 (torch ships a 3.12-only test file),
# hence `|| true`.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -r requirements.txt
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# As root (containers, CI machines) Jupyter refuses to start unless told --allow-root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(ROOT_FLAG)

# Notebooks and package tests run one torch thread each (tests/conftest.py), so two pytest
# workers (one file each at a time, slowest first: conftest.py) use both cores.
test: $(STAMP)
	$(VENV)/bin/pytest -n 2 --dist loadfile

# Re-run every notebook under emulated machines (other ATen CPU capabilities, MKL paths):
# stored outputs and figures must not depend on the CPU that wrote them. PORTABLE_MACHINES
# (newline-separated env assignments) overrides the list; see scripts/test_portable.sh.
test-portable: $(STAMP)
	scripts/test_portable.sh

# Re-execute every notebook in place (stored outputs and figures/). Cells marked
# NBVAL_IGNORE_OUTPUT (timings, versions) keep their stored output while their source is
# unchanged, so two runs in a row leave git clean; `make notebooks-refresh` re-measures them too.
notebooks: $(STAMP)
	$(PY) scripts/run_notebooks.py notebooks/*.ipynb

notebooks-refresh: $(STAMP)
	$(PY) scripts/run_notebooks.py --refresh-volatile notebooks/*.ipynb

lint: $(STAMP)
	$(VENV)/bin/ruff check dsv3_lab tests scripts conftest.py
