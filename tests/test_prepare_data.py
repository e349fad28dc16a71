"""prepare-data: the manifest, the exact contents of both splits, determinism, and the CLI's refusals
(exit 2, one error line, nothing left at --out)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import write_corpus
from typer.testing import CliRunner

import bltool
from bltool.artifacts import read_manifest, sha256_file
from bltool.cli import app
from bltool.data.prepared import SPLIT_RULE, PreparedData, SplitWriter, is_heldout, token_byte_counts
from bltool.errors import UsageError
from bltool.stages import prepare_data as stage
from bltool.stages.prepare_data import PrepareDataConfig, run

SEQ_LEN = 64
HELDOUT = 0.3


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def corpus_texts(root: Path, glob: str = "**/*.txt") -> list[str]:
    """The documents of a text directory in the order they are read (sorted paths)."""
    return [p.read_text(encoding="utf-8") for p in sorted(root.glob(glob)) if p.is_file()]


def read_split(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def split_docs(ids: list[int], eos: int) -> list[tuple[int, ...]]:
    """Packed ids back into documents (every document ends with EOS)."""
    docs, current = [], []
    for token in ids:
        if token == eos:
            docs.append(tuple(current))
            current = []
        else:
            current.append(token)
    assert current == []  # the stream ends with an EOS
    return docs


def flat(table: pa.Table, column: str) -> list[int]:
    return table.column(column).combine_chunks().values.to_pylist()


def hidden_entries(directory: Path) -> list[str]:
    """Temporary siblings (.data.tmp-*, .data.old-*) that a stage must not leave behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------
# The artifact


def test_manifest(prepared, corpus, tiny_llama, tokenizer):
    manifest = read_manifest(prepared, ("prepare-data",))
    assert manifest["stage"] == "prepare-data"
    assert manifest["bltool_version"] == bltool.__version__
    assert manifest["config"] == {
        "inputs": [str(corpus)], "tokenizer": str(tiny_llama), "out": str(prepared), "heldout": HELDOUT,
        "seq_len": SEQ_LEN, "glob": "**/*.txt", "text_field": "text", "id_field": "id", "doc_sep": None,
        "overwrite": False,
    }
    # this tokenizer has no <|endoftext|>: documents are joined with its EOS, and the manifest says so
    assert manifest["doc_sep"] == {"token": "<eos>", "id": tokenizer.eos_token_id, "chosen_by": "default: the EOS"}

    files = sorted(p for p in corpus.glob("**/*.txt"))
    assert len(files) == 60
    (entry,) = manifest["inputs"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(corpus).as_posix().encode() + b"\0"
                      + hashlib.sha256(path.read_bytes()).digest())
    assert entry == {"role": "corpus", "path": str(corpus.absolute()), "format": "text-dir", "files": 60,
                     "bytes": sum(p.stat().st_size for p in files), "documents": 60, "sha256": digest.hexdigest()}

    from bltool.models.loading import tokenizer_identity

    ident = tokenizer_identity(tokenizer)
    assert manifest["tokenizer"]["fingerprint"] == ident["fingerprint"]
    assert manifest["tokenizer"]["eos_token_id"] == tokenizer.eos_token_id
    assert manifest["tokenizer"]["source"] == str(tiny_llama)
    assert manifest["split"]["rule"] == SPLIT_RULE
    assert manifest["split"]["heldout_fraction"] == HELDOUT
    assert "'id'" in manifest["split"]["key"]

    texts = corpus_texts(corpus)
    heldout_texts = [t for t in texts if is_heldout(t, HELDOUT)]
    splits = manifest["splits"]
    assert splits["heldout"]["documents"] == len(heldout_texts)
    assert splits["train"]["documents"] + splits["heldout"]["documents"] == 60
    assert 0 < splits["heldout"]["documents"] < 60
    assert splits["heldout"]["text_bytes"] == sum(len(t.encode("utf-8")) for t in heldout_texts)
    assert splits["train"]["text_bytes"] == sum(len(t.encode("utf-8")) for t in texts) - splits["heldout"][
        "text_bytes"]

    total = 0
    for split in ("train", "heldout"):
        table = read_split(prepared / f"{split}.arrow")
        lengths = [len(r) for r in table.column("input_ids").to_pylist()]
        assert splits[split]["tokens"] == sum(lengths)
        assert splits[split]["sequences"] == table.num_rows == len(lengths)
        assert all(n == SEQ_LEN for n in lengths[:-1]) and 1 <= lengths[-1] <= SEQ_LEN
        total += sum(lengths)
    assert manifest["timing"]["tokens"] == total
    assert manifest["timing"]["tokens_per_s"] > 0 and manifest["timing"]["seconds"] >= 0

    assert set(manifest["files"]) == {"train.arrow", "heldout.arrow"}
    for name, info in manifest["files"].items():
        assert info == {"bytes": (prepared / name).stat().st_size, "sha256": sha256_file(prepared / name)}
    assert sorted(p.name for p in prepared.iterdir()) == ["heldout.arrow", "manifest.json", "train.arrow"]


