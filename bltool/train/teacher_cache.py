"""The teacher-logits cache: a teacher's top-k logits for the sequences a distillation run will read.

`bltool teacher-logits` writes `topk.arrow`, an Arrow IPC stream with one row per training sequence:

    sequence     int64              index of the sequence in the data's train split
    topk_ids     list<int32>        (T-1)·k token ids, position-major: the k largest teacher logits at
                                    each predicting position 0..T-2 (position t predicts token t+1)
    topk_logits  list<float16>      the matching logits (temperature 1) minus the position's largest,
                                    so ≤ 0: float16 is most precise near 0, where the mass is
    lse          list<float32>      (T-1) log-sum-exp of all V logits / temperature, minus largest / T
    tail         list<float32>      (T-1) log of the teacher's probability mass beyond its top k at the
                                    cache's temperature, computed from the float32 logits (−inf at k = V)

`lse` turns the k logits into probabilities at the distillation temperature, and `tail` is the mass of
everything else, exact to float32 rather than 1 − Σ of k float16-rounded probabilities (see
`losses.kd_loss_topk` for how the loss uses them). Both depend on the temperature, so a cache serves
runs at the temperature it was made with, and `distill` refuses another.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from bltool.artifacts import Stage, artifact_ref, read_manifest
from bltool.data import list_array
from bltool.errors import ArtifactError

FILE = "topk.arrow"
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
    both keeps log p = logit / T − lse exact while putting the stored logits where float16 is precise."""
    hidden = hidden[:, :-1]
    ids, values, lse, tail = [], [], [], []
    for start in range(0, hidden.shape[1], chunk):
        logits = head(hidden[:, start: start + chunk])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (B, c, V)
        top = logits.topk(k, dim=-1)
        largest = top.values[..., :1]  # (B, c, 1)
        scaled = logits / temperature
        all_lse = torch.logsumexp(scaled, dim=-1)  # (B, c)
        ids.append(top.indices.to(torch.int32))
        values.append(top.values - largest)
        lse.append(all_lse - largest.squeeze(-1) / temperature)
        tail.append(torch.logsumexp(scaled.scatter(-1, top.indices, float("-inf")), dim=-1) - all_lse)
        del logits, scaled
    return torch.cat(ids, 1), torch.cat(values, 1), torch.cat(lse, 1), torch.cat(tail, 1)


class CacheWriter:
    """Streams rows into `topk.arrow`."""

    def __init__(self, path: Path):
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, SCHEMA)
        self.rows = 0
        self.positions = 0
        self.tail_mass = 0.0  # Σ over written positions of the teacher's mass beyond its top k

    def write(self, sequences: list[int], ids: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor,
              tail: torch.Tensor, lengths: list[int]) -> None:
        """One batch of `teacher_topk`'s outputs: `lengths[i]` real tokens in row i (its predicting
        positions are lengths[i] − 1)."""
        n = [length - 1 for length in lengths]
        ids_np, logits_np = ids.cpu().numpy(), logits.float().cpu().numpy()
        lse_np, tail_np = lse.float().cpu().numpy(), tail.float().cpu().numpy()
        tails = [tail_np[i, : n[i]] for i in range(len(n))]
        batch = pa.RecordBatch.from_arrays([
            pa.array(np.asarray(sequences, dtype=np.int64)),
            list_array([ids_np[i, : n[i]].reshape(-1) for i in range(len(n))], np.int32),
            list_array([logits_np[i, : n[i]].reshape(-1) for i in range(len(n))], np.float16),
            list_array([lse_np[i, : n[i]] for i in range(len(n))], np.float32),
            list_array(tails, np.float32),
        ], schema=SCHEMA)
        self._writer.write_batch(batch)
        self.rows += len(sequences)
        self.positions += sum(n)
        self.tail_mass += float(sum(np.exp(t.astype(np.float64)).sum() for t in tails))

    @property
    def mean_tail_mass(self) -> float | None:
        """The teacher's mean probability mass beyond its top k, over the written positions."""
        return self.tail_mass / self.positions if self.positions else None

    def close(self) -> None:
        self._writer.close()
        self._sink.close()


class TeacherCache:
    """Random access, by sequence index, to a `teacher-logits` artifact (memory-mapped)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.k = int(manifest["config"]["top_k"])
        self.temperature = float(manifest["config"]["temperature"])
        file = self.path / FILE
        try:
            self._source = pa.memory_map(str(file))
            reader = pa.ipc.open_stream(self._source)
            if "tail" not in reader.schema.names:
                raise ArtifactError(f"--teacher-logits: {file} was made by an earlier bltool (no float32 tail "
                                    "mass); make the cache again with `bltool teacher-logits`")
            batches = list(reader)
        except (OSError, pa.ArrowInvalid) as err:
            raise ArtifactError(f"--teacher-logits: {file} is not a readable Arrow stream ({err})") from None
        self._columns = []
        where: dict[int, tuple[int, int]] = {}
        for b, batch in enumerate(batches):
            cols = {}
            for name in ("topk_ids", "topk_logits", "lse", "tail"):
                lists = batch.column(name)
                cols[name] = (lists.values.to_numpy(zero_copy_only=False), lists.offsets.to_numpy(zero_copy_only=False))
            self._columns.append(cols)
            for row, sequence in enumerate(batch.column("sequence").to_numpy()):
                where[int(sequence)] = (b, row)
        self._where = where

    @classmethod
    def open(cls, path: Path, flag: str = "--teacher-logits") -> TeacherCache:
        return cls(Path(path), read_manifest(Path(path), (Stage.TEACHER_LOGITS,), flag))

    def ref(self) -> dict:
        return artifact_ref(self.path, self.manifest, Stage.TEACHER_LOGITS)

    def __contains__(self, sequence: int) -> bool:
        return int(sequence) in self._where

    def _row(self, name: str, b: int, row: int) -> np.ndarray:
        values, offsets = self._columns[b][name]
        return values[offsets[row]: offsets[row + 1]]

    def batch(self, sequences: list[int], length: int, device) -> tuple[torch.Tensor, ...]:
        """(ids (B, length-1, k) int64, logits (B, length-1, k) float32, lse (B, length-1) float32,
        tail (B, length-1) float32), zero past each row's end (padding: those positions carry no loss)."""
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
