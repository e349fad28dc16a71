"""bltool.data.prepared: the held-out rule (docs/method.md §6), per-token byte counts, packing, and the Arrow files."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from bltool.data.prepared import (
    HELDOUT_BUCKETS,
    Packer,
    PreparedData,
    SplitWriter,
    heldout_bucket,
    is_heldout,
    token_byte_counts,
)
from bltool.errors import ArtifactError, UsageError

# ---------------------------------------------------------------------------------------------------
# The held-out rule


def md5_bucket(key: str) -> int:
    """docs/method.md §6 written out independently."""
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % 10000


@pytest.mark.parametrize(
    ("key", "bucket"),
    [("", 8366), ("hello", 2994), ("naïve café 東京 😀", 8572), ("key-5512", 0), ("key-16351", 19),
     ("key-197", 20), ("key-31606", 1999), ("key-7635", 2000), ("key-27101", 9999)],
)
def test_heldout_bucket_is_md5_mod_10000(key, bucket):
    assert HELDOUT_BUCKETS == 10_000
    assert md5_bucket(key) == bucket  # the literal values pin the rule itself
    assert heldout_bucket(key) == bucket


@pytest.mark.parametrize(
    ("key", "fraction", "expected"),
    [
        ("key-5512", 0.0001, True),  # bucket 0 < 1
        ("key-16351", 0.002, True),  # bucket 19 < 20 (the paper's 0.2 %)
        ("key-197", 0.002, False),  # bucket 20 is not < 20
        ("key-197", 0.0021, True),  # 20 < 21
        ("key-31606", 0.2, True),  # 1999 < 2000
        ("key-7635", 0.2, False),  # 2000 is not < 2000
        ("key-27101", 0.9999, False),  # 9999 is not < 9999
        ("key-27101", 0.99999, True),
    ],
)
def test_is_heldout_threshold(key, fraction, expected):
    assert is_heldout(key, fraction) is expected


def synthetic_documents(n: int = 10_000) -> list[str]:
    rng = random.Random(1234)
    words = "alpha beta gamma delta river house 東京 café naïve ✓".split()
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for i in range(n)]


@pytest.mark.parametrize(("fraction", "tolerance"), [(0.02, 0.005), (0.2, 0.015), (0.002, 0.002)])
def test_split_is_independent_of_order_and_close_to_fraction(fraction, tolerance):
    docs = synthetic_documents()
    assert len(set(docs)) == len(docs)
    heldout = [d for d in docs if is_heldout(d, fraction)]
    assert heldout == [d for d in docs if md5_bucket(d) < 10000 * fraction]
    assert abs(len(heldout) / len(docs) - fraction) <= tolerance
    shuffled = docs[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != docs
    assert {d for d in shuffled if is_heldout(d, fraction)} == set(heldout)


def test_larger_fraction_holds_out_a_superset():
    docs = synthetic_documents(3000)
    small = {d for d in docs if is_heldout(d, 0.02)}
    large = {d for d in docs if is_heldout(d, 0.2)}
    assert small and small < large


# ---------------------------------------------------------------------------------------------------
# Per-token byte counts


@pytest.mark.parametrize(
    ("text", "offsets", "expected"),
    [
        ("hello world", [(0, 5), (5, 11)], [5, 6]),
        # a skipped character (the space) goes to the token after it
        ("hello world", [(0, 5), (6, 11)], [5, 6]),
        # trailing characters no token covers are not counted (the caller gives them to EOS)
        ("ab  ", [(0, 1), (1, 2)], [1, 1]),
        # leading skipped characters go to the first token
        ("  ab", [(2, 3), (3, 4)], [3, 1]),
        # byte-level BPE: one multi-byte character split over several tokens with the same span
        ("é東😀", [(0, 1), (0, 1), (1, 2), (1, 2), (1, 2), (2, 3), (2, 3), (2, 3), (2, 3)],
         [2, 0, 3, 0, 0, 4, 0, 0, 0]),
        ("aé b", [(0, 1), (1, 2), (2, 4)], [1, 2, 2]),
        ("x東京y", [(0, 1), (1, 3), (3, 4)], [1, 6, 1]),
        # an offset that goes backwards (e.g. an empty span) does not move the end back
        ("abcd", [(0, 3), (0, 0), (3, 4)], [3, 0, 1]),
        ("東京", [(0, 1), (0, 0), (1, 2)], [3, 0, 3]),
        ("", [], []),
    ],
)
def test_token_byte_counts_hand_made(text, offsets, expected):
    counts = token_byte_counts(text, offsets)
    assert counts.dtype == np.int64
    assert counts.tolist() == expected
    last_end = max((e for _, e in offsets), default=0)
    assert int(counts.sum()) == len(text[:last_end].encode("utf-8"))


TEXTS = [
    "The quick brown fox.",
    "héllo 東京 😀 world",
    "naïve café — 東京. Ünïcode ✓",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\ttabbed",
    "😀😀😀 🤖",
    "ascii only but long " * 20,
]


@pytest.mark.parametrize("text", TEXTS)
def test_token_byte_counts_with_real_fast_tokenizer(tokenizer, text):
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    counts = token_byte_counts(text, offsets)
    assert len(counts) == len(encoded["input_ids"]) > 0
    assert (counts >= 0).all()
    # cumulative counts are the UTF-8 bytes up to the furthest end so far, computed by slicing
    furthest = 0
    for i, (_, end) in enumerate(offsets):
        furthest = max(furthest, end)
        assert int(counts[: i + 1].sum()) == len(text[:furthest].encode("utf-8"))
    # byte-level BPE covers every character, so nothing is left for EOS
    assert int(counts.sum()) == len(text.encode("utf-8"))


def test_real_tokenizer_gives_overlapping_offsets(tokenizer):
    """The case token_byte_counts exists for: several tokens share one multi-byte character."""
    text = "héllo 東京 😀 world"
    offsets = [tuple(o) for o in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"]]
    shared = [a for a, b in zip(offsets, offsets[1:]) if a == b]
    assert shared, offsets
    counts = token_byte_counts(text, offsets).tolist()
    # the emoji (4 bytes) is one character: the tokens sharing its span carry 4 bytes between them
    emoji = text.index("😀")
    assert sum(c for c, o in zip(counts, offsets) if o == (emoji, emoji + 1)) == 4
    assert sum(counts) == len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------
# Packing

EOS = 0


def pack(docs, seq_len: int, with_bytes: bool = False, byte_lists=None, tails=None):
    """Feed every document to a Packer; return (windows from each add, windows from flush)."""
    packer = Packer(seq_len, EOS, with_bytes=with_bytes)
    per_add = []
    for i, ids in enumerate(docs):
        if with_bytes:
            per_add.append(packer.add(ids, np.asarray(byte_lists[i]), tail_bytes=tails[i]))
        else:
            per_add.append(packer.add(ids))
    return per_add, packer.flush(), packer


def joined(docs) -> list[int]:
    out = []
    for ids in docs:
        out += list(ids) + [EOS]
    return out


def test_packer_exact_windows():
    per_add, flushed, packer = pack([[1, 2, 3], [4, 5], [6]], seq_len=4)
    as_lists = [[w[0].tolist() for w in windows] for windows in per_add]
    assert as_lists == [[[1, 2, 3, 0]], [], [[4, 5, 0, 6]]]
    assert [w[0].tolist() for w in flushed] == [[0]]
    assert all(w[1] is None for windows in per_add for w in windows)
    assert all(w[0].dtype == np.int32 for windows in per_add for w in windows)
    assert packer.flush() == []  # nothing left


def test_packer_exact_multiple_leaves_nothing_to_flush():
    per_add, flushed, _ = pack([[1, 2], [3, 4]], seq_len=3)
    assert [[w[0].tolist() for w in ws] for ws in per_add] == [[[1, 2, 0]], [[3, 4, 0]]]
    assert flushed == []


def test_packer_document_longer_than_several_windows():
    doc = list(range(1, 24))  # 23 tokens + EOS = 24 = 4 full windows of 5 and 4 left over
    per_add, flushed, _ = pack([doc, [99]], seq_len=5)
    assert [w[0].tolist() for w in per_add[0]] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15],
                                                    [16, 17, 18, 19, 20]]
    assert [w[0].tolist() for w in per_add[1]] == [[21, 22, 23, 0, 99]]
    assert [w[0].tolist() for w in flushed] == [[0]]


@pytest.mark.parametrize("seq_len", [2, 7, 16, 64])
def test_packer_round_trip(seq_len):
    rng = random.Random(seq_len)
    docs = [[rng.randint(1, 300) for _ in range(rng.randint(0, 40))] for _ in range(50)]
    docs.append(list(range(1, 5 * seq_len + 3)))  # longer than several windows
    per_add, flushed, _ = pack(docs, seq_len)
    windows = [w[0] for ws in per_add for w in ws] + [w[0] for w in flushed]
    assert np.concatenate(windows).tolist() == joined(docs)
    assert all(len(w) == seq_len for w in windows[:-1])
    assert 1 <= len(windows[-1]) <= seq_len
    assert len(flushed) <= 1


def test_packer_bytes_travel_with_ids():
    rng = random.Random(3)
    docs = [[rng.randint(1, 300) for _ in range(rng.randint(0, 30))] for _ in range(40)]
    byte_lists = [[rng.randint(0, 4) for _ in ids] for ids in docs]
    tails = [rng.randint(0, 3) for _ in docs]
    per_add, flushed, _ = pack(docs, 8, with_bytes=True, byte_lists=byte_lists, tails=tails)
    windows = [w for ws in per_add for w in ws] + flushed
    assert all(len(ids) == len(nb) for ids, nb in windows)
    assert all(nb.dtype == np.int32 for _, nb in windows)
    expected_ids, expected_bytes = [], []
    for ids, nb, tail in zip(docs, byte_lists, tails):
        expected_ids += ids + [EOS]
        expected_bytes += nb + [tail]
    assert np.concatenate([w[0] for w in windows]).tolist() == expected_ids
    assert np.concatenate([w[1] for w in windows]).tolist() == expected_bytes
    assert all(len(w[0]) == 8 for w in windows[:-1])


def test_packer_empty_document_is_just_eos():
    per_add, flushed, _ = pack([[], [], [5]], seq_len=3)
    assert [w[0].tolist() for w in per_add[2]] == [[0, 0, 5]]
    assert [w[0].tolist() for w in flushed] == [[0]]


# ---------------------------------------------------------------------------------------------------
# Arrow files


def random_windows(seed: int, n: int, seq_len: int, with_bytes: bool):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = seq_len if i < n - 1 else seq_len // 3
        ids = rng.integers(0, 300, size=length).astype(np.int32)
        nb = rng.integers(0, 5, size=length).astype(np.int32) if with_bytes else None
        out.append((ids, nb))
    return out


def write_split(path: Path, windows, with_bytes: bool, rows_per_batch: int = 3) -> SplitWriter:
    writer = SplitWriter(path, with_bytes=with_bytes, rows_per_batch=rows_per_batch)
    for start in range(0, len(windows), 2):  # several write calls, several record batches
        writer.write(windows[start:start + 2])
    writer.close()
    return writer


@pytest.mark.parametrize("with_bytes", [False, True])
def test_split_writer_round_trip(tmp_path, with_bytes):
    split = "heldout" if with_bytes else "train"
    windows = random_windows(0, 11, 16, with_bytes)
    writer = write_split(tmp_path / f"{split}.arrow", windows, with_bytes)
    assert writer.sequences == 11
    assert writer.tokens == 10 * 16 + 5
    assert writer.bytes == (sum(int(nb.sum()) for _, nb in windows) if with_bytes else 0)

    data = PreparedData(tmp_path, {"config": {"seq_len": 16}})
    batches = list(data.iter_batches(split))
    assert len(batches) > 1  # rows_per_batch=3 wrote several record batches
    got = list(data.iter_sequences(split))
    assert len(got) == len(windows)
    for (ids, nb), (want_ids, want_nb) in zip(got, windows):
        assert ids.tolist() == want_ids.tolist()
        if with_bytes:
            assert nb.tolist() == want_nb.tolist()
        else:
            assert nb is None

    # the schema is list<int32>, and the file is an Arrow IPC *stream*
    with pa.memory_map(str(tmp_path / f"{split}.arrow")) as source:
        table = pa.ipc.open_stream(source).read_all()
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.column_names == (["input_ids", "token_bytes"] if with_bytes else ["input_ids"])
    if with_bytes:
        assert table.schema.field("token_bytes").type == pa.list_(pa.int32())


def test_split_file_is_readable_by_datasets(tmp_path):
    import datasets

    windows = random_windows(1, 7, 8, True)
    write_split(tmp_path / "heldout.arrow", windows, True)
    ds = datasets.Dataset.from_file(str(tmp_path / "heldout.arrow"))
    assert ds.num_rows == 7
    assert ds.column_names == ["input_ids", "token_bytes"]
    assert ds[0]["input_ids"] == windows[0][0].tolist()
    assert ds[6]["token_bytes"] == windows[6][1].tolist()
    assert [len(r) for r in ds["input_ids"]] == [8] * 6 + [2]


def test_empty_split_file(tmp_path):
    writer = write_split(tmp_path / "train.arrow", [], False)
    assert (writer.sequences, writer.tokens) == (0, 0)
    data = PreparedData(tmp_path, {"config": {"seq_len": 8}})
    assert list(data.iter_sequences("train")) == []


def test_prepared_data_refuses_unknown_split_and_corrupt_file(tmp_path):
    data = PreparedData(tmp_path, {"config": {"seq_len": 8}})
    with pytest.raises(UsageError, match="unknown split 'test'"):
        data.split_path("test")
    (tmp_path / "train.arrow").write_bytes(b"not an arrow stream at all" * 4)
    with pytest.raises(ArtifactError, match="train.arrow"):
        list(data.iter_sequences("train"))


def test_prepared_data_open_needs_prepare_data_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        PreparedData.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="prepare-data"):
        PreparedData.open(tmp_path / "empty")


@pytest.mark.parametrize("fraction, buckets", [(0.0051, 51), (0.002, 20), (0.00515, 52), (0.2, 2000), (0.99999, 10000)])
def test_heldout_threshold_is_exact_in_integers(fraction, buckets):
    """`bucket < 10000·p` without float error: 0.0051·10000 is 51.00000000000001 in floating point."""
    from bltool.data.prepared import heldout_threshold

    assert heldout_threshold(fraction) == buckets
