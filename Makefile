# Every target installs what it needs: a fresh clone runs any of them with nothing done before.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: setup test demo serve worker lint bench clean reliability soak audit engines

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# One BLAS/OpenMP thread per process: the suite runs several processes (API, workers) on tiny tensors, where
# threads only contend.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VPY) -m pytest -q -m "not requires_gpu and not slow" $(PYTEST_ARGS)

worker: $(STAMP)
	$(VPY) -m worker

# Faults, fuzzing and the security review (docs/RELIABILITY.md); `make test` runs the same directory without the
# tests marked slow, this runs all of them.
reliability: $(STAMP)
	OMP_NUM_THREADS=1 $(VPY) -m pytest tests/reliability -q $(PYTEST_ARGS)

# Many small jobs through two workers with random faults (bounded: jobs, faults, deadline); prints the counts.
SOAK_ARGS ?= --jobs 40 --faults 12 --deadline 900 --seed 1
soak: $(STAMP)
	OMP_NUM_THREADS=1 $(VPY) scripts/soak.py $(SOAK_ARGS)

# Known vulnerabilities in the installed dependencies (needs the vulnerability database on the network).
audit: $(STAMP)
	$(VPY) -m pip_audit --skip-editable --progress-spinner off

demo: $(STAMP)
	$(VPY) scripts/demo.py

serve: $(STAMP)
	$(VPY) -m app.serve

lint: $(STAMP)
	$(VENV)/bin/ruff check mopeq_core mopeq_client app worker tests client

bench: $(STAMP)
	$(VPY) bench/bench_pipeline.py

# Opt-in, never part of `make test`: llama.cpp's tools (llama-quantize, llama-perplexity, llama-simple,
# llama-completion) built from the llama.cpp source in the llama-cpp-python sdist (PyPI) into .engines/ (~7 min on
# 2 cores); docs/BENCHMARKS.md uses them to run the --format gguf output.
engines: $(STAMP)
	PIP=$(VENV)/bin/pip ENGINES_DIR=.engines scripts/build_llama_cpp.sh

clean:
	rm -rf .mopeq out .pytest_cache
