# FeatAug — the two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.feataug-setup
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup demo demo-full demo-trees test test-slow test-cpu-variants bench bench-gpu wheelhouse lint clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt tools/install_detectron2.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" -c constraints.txt
	$(PIP) install -q -c constraints.txt -e ".[test]"
	$(PY) tools/install_detectron2.py
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/feataug env
	$(VENV)/bin/feataug demo --profile quick

demo-full: setup
	$(VENV)/bin/feataug env
	$(VENV)/bin/feataug demo --profile full

demo-trees: setup
	$(VENV)/bin/feataug env
	$(VENV)/bin/feataug demo --profile trees

test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# The fast suite again as on an AVX2 CPU without AVX-512 (README: "Other CPUs").
test-cpu-variants: setup
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
		$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PIP) install -q -c constraints.txt -e ".[bench]"
	$(VENV)/bin/feataug bench --out output/bench/bench.json $(BENCH_ARGS)

# One GPU, <= 8 min: MoCo v2 R50 end to end, CPU vs device augmentation, MFU, detection.
bench-gpu: setup
	$(VENV)/bin/feataug bench --gpu --out output/bench/bench-gpu.json $(BENCH_ARGS)

# Wheels for a machine without internet (README: "A machine without internet").
wheelhouse: setup
	$(PY) tools/wheelhouse.py --out wheelhouse $(WHEELHOUSE_ARGS)

lint: setup
	$(PIP) install -q ruff
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
