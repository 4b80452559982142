# Two commands: `make demo` (the main job) and `make test` (the suite; .ci/run calls it).
# Everything installs into .venv; PyTorch is pinned to the 2.13.0 CPU build *before* the package,
# so no resolver ever pulls a multi-GB CUDA build onto a CPU machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STORE ?= results/results.sqlite
DEMO_FLAGS ?=

.PHONY: demo test install install-dev data clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed data

install-dev: $(VENV)/.installed-dev data

data:
	scripts/install-data.sh

# The main job: BadNets 10% on Fashion-MNIST, trained once without a defense and once with
# EigenGuard, then the table read back from the result store.
demo: install
	EIGENGUARD_STORE=$(STORE) $(BIN)/eigenguard run --defense none $(DEMO_FLAGS)
	EIGENGUARD_STORE=$(STORE) $(BIN)/eigenguard run --defense eigenguard $(DEMO_FLAGS)
	EIGENGUARD_STORE=$(STORE) $(BIN)/eigenguard report

test: install-dev
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
