# The two commands of the README. Each works on a fresh machine with Python >= 3.11 and pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# `make test PYTEST_ARGS="-m 'not slow'"` skips the slow tests locally.
PYTEST_ARGS ?=

.PHONY: demo test lint bench bench-decode clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/train_lm.py

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -n 2 --dist worksteal $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_flash_cpu.py

# Prefill and decode tokens/s of a Llama-style model against transformers (~30 min on 2 quiet cores).
bench-decode: $(STAMP)
	$(PY) benchmarks/bench_decode.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
