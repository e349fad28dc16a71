"""Training batches: random access to packed sequences, and the order a run reads them in.

The order is a pure function of (seed, position): epoch e is the permutation
`numpy.random.default_rng([seed, e]).permutation(n)` of the n training sequences, and position p of the
run is element p mod n of epoch p // n. Step t of a run with a global batch of G sequences reads
positions [t·G, (t+1)·G). So the data position of a checkpoint is just the step count, two runs with
the same seed read the same sequences (which is what lets `teacher-logits` cache exactly what a
`distill` run will ask for), and a data-parallel rank takes its share of each micro-batch by slicing.

Sequences are read from the memory-mapped Arrow stream file: nothing but the rows a batch needs is
ever paged in.
"""

from __future__ import annotations

import queue
import threading
from bisect import bisect_right
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from bltool.errors import ArtifactError


class PackedSequences:
    """Random access to the `input_ids` rows of a prepared split (an Arrow IPC stream file)."""

    def __init__(self, path: Path, column: str = "input_ids"):
        self.path = Path(path)
        try:
            self._source = pa.memory_map(str(self.path))
            batches = list(pa.ipc.open_stream(self._source))  # zero-copy views into the mapping
        except (OSError, pa.ArrowInvalid) as err:
            raise ArtifactError(f"--data: {self.path} is not a readable Arrow stream ({err})") from None
        self._values, self._offsets, starts = [], [], [0]
        for batch in batches:
            lists = batch.column(column)
            self._values.append(lists.values.to_numpy(zero_copy_only=False))
            self._offsets.append(lists.offsets.to_numpy(zero_copy_only=False))
            starts.append(starts[-1] + batch.num_rows)
        self._starts = starts

    def __len__(self) -> int:
        return self._starts[-1]

    def length(self, index: int) -> int:
        """Tokens in row `index`, from the offsets alone (nothing is paged in)."""
        b = bisect_right(self._starts, index) - 1
        offsets = self._offsets[b]
        return int(offsets[index - self._starts[b] + 1] - offsets[index - self._starts[b]])

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(index)
        b = bisect_right(self._starts, index) - 1
        row = index - self._starts[b]
        offsets = self._offsets[b]
        return self._values[b][offsets[row]: offsets[row + 1]]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of sequence indices for one epoch (stateless, so any position is computable)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def positions_to_indices(start: int, count: int, n: int, seed: int) -> np.ndarray:
    """Sequence indices at run positions [start, start + count)."""
    out = np.empty(count, dtype=np.int64)
    filled, position = 0, start
    while filled < count:
        epoch, offset = divmod(position, n)
        take = min(count - filled, n - offset)
        out[filled: filled + take] = epoch_order(n, seed, epoch)[offset: offset + take]
        filled += take
        position += take
    return out


def global_batch_size(world: int, batch_size: int, accumulation: int) -> int:
    """Sequences per optimizer step: `batch_size` per micro-batch, `accumulation` micro-batches, `world` ranks."""
    return world * accumulation * batch_size


def micro_batch_indices(step: int, micro: int, rank: int, world: int, batch_size: int, accumulation: int,
                        n: int, seed: int) -> np.ndarray:
    """The sequences that `rank` reads for micro-batch `micro` of optimizer step `step` (0-based).

    A step's global batch is world × accumulation × batch_size sequences; micro-batch j of rank r is
    the slice starting at (j · world + r) · batch_size, so one process with accumulation A·W reads
    exactly the sequences that W processes with accumulation A read together.
    """
    start = step * global_batch_size(world, batch_size, accumulation) + (micro * world + rank) * batch_size
    return positions_to_indices(start, batch_size, n, seed)


def collate(rows: list[np.ndarray], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows to one length: (B, T) int64 ids and (B, T) attention mask, on `device` (on the host
    for device None)."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    if device is None:
        return torch.from_numpy(ids), torch.from_numpy(mask)
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


class Prefetcher:
    """Builds the batches of the coming steps in a background thread while the current one trains.

    `make(key)` returns a tuple of host tensors for one key (an optimizer step's micro-batch); `keys` is
    the order they will be asked for. On a CUDA device the thread pins them, and `get` copies them with
    non_blocking=True, so the copy overlaps the GPU's work. `get(key)` must ask for the keys in order;
    `close()` stops the thread (also on errors: the thread is a daemon, and its exception is re-raised
    by the `get` that needed its result)."""

    def __init__(self, make, keys, device: str, depth: int = 2):
        self._make, self._pin, self._device = make, str(device).startswith("cuda"), device
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(iter(keys),), daemon=True, name="bltool-prefetch")
        self._thread.start()

    def _work(self, keys) -> None:
        for key in keys:
            try:
                item = self._make(key)
                if self._pin:
                    item = tuple(t.pin_memory() if isinstance(t, torch.Tensor) else t for t in item)
                result = (key, item, None)
            except BaseException as err:  # handed to the consumer, which raises it
                result = (key, None, err)
            while not self._stopped.is_set():
                try:
                    self._queue.put(result, timeout=0.1)
                    break
                except queue.Full:  # wait for the consumer
                    continue
            if self._stopped.is_set() or result[2] is not None:
                return

    def get(self, key):
        """The item for `key`, on the device."""
        got, item, err = self._queue.get()
        if err is not None:
            raise err
        if got != key:
            raise RuntimeError(f"prefetcher: asked for {key}, next is {got}")
        return tuple(t.to(self._device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in item)

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
