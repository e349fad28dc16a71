"""Prepared data: the held-out rule, packing into fixed-length sequences, and the Arrow files.

A prepared dataset (`bltool prepare-data`) is a directory with `train.arrow` and `heldout.arrow` (Arrow
IPC *stream* files, which `datasets.Dataset.from_file` reads) and `manifest.json`. Each row is one
packed sequence: `input_ids` (list<int32>, `seq_len` long; only a split's last row may be shorter).
Documents are joined with a separator token (`doc₁ SEP doc₂ SEP …`): the tokenizer's pretraining
separator (`<|endoftext|>`) when its vocabulary has one, else its EOS, or the token `--doc-sep` names; the
manifest's `doc_sep` records it (data prepared before it was recorded used the EOS). The stream is cut into
consecutive, non-overlapping windows, so a document may straddle two rows. Held-out rows also carry
`token_bytes` (list<int32>): how many UTF-8 bytes of the original text each token stands for, which is what
bits-per-byte divides by.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from bltool.artifacts import Stage, artifact_ref, read_manifest
from bltool.errors import ArtifactError, UsageError

SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 10_000
SPLIT_RULE = "int(md5(key).hexdigest(), 16) % 10000 < 10000 * heldout_fraction"


def heldout_bucket(key: str) -> int:
    """The document's bucket in [0, 10000): int(md5(UTF-8 key)) mod 10000 (docs/method.md §6)."""
    return int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % HELDOUT_BUCKETS


def heldout_threshold(fraction: float) -> int:
    """Buckets below this are held out: the integer form of `bucket < 10000 · p`, computed so that
    float error cannot add a bucket (0.0051 · 10000 is 51.00000000000001 in floating point)."""
    return math.ceil(round(HELDOUT_BUCKETS * fraction, 9))


def is_heldout(key: str, fraction: float) -> bool:
    """A pure function of the document, so the split is stable across runs, machines and corpus order."""
    return heldout_bucket(key) < heldout_threshold(fraction)


