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
	# `bash .ci/run` on a fresh clone, 2 cores (Intel Xeon), the machine otherwise idle, 2026-12-07: 31.9 and 32.9 min
	# with the install (tests 29.3 and 31.0; 891 of them; the second after the cuts of 70c5a48, so the spread is the
	# machine's). CI's own machine ran the 871 tests of 2026-12-06 in 25.4 min where this one took 29.2-30.3: it is
	# about 15% faster, so about 28 min there
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

lint: install
	$(VENV)/bin/ruff check .
