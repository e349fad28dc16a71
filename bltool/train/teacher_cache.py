"""The teacher-logits cache (docs/method.md §4, "A cached teacher"): what a teacher says about the sequences a
distillation run will read, in the top-k or the sampled form, recorded in the manifest's `cache` section.

`bltool teacher-logits` writes Arrow IPC streams under `shards/`, one per completed part of each process's
share (`part-B.arrow`, B its first batch), listed with their rows and positions in the manifest's `shards`;
top-k caches made before sharding hold one `topk.arrow`, read the same way. Each stream has one row per
training sequence (every sequence in exactly one file), with lists over its predicting positions 0..T-2
(position t predicts token t+1), position-major.

The top-k form (`topk`, estimator `topk-tail-bucket`, `losses.kd_loss_topk`):

    sequence     int64              index of the sequence in the data's train split
    topk_ids     list<int32>        (T-1)·k token ids: the k largest teacher logits at each position
    topk_logits  list<float16>      the matching logits (temperature 1) minus the position's largest,
                                    so ≤ 0: float16 is most precise near 0, where the mass is
    lse          list<float32>      (T-1) log-sum-exp of all V logits / temperature, minus largest / T
    tail         list<float32>      (T-1) log of the teacher's probability mass beyond its top k at the
                                    cache's temperature, computed from the float32 logits (−inf at k = V),
                                    exact to float32 rather than 1 − Σ of k float16-rounded probabilities

The sampled form (`sampled`, estimator `rs-kd`, `losses.kd_loss_sampled`; draws from `sample_uniforms`):

    sequence       int64                 index of the sequence in the data's train split
    sample_ids     list<uint16|int32>    the distinct drawn ids, ascending at each position, position
                                         after position (uint16 when the vocabulary fits, else int32)
    sample_counts  list<uint8>           how often each was drawn (they sum to N at every position)
    sample_unique  list<uint8>           (T-1) how many distinct ids each position has
    entropy        list<float32>         (T-1) the teacher's entropy at T (turns the estimated cross-
                                         entropy into an estimate of the KL, for the log; no gradient)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from bltool.artifacts import MANIFEST, Stage, artifact_ref, read_manifest
from bltool.errors import ArtifactError

FILE = "topk.arrow"
TOPK, SAMPLED = "topk", "sampled"  # the two forms (the manifest's cache.form)
ESTIMATORS = {TOPK: "topk-tail-bucket", SAMPLED: "rs-kd"}  # the manifest's cache.estimator, by form
MAX_SAMPLES = 255  # draws per position in the sampled form: counts and distinct ids are stored in one byte
SAMPLE_BLOCK = 256  # tokens per block of the sampled form's two-level inverse CDF (`teacher_sample_rows`)
SAMPLE_STREAM = 0x5A3D_0001  # tells the sampled form's random stream apart from any other use of the seed
SCHEMA = pa.schema([
    pa.field("sequence", pa.int64()),
    pa.field("topk_ids", pa.list_(pa.int32())),
    pa.field("topk_logits", pa.list_(pa.float16())),
    pa.field("lse", pa.list_(pa.float32())),
    pa.field("tail", pa.list_(pa.float32())),
])


@torch.no_grad()
def teacher_topk(hidden: torch.Tensor, head, k: int, temperature: float, chunk: int = 256):
    """From the teacher's final hidden states (B, T, d), chunk by chunk, at float32 or wider: top-k ids
    (B, T-1, k) int32; their logits minus the position's largest (B, T-1, k), so ≤ 0; log-sum-exp of all
    logits / temperature minus largest / temperature (B, T-1); and the log of the probability mass
    beyond the top k at `temperature` (B, T-1), −inf when k = V. Subtracting the largest logit from
    both keeps log p = logit / T − lse exact while putting the stored logits where float16 is precise.
    `chunk` positions of every sequence at a time: (B, chunk, V) logits at most."""
    b, t = hidden.shape[0], hidden.shape[1] - 1
    rows = hidden[:, :-1].reshape(b * t, hidden.shape[-1])
    out = teacher_topk_rows(rows, head, k, temperature, max(b, 1) * chunk)
    return tuple(x.reshape(b, t, *x.shape[1:]) for x in out)


def _block_logits(head, block: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """The head's logits for a block of rows in the working dtype, a tensor the caller may write into."""
    z = head(block)
    if z.dtype != work:
        return z.to(work)
    if z.untyped_storage().data_ptr() == block.untyped_storage().data_ptr():
        return z.clone()  # a head that hands back its input: never write into the caller's tensor
    return z


