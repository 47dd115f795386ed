# Two commands: `make study` (the main job) and `make test` (the whole suite).
# Both create .venv and install the project the first time.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# On a machine without CUDA, pin the CPU torch build that `pip install torch==2.13.0` finds here,
# so that no multi-GB CUDA build is ever pulled. With CUDA present the user's own torch is kept.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
CONSTRAINTS := $(if $(HAS_CUDA),,-c constraints-cpu.txt)
TORCH := $(if $(HAS_CUDA),,torch==2.13.0)

.PHONY: setup study test test-fast lint bench clean test-tools

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) $(TORCH) -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

study: $(STAMP)
	$(PY) -m study.launch --grid full $(ARGS)

# Headless Chromium (tests/test_report.py renders report.html and the MLflow UI), tmux (the same tests run a
# study in a real terminal) and mricron-data (Colin27, a real whole-head T1 for the registration tests):
# installed when missing and running as root.
test-tools:
	@(command -v chromium && command -v tmux && test -f /usr/share/mricron/templates/ch2.nii.gz) >/dev/null || [ "$$(id -u)" != 0 ] || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium tmux mricron-data) || true

# The whole suite on two pytest-xdist workers: the end-to-end group (tests marked slow: a real Ray, a launcher run)
# on one, one test after another, the rest on the other (tests/conftest.py). PYTEST_ARGS adds options, e.g.
# PYTEST_ARGS="-k report"; XDIST="-n 0" runs in one process.
XDIST ?= -n 2 --dist loadgroup
test: $(STAMP) test-tools
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

# The inner loop for contributors: everything but the end-to-end group.
test-fast: $(STAMP) test-tools
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m bench.run_cpu

clean:
	rm -rf $(VENV) .pytest_cache

# The documentation site (mkdocs.yml, docs/): `make docs` serves it on http://127.0.0.1:8000 and rebuilds on
# every change; `make docs-build` builds it strictly into out/site (what tests/test_docs.py checks in `make test`).
.PHONY: docs docs-build
DOCS_ENV := NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true

docs: $(STAMP)
	$(DOCS_ENV) $(VENV)/bin/mkdocs serve $(ARGS)

docs-build: $(STAMP)
	$(DOCS_ENV) $(VENV)/bin/mkdocs build --strict $(ARGS)
