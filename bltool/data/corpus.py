"""Reading documents from the corpus formats users have, one document at a time.

Supported inputs (each argument to `prepare-data` may be any of them):
- a directory of text files, selected with a glob (default `**/*.txt`); one file is one document;
- a text file (`.txt`, `.md`, `.rst`, `.text`): one document;
- JSON Lines (`.jsonl`, `.json`, `.ndjson`): one object per line, text and id fields named by flags;
- Parquet (`.parquet`) and Arrow (`.arrow`, IPC stream or file format): columns named by the same flags;
- a `datasets.Dataset.save_to_disk` directory (memory-mapped; every split of a DatasetDict in name order).

Nothing is held in memory beyond one record batch. Each input's bytes are hashed as they are read so
the manifest can cite the corpus by content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bltool.artifacts import sha256_file
from bltool.errors import UsageError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
BATCH_ROWS = 1024


@dataclass
class Document:
    key: str  # what the held-out rule hashes: the document id if there is one, else the text
    text: str
    nbytes: int  # bytes of input consumed for this document (for the progress bar)


@dataclass
class InputRecord:
    """One input argument as cited in the manifest."""

    path: str
    format: str
    files: int = 0
    bytes: int = 0
    documents: int = 0
    _digest: object = field(default_factory=hashlib.sha256, repr=False)

    def as_dict(self) -> dict:
        return {
            "role": "corpus",
            "path": self.path,
            "format": self.format,
            "files": self.files,
            "bytes": self.bytes,
            "documents": self.documents,
            "sha256": self._digest.hexdigest(),
        }


def detect_format(path: Path, flag: str = "INPUT") -> str:
    if not path.exists():
        raise UsageError(f"{flag}: {path} does not exist")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "datasets"
        return "text-dir"
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".arrow":
        return "arrow"
    known = sorted(TEXT_SUFFIXES | JSONL_SUFFIXES | {".parquet", ".arrow"})
    raise UsageError(f"{flag}: {path} has an unknown suffix {suffix!r}; expected a directory or one of {known}")


def input_size(path: Path, glob: str) -> int:
    """Total input bytes, for a progress bar with a known end."""
    fmt = detect_format(path)
    if fmt == "text-dir":
        return sum(p.stat().st_size for p in path.glob(glob) if p.is_file())
    if fmt == "datasets":
        return sum(p.stat().st_size for p in path.rglob("*.arrow"))
    return path.stat().st_size


def _hash_file(record: InputRecord, path: Path, name: str) -> bytes:
    data = path.read_bytes()
    record._digest.update(name.encode("utf-8") + b"\0" + hashlib.sha256(data).digest())
    record.files += 1
    record.bytes += len(data)
    return data


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text (byte {err.start})") from None


class CorpusReader:
    """Iterates the documents of several inputs; `records` cites each input once it has been read."""

    def __init__(self, paths: list[Path], glob: str, text_field: str, id_field: str | None):
        self.paths = [Path(p) for p in paths]
        self.glob = glob
        self.text_field = text_field
        self.id_field = id_field
        self.records: list[InputRecord] = []
        self.formats = [detect_format(p) for p in self.paths]  # checks every input up front
        for path, fmt in zip(self.paths, self.formats):
            if fmt == "text-dir" and not any(p.is_file() for p in path.glob(glob)):
                raise UsageError(f"INPUT: no files in {path} match --glob {glob!r}")

    def total_bytes(self) -> int:
        return sum(input_size(p, self.glob) for p in self.paths)

    def __iter__(self) -> Iterator[Document]:
        for path, fmt in zip(self.paths, self.formats):
            record = InputRecord(str(path.absolute()), fmt)
            self.records.append(record)
            reader = getattr(self, "_read_" + fmt.replace("-", "_"))
            for doc in reader(path, record):
                record.documents += 1
                yield doc

    # -- formats --------------------------------------------------------------------------------

    def _read_text_dir(self, root: Path, record: InputRecord) -> Iterator[Document]:
        files = sorted(p for p in root.glob(self.glob) if p.is_file())
        for path in files:
            data = _hash_file(record, path, path.relative_to(root).as_posix())
            text = _decode(data, path)
            yield Document(text, text, len(data))

    def _read_text(self, path: Path, record: InputRecord) -> Iterator[Document]:
        data = _hash_file(record, path, path.name)
        text = _decode(data, path)
        yield Document(text, text, len(data))

    def _read_jsonl(self, path: Path, record: InputRecord) -> Iterator[Document]:
        record.files += 1
        with open(path, "rb") as handle:
            for lineno, line in enumerate(handle, 1):
                record._digest.update(line)
                record.bytes += len(line)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise UsageError(f"{path}:{lineno}: not valid JSON ({err})") from None
                if not isinstance(obj, dict):
                    raise UsageError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield self._document(obj.get(self.text_field), obj.get(self.id_field) if self.id_field else None,
                                     f"{path}:{lineno}", len(line))

    def _read_batches(self, batches: Iterator[pa.RecordBatch], where: str, record: InputRecord):
        for batch in batches:
            names = batch.schema.names
            if self.text_field not in names:
                raise UsageError(f"{where}: no column {self.text_field!r} (columns: {names}); set --text-field")
            texts = batch.column(self.text_field).to_pylist()
            ids = batch.column(self.id_field).to_pylist() if self.id_field in names else [None] * len(texts)
            share = batch.nbytes // max(len(texts), 1)
            for row, (text, doc_id) in enumerate(zip(texts, ids)):
                yield self._document(text, doc_id, f"{where} row {row}", share)

    def _read_parquet(self, path: Path, record: InputRecord) -> Iterator[Document]:
        _hash_stream(record, path)
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise UsageError(f"{path}: not a Parquet file ({err})") from None
        columns = [c for c in (self.text_field, self.id_field) if c and c in parquet.schema_arrow.names]
        if self.text_field not in columns:
            raise UsageError(f"{path}: no column {self.text_field!r} (columns: {parquet.schema_arrow.names}); "
                             "set --text-field")
        yield from self._read_batches(parquet.iter_batches(BATCH_ROWS, columns=columns), str(path), record)

    def _read_arrow(self, path: Path, record: InputRecord) -> Iterator[Document]:
        _hash_stream(record, path)
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
            except pa.ArrowInvalid:
                try:
                    reader = pa.ipc.open_file(source)
                except pa.ArrowInvalid as err:
                    raise UsageError(f"{path}: not an Arrow IPC stream or file ({err})") from None
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            yield from self._read_batches(batches, str(path), record)

    def _read_datasets(self, root: Path, record: InputRecord) -> Iterator[Document]:
        import datasets

        for path in sorted(root.rglob("*")):
            if path.is_file():
                _hash_stream(record, path, path.relative_to(root).as_posix())
        try:
            loaded = datasets.load_from_disk(str(root))
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"{root}: not a datasets.save_to_disk directory ({err})") from None
        splits = [loaded] if isinstance(loaded, datasets.Dataset) else [loaded[k] for k in sorted(loaded)]
        for split in splits:
            tables = split.with_format("arrow").iter(batch_size=BATCH_ROWS)  # pa.Table slices, memory-mapped
            batches = (batch for table in tables for batch in table.to_batches())
            yield from self._read_batches(batches, str(root), record)

    def _document(self, text, doc_id, where: str, nbytes: int) -> Document:
        if not isinstance(text, str):
            raise UsageError(f"{where}: field {self.text_field!r} is missing or not a string; set --text-field")
        key = text if doc_id is None else str(doc_id)
        return Document(key, text, nbytes)


def _hash_stream(record: InputRecord, path: Path, name: str | None = None) -> None:
    """Hash a binary input file in chunks (columnar formats are read by pyarrow, not by us)."""
    record._digest.update((name or path.name).encode("utf-8") + b"\0" + bytes.fromhex(sha256_file(path)))
    record.files += 1
    record.bytes += path.stat().st_size