def token_byte_counts(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """UTF-8 bytes of `text` attributed to each token, from the fast tokenizer's character offsets.

    Byte-level BPE can give several tokens the same character span (one multi-byte character split
    over tokens); characters a tokenizer skips would be counted by no token. So each token is given the
    characters from the end of everything before it to its own end, and the sum over tokens is exactly
    the bytes up to the last token's end. The caller gives any remainder to the separator that follows.
    Returns int64 array of len(offsets).
    """
    n = len(offsets)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.fromiter((e for _, e in offsets), dtype=np.int64, count=n)
    ends = np.maximum.accumulate(ends)
    starts = np.concatenate(([0], ends[:-1]))
    if text.isascii():
        return ends - starts
    # byte offset of each character boundary: cum[i] = len(text[:i].encode())
    char_bytes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = np.where(char_bytes < 0x80, 1, np.where(char_bytes < 0x800, 2, np.where(char_bytes < 0x10000, 3, 4)))
    cum = np.concatenate(([0], np.cumsum(widths)))
    return cum[ends] - cum[starts]


class Packer:
    """Concatenates documents (each followed by the separator `eos_id`) and emits `seq_len` windows.

    `add` returns the completed windows; `flush` returns the final, shorter window (if any tokens are
    left). With `with_bytes`, each window carries its tokens' byte counts too.
    """

    def __init__(self, seq_len: int, eos_id: int, with_bytes: bool = False):
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.with_bytes = with_bytes
        self._ids: list[np.ndarray] = []
        self._bytes: list[np.ndarray] = []
        self._pending = 0

    def add(self, ids: list[int], nbytes: np.ndarray | None = None, tail_bytes: int = 0):
        """Append one document's token ids (and per-token bytes), then the separator (carrying `tail_bytes`)."""
        self._ids.append(np.asarray(ids, dtype=np.int32))
        self._ids.append(np.asarray([self.eos_id], dtype=np.int32))
        if self.with_bytes:
            self._bytes.append(np.asarray(nbytes, dtype=np.int32))
            self._bytes.append(np.asarray([tail_bytes], dtype=np.int32))
        self._pending += len(ids) + 1
        if self._pending < self.seq_len:
            return []
        return self._cut(final=False)

    def flush(self):
        return self._cut(final=True) if self._pending else []

    def _cut(self, final: bool):
        ids = np.concatenate(self._ids)
        nb = np.concatenate(self._bytes) if self.with_bytes else None
        full = len(ids) // self.seq_len
        stop = len(ids) if final else full * self.seq_len
        windows = []
        for start in range(0, stop, self.seq_len):
            end = min(start + self.seq_len, stop)
            windows.append((ids[start:end], nb[start:end] if nb is not None else None))
        rest = slice(stop, None)
        self._ids = [ids[rest]] if stop < len(ids) else []
        self._bytes = [nb[rest]] if nb is not None and stop < len(nb) else []
        self._pending = len(ids) - stop
        return windows


def split_schema(with_bytes: bool) -> pa.Schema:
    fields = [pa.field("input_ids", pa.list_(pa.int32()))]
    if with_bytes:
        fields.append(pa.field("token_bytes", pa.list_(pa.int32())))
    return pa.schema(fields)


class SplitWriter:
    """Streams packed windows into an Arrow IPC stream file, a record batch at a time."""

    def __init__(self, path: Path, with_bytes: bool, rows_per_batch: int = 256):
        self.schema = split_schema(with_bytes)
        self.with_bytes = with_bytes
        self.rows_per_batch = rows_per_batch
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._rows: list = []
        self.sequences = 0
        self.tokens = 0
        self.bytes = 0

    def write(self, windows) -> None:
        for ids, nbytes in windows:
            self._rows.append((ids, nbytes))
            self.sequences += 1
            self.tokens += len(ids)
            if nbytes is not None:
                self.bytes += int(nbytes.sum())
        if len(self._rows) >= self.rows_per_batch:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        columns = [list_array([r[0] for r in self._rows])]
        if self.with_bytes:
            columns.append(list_array([r[1] for r in self._rows]))
        self._writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()


def list_array(rows: list[np.ndarray], dtype=np.int32) -> pa.ListArray:
    """One Arrow list column from variable-length numpy rows, without a Python loop over elements."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    values = np.concatenate(rows).astype(dtype) if rows else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


# ---------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class PreparedData:
    """An opened `prepare-data` artifact."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: Path, flag: str = "--data") -> PreparedData:
        path = Path(path)
        manifest = read_manifest(path, (Stage.PREPARE_DATA,), flag)
        return cls(path, manifest)

    @property
    def seq_len(self) -> int:
        return int(self.manifest["config"]["seq_len"])

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]

    @property
    def doc_sep(self) -> dict:
        """The token that ends each document: {"token", "id", "chosen_by"}. Data prepared before the
        separator was recorded joined documents with the tokenizer's EOS."""
        recorded = self.manifest.get("doc_sep")
        if recorded is not None:
            return recorded
        return {"token": self.tokenizer.get("eos_token"), "id": int(self.tokenizer["eos_token_id"]),
                "chosen_by": "EOS (prepared before bltool recorded the separator)"}

    def ref(self) -> dict:
        return artifact_ref(self.path, self.manifest, "data")

    def split_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise UsageError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.path / f"{split}.arrow"

    def iter_batches(self, split: str) -> Iterator[pa.RecordBatch]:
        path = self.split_path(split)
        try:
            with pa.memory_map(str(path)) as source:
                yield from pa.ipc.open_stream(source)
        except pa.ArrowInvalid as err:
            raise ArtifactError(f"--data: {path} is not a readable Arrow stream ({err})") from None

    def iter_sequences(self, split: str) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """(input_ids, token_bytes or None) per packed sequence, in file order."""
        for batch in self.iter_batches(split):
            ids = batch.column("input_ids")
            nb = batch.column("token_bytes") if "token_bytes" in batch.schema.names else None
            for i in range(batch.num_rows):
                yield (
                    ids[i].values.to_numpy(zero_copy_only=False),
                    nb[i].values.to_numpy(zero_copy_only=False) if nb is not None else None,
                )

    def check_tokenizer(self, identity: dict, what: str, flag: str = "--data") -> None:
        """Refuse a model whose tokenizer is not the one this data was made with."""
        if identity["fingerprint"] != self.tokenizer["fingerprint"]:
            raise UsageError(
                f"{flag}: {self.path} was tokenized with {self.tokenizer.get('source', 'another tokenizer')!r} "
                f"(fingerprint {self.tokenizer['fingerprint'][:12]}), but {what} uses a different tokenizer "
                f"(fingerprint {identity['fingerprint'][:12]}); run `bltool prepare-data` with --tokenizer {what}"
            )
