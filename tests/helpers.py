"""Builders the tests share: tiny tokenizers and random models, corpora, the inputs of a distill run, a
distilled student written the way `bltool distill` writes one (and compressed), vLLM's environment, the
CLI's refusal check, and independent rules for the ICL probes.

Fixtures stay in conftest.py; these are plain functions that test modules import (`from helpers import
...`), so no test module imports another.
"""

from __future__ import annotations

import calendar
import os
import random
import string
from pathlib import Path

import pytest
import torch

from bltool.adapt.adapters import adapter_section, save_adapted
from bltool.adapt.lora import LoRASpec, inject_lora
from bltool.artifacts import Stage, write_manifest
from bltool.eval.probes import vocabulary
from bltool.models.families import FAMILIES
from bltool.models.loading import load_model, load_tokenizer, resolve_model

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


# keyword arguments a family's tiny config needs beyond the common ones (by model type)
TINY_EXTRA = {
    "mistral": {"sliding_window": None},
    "qwen3": {"head_dim": 16},  # Qwen3 decouples the head width from hidden / heads (32 / 4 = 8)
}


def tiny_config(arch: str, vocab_size: int, layers: int, tied: bool):
    """A tiny config of any family of bltool/models/families.py (`arch` is its model type)."""
    import transformers

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
    if arch not in FAMILIES:
        raise ValueError(arch)
    return getattr(transformers, FAMILIES[arch].config_class)(**common, **TINY_EXTRA.get(arch, {}))


def save_tiny_model(path: Path, tokenizer, arch: str = "llama", layers: int = 12, tied: bool = True,
                    seed: int = 0) -> Path:
    """A random tiny causal LM saved as a Hugging Face checkpoint directory with its tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), layers, tied))
    with torch.no_grad():  # random, non-zero norms and biases so layer identity and biases matter in the outputs
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def distill_setting(root: Path, tokenizer) -> dict:
    """A 4-layer tiny teacher, its 2-layer mixed student, and data packed into 32-token sequences:
    {"teacher", "student", "data", "root"}, for distill runs."""
    from bltool.stages.build_student import BuildStudentConfig
    from bltool.stages.build_student import run as build_student
    from bltool.stages.prepare_data import PrepareDataConfig
    from bltool.stages.prepare_data import run as prepare_data

    teacher = save_tiny_model(root / "teacher", tokenizer, "llama", layers=4, tied=True, seed=3)
    corpus = write_corpus(root / "corpus", n_docs=80, seed=1)
    data = prepare_data(PrepareDataConfig(inputs=(str(corpus),), tokenizer=str(teacher), out=str(root / "data"),
                                          heldout=0.2, seq_len=32))
    student = build_student(BuildStudentConfig(teacher=str(teacher), out=str(root / "student"), layers=2))
    return {"teacher": teacher, "student": student, "data": data, "root": root}


def read_log(path: Path) -> list[dict]:
    """A distill output's per-step log (log.arrow) as rows."""
    import pyarrow as pa

    with pa.memory_map(str(path / "log.arrow")) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def write_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """A directory of text documents (with a nested folder), as prepare-data reads them."""
    rng = random.Random(seed)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        folder = root / "sub" if i % 3 == 0 else root
        (folder / f"doc{i:04d}.txt").write_text(make_text(rng, rng.randint(20, 200)), encoding="utf-8")
    return root


# ---------------------------------------------------------------------------------------------------
# A distilled student

IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])


def distilled_student(path, teacher, method="budgeted-lora", rhos=(0.0, 0.3, 1.0), gate_scale=3.0, seed=0,
                      compute=None, budget=None):
    """A distill-style artifact from a tiny model: random LoRA factors and gates, ρ cycling through
    `rhos` (budgeted-lora), written as `bltool distill` writes it. Returns (path, in-memory model)."""
    ref = resolve_model(str(teacher))
    model = load_model(ref)
    tokenizer = load_tokenizer(ref)
    path.mkdir(parents=True)
    compute = compute if compute is not None else {"proxy": 0.59, "realised": 0.61, "dense_macs_executed": 10,
                                                   "dense_macs_kd_full": 20}
    if method == "kd-full":
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        write_manifest(path, Stage.DISTILL, config={"method": method}, inputs=[], adapters=None, compute=compute)
        return path, model.eval()
    spec = LoRASpec(rank=4, alpha=8.0, dropout=0.0, gated=method == "budgeted-lora")
    adapted = inject_lora(model, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (_, m) in enumerate(adapted):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.2)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
            if m.gate_logits is not None:
                m.gate_logits.copy_(torch.randn(m.rank, generator=g) * gate_scale)
                m.set_rho(rhos[i % len(rhos)])
    save_adapted(path, model, tokenizer)
    sections = {"adapters": adapter_section(spec, adapted), "compute": compute}
    if method == "budgeted-lora":
        sections["budget"] = budget or {"budget": 0.4, "decay_start": 0.1, "decay_end": 0.3, "beta": 0.9,
                                        "tau_drop": 0.05}
    write_manifest(path, Stage.DISTILL, config={"method": method}, inputs=[], **sections)
    return path, model.eval()


# ---------------------------------------------------------------------------------------------------
# vLLM's environment (tests/test_vllm.py, tests/test_gpu.py)


