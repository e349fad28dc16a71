"""eval-ppl (docs/method.md §6): perplexity and bits-per-byte against an independent computation, the token
budget, batching and chunking invariance, the files written, and refused inputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_refused, write_corpus
from typer.testing import CliRunner

from bltool.artifacts import read_manifest, write_manifest
from bltool.cli import app
from bltool.data.prepared import split_schema
from bltool.errors import UsageError
from bltool.eval.nll import token_nll
from bltool.models.loading import tokenizer_identity
from bltool.stages.eval_ppl import EvalPplConfig, run

SEQ_LEN = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_llama) -> Path:
    """One prepare-data artifact for the module (held-out 30 %, windows of 64)."""
    from bltool.stages.prepare_data import PrepareDataConfig
    from bltool.stages.prepare_data import run as prepare

    root = tmp_path_factory.mktemp("eval-data")
    corpus = write_corpus(root / "corpus")
    return prepare(PrepareDataConfig(inputs=(str(corpus),), tokenizer=str(tiny_llama), out=str(root / "data"),
                                     heldout=0.3, seq_len=SEQ_LEN))


@pytest.fixture(scope="module")
def heldout_windows(data) -> list[tuple[list[int], list[int]]]:
    """(input_ids, token_bytes) of every held-out row, read with pyarrow directly."""
    with pa.memory_map(str(data / "heldout.arrow")) as source:
        table = pa.ipc.open_stream(source).read_all()
    rows = list(zip(table.column("input_ids").to_pylist(), table.column("token_bytes").to_pylist()))
    assert len(rows) >= 10
    assert all(len(ids) == SEQ_LEN for ids, _ in rows[:-1])
    assert 2 <= len(rows[-1][0]) < SEQ_LEN  # a short last window exercises padding
    assert all(len(ids) == len(nbytes) for ids, nbytes in rows)
    return rows


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def budgeted(rows, max_tokens: int):
    """The protocol written out independently: windows in file order, the last cut to the budget."""
    out, left = [], max_tokens
    for ids, nbytes in rows:
        take = min(len(ids), left)
        if take < 2:  # a window of one token scores nothing
            break
        out.append((ids[:take], nbytes[:take]))
        left -= take
    return out


def reference(model, windows) -> dict:
    """Σ NLL from plain full-vocabulary logits, one unpadded window at a time."""
    nll_sum, scored, scored_bytes = 0.0, 0, 0
    with torch.no_grad():
        for ids, nbytes in windows:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
            nll_sum += float(-logp.gather(1, x[0, 1:, None]).sum())
            scored += len(ids) - 1
            scored_bytes += sum(nbytes[1:])
    return {"nll_sum": nll_sum, "scored": scored, "bytes": scored_bytes, "windows": len(windows),
            "tokens": sum(len(ids) for ids, _ in windows)}


def evaluate(tiny_llama, data, out: Path, **kwargs) -> dict:
    config = EvalPplConfig(model=str(tiny_llama), data=str(data), out=str(out), device="cpu", **kwargs)
    assert run(config) == out
    return json.loads((out / "result.json").read_text())


def test_perplexity_and_bits_per_byte_match_hand_computation(tiny_llama, data, heldout_windows, model, tmp_path):
    result = evaluate(tiny_llama, data, tmp_path / "ppl")
    ref = reference(model, heldout_windows)
    mean = ref["nll_sum"] / ref["scored"]
    assert result["perplexity"] == pytest.approx(math.exp(mean), rel=1e-5)
    assert result["mean_nll"] == pytest.approx(mean, rel=1e-5)
    assert result["nll_sum"] == pytest.approx(ref["nll_sum"], rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(ref["nll_sum"] / (math.log(2) * ref["bytes"]), rel=1e-5)
    # a random model over a 300-token vocabulary is close to uniform
    assert 150 < result["perplexity"] < 600
    protocol = result["protocol"]
    assert protocol["split"] == "heldout" and protocol["seq_len"] == SEQ_LEN
    assert protocol["windows"] == len(heldout_windows)
    assert protocol["tokens_in_windows"] == sum(len(ids) for ids, _ in heldout_windows)
    assert protocol["tokens_scored"] == protocol["tokens_in_windows"] - len(heldout_windows) == ref["scored"]
    assert protocol["bytes_scored"] == ref["bytes"]
    # the bytes are those of the scored tokens: all bytes minus each window's first token
    all_bytes = sum(sum(nbytes) for _, nbytes in heldout_windows)
    assert protocol["bytes_scored"] == all_bytes - sum(nbytes[0] for _, nbytes in heldout_windows)
    assert protocol["bytes_scored"] < all_bytes
    assert result["dtype"] == "float32" and result["device"] == "cpu"


@pytest.mark.parametrize("max_tokens", [150, 2 * SEQ_LEN, 3 * SEQ_LEN + 1, 2, 5 * SEQ_LEN - 7])
def test_token_budget(tiny_llama, data, heldout_windows, model, tmp_path, max_tokens):
    result = evaluate(tiny_llama, data, tmp_path / "ppl", max_tokens=max_tokens, batch_size=4)
    protocol = result["protocol"]
    windows = budgeted(heldout_windows, max_tokens)
    assert protocol["tokens_in_windows"] <= max_tokens
    assert protocol["max_tokens"] == max_tokens
    assert protocol["windows"] == len(windows) == math.ceil(protocol["tokens_in_windows"] / SEQ_LEN)
    assert protocol["tokens_in_windows"] == sum(len(ids) for ids, _ in windows)
    if max_tokens % SEQ_LEN >= 2:  # the last window is cut to what is left of the budget
        assert protocol["tokens_in_windows"] == max_tokens
        assert len(windows[-1][0]) == max_tokens % SEQ_LEN
    assert protocol["tokens_scored"] == protocol["tokens_in_windows"] - protocol["windows"]
    ref = reference(model, windows)
    assert result["nll_sum"] == pytest.approx(ref["nll_sum"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(ref["nll_sum"] / ref["scored"]), rel=1e-5)
    assert protocol["bytes_scored"] == ref["bytes"]


def test_budget_cut_concrete(tiny_llama, data, tmp_path):
    """150 tokens of windows of 64: 64 + 64 + 22, scoring 147."""
    protocol = evaluate(tiny_llama, data, tmp_path / "ppl", max_tokens=150)["protocol"]
    assert (protocol["windows"], protocol["tokens_in_windows"], protocol["tokens_scored"]) == (3, 150, 147)


def test_budget_beyond_the_split_is_capped(tiny_llama, data, heldout_windows, tmp_path):
    total = sum(len(ids) for ids, _ in heldout_windows)
    protocol = evaluate(tiny_llama, data, tmp_path / "ppl", max_tokens=total + 1000)["protocol"]
    assert protocol["tokens_in_windows"] == total and protocol["windows"] == len(heldout_windows)


@pytest.mark.parametrize("max_tokens", [150, 10_000_000])
def test_batch_size_does_not_change_the_result(tiny_llama, data, tmp_path, max_tokens):
    # with 150 tokens the windows 64, 64, 22 share one padded batch of 4; with the whole split the
    # last batch holds the short final window
    one = evaluate(tiny_llama, data, tmp_path / "b1", batch_size=1, max_tokens=max_tokens)
    four = evaluate(tiny_llama, data, tmp_path / "b4", batch_size=4, max_tokens=max_tokens)
    seven = evaluate(tiny_llama, data, tmp_path / "b7", batch_size=7, max_tokens=max_tokens)
    for other in (four, seven):
        assert other["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-6)
        assert other["perplexity"] == pytest.approx(one["perplexity"], rel=1e-6)
        assert other["bits_per_byte"] == pytest.approx(one["bits_per_byte"], rel=1e-6)
        assert other["protocol"] == one["protocol"]


def test_chunk_size_does_not_change_the_result(tiny_llama, data, tmp_path):
    results = [evaluate(tiny_llama, data, tmp_path / f"c{chunk}", chunk=chunk, max_tokens=1000)
               for chunk in (1, 5, 63, 256)]
    for other in results[1:]:
        assert other["nll_sum"] == pytest.approx(results[0]["nll_sum"], rel=1e-6)
        assert other["protocol"] == results[0]["protocol"]


# ---------------------------------------------------------------------------------------------------
# token_nll on hand-set inputs


class _OneHotDecoder(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask, use_cache):
        assert use_cache is False
        return SimpleNamespace(last_hidden_state=F.one_hot(input_ids, self.vocab).float())


class BigramLM(torch.nn.Module):
    """hidden = one-hot(token); LM head column a = log p(· | a), so NLL(b after a) = -log p(b | a)."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        vocab = probs.shape[0]
        self.decoder = _OneHotDecoder(vocab)
        self.head = torch.nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(probs.log().T)

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


