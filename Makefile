VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/nakt demo

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=10

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check nakt tests benchmarks

clean:
	rm -rf $(VENV) demo_runs