def vllm_python() -> str:
    python = os.environ.get("BLTOOL_VLLM_PYTHON")
    if python and Path(python).exists():
        return python
    message = (f"BLTOOL_VLLM_PYTHON={python!r} is not a Python" if python else
               "BLTOOL_VLLM_PYTHON is not set (make vllm-install builds .venv-vllm)")
    if os.environ.get("BLTOOL_REQUIRE_VLLM") == "1":
        pytest.fail(f"BLTOOL_REQUIRE_VLLM=1 but {message}")
    pytest.skip(message)


def vllm_teacher(path: Path, tokenizer, arch: str) -> Path:
    """A random tiny model vLLM's CPU attention accepts (head size 32: it supports 32, 64, 80, ...)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, len(tokenizer), layers=4, tied=arch == "llama")
    config.hidden_size, config.intermediate_size, config.head_dim = 128, 256, 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def compressed_student(root: Path, teacher: Path, method: str, name: str, rhos=(0.0, 0.1, 1.0)) -> Path:
    """`distilled_student(teacher)` compressed by `bltool compress` into root/name."""
    from typer.testing import CliRunner

    from bltool.cli import app

    source, _ = distilled_student(root / f"{name}-distilled", teacher, method=method, rhos=rhos)
    result = CliRunner().invoke(app, ["compress", str(source), "--out", str(root / name)])
    assert result.exit_code == 0, result.output
    return root / name


# ---------------------------------------------------------------------------------------------------
# Independent rules: input → the one right output (written without the generators' code).

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
ROMAN = "i ii iii iv v vi vii viii ix x xi xii xiii xiv xv xvi xvii xviii xix xx".split()


def _series() -> list[tuple[list[str], bool]]:
    lower = list(string.ascii_lowercase)
    days = [calendar.day_name[i] for i in range(7)]  # C locale: Monday … Sunday
    months = [calendar.month_name[i] for i in range(1, 13)]
    plain = [NUMBER_WORDS, [str(i) for i in range(30)], lower, [c.upper() for c in lower],
             [c + c for c in lower], [(c + c).upper() for c in lower], ROMAN, [r.upper() for r in ROMAN]]
    cyclic = [days, [d.lower() for d in days], months, [m.lower() for m in months]]
    return [(s, False) for s in plain] + [(s, True) for s in cyclic]


def _neighbours(step: int) -> dict[str, set[str]]:
    table: dict[str, set[str]] = {}
    for series, cyclic in _series():
        for i, item in enumerate(series):
            j = i + step
            if cyclic:
                j %= len(series)
            if 0 <= j < len(series):
                table.setdefault(item, set()).add(series[j])
    return table


NEXT, PREV = _neighbours(+1), _neighbours(-1)


def _unique(table: dict[str, set[str]], x: str) -> str:
    (answer,) = table[x]  # a query must have exactly one right answer
    return answer


def _words(x: str, k: int) -> list[str]:
    words = x.split(", ")
    assert len(words) == k and len(set(words)) == k, x
    assert all(w in VOCAB for w in words), x
    return words


VOCAB = set(vocabulary())
RULES = {
    **{f"choose_first_of_{k}": (lambda x, k=k: _words(x, k)[0]) for k in (3, 5)},
    **{f"choose_middle_of_{k}": (lambda x, k=k: _words(x, k)[(k - 1) // 2]) for k in (3, 5)},
    **{f"choose_last_of_{k}": (lambda x, k=k: _words(x, k)[k - 1]) for k in (3, 5)},
    **{f"alphabetically_first_{k}": (lambda x, k=k: sorted(_words(x, k))[0]) for k in (3, 5)},
    **{f"alphabetically_last_{k}": (lambda x, k=k: sorted(_words(x, k))[-1]) for k in (3, 5)},
    "capitalize": lambda x: x.capitalize() if x.islower() else None,
    "capitalize_first_letter": lambda x: x[:1].upper() if x.islower() else None,
    "capitalize_last_letter": lambda x: x[-1:].upper() if x.islower() else None,
    "next_capital_letter": lambda x: string.ascii_uppercase[(string.ascii_lowercase.index(x[0]) + 1) % 26]
    if x.islower() else None,
    "lowercase_first_letter": lambda x: x[:1].lower() if x.isupper() and x.lower() in VOCAB else None,
    "lowercase_last_letter": lambda x: x[-1:].lower() if x.isupper() and x.lower() in VOCAB else None,
    "next_item": lambda x: _unique(NEXT, x),
    "prev_item": lambda x: _unique(PREV, x),
    "word_length": lambda x: str(sum(c.isalpha() for c in x)) if x.isalpha() else None,
}


def rule_answer(name: str, x: str) -> str | None:
    """What the independent rule says; None where the input does not fit the task at all."""
    try:
        return RULES[name](x)
    except (AssertionError, ValueError, KeyError, IndexError):
        return None


def chat_tokenizer(vocab_size: int = 300):
    """A byte-level BPE fast tokenizer laid out like an instruct model's (SmolLM2-Instruct): its EOS is the
    chat turn end `<|im_end|>`, and its vocabulary also has the pretraining separator `<|endoftext|>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([make_text(rng, 30) for _ in range(200)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")