@torch.no_grad()
def teacher_topk_rows(rows: torch.Tensor, head, k: int, temperature: float, chunk: int):
    """`teacher_topk` for (N, d) hidden states, one per predicting position: (N, k) ids, (N, k) logits
    minus the largest, (N,) lse and (N,) tail, `chunk` rows (an (chunk, V) block of logits) at a time.

    Each block is worked in place (no scaled or masked copies of it): z ← exp((z − max) / T), the top k
    zeroed, then one sum gives the tail's mass directly, summed over the tail's own terms (so exact to
    the working precision even when the top k hold nearly all the mass, unlike 1 − Σ top); the top k's
    terms, recomputed from their logits, complete the sum, in float64, to the log-sum-exp."""
    n = rows.shape[0]
    work = torch.promote_types(head.weight.dtype if hasattr(head, "weight") else rows.dtype, torch.float32)
    ids = torch.empty(n, k, dtype=torch.int32, device=rows.device)
    values = torch.empty(n, k, dtype=work, device=rows.device)
    lse = torch.empty(n, dtype=work, device=rows.device)
    tail = torch.empty(n, dtype=work, device=rows.device)
    wide = torch.promote_types(work, torch.float64) if rows.device.type != "mps" else work
    inv = 1.0 / temperature
    for start in range(0, n, max(chunk, 1)):
        block = rows[start: start + chunk]
        z = _block_logits(head, block, work)
        top = z.topk(k, dim=-1)
        shifted = top.values - top.values[:, :1]  # (c, k), ≤ 0
        z.sub_(top.values[:, :1]).mul_(inv).exp_()  # exp((z − max) / T) ∈ (0, 1]
        z.scatter_(-1, top.indices, 0.0)
        tail_sum = z.sum(-1).to(wide)  # the mass beyond the top k, relative to the largest term
        total = tail_sum + (shifted * inv).exp().to(wide).sum(-1)
        log_total = total.log()
        log_tail = tail_sum.log() - log_total  # −inf where the tail is empty (k = V)
        if k < z.shape[-1] and bool((tail_sum == 0).any()):  # every tail term underflowed: log domain
            lost = (tail_sum == 0).nonzero().squeeze(-1)
            scaled = head(block[lost]).to(work) * inv
            masked = scaled.scatter(-1, top.indices[lost], float("-inf"))
            log_tail[lost] = (torch.logsumexp(masked, -1) - torch.logsumexp(scaled, -1)).to(wide)
        ids[start: start + chunk] = top.indices
        values[start: start + chunk] = shifted
        lse[start: start + chunk] = log_total
        tail[start: start + chunk] = log_tail
        del z, top
    return ids, values, lse, tail


def sampled_schema(vocab: int) -> pa.Schema:
    """The sampled form's Arrow schema: ids as uint16 when the vocabulary fits in it, else int32."""
    return pa.schema([
        pa.field("sequence", pa.int64()),
        pa.field("sample_ids", pa.list_(pa.uint16() if vocab <= 1 << 16 else pa.int32())),
        pa.field("sample_counts", pa.list_(pa.uint8())),
        pa.field("sample_unique", pa.list_(pa.uint8())),
        pa.field("entropy", pa.list_(pa.float32())),
    ])


