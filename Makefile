# The two commands in the README: `make demo` and `make test` (each installs into .venv first, once).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: PyPI's torchvision does not import beside other torch builds, and timm needs it
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dit demo

test: install
	$(VENV)/bin/ruff check .
	# two workers, one test file each at a time (module fixtures built once), one OpenMP thread each (tests/conftest.py).
	# `bash .ci/run` on a fresh clone, 2 cores (Intel Xeon), the machine otherwise idle, 2026-12-07: 23.9 min with the
	# install (947 tests in 22.2 min); the same tree's suite varied 1389-1648 s between two runs here.
	# Stop 33's CI took 32.5 min, stop 36's 29.3 (BENCHMARKS.md: the suite's wall time)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

lint: install
	$(VENV)/bin/ruff check .
