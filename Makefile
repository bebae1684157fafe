# Every target installs what it needs: a fresh clone runs any of them with nothing done before.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: setup test demo serve worker lint bench clean

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

demo: $(STAMP)
	$(VPY) scripts/demo.py

serve: $(STAMP)
	$(VPY) -m app.serve

lint: $(STAMP)
	$(VENV)/bin/ruff check mopeq_core mopeq_client app worker tests

bench: $(STAMP)
	$(VPY) bench/bench_pipeline.py

clean:
	rm -rf .mopeq out .pytest_cache