def sample_uniforms(seed: int, sequence: int, positions: int, n: int) -> torch.Tensor:
    """The uniforms in [0, 1) that draw the samples of one sequence: (positions, n) float64, a pure function
    of (seed, sequence) (NumPy's PCG64 seeded through a SeedSequence), so a sampled cache is the same
    whatever its batches, processes, resumptions or device."""
    rng = np.random.default_rng([SAMPLE_STREAM, seed & 0xFFFF_FFFF_FFFF_FFFF, int(sequence)])
    return torch.from_numpy(rng.random((positions, n)))


@torch.no_grad()
def teacher_sample_rows(rows: torch.Tensor, head, temperature: float, uniforms: torch.Tensor, chunk: int):
    """N draws with replacement from the teacher's softmax(z/T) for each of the (R, d) hidden states
    `rows`, by the inverse of its cumulative distribution at the uniforms (R, N) (`sample_uniforms`).

    In two levels, so that no float32 running sum over the whole vocabulary decides a draw (one over 49k
    terms misplaces ~1e-7 of the total per token, a bias of 1% on a token of mass 1e-5): a uniform first
    picks a block of `SAMPLE_BLOCK` tokens by the float64 cumulative sum of the block sums, then a token
    in it by the float64 cumulative sum of the block's own terms, at the uniform's fraction of the way
    through the block. Every token's chance is then its probability to the precision of its float32
    exponential (~1e-7 relative), and the block needs ~8 bytes per logit (its logits and exponentials).

    Returns, flat: the distinct drawn ids (M,) int32, ascending within each row, row after row; their
    counts (M,) int32 (each row's sum to N); the distinct ids per row (R,) int32; and the teacher's
    entropy at T per row (R,) float64 where the device has it. `chunk` rows (a (chunk, V) block of logits)
    at a time."""
    r, n = rows.shape[0], uniforms.shape[-1]
    work = torch.promote_types(head.weight.dtype if hasattr(head, "weight") else rows.dtype, torch.float32)
    wide = torch.promote_types(work, torch.float64) if rows.device.type != "mps" else work
    uniforms = uniforms.to(rows.device, wide)
    inv, k = 1.0 / temperature, SAMPLE_BLOCK
    ids, counts, unique, entropy = [], [], [], []
    for start in range(0, r, max(chunk, 1)):
        block = rows[start: start + chunk]
        z = _block_logits(head, block, work)
        c, v = z.shape
        s = z.sub_(z.amax(-1, keepdim=True)).mul_(inv)  # (z − max) / T ≤ 0, in place
        e = s.exp()  # ∈ (0, 1], the largest 1
        dot = torch.linalg.vecdot(e, s).to(wide)  # Σ e·s
        del z, s
        if v % k:
            e = torch.nn.functional.pad(e, (0, k - v % k))  # zero terms: never drawn
        e = e.view(c, -1, k)  # (c, blocks, k)
        outer = e.sum(-1).to(wide).cumsum(-1)  # (c, blocks)
        total = outer[:, -1:]  # S = Σ e
        entropy.append(total.squeeze(-1).log() - dot / total.squeeze(-1))  # −Σ p log p = log S − Σ e·s / S
        # a block (a token) covers [cum_{i−1}, cum_i): its width is its mass, none when that underflowed
        target = uniforms[start: start + chunk] * total  # (c, N)
        b = torch.searchsorted(outer, target, right=True).clamp_(max=outer.shape[-1] - 1)
        below = torch.where(b > 0, outer.gather(-1, (b - 1).clamp_(min=0)), 0.0)
        width = outer.gather(-1, b) - below
        inner = e.gather(1, b.unsqueeze(-1).expand(c, n, k)).cumsum(-1, dtype=wide)  # (c, N, k)
        into = ((target - below) / width).clamp_(0, 1) * inner[..., -1]  # that fraction of the block's sum
        i = torch.searchsorted(inner, into.unsqueeze(-1), right=True).squeeze(-1).clamp_(max=k - 1)
        del e, inner
        drawn = (b * k + i).clamp_(max=v - 1).sort(-1).values  # (c, N)
        first = torch.ones_like(drawn, dtype=torch.bool)
        first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
        starts = first.reshape(-1).nonzero().squeeze(-1)
        ids.append(drawn.reshape(-1)[starts].to(torch.int32))
        counts.append(torch.diff(starts, append=starts.new_tensor([drawn.numel()])).to(torch.int32))
        unique.append(first.sum(-1, dtype=torch.int32))
    if not ids:
        empty = torch.empty(0, dtype=torch.int32, device=rows.device)
        return empty, empty, empty, torch.empty(0, dtype=wide, device=rows.device)
    return torch.cat(ids), torch.cat(counts), torch.cat(unique), torch.cat(entropy)