def test_split_contents_are_exact(prepared, corpus, tokenizer):
    """Each split is its documents, in read order, tokenized and joined with EOS; held-out token_bytes sum
    to each held-out document's UTF-8 bytes exactly."""
    eos = tokenizer.eos_token_id
    texts = corpus_texts(corpus)
    for split in ("train", "heldout"):
        chosen = [t for t in texts if is_heldout(t, HELDOUT) == (split == "heldout")]
        table = read_split(prepared / f"{split}.arrow")
        ids = flat(table, "input_ids")
        expected = []
        for text in chosen:
            expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        assert ids == expected
        if split == "train":
            assert table.column_names == ["input_ids"]
            continue
        assert table.column_names == ["input_ids", "token_bytes"]
        nbytes = flat(table, "token_bytes")
        assert len(nbytes) == len(ids)
        assert sum(nbytes) == sum(len(t.encode("utf-8")) for t in chosen)
        # per document: its tokens and its EOS carry exactly its bytes
        start = 0
        for text in chosen:
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            n = len(encoded["input_ids"]) + 1
            assert sum(nbytes[start:start + n]) == len(text.encode("utf-8"))
            assert nbytes[start:start + n - 1] == token_byte_counts(text, encoded["offset_mapping"]).tolist()
            start += n
        assert start == len(ids)
        assert any(not t.isascii() for t in chosen)  # multi-byte characters were exercised


def test_prepared_data_reader(prepared):
    data = PreparedData.open(prepared)
    assert data.seq_len == SEQ_LEN
    manifest = data.manifest
    sequences = list(data.iter_sequences("heldout"))
    assert len(sequences) == manifest["splits"]["heldout"]["sequences"]
    assert sum(len(ids) for ids, _ in sequences) == manifest["splits"]["heldout"]["tokens"]
    assert sum(int(nb.sum()) for _, nb in sequences) == manifest["splits"]["heldout"]["text_bytes"]
    assert all(nb is None for _, nb in data.iter_sequences("train"))
    assert data.ref()["hash"] == manifest["hash"]


def test_deterministic_and_independent_of_corpus_order(tmp_path, corpus, tiny_llama, tokenizer):
    def prepare(inputs, out):
        return run(PrepareDataConfig(inputs=(str(inputs),), tokenizer=str(tiny_llama), out=str(tmp_path / out),
                                     heldout=HELDOUT, seq_len=SEQ_LEN))

    first, second = prepare(corpus, "one"), prepare(corpus, "two")
    for name in ("train.arrow", "heldout.arrow"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (first, second))
    assert m1["hash"] == m2["hash"] and m1["splits"] == m2["splits"]
    assert m1["inputs"][0]["sha256"] == m2["inputs"][0]["sha256"]

    # the same documents under other names, so they are read in the reverse order
    texts = corpus_texts(corpus)
    reordered = tmp_path / "reordered"
    reordered.mkdir()
    for i, text in enumerate(texts):
        (reordered / f"{len(texts) - i:04d}.txt").write_text(text, encoding="utf-8")
    assert corpus_texts(reordered) == texts[::-1]
    third = prepare(reordered, "three")
    m3 = json.loads((third / "manifest.json").read_text())
    assert m3["splits"] == m1["splits"]  # documents, tokens, sequences, bytes per split
    eos = tokenizer.eos_token_id
    for split in ("train", "heldout"):
        docs1 = split_docs(flat(read_split(first / f"{split}.arrow"), "input_ids"), eos)
        docs3 = split_docs(flat(read_split(third / f"{split}.arrow"), "input_ids"), eos)
        assert docs3 == docs1[::-1]  # the same documents, in the order they were read


