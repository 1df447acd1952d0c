# Set-up is one command either way: `make run` installs everything and runs `lab`; `make test`
# installs everything and runs the tests. The install happens once (again when pyproject.toml
# changes) into .venv/; afterwards `. .venv/bin/activate` puts `lab` on the PATH.
#
#   make run ARGS="model=tiny train.lr=1e-3"    overrides for `lab`
#   make test ARGS="-k sweeps"                  arguments for pytest
#   make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"   a CUDA machine

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
INSTALLED := $(VENV)/.installed

.PHONY: install run test

install: $(INSTALLED)

# torch first, pinned: an unpinned torch (even through another package's range) pulls the CUDA build
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e ".[dev,bible]"
	touch $@

run: $(INSTALLED)
	$(VENV)/bin/lab $(ARGS)

test: $(INSTALLED)
	$(VENV)/bin/pytest $(ARGS)