def padded_samples(ids: np.ndarray, counts: np.ndarray, unique: np.ndarray, width: int):
    """The flat form of `teacher_sample_rows` as (R, width) arrays: ids (int64) and counts (float32), each
    row's distinct ids first, then zeros (count 0: no weight in the loss)."""
    unique = np.asarray(unique, dtype=np.int64)
    r = len(unique)
    row = np.repeat(np.arange(r), unique)
    slot = np.arange(len(row)) - np.repeat(np.cumsum(unique) - unique, unique)
    out_ids = np.zeros((r, width), dtype=np.int64)
    out_counts = np.zeros((r, width), dtype=np.float32)
    out_ids[row, slot] = ids
    out_counts[row, slot] = counts
    return out_ids, out_counts


class CacheWriter:
    """Streams rows into one Arrow stream file of the cache (a shard's part, or the whole `topk.arrow`):
    the top-k form (`write`, `write_rows`), or with `vocab` given the sampled form (`write_samples`)."""

    def __init__(self, path: Path, vocab: int | None = None):
        self.path = Path(path)
        self.schema = SCHEMA if vocab is None else sampled_schema(vocab)
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self.rows = 0
        self.positions = 0
        self.tail_mass = 0.0  # Σ over written positions of the teacher's mass beyond its top k (top-k form)
        self.distinct = 0  # Σ over written positions of the distinct drawn ids (sampled form)

    def write(self, sequences: list[int], ids: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor,
              tail: torch.Tensor, lengths: list[int]) -> None:
        """One batch of `teacher_topk`'s outputs, (B, T-1, …): `lengths[i]` real tokens in row i (its
        predicting positions are lengths[i] − 1)."""
        keep = torch.zeros(ids.shape[:2], dtype=torch.bool)
        for i, length in enumerate(lengths):
            keep[i, : length - 1] = True
        keep = keep.to(ids.device)
        self.write_rows(sequences, ids[keep], logits[keep], lse[keep], tail[keep], lengths)

    def write_rows(self, sequences: list[int], ids: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor,
                   tail: torch.Tensor, lengths: list[int]) -> None:
        """One batch of `teacher_topk_rows`'s outputs for the predicting positions of the sequences, row
        after row ((Σ lengths[i] − 1, …)): built as Arrow arrays from whole buffers, no per-row copies."""
        n = np.asarray([length - 1 for length in lengths], dtype=np.int64)
        k = ids.shape[-1] if ids.ndim > 1 else 0
        ids_np = ids.to("cpu", torch.int32).numpy().reshape(-1)
        logits_np = logits.to("cpu", torch.float16).numpy().reshape(-1)
        lse_np, tail_np = lse.to("cpu", torch.float32).numpy(), tail.to("cpu", torch.float32).numpy()
        if len(lse_np) != int(n.sum()):
            raise ValueError(f"{len(lse_np)} positions for sequences with {int(n.sum())} predicting positions")
        offsets = np.concatenate(([0], np.cumsum(n))).astype(np.int32)

        def lists(values: np.ndarray, per: int) -> pa.ListArray:
            return pa.ListArray.from_arrays(pa.array(offsets * per), pa.array(values))

        batch = pa.RecordBatch.from_arrays([
            pa.array(np.asarray(sequences, dtype=np.int64)),
            lists(ids_np, k), lists(logits_np, k), lists(lse_np, 1), lists(tail_np, 1),
        ], schema=SCHEMA)
        self._writer.write_batch(batch)
        self.rows += len(sequences)
        self.positions += int(n.sum())
        self.tail_mass += float(np.exp(tail_np.astype(np.float64)).sum())

    def write_samples(self, sequences: list[int], ids: torch.Tensor, counts: torch.Tensor, unique: torch.Tensor,
                      entropy: torch.Tensor, lengths: list[int]) -> None:
        """One batch of `teacher_sample_rows`'s outputs for the predicting positions of the sequences, row
        after row (`unique`, `entropy`: (Σ lengths[i] − 1,); `ids`, `counts`: (Σ unique,))."""
        n = np.asarray([length - 1 for length in lengths], dtype=np.int64)
        unique_np = unique.to("cpu", torch.int64).numpy()
        if len(unique_np) != int(n.sum()) or int(unique_np.sum()) != ids.numel():
            raise ValueError(f"{len(unique_np)} positions with {int(unique_np.sum())} distinct ids for sequences "
                             f"with {int(n.sum())} predicting positions and {ids.numel()} ids")
        offsets = np.concatenate(([0], np.cumsum(n)))
        id_offsets = np.concatenate(([0], np.cumsum(unique_np)))[offsets]
        id_type = self.schema.field("sample_ids").type.value_type.to_pandas_dtype()

        def lists(values: np.ndarray, at: np.ndarray) -> pa.ListArray:
            return pa.ListArray.from_arrays(pa.array(at.astype(np.int32)), pa.array(values))

        batch = pa.RecordBatch.from_arrays([
            pa.array(np.asarray(sequences, dtype=np.int64)),
            lists(ids.to("cpu", torch.int64).numpy().astype(id_type), id_offsets),
            lists(counts.to("cpu", torch.int64).numpy().astype(np.uint8), id_offsets),
            lists(unique_np.astype(np.uint8), offsets),
            lists(entropy.to("cpu", torch.float32).numpy(), offsets),
        ], schema=self.schema)
        self._writer.write_batch(batch)
        self.rows += len(sequences)
        self.positions += int(n.sum())
        self.distinct += int(unique_np.sum())

    @property
    def mean_tail_mass(self) -> float | None:
        """The teacher's mean probability mass beyond its top k, over the written positions."""
        return self.tail_mass / self.positions if self.positions else None

    def close(self, sync: bool = False) -> None:
        """Finish the stream; with `sync`, make it durable (fsync) before returning."""
        self._writer.close()
        self._sink.close()
        if sync:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


