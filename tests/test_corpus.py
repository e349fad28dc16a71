"""bltool.data.corpus: every input format built here, the document keys, the content hashes, and bad inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bltool.data import corpus as corpus_module
from bltool.data.corpus import CorpusReader
from bltool.errors import UsageError

TEXTS = ["First document.\nWith two lines.", "Zweites Dokument: naïve café — 東京 😀", "third\r\nwith CRLF", ""]
IDS = ["doc-a", None, 17, "doc-d"]  # one missing id: its key is its text; an int id: str(id)
EXPECTED_KEYS = ["doc-a", TEXTS[1], "17", "doc-d"]


def read(paths, glob: str = "**/*.txt", text_field: str = "text", id_field: str | None = "id"):
    reader = CorpusReader([Path(p) for p in paths], glob, text_field, id_field)
    docs = list(reader)
    return reader, [(d.key, d.text) for d in docs]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Text


def make_text_dir(root: Path) -> dict[str, str]:
    files = {
        "b.txt": "bee",
        "a.txt": "ay — ünïcode",
        "sub/c.txt": "see",
        "sub/deeper/d.txt": "dee 東京",
        "notes.md": "markdown, not matched by the default glob",
        "data.json": '{"text": "not matched"}',
        "README": "no suffix",
        "sub/e.txt.bak": "backup",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return files


def test_text_directory_with_glob(tmp_path):
    root = tmp_path / "corpus"
    files = make_text_dir(root)
    reader, docs = read([root])
    names = ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt"]  # sorted by path, nested included
    assert docs == [(files[n], files[n]) for n in names]  # no id: the key is the text
    assert reader.formats == ["text-dir"]
    record = reader.records[0].as_dict()
    assert record["role"] == "corpus" and record["format"] == "text-dir"
    assert record["path"] == str(root.absolute())
    assert record["files"] == 4 and record["documents"] == 4
    assert record["bytes"] == sum(len(files[n].encode("utf-8")) for n in names)
    assert reader.total_bytes() == record["bytes"]
    # the hash cites names and contents: sha256 over "name\0" + sha256(content) in read order
    digest = hashlib.sha256()
    for n in names:
        digest.update(n.encode() + b"\0" + hashlib.sha256(files[n].encode("utf-8")).digest())
    assert record["sha256"] == digest.hexdigest()

    _, md = read([root], glob="*.md")
    assert md == [(files["notes.md"], files["notes.md"])]
    _, top = read([root], glob="*.txt")  # non-recursive glob: only the top level
    assert [t for _, t in top] == [files["a.txt"], files["b.txt"]]


def test_text_directory_hash_follows_content(tmp_path):
    root = tmp_path / "corpus"
    make_text_dir(root)
    first = read([root])[0].records[0].as_dict()["sha256"]
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert read([copy])[0].records[0].as_dict()["sha256"] == first  # same content elsewhere: same hash
    (copy / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    assert read([copy])[0].records[0].as_dict()["sha256"] != first
    (root / "notes.md").write_text("changed, but not matched by the glob", encoding="utf-8")
    assert read([root])[0].records[0].as_dict()["sha256"] == first


@pytest.mark.parametrize("suffix", [".txt", ".md", ".rst", ".text"])
def test_single_text_file(tmp_path, suffix):
    path = tmp_path / f"one{suffix}"
    text = "A whole file is one document.\r\nCRLF kept, naïve 東京 😀\n"
    path.write_bytes(text.encode("utf-8"))
    reader, docs = read([path])
    assert docs == [(text, text)]
    record = reader.records[0].as_dict()
    assert record["format"] == "text" and record["files"] == 1 and record["documents"] == 1
    assert record["bytes"] == len(text.encode("utf-8"))
    path.write_bytes(text.encode("utf-8") + b"!")
    assert read([path])[0].records[0].as_dict()["sha256"] != record["sha256"]


# ---------------------------------------------------------------------------------------------------
# JSON Lines


def write_jsonl(path: Path, rows: list[dict], blank_lines: bool = True) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_lines:
        lines.insert(1, "")
        lines.append("   ")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".ndjson"])
def test_jsonl_default_fields(tmp_path, suffix):
    rows = [{"text": t, **({"id": i} if i is not None else {}), "other": 1} for t, i in zip(TEXTS, IDS)]
    path = write_jsonl(tmp_path / f"c{suffix}", rows)
    reader, docs = read([path])
    assert docs == list(zip(EXPECTED_KEYS, TEXTS))
    record = reader.records[0].as_dict()
    assert record["format"] == "jsonl" and record["documents"] == 4 and record["files"] == 1
    assert record["bytes"] == path.stat().st_size


def test_jsonl_custom_fields_and_null_id(tmp_path):
    rows = [{"body": "one", "doc_id": 7}, {"body": "two", "doc_id": None}, {"body": "three", "id": "ignored"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    _, docs = read([path], text_field="body", id_field="doc_id")
    assert docs == [("7", "one"), ("two", "two"), ("three", "three")]
    _, no_ids = read([path], text_field="body", id_field=None)
    assert no_ids == [("one", "one"), ("two", "two"), ("three", "three")]


def test_jsonl_hash_follows_content(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"text": "b"}])
    first = read([path])[0].records[0].as_dict()["sha256"]
    assert read([path])[0].records[0].as_dict()["sha256"] == first
    write_jsonl(path, [{"text": "a"}, {"text": "c"}])
    assert read([path])[0].records[0].as_dict()["sha256"] != first


# ---------------------------------------------------------------------------------------------------
# Columnar formats


def corpus_table(text_column: str = "text", id_column: str | None = "id") -> pa.Table:
    columns = {text_column: pa.array(TEXTS, pa.string()), "extra": pa.array([1, 2, 3, 4])}
    if id_column:
        columns[id_column] = pa.array([None if i is None else str(i) for i in IDS], pa.string())
    return pa.table(columns)


def test_parquet(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "BATCH_ROWS", 3)  # several record batches
    path = tmp_path / "c.parquet"
    pq.write_table(corpus_table(), path, row_group_size=2)
    reader, docs = read([path])
    assert docs == list(zip(EXPECTED_KEYS, TEXTS))
    record = reader.records[0].as_dict()
    assert record["format"] == "parquet" and record["documents"] == 4 and record["files"] == 1
    assert record["bytes"] == path.stat().st_size
    assert record["sha256"] == hashlib.sha256(b"c.parquet\0" + bytes.fromhex(sha(path))).hexdigest()

    pq.write_table(corpus_table(), tmp_path / "same.parquet", row_group_size=2)
    _, same = read([tmp_path / "same.parquet"])
    assert same == docs
    pq.write_table(corpus_table().slice(0, 3), path)
    assert read([path])[0].records[0].as_dict()["sha256"] != record["sha256"]


def test_parquet_custom_columns_and_no_id(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(corpus_table("content", "uid"), path)
    _, docs = read([path], text_field="content", id_field="uid")
    assert docs == list(zip(EXPECTED_KEYS, TEXTS))
    _, by_text = read([path], text_field="content", id_field="id")  # no such id column: key is the text
    assert by_text == [(t, t) for t in TEXTS]


def write_arrow(path: Path, table: pa.Table, kind: str) -> Path:
    new = pa.ipc.new_stream if kind == "stream" else pa.ipc.new_file
    with new(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=2)  # two record batches
    return path


@pytest.mark.parametrize("kind", ["stream", "file"])
def test_arrow_ipc(tmp_path, kind):
    path = write_arrow(tmp_path / "c.arrow", corpus_table(), kind)
    if kind == "stream":
        with pa.memory_map(str(path)) as source:
            assert pa.ipc.open_stream(source).read_all().num_rows == 4
    else:
        with pa.memory_map(str(path)) as source:
            assert pa.ipc.open_file(source).num_record_batches == 2
    reader, docs = read([path])
    assert docs == list(zip(EXPECTED_KEYS, TEXTS))
    record = reader.records[0].as_dict()
    assert record["format"] == "arrow" and record["documents"] == 4
    assert record["sha256"] == hashlib.sha256(b"c.arrow\0" + bytes.fromhex(sha(path))).hexdigest()


def test_datasets_save_to_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": TEXTS, "id": [None if i is None else str(i) for i in IDS]})
    ds.save_to_disk(str(tmp_path / "ds"))
    reader, docs = read([tmp_path / "ds"])
    assert reader.formats == ["datasets"]
    assert docs == list(zip(EXPECTED_KEYS, TEXTS))
    record = reader.records[0].as_dict()
    assert record["format"] == "datasets" and record["documents"] == 4
    assert record["files"] == len([p for p in (tmp_path / "ds").rglob("*") if p.is_file()])

    ds2 = datasets.Dataset.from_dict({"text": TEXTS[:3] + ["changed"], "id": [None] * 4})
    ds2.save_to_disk(str(tmp_path / "ds2"))
    assert read([tmp_path / "ds2"])[0].records[0].as_dict()["sha256"] != record["sha256"]


def test_datasets_dict_reads_every_split_in_name_order(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": ["t1", "t2", "t3"]}),
        "test": datasets.Dataset.from_dict({"body": ["s1"]}),
        "validation": datasets.Dataset.from_dict({"body": ["v1", "v2"]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    reader, docs = read([tmp_path / "dd"], text_field="body")
    assert [t for _, t in docs] == ["s1", "t1", "t2", "t3", "v1", "v2"]
    assert [k for k, _ in docs] == [t for _, t in docs]
    assert reader.records[0].as_dict()["documents"] == 6


def test_several_inputs_are_read_in_order_and_cited_each(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("from text", encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "b.jsonl", [{"text": "from jsonl", "id": 1}], blank_lines=False)
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["from parquet"]}), parquet)
    reader, docs = read([jsonl, text, parquet])
    assert docs == [("1", "from jsonl"), ("from text", "from text"), ("from parquet", "from parquet")]
    assert [r.as_dict()["format"] for r in reader.records] == ["jsonl", "text", "parquet"]
    assert [r.as_dict()["path"] for r in reader.records] == [str(p.absolute()) for p in (jsonl, text, parquet)]
    assert [r.as_dict()["documents"] for r in reader.records] == [1, 1, 1]


# ---------------------------------------------------------------------------------------------------
# Bad inputs


def read_error(paths, **kwargs) -> str:
    with pytest.raises(UsageError) as info:
        read(paths, **kwargs)
    return str(info.value)


def test_non_utf8_text_file(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("fine", encoding="utf-8")
    (root / "b.txt").write_bytes(b"caf\xe9 latin-1")
    message = read_error([root])
    assert str(root / "b.txt") in message and "UTF-8" in message and "byte 3" in message
    message = read_error([root / "b.txt"])
    assert str(root / "b.txt") in message and "UTF-8" in message


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b'{"text": "ok"}\n[1, 2]\n', [":2:", "expected a JSON object", "list"]),
        (b'{"text": "ok"}\n"just a string"\n', [":2:", "expected a JSON object", "str"]),
        (b'{"text": "ok"}\n\n{"text": \n', [":3:", "not valid JSON"]),
        (b'{"text": "ok"}\n{"id": 5}\n', [":2", "'text'", "--text-field"]),
        (b'{"text": 5}\n', [":1", "'text'", "--text-field"]),
        (b'{"text": "caf\xe9"}\n', [":1:", "not valid JSON"]),
    ],
)
def test_bad_jsonl(tmp_path, content, needles):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    message = read_error([path])
    assert str(path) in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_parquet_without_text_column(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["a"], "id": ["1"]}), path)
    message = read_error([path])
    assert str(path) in message and "'text'" in message and "content" in message and "--text-field" in message


def test_arrow_and_datasets_without_text_column(tmp_path):
    import datasets

    path = write_arrow(tmp_path / "c.arrow", pa.table({"content": ["a", "b"]}), "file")
    message = read_error([path])
    assert str(path) in message and "'text'" in message and "--text-field" in message
    datasets.Dataset.from_dict({"content": ["a"]}).save_to_disk(str(tmp_path / "ds"))
    message = read_error([tmp_path / "ds"])
    assert str(tmp_path / "ds") in message and "'text'" in message


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("c.parquet", b"PAR1 but not really", "not a Parquet file"),
        ("c.parquet", b"", "not a Parquet file"),
        ("c.arrow", b"not arrow" * 20, "not an Arrow IPC stream or file"),
        ("c.arrow", b"", "not an Arrow IPC stream or file"),
    ],
)
def test_corrupt_columnar_files(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    message = read_error([path])
    assert str(path) in message and needle in message


def test_unknown_suffix_and_missing_path_are_refused_up_front(tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_text("text\nhello\n", encoding="utf-8")
    good = tmp_path / "a.txt"
    good.write_text("fine", encoding="utf-8")
    with pytest.raises(UsageError) as info:
        CorpusReader([good, csv], "**/*.txt", "text", "id")  # before anything is read
    assert str(csv) in str(info.value) and "'.csv'" in str(info.value) and ".jsonl" in str(info.value)
    missing = tmp_path / "nothing.txt"
    with pytest.raises(UsageError) as info:
        CorpusReader([good, missing], "**/*.txt", "text", "id")
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
