VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench-quick clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# byte-compiled here on purpose: --no-compile saved 66 s of the install but cost 290 s of tests where
	# PYTHONDONTWRITEBYTECODE is set (every subprocess compiled torch from source again)
	$(PY) -m pip install --quiet -e ".[test,nnunet,onnx]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/nakt demo

# two pytest workers (pytest-xdist), a test file each at a time, so that one file's module fixtures are built once;
# one thread per worker: two workers with a thread per core each oversubscribe the cores, and OpenMP's spinning
# threads then made single tests up to 10x slower on 2 cores
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10

# the four segmentation benchmarks in quick mode (1 seed, small sizes): a few minutes each on 2 CPU cores
bench-quick: $(VENV)/.installed
	for d in cxr_lungs busi drive brats6; do \
		$(PY) benchmarks/segmentation_transfer.py --config configs/benchmarks/$$d.yaml --quick || exit 1; done

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check nakt tests benchmarks

clean:
	rm -rf $(VENV) demo_runs