COLUMNS = {TOPK: ("topk_ids", "topk_logits", "lse", "tail"),
           SAMPLED: ("sample_ids", "sample_counts", "sample_unique", "entropy")}


def cache_files(path: Path, manifest: dict) -> list[tuple[str, int | None]]:
    """The Arrow files of a finished cache and the rows each holds: the shards its manifest lists, or
    the one `topk.arrow` of a cache made before sharding (rows not recorded)."""
    shards = manifest.get("shards")
    if shards is None:
        return [(FILE, None)]
    return [(str(s["file"]), int(s["rows"])) for s in shards]


class TeacherCache:
    """Random access, by sequence index, to a `teacher-logits` artifact (memory-mapped): one file per
    part of each rank's shard, or the single `topk.arrow` of an older cache; the same either way."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        config = manifest["config"]
        self.form = SAMPLED if config.get("sample") else TOPK  # caches made before the sampled form: top-k
        self.k = int(config["top_k"]) if self.form == TOPK else None  # logits per position
        self.samples = int(config["sample"]) if self.form == SAMPLED else None  # draws per position
        self.temperature = float(config["temperature"])
        names = COLUMNS[self.form]
        self._columns = []
        self._sources = []
        where: dict[int, tuple[int, int]] = {}
        for name, rows in cache_files(self.path, manifest):
            batches = self._read(self.path / name)
            if rows is not None and sum(b.num_rows for b in batches) != rows:
                raise ArtifactError(f"--teacher-logits: {self.path / name} holds "
                                    f"{sum(b.num_rows for b in batches)} rows, its manifest says {rows}")
            for batch in batches:
                b = len(self._columns)
                cols = {}
                for column in names:
                    lists = batch.column(column)
                    cols[column] = (lists.values.to_numpy(zero_copy_only=False),
                                    lists.offsets.to_numpy(zero_copy_only=False))
                self._columns.append(cols)
                for row, sequence in enumerate(batch.column("sequence").to_numpy()):
                    if int(sequence) in where:
                        raise ArtifactError(f"--teacher-logits: {self.path} holds train sequence {sequence} twice")
                    where[int(sequence)] = (b, row)
        self._where = where

    def _read(self, file: Path) -> list[pa.RecordBatch]:
        try:
            source = pa.memory_map(str(file))
            self._sources.append(source)
            reader = pa.ipc.open_stream(source)
            if self.form == TOPK and "tail" not in reader.schema.names:
                raise ArtifactError(f"--teacher-logits: {file} was made by an earlier bltool (no float32 tail "
                                    "mass); make the cache again with `bltool teacher-logits`")
            missing = [c for c in COLUMNS[self.form] if c not in reader.schema.names]
            if missing:
                raise ArtifactError(f"--teacher-logits: {file} lacks the {', '.join(missing)} column(s) of the "
                                    f"{self.form} form its manifest names")
            return list(reader)
        except (OSError, pa.ArrowInvalid) as err:
            raise ArtifactError(f"--teacher-logits: {file} is not a readable Arrow stream ({err})") from None

    @classmethod
    def open(cls, path: Path, flag: str = "--teacher-logits") -> TeacherCache:
        path = Path(path)
        check_finished(path, flag)
        return cls(path, read_manifest(path, (Stage.TEACHER_LOGITS,), flag))

    def ref(self) -> dict:
        return artifact_ref(self.path, self.manifest, Stage.TEACHER_LOGITS)

    def __contains__(self, sequence: int) -> bool:
        return int(sequence) in self._where

    def __len__(self) -> int:
        return len(self._where)

    def sequences(self) -> list[int]:
        return sorted(self._where)

    def _row(self, name: str, b: int, row: int) -> np.ndarray:
        values, offsets = self._columns[b][name]
        return values[offsets[row]: offsets[row + 1]]

    def batch(self, sequences: list[int], length: int, device) -> tuple[torch.Tensor, ...]:
        """The teacher's side of the loss for these sequences, zero past each row's end (padding: those
        positions carry no loss). Top-k form (`losses.kd_loss_topk`): ids (B, length-1, k) int64, logits
        (B, length-1, k) float32, lse (B, length-1) float32, tail (B, length-1) float32. Sampled form
        (`losses.kd_loss_sampled`): ids (B, length-1, N) int64 and counts (B, length-1, N) float32, each
        position's distinct ids first, then zeros; entropy (B, length-1) float32."""
        if self.form == SAMPLED:
            return self._sampled_batch(sequences, length, device)
        n, k = len(sequences), self.k
        ids = np.zeros((n, length - 1, k), dtype=np.int64)
        logits = np.zeros((n, length - 1, k), dtype=np.float32)
        lse = np.zeros((n, length - 1), dtype=np.float32)
        tail = np.zeros((n, length - 1), dtype=np.float32)
        for i, sequence in enumerate(sequences):
            if int(sequence) not in self._where:
                raise ArtifactError(f"--teacher-logits: {self.path} has no logits for train sequence {sequence}")
            b, row = self._where[int(sequence)]
            row_lse = self._row("lse", b, row)
            positions = len(row_lse)
            if positions > length - 1:
                raise ArtifactError(f"--teacher-logits: {self.path}: sequence {sequence} is longer than the data's")
            lse[i, :positions] = row_lse
            tail[i, :positions] = self._row("tail", b, row)
            ids[i, :positions] = self._row("topk_ids", b, row).reshape(positions, k)
            logits[i, :positions] = self._row("topk_logits", b, row).reshape(positions, k)
        return tuple(torch.from_numpy(a).to(device) for a in (ids, logits, lse, tail))

    def _sampled_batch(self, sequences: list[int], length: int, device) -> tuple[torch.Tensor, ...]:
        n, width = len(sequences), self.samples
        ids = np.zeros((n, length - 1, width), dtype=np.int64)
        counts = np.zeros((n, length - 1, width), dtype=np.float32)
        entropy = np.zeros((n, length - 1), dtype=np.float32)
        for i, sequence in enumerate(sequences):
            b, row = self._locate(sequence)
            unique = self._row("sample_unique", b, row)
            positions = len(unique)
            if positions > length - 1:
                raise ArtifactError(f"--teacher-logits: {self.path}: sequence {sequence} is longer than the data's")
            row_ids, row_counts = self._row("sample_ids", b, row), self._row("sample_counts", b, row)
            if (int(unique.sum()) != len(row_ids) or len(row_counts) != len(row_ids)
                    or int(unique.max(initial=0)) > width):
                raise ArtifactError(f"--teacher-logits: {self.path}: the samples of sequence {sequence} are "
                                    "inconsistent (damaged file?)")
            ids[i, :positions], counts[i, :positions] = padded_samples(row_ids, row_counts, unique, width)
            entropy[i, :positions] = self._row("entropy", b, row)
        return tuple(torch.from_numpy(a).to(device) for a in (ids, counts, entropy))

    def _locate(self, sequence: int) -> tuple[int, int]:
        if int(sequence) not in self._where:
            raise ArtifactError(f"--teacher-logits: {self.path} has no logits for train sequence {sequence}")
        return self._where[int(sequence)]


