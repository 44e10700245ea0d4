# Every target installs what it needs into .venv first.
# CI pins the CPU build of torch: `make test-all TORCH=torch==2.13.0`; users may leave it unpinned.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-all demo lint bench sweep clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,deepspeed]"
	touch $(STAMP)

install: $(STAMP)

# the fast tier (a few minutes on 2 cores): everything but the tests marked slow (end-to-end fits,
# kills and resumes, server processes, multi-process runs, flex compilations), on the same two
# workers as test-all
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

# every test: what CI runs. Two pytest workers (pytest-xdist), each given whole files (module fixtures
# made once; the one-node SLURM's tests are one file) and one torch thread: most slow tests wait on
# single-threaded child processes (imports, tiny fits), so two at a time use both cores.
test-all: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: $(STAMP)
	$(VENV)/bin/gist-lightning fit --config configs/tiny.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check gist_lightning tests experiments

bench: $(STAMP)
	$(PY) experiments/bench_caching.py
	$(PY) experiments/bench_train.py
	$(PY) experiments/bench_attention.py
	$(PY) experiments/bench_generate.py --shape tiny

# the default sweep on the embedded default: pos_control, neg_control, gist k in {1,2,5,10}, 3 seeds each
# (it resumes: finished runs are skipped)
sweep: $(STAMP)
	$(PY) experiments/sweep.py --config configs/tiny.yaml --out experiments/results/tiny-sweep --runs runs/sweep-tiny \
		--conditions pos_control neg_control gist --seeds 0 1 2

clean:
	rm -rf $(VENV) .cache runs