def test_jsonl_ids_decide_the_split(tmp_path, tiny_llama):
    """With an id field the id is hashed, not the text: identical texts can land in different splits."""
    path = tmp_path / "c.jsonl"
    rows = [{"doc_id": f"doc-{i}", "body": f"same text {i % 3}"} for i in range(200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = invoke("prepare-data", str(path), "--tokenizer", str(tiny_llama), "--out", str(tmp_path / "data"),
                    "--heldout", "0.1", "--seq-len", "16", "--text-field", "body", "--id-field", "doc_id")
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest(tmp_path / "data", ("prepare-data",))
    expected = sum(is_heldout(r["doc_id"], 0.1) for r in rows)
    assert manifest["splits"]["heldout"]["documents"] == expected
    assert expected != sum(is_heldout(r["body"], 0.1) for r in rows)
    assert manifest["config"]["id_field"] == "doc_id" and manifest["config"]["text_field"] == "body"

    # --id-field '' hashes the text: there are only 3 distinct texts
    result = invoke("prepare-data", str(path), "--tokenizer", str(tiny_llama), "--out", str(tmp_path / "by-text"),
                    "--heldout", "0.9", "--seq-len", "16", "--text-field", "body", "--id-field", "")
    assert result.exit_code == 0, result.stderr
    # buckets of "same text 0/1/2" are 9982, 1701, 6340: texts 1 and 2 are held out, every copy of them
    assert sum(is_heldout(r["body"], 0.9) for r in rows) == 133
    manifest = read_manifest(tmp_path / "by-text", ("prepare-data",))
    assert manifest["splits"]["heldout"]["documents"] == 133
    assert manifest["config"]["id_field"] is None
    assert manifest["split"]["key"] == "the document's UTF-8 text"


# ---------------------------------------------------------------------------------------------------
# The CLI


def test_cli_stdout_is_the_output_path(tmp_path, corpus, tiny_llama):
    out = tmp_path / "data"
    result = invoke("prepare-data", str(corpus), "--tokenizer", str(tiny_llama), "--out", str(out),
                    "--heldout", "0.3", "--seq-len", "32")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    assert "documents" in result.stderr  # the summary goes to stderr
    manifest = read_manifest(out, ("prepare-data",))
    assert manifest["config"]["seq_len"] == 32
    assert hidden_entries(tmp_path) == []


def assert_refused(result, *needles: str, only_line: bool = True):
    """Exit 2, nothing on stdout, one error line naming what is wrong.

    Errors found before any work leave stderr with that line alone; errors found after reading the
    corpus (no documents, no held-out document, undecodable file) follow the progress bar's line."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    if only_line:
        assert lines == errors, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def tiny_corpus_outside_buckets(root: Path, below: int, n: int = 3) -> list[str]:
    """A few documents whose buckets are all >= `below`."""
    from bltool.data.prepared import heldout_bucket

    root.mkdir()
    texts = [t for t in (f"tiny document number {i}." for i in range(100)) if heldout_bucket(t) >= below][:n]
    for i, text in enumerate(texts):
        (root / f"{i}.txt").write_text(text, encoding="utf-8")
    return texts


@pytest.mark.parametrize(
    "case",
    ["missing-input", "empty-dir", "glob-matches-nothing", "heldout-0", "heldout-1", "heldout-1.5",
     "heldout-negative", "unknown-tokenizer", "seq-len-1", "no-heldout-document", "every-document-heldout",
     "unknown-suffix", "out-is-a-file", "doc-sep-several-tokens", "doc-sep-empty"],
)
def test_cli_refusals_leave_nothing(tmp_path, corpus, tiny_llama, case):
    out = tmp_path / "data"
    inputs, options, needles, only_line = [str(corpus)], [], [], True
    if case == "missing-input":
        inputs, needles = [str(tmp_path / "nowhere")], [str(tmp_path / "nowhere"), "does not exist"]
    elif case == "empty-dir":
        (tmp_path / "empty").mkdir()
        inputs, needles = [str(tmp_path / "empty")], ["INPUT", "no files", "empty", "--glob"]
    elif case == "glob-matches-nothing":
        options, needles = ["--glob", "**/*.rst"], ["INPUT", "no files", "'**/*.rst'"]
    elif case.startswith("heldout-"):
        value = {"heldout-0": "0", "heldout-1": "1", "heldout-1.5": "1.5", "heldout-negative": "-0.1"}[case]
        options, needles = ["--heldout", value], ["--heldout", value]
    elif case == "unknown-tokenizer":
        needles = ["--tokenizer", "no-such-model"]
    elif case == "seq-len-1":
        options, needles = ["--seq-len", "1"], ["--seq-len"]
    elif case == "no-heldout-document":
        texts = tiny_corpus_outside_buckets(tmp_path / "tiny", below=1)
        assert len(texts) == 3
        inputs = [str(tmp_path / "tiny")]
        options, needles, only_line = ["--heldout", "0.0001"], ["--heldout", "none of the 3 documents"], True
    elif case == "every-document-heldout":
        from bltool.data.prepared import heldout_bucket

        (tmp_path / "tiny").mkdir()
        texts = [t for t in (f"doc {i}" for i in range(50)) if heldout_bucket(t) < 9999][:3]
        for i, text in enumerate(texts):
            (tmp_path / "tiny" / f"{i}.txt").write_text(text, encoding="utf-8")
        inputs = [str(tmp_path / "tiny")]
        options, needles, only_line = ["--heldout", "0.9999"], ["--heldout", "every document"], True
    elif case == "unknown-suffix":
        (tmp_path / "c.csv").write_text("text\nhi\n", encoding="utf-8")
        inputs, needles = [str(corpus), str(tmp_path / "c.csv")], [str(tmp_path / "c.csv"), "'.csv'"]
    elif case == "out-is-a-file":
        out.write_text("a file", encoding="utf-8")
        needles = ["--out", "not a directory"]
    elif case == "doc-sep-several-tokens":
        options, needles = ["--doc-sep", "<|endoftext|>"], ["--doc-sep", "'<|endoftext|>'", "single token"]
    elif case == "doc-sep-empty":
        options, needles = ["--doc-sep", ""], ["--doc-sep", "empty"]
    tokenizer = "no-such-model" if case == "unknown-tokenizer" else str(tiny_llama)
    result = invoke("prepare-data", *inputs, "--tokenizer", tokenizer, "--out", str(out), *options)
    assert_refused(result, *needles, only_line=only_line)
    if case == "out-is-a-file":
        assert out.read_text(encoding="utf-8") == "a file"
    else:
        assert not out.exists()
    assert hidden_entries(tmp_path) == []


def test_cli_existing_out_needs_overwrite(tmp_path, corpus, tiny_llama):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("precious", encoding="utf-8")
    args = ["prepare-data", str(corpus), "--tokenizer", str(tiny_llama), "--out", str(out), "--heldout", "0.3"]
    assert_refused(invoke(*args), "--out", str(out), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text(encoding="utf-8") == "precious"

    # --overwrite replaces only an earlier prepare-data output, never a folder of the user's
    assert_refused(invoke(*args, "--overwrite"), "--out", str(out), "--overwrite", "not a bltool output")
    assert (out / "keep.txt").read_text(encoding="utf-8") == "precious"
    (out / "keep.txt").unlink()
    assert invoke(*args).exit_code == 0
    result = invoke(*args, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    assert sorted(p.name for p in out.iterdir()) == ["heldout.arrow", "manifest.json", "train.arrow"]
    assert read_manifest(out, ("prepare-data",))["config"]["overwrite"] is True
    assert hidden_entries(tmp_path) == []


def test_cli_existing_empty_out_is_fine(tmp_path, corpus, tiny_llama):
    out = tmp_path / "data"
    out.mkdir()
    result = invoke("prepare-data", str(corpus), "--tokenizer", str(tiny_llama), "--out", str(out), "--heldout", "0.3")
    assert result.exit_code == 0, result.stderr
    assert (out / "manifest.json").is_file()


@pytest.fixture
def small_batches(monkeypatch):
    """Tokenize a few documents at a time, so a corpus takes many batches."""
    monkeypatch.setattr(stage, "BATCH_CHARS", 2000)
    monkeypatch.delenv("BLTOOL_DEBUG", raising=False)


def failing_encode(monkeypatch, tmp_path: Path, after: int, exc: BaseException) -> dict:
    """Make the stage's tokenize-and-pack step fail on call `after` + 1, having written real data."""
    calls = {"n": 0, "tmp_files": []}
    real = stage._encode

    def encode(*args, **kwargs):
        if calls["n"] == after:
            calls["tmp_files"] = sorted(
                (p.name, f.name, f.stat().st_size) for p in tmp_path.iterdir() if p.name.startswith(".data.tmp-")
                for f in p.iterdir()
            )
            raise exc
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "_encode", encode)
    return calls


@pytest.mark.parametrize(("exc", "code", "needle"),
                         [(RuntimeError("tokenizer exploded"), 1, "RuntimeError: tokenizer exploded"),
                          (KeyboardInterrupt(), 130, "interrupted")])
def test_cli_failure_midway_leaves_nothing(tmp_path, corpus, tiny_llama, small_batches, monkeypatch, exc, code,
                                           needle):
    calls = failing_encode(monkeypatch, tmp_path, after=6, exc=exc)
    # write each window to disk at once, so the failure comes after real data was written
    monkeypatch.setattr(stage, "SplitWriter", lambda path, with_bytes: SplitWriter(path, with_bytes, rows_per_batch=1))
    out = tmp_path / "data"
    result = invoke("prepare-data", str(corpus), "--tokenizer", str(tiny_llama), "--out", str(out),
                    "--heldout", "0.3", "--seq-len", "16")
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert needle in result.stderr.strip().splitlines()[-1]
    assert calls["n"] == 6
    # it failed midway: the temporary directory held Arrow files with data in them
    assert {name for _, name, _ in calls["tmp_files"]} == {"train.arrow", "heldout.arrow"}
    assert any(size > 1000 for _, _, size in calls["tmp_files"])
    assert not out.exists()
    assert hidden_entries(tmp_path) == []


def test_cli_undecodable_file_late_in_the_corpus(tmp_path, corpus, tiny_llama, small_batches, monkeypatch):
    bad = corpus / "zzz" / "late.txt"  # sorted last
    bad.parent.mkdir()
    bad.write_bytes(b"fine until here \xff\xfe")
    calls = failing_encode(monkeypatch, tmp_path, after=10_000, exc=RuntimeError("unused"))  # only counts
    out = tmp_path / "data"
    result = invoke("prepare-data", str(corpus), "--tokenizer", str(tiny_llama), "--out", str(out),
                    "--heldout", "0.3", "--seq-len", "16")
    assert_refused(result, str(bad), "UTF-8")
    assert calls["n"] > 4  # earlier batches were tokenized and written before the bad file was reached
    assert not out.exists()
    assert hidden_entries(tmp_path) == []


def test_cli_failed_overwrite_keeps_the_old_output(tmp_path, corpus, tiny_llama, prepared):
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    (corpus / "zzz.txt").write_bytes(b"\xc3\x28 invalid")
    result = invoke("prepare-data", str(corpus), "--tokenizer", str(tiny_llama), "--out", str(prepared),
                    "--heldout", "0.5", "--overwrite")
    assert_refused(result, str(corpus / "zzz.txt"))
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before
    assert hidden_entries(prepared.parent) == []


def test_config_is_checked_before_any_work(tmp_path, tiny_llama):
    with pytest.raises(UsageError, match="at least one INPUT"):
        PrepareDataConfig(inputs=(), tokenizer=str(tiny_llama), out=str(tmp_path / "d"))
    with pytest.raises(UsageError, match="--text-field"):
        PrepareDataConfig(inputs=("x",), tokenizer=str(tiny_llama), out=str(tmp_path / "d"), text_field="")


def test_several_formats_in_one_run(tmp_path, tiny_llama, tokenizer):
    """A text directory, JSON Lines and Parquet together: every document counted once, read in order."""
    import pyarrow.parquet as pq

    corpus = write_corpus(tmp_path / "corpus", n_docs=20, seed=1)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"jsonl document {i}", "id": i}) + "\n" for i in range(30)),
                     encoding="utf-8")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [f"parquet document {i} é" for i in range(25)]}), parquet)
    out = run(PrepareDataConfig(inputs=(str(corpus), str(jsonl), str(parquet)), tokenizer=str(tiny_llama),
                                out=str(tmp_path / "data"), heldout=0.25, seq_len=SEQ_LEN))
    manifest = read_manifest(out, ("prepare-data",))
    assert [i["format"] for i in manifest["inputs"]] == ["text-dir", "jsonl", "parquet"]
    assert [i["documents"] for i in manifest["inputs"]] == [20, 30, 25]
    keyed = ([(t, t) for t in corpus_texts(corpus)] + [(str(i), f"jsonl document {i}") for i in range(30)]
             + [(f"parquet document {i} é",) * 2 for i in range(25)])
    heldout = [text for key, text in keyed if is_heldout(key, 0.25)]
    assert manifest["splits"]["heldout"]["documents"] == len(heldout)
    ids = flat(read_split(out / "heldout.arrow"), "input_ids")
    expected = []
    for text in heldout:
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == expected
    assert int(np.sum(flat(read_split(out / "heldout.arrow"), "token_bytes"))) == sum(
        len(t.encode("utf-8")) for t in heldout)