# ---------------------------------------------------------------------------------------------------
# Unfinished runs: `teacher-logits` builds its output in OUT.partial, part by part, and renames the
# finished cache into OUT; a killed run leaves OUT.partial for `teacher-logits --resume`.

PARTIAL_SUFFIX = ".partial"
RUN_FILE = "run.json"  # in OUT.partial: the settings of the run that is building it


def partial_path(out: Path) -> Path:
    """Where a `teacher-logits` run builds `out` until it is finished."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def check_finished(path: Path, flag: str = "--teacher-logits") -> None:
    """Refuse, in one line, an unfinished `teacher-logits` run (its OUT.partial, or an OUT that only
    has one) before anything reads it as a cache."""
    path = Path(path)
    if (path / RUN_FILE).is_file() and not (path / MANIFEST).is_file():
        out = path.with_name(path.name[: -len(PARTIAL_SUFFIX)]) if path.name.endswith(PARTIAL_SUFFIX) else path
        raise ArtifactError(f"{flag}: {path} is an unfinished `bltool teacher-logits` run (no {MANIFEST}); "
                            f"finish it with `bltool teacher-logits --resume --out {out}` and the same flags")
    if not path.exists() and (partial_path(path) / RUN_FILE).is_file():
        raise ArtifactError(f"{flag}: {path} does not exist yet: {partial_path(path)} holds its unfinished "
                            f"`bltool teacher-logits` run; finish it with `bltool teacher-logits --resume --out "
                            f"{path}` and the same flags")
