# Two entry points, each self-installing on a fresh machine:
#   make serve   - python -m ferrum_jax.serve on the embedded default (127.0.0.1:8000)
#   make test    - the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed-serve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[serve]"
	touch $@

$(VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[serve,test]"
	touch $@ $(VENV)/.installed-serve

.PHONY: serve test
serve: $(VENV)/.installed-serve
	$(PY) -m ferrum_jax.serve $(ARGS)

test: $(VENV)/.installed-test
	JAX_PLATFORMS=cpu $(PY) -m pytest -q $(PYTEST_ARGS)