def test_copied_artifact_still_opens(tmp_path, prepared):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    assert PreparedData.open(copy).manifest["hash"] == read_manifest(prepared)["hash"]


@pytest.fixture(scope="module")
def whitespace_model(tmp_path_factory):
    """A checkpoint whose fast tokenizer drops whitespace (a Whitespace pre-tokenizer): its offsets skip
    characters, so some bytes are covered by no token and must go to the EOS after the document."""
    from helpers import WORDS, save_tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<eos>"])
    tok.train_from_iterator([" ".join(WORDS) + " café 東京 ✓ ."] * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    return save_tiny_model(tmp_path_factory.mktemp("ws") / "model", fast, "llama", layers=1)


def test_bytes_no_token_covers_go_to_eos(tmp_path, whitespace_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(whitespace_model)
    root = tmp_path / "corpus"
    root.mkdir()
    texts = [f"  the river {i} café 東京 ✓  \n\n" + "read write " * (i % 5) + "\t \n" for i in range(40)]
    for i, text in enumerate(texts):
        (root / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    out = run(PrepareDataConfig(inputs=(str(root),), tokenizer=str(whitespace_model), out=str(tmp_path / "data"),
                                heldout=0.5, seq_len=16))
    chosen = [t for t in texts if is_heldout(t, 0.5)]
    assert 0 < len(chosen) < len(texts)
    table = read_split(out / "heldout.arrow")
    ids, nbytes = flat(table, "input_ids"), flat(table, "token_bytes")
    start, tails = 0, []
    for text in chosen:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        n = len(encoded["input_ids"])
        last_end = max(e for _, e in encoded["offset_mapping"])
        assert ids[start:start + n + 1] == encoded["input_ids"] + [tokenizer.eos_token_id]
        # the trailing whitespace no token covers is carried by the EOS
        tails.append(nbytes[start + n])
        assert nbytes[start + n] == len(text.encode("utf-8")) - len(text[:last_end].encode("utf-8")) > 0
        assert sum(nbytes[start:start + n + 1]) == len(text.encode("utf-8"))
        start += n + 1
    assert start == len(ids)
    assert sum(nbytes) == sum(len(t.encode("utf-8")) for t in chosen)
    assert read_manifest(out)["splits"]["heldout"]["text_bytes"] == sum(nbytes)


# ---------------------------------------------------------------------------------------------------
# The document separator


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny model whose tokenizer's EOS is `<|im_end|>` and whose vocabulary has `<|endoftext|>`."""
    from helpers import chat_tokenizer, save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("chat") / "model", chat_tokenizer(), "llama", layers=1)


def _joined(texts: list[str], tokenizer, sep: int) -> list[int]:
    expected = []
    for text in texts:
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [sep]
    return expected


@pytest.mark.parametrize("doc_sep", [None, "<|im_end|>", "<|im_start|>"])
def test_documents_are_joined_with_the_pretraining_separator(tmp_path, corpus, chat_model, doc_sep):
    """By default an instruct tokenizer's <|endoftext|> joins documents, not its EOS (the chat token
    <|im_end|>); --doc-sep names another single token. The manifest records the choice and its id, and
    the reader returns it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    assert tokenizer.eos_token == "<|im_end|>"
    expected_token = doc_sep or "<|endoftext|>"
    sep = tokenizer.convert_tokens_to_ids(expected_token)
    assert sep != tokenizer.eos_token_id or doc_sep == "<|im_end|>"
    out = run(PrepareDataConfig(inputs=(str(corpus),), tokenizer=str(chat_model), out=str(tmp_path / "data"),
                                heldout=HELDOUT, seq_len=SEQ_LEN, doc_sep=doc_sep))
    manifest = read_manifest(out, ("prepare-data",))
    chosen_by = "--doc-sep" if doc_sep else "default: the pretraining separator"
    assert manifest["doc_sep"] == {"token": expected_token, "id": sep, "chosen_by": chosen_by}
    assert manifest["config"]["doc_sep"] == doc_sep
    assert PreparedData.open(out).doc_sep == manifest["doc_sep"]
    # the tokenizer record (what other stages read the pad id from) is unchanged: its EOS
    assert manifest["tokenizer"]["eos_token_id"] == tokenizer.eos_token_id
    texts = corpus_texts(corpus)
    for split in ("train", "heldout"):
        chosen = [t for t in texts if is_heldout(t, HELDOUT) == (split == "heldout")]
        table = read_split(out / f"{split}.arrow")
        assert flat(table, "input_ids") == _joined(chosen, tokenizer, sep)
    assert sum(flat(read_split(out / "heldout.arrow"), "token_bytes")) == sum(
        len(t.encode("utf-8")) for t in texts if is_heldout(t, HELDOUT))


def test_doc_sep_may_be_text_that_is_one_token(tmp_path, corpus, tiny_llama, tokenizer):
    """--doc-sep takes a vocabulary entry or text that encodes to exactly one token."""
    (single,) = tokenizer(".", add_special_tokens=False)["input_ids"]
    out = run(PrepareDataConfig(inputs=(str(corpus),), tokenizer=str(tiny_llama), out=str(tmp_path / "data"),
                                heldout=HELDOUT, seq_len=SEQ_LEN, doc_sep="."))
    assert read_manifest(out)["doc_sep"] == {"token": ".", "id": single, "chosen_by": "--doc-sep"}
    ids = flat(read_split(out / "train.arrow"), "input_ids")
    chosen = [t for t in corpus_texts(corpus) if not is_heldout(t, HELDOUT)]
    assert ids == _joined(chosen, tokenizer, single)


def test_data_prepared_before_doc_sep_still_loads(tmp_path, prepared, tokenizer):
    """A manifest written before the separator was recorded: the reader falls back to the EOS, which is
    what those data were joined with, and the stages that read it still run."""
    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["doc_sep"], manifest["config"]["doc_sep"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    data = PreparedData.open(old)
    assert data.doc_sep["id"] == tokenizer.eos_token_id and data.doc_sep["token"] == "<eos>"
    assert sum(len(ids) for ids, _ in data.iter_sequences("heldout")) == manifest["splits"]["heldout"]["tokens"]