BIGRAM = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]])


@pytest.mark.parametrize("chunk", [1, 2, 3, 256])
def test_token_nll_hand_set(chunk):
    lm = BigramLM(BIGRAM)
    ids = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0], [1, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    nll = token_nll(lm, ids, mask, chunk=chunk)
    expected = torch.tensor([
        [-math.log(0.25), -math.log(0.7), math.log(3)],  # 0→1, 1→2, 2→0
        [math.log(3), math.log(3), 0.0],  # 2→2, 2→1, padding
        [-math.log(0.1), 0.0, 0.0],  # 1→0, padding, padding
    ])
    assert nll.dtype == torch.float32 and nll.shape == (3, 3)
    torch.testing.assert_close(nll, expected, rtol=1e-6, atol=1e-6)


def test_token_nll_matches_full_logits_on_a_real_model(model):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, model.config.vocab_size, (2, 20), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    with torch.no_grad():
        logits = model(ids[:1]).logits[0, :-1]
        short = model(ids[1:, :13]).logits[0, :-1]
    nll = token_nll(model, ids, mask, chunk=7)
    torch.testing.assert_close(nll[0], F.cross_entropy(logits, ids[0, 1:], reduction="none"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll[1, :12], F.cross_entropy(short, ids[1, 1:13], reduction="none"),
                               rtol=1e-5, atol=1e-5)
    assert torch.all(nll[1, 12:] == 0)


# ---------------------------------------------------------------------------------------------------
# What is written


def test_outputs_written(tiny_llama, data, tmp_path):
    out = tmp_path / "ppl"
    result = evaluate(tiny_llama, data, out, max_tokens=300)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "result.arrow", "result.json", "windows.arrow"]
    with pa.OSFile(str(out / "result.arrow"), "rb") as source:
        table = pa.ipc.open_stream(source).read_all()
    assert table.num_rows == 1
    row = table.to_pylist()[0]
    for key in ("perplexity", "bits_per_byte", "mean_nll", "nll_sum", "model", "device", "dtype"):
        assert row[key] == result[key], key
    assert row["protocol_tokens_scored"] == result["protocol"]["tokens_scored"]
    assert row["protocol_max_tokens"] == 300
    manifest = read_manifest(out, ("eval-ppl",))
    assert manifest["result"]["perplexity"] == result["perplexity"]
    roles = {entry["role"]: entry for entry in manifest["inputs"]}
    assert roles["model"]["path"] == str(tiny_llama)
    assert roles["data"]["hash"] == read_manifest(data, ("prepare-data",))["hash"]
    assert manifest["config"]["max_tokens"] == 300 and manifest["config"]["out"] == str(out)
    assert set(manifest["files"]) == {"result.arrow", "result.json", "windows.arrow"}
    assert manifest["result"]["perplexity_se"] == result["perplexity_se"] > 0


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_cli_default_output_is_ppl_label(tiny_llama, prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in prepared.iterdir())
    result = invoke("eval-ppl", str(tiny_llama), "--data", str(prepared), "--max-tokens", "200", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    expected = Path("ppl") / tiny_llama.name  # outside --data: an output never lies inside an input
    assert result.stdout == f"{expected}\n"
    assert sorted(p.name for p in prepared.iterdir()) == before
    assert (expected / "result.json").is_file()
    assert "perplexity" in result.stderr
    # the data artifact itself still checks out
    read_manifest(prepared, ("prepare-data",))
    # a second run refuses to replace it
    again = invoke("eval-ppl", str(tiny_llama), "--data", str(prepared), "--max-tokens", "200")
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_cli_refuses_model_with_another_tokenizer(other_model, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out, ppl/<model name>, is relative
    result = invoke("eval-ppl", str(other_model), "--data", str(data))
    assert_refused(result, "--data", "tokenizer", "prepare-data")
    assert not (tmp_path / "ppl").exists() and not (data / "ppl").exists()
    assert not [p for p in data.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--max-tokens", "1"], ["--max-tokens"]),
        (["--max-tokens", "0"], ["--max-tokens"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--dtype", "float64"], ["--dtype", "float64"]),
        (["--chunk", "0"], ["--chunk"]),
        (["--device", "tpu"], ["--device", "tpu"]),
    ],
)
def test_cli_bad_options(tiny_llama, data, tmp_path, args, needles):
    out = tmp_path / "runs" / "ppl"
    assert_refused(invoke("eval-ppl", str(tiny_llama), "--data", str(data), "--out", str(out), *args), *needles)
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_cuda_without_cuda(tiny_llama, data, tmp_path):
    out = tmp_path / "ppl"
    result = invoke("eval-ppl", str(tiny_llama), "--data", str(data), "--out", str(out), "--device", "cuda")
    assert_refused(result, "--device", "CUDA")
    assert not out.exists()


def test_cli_data_that_is_not_prepare_data(tiny_llama, data, tmp_path):
    # a model directory (no manifest)
    result = invoke("eval-ppl", str(tiny_llama), "--data", str(tiny_llama), "--out", str(tmp_path / "a"))
    assert_refused(result, "--data", "manifest.json", "prepare-data")
    # another stage's artifact
    evaluate(tiny_llama, data, tmp_path / "ppl", max_tokens=100)
    result = invoke("eval-ppl", str(tiny_llama), "--data", str(tmp_path / "ppl"), "--out", str(tmp_path / "b"))
    assert_refused(result, "--data", "eval-ppl", "prepare-data")
    # a path that does not exist
    result = invoke("eval-ppl", str(tiny_llama), "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "c"))
    assert_refused(result, "--data", "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ppl"]


def test_cli_truncated_heldout_split(tiny_llama, data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    heldout = copy / "heldout.arrow"
    with open(heldout, "r+b") as handle:
        handle.truncate(heldout.stat().st_size // 2)
    result = invoke("eval-ppl", str(tiny_llama), "--data", str(copy), "--out", str(tmp_path / "ppl"))
    assert_refused(result, "--data", "heldout.arrow")
    assert not (tmp_path / "ppl").exists()


def test_config_validation():
    for kwargs, flag in (({"max_tokens": 1}, "--max-tokens"), ({"batch_size": 0}, "--batch-size"),
                         ({"dtype": "float64"}, "--dtype"), ({"chunk": 0}, "--chunk")):
        with pytest.raises(UsageError, match=flag):
            EvalPplConfig(model="m", data="d", **kwargs)


# ---------------------------------------------------------------------------------------------------
# Hand-made prepare-data artifacts: exact byte counts and edge cases


def hand_made_data(path: Path, tokenizer, heldout: list[tuple[list[int], list[int]]], seq_len: int = 8,
                   documents: int | None = None) -> Path:
    """A prepare-data artifact written directly: the given held-out rows, one train row (and, given
    `documents`, the count of held-out documents a real manifest records)."""
    path.mkdir(parents=True)
    for split, rows in (("train", [([1, 2, 3], None)]), ("heldout", heldout)):
        schema = split_schema(with_bytes=split == "heldout")
        columns = [pa.array([ids for ids, _ in rows], pa.list_(pa.int32()))]
        if split == "heldout":
            columns.append(pa.array([nbytes for _, nbytes in rows], pa.list_(pa.int32())))
        with pa.OSFile(str(path / f"{split}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
    splits = {"splits": {"heldout": {"documents": documents}}} if documents is not None else {}
    write_manifest(path, "prepare-data", config={"seq_len": seq_len}, inputs=[],
                   tokenizer=tokenizer_identity(tokenizer), **splits)
    return path


def test_exact_bytes_on_hand_made_data(tiny_llama, tokenizer, model, tmp_path):
    rows = [([5, 7, 9, 0, 11, 12, 13, 14], [1, 2, 3, 0, 4, 1, 1, 1]), ([20, 21, 0], [6, 5, 0])]
    data = hand_made_data(tmp_path / "data", tokenizer, rows)
    result = evaluate(tiny_llama, data, tmp_path / "ppl", batch_size=2)
    ref = reference(model, rows)
    assert result["protocol"]["bytes_scored"] == (2 + 3 + 0 + 4 + 1 + 1 + 1) + (5 + 0) == 17
    assert result["protocol"]["tokens_scored"] == 7 + 2
    assert result["bits_per_byte"] == pytest.approx(ref["nll_sum"] / (math.log(2) * 17), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(ref["nll_sum"] / 9), rel=1e-5)


def test_no_scored_bytes_still_succeeds(tiny_llama, tokenizer, model, tmp_path):
    """Only an EOS (0 bytes) is scored: bits-per-byte is undefined (null), the run still succeeds."""
    data = hand_made_data(tmp_path / "data", tokenizer, [([5, 0], [1, 0])])
    out = tmp_path / "ppl"
    result = CliRunner().invoke(app, ["eval-ppl", str(tiny_llama), "--data", str(data), "--device", "cpu",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    saved = json.loads((out / "result.json").read_text())
    assert saved["bits_per_byte"] is None
    with torch.no_grad():
        nll = -torch.log_softmax(model(torch.tensor([[5, 0]])).logits[0, 0].double(), -1)[0]
    assert saved["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_nothing_to_score_is_refused(tiny_llama, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out, ppl/<model name>, is relative
    data = hand_made_data(tmp_path / "data", tokenizer, [([5], [1])])
    result = invoke("eval-ppl", str(tiny_llama), "--data", str(data), "--device", "cpu")
    # found only after the (empty) evaluation, so the progress line precedes the error
    assert result.exit_code == 2 and result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --data") and "no held-out tokens" in last
    assert not (tmp_path / "ppl").exists()


# ---------------------------------------------------------------------------------------------------
# Per-window and per-document NLL sums, and the standard error of the perplexity


def reference_tokens(model, windows) -> list[list[float]]:
    """Per window, the NLL of each scored token from plain full-vocabulary logits."""
    out = []
    with torch.no_grad():
        for ids, _ in windows:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
            out.append([float(v) for v in -logp.gather(1, x[0, 1:, None])[:, 0]])
    return out


def hand_se(sums: list[float], tokens: list[int]) -> float:
    """The delta method's SE of Σ sums / Σ tokens over k units, written out."""
    k, mean = len(sums), sum(sums) / sum(tokens)
    return math.sqrt(k / (k - 1) * sum((s - mean * n) ** 2 for s, n in zip(sums, tokens))) / sum(tokens)


def read_windows(out: Path) -> list[dict]:
    with pa.memory_map(str(out / "windows.arrow")) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


@pytest.mark.parametrize("max_tokens", [10_000_000, 20 * SEQ_LEN - 7])  # 17 documents; 5, the last cut
def test_windows_arrow_holds_each_documents_nll_and_the_se_is_over_documents(
        tiny_llama, data, heldout_windows, model, tmp_path, max_tokens):
    """Every scored token is given, independently here, to the document it belongs to (the separator to the
    one it ends; a document may straddle windows); windows.arrow holds those sums per (window, document),
    and perplexity_se is the delta method's over the documents, checked against the formula by hand."""
    out = tmp_path / "ppl"
    result = evaluate(tiny_llama, data, out, max_tokens=max_tokens, batch_size=3)
    windows = budgeted(heldout_windows, max_tokens)
    sep = read_manifest(data, ("prepare-data",))["doc_sep"]["id"]
    expected: dict[tuple[int, int], list[float]] = {}
    document = 0
    for w, ((ids, nbytes), nlls) in enumerate(zip(windows, reference_tokens(model, windows))):
        for t in range(len(ids)):
            if t > 0:
                entry = expected.setdefault((w, document), [0, 0, 0.0])
                entry[0] += 1
                entry[1] += nbytes[t]
                entry[2] += nlls[t - 1]
            document += ids[t] == sep
    rows = read_windows(out)
    assert [(r["window"], r["document"]) for r in rows] == list(expected)
    assert any(sum(r["document"] == d for r in rows) > 1 for d in {r["document"] for r in rows})  # straddles
    for r in rows:
        tokens, nbytes, nll = expected[r["window"], r["document"]]
        assert (r["tokens"], r["bytes"]) == (tokens, nbytes)
        assert r["nll"] == pytest.approx(nll, rel=1e-5, abs=1e-6)
    assert sum(r["tokens"] for r in rows) == result["protocol"]["tokens_scored"]
    assert sum(r["nll"] for r in rows) == pytest.approx(result["nll_sum"], rel=1e-9)

    per_doc: dict[int, list[float]] = {}
    for (_, d), (tokens, _, nll) in expected.items():
        per_doc.setdefault(d, [0.0, 0])
        per_doc[d][0] += nll
        per_doc[d][1] += tokens
    se = hand_se([v[0] for v in per_doc.values()], [v[1] for v in per_doc.values()])
    assert result["protocol"]["se_unit"] == "documents" and result["protocol"]["se_units"] == len(per_doc) > 2
    assert result["mean_nll_se"] == pytest.approx(se, rel=1e-4)
    assert result["perplexity_se"] == pytest.approx(result["perplexity"] * se, rel=1e-4)
    # over documents, not windows: the windows' SE is another number
    per_window = [(sum(v[2] for (w2, _), v in expected.items() if w2 == w),
                   sum(v[0] for (w2, _), v in expected.items() if w2 == w)) for w in range(len(windows))]
    assert abs(hand_se(*zip(*per_window)) - se) > 1e-3 * se


HAND_ROWS = [([5, 7, 9, 0, 11, 12, 13, 14], [1] * 8), ([20, 21, 0, 30], [1] * 4), ([40, 0, 41, 42, 43], [1] * 5)]


@pytest.mark.parametrize("documents", [None, 4])
def test_the_se_falls_back_to_windows_where_the_documents_are_not_known(tiny_llama, tokenizer, model, tmp_path,
                                                                        documents):
    """Data whose manifest does not count its held-out documents, or counts other than the separators (0, the
    EOS, three times) mark: document is null and the SE is over the windows (three here), by the formula."""
    data = hand_made_data(tmp_path / "data", tokenizer, HAND_ROWS, documents=documents)
    result = evaluate(tiny_llama, data, tmp_path / "ppl", batch_size=2)
    table = read_windows(tmp_path / "ppl")
    assert [(r["window"], r["document"], r["tokens"]) for r in table] == [(0, None, 7), (1, None, 3), (2, None, 4)]
    sums = [sum(nlls) for nlls in reference_tokens(model, HAND_ROWS)]
    assert [r["nll"] for r in table] == pytest.approx(sums, rel=1e-5)
    assert result["protocol"]["se_unit"] == "windows" and result["protocol"]["se_units"] == 3
    assert result["mean_nll_se"] == pytest.approx(hand_se(sums, [7, 3, 4]), rel=1e-4)


def test_documents_marked_by_their_separators_are_the_se_units(tiny_llama, tokenizer, model, tmp_path):
    """Three separators and a manifest counting three documents: each scored token goes to its document (a
    separator to the one it ends), documents straddle windows, and the SE is over the 4 documents."""
    data = hand_made_data(tmp_path / "data", tokenizer, HAND_ROWS, documents=3)
    result = evaluate(tiny_llama, data, tmp_path / "ppl", batch_size=2)
    table = read_windows(tmp_path / "ppl")
    assert [(r["window"], r["document"], r["tokens"]) for r in table] == [
        (0, 0, 3), (0, 1, 4), (1, 1, 2), (1, 2, 1), (2, 2, 1), (2, 3, 3)]
    nlls = reference_tokens(model, HAND_ROWS)
    pieces = [sum(nlls[0][:3]), sum(nlls[0][3:]), sum(nlls[1][:2]), nlls[1][2], nlls[2][0], sum(nlls[2][1:])]
    assert [r["nll"] for r in table] == pytest.approx(pieces, rel=1e-5)
    per_document = [pieces[0], pieces[1] + pieces[2], pieces[3] + pieces[4], pieces[5]]
    assert result["protocol"]["se_unit"] == "documents" and result["protocol"]["se_units"] == 4
    assert result["mean_nll_se"] == pytest.approx(hand_se(per_document, [3, 6, 2, 3]), rel=1e-4)
