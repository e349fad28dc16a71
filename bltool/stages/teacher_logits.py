"""teacher-logits: run the teacher once and store its top-k logits for the sequences distillation reads.

The sequences are those at positions [0, ⌈tokens / seq_len⌉) of the run order for `--seed` (see
`bltool.train.batches`), so any `distill --teacher-logits DIR` with the same data, seed and temperature and at
most `--tokens` tokens finds every sequence it needs, whatever its batch size or number of processes.
A sweep over budgets then pays for the teacher once. See `bltool.train.teacher_cache` for the file format and
`losses.kd_loss_topk` for how the loss treats the tail beyond the top k.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bltool import ui
from bltool.artifacts import Stage, atomic_output, check_output_dir, write_manifest
from bltool.data import PreparedData
from bltool.devices import check_dtype, resolve_device, resolve_dtype
from bltool.errors import UsageError
from bltool.models import load_model, load_tokenizer, model_content_hash, resolve_model, tokenizer_identity
from bltool.nll import hidden_states
from bltool.train.batches import PackedSequences, collate, positions_to_indices
from bltool.train.losses import check_kd_args
from bltool.train.teacher_cache import FILE, CacheWriter, teacher_topk


@dataclass(frozen=True)
class TeacherLogitsConfig:
    teacher: str  # teacher model: path, .gguf or alias
    data: str  # a prepare-data output directory
    out: str  # output directory
    tokens: int = 2_000_000  # cover the sequences a run of this many tokens reads
    seed: int = 0  # the data order of the distill runs that will use the cache
    top_k: int = 64  # logits kept per position
    temperature: float = 3.0  # the distillation temperature (the tail's mass depends on it)
    batch_size: int = 8  # sequences per teacher forward pass
    chunk: int = 256  # positions per LM-head chunk
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    overwrite: bool = False  # replace an existing --out

    def __post_init__(self):
        if self.tokens < 1 or self.batch_size < 1:
            raise UsageError("--tokens and --batch-size must be at least 1")
        if self.top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {self.top_k}")
        check_kd_args(self.temperature, 0.5, self.chunk)
        check_dtype(self.dtype)


def covered_sequences(tokens: int, seq_len: int, n: int, seed: int) -> np.ndarray:
    """Sequence indices a run's first ⌈tokens / seq_len⌉ positions read: the start of epoch 0, or all n
    sequences once the run goes past one epoch (later epochs re-read them)."""
    return positions_to_indices(0, min(math.ceil(tokens / seq_len), n), n, seed)


def run(config: TeacherLogitsConfig) -> Path:
    out = Path(config.out)
    check_output_dir(out, config.overwrite)
    data = PreparedData.open(Path(config.data))
    ref = resolve_model(config.teacher, flag="--teacher")
    tokenizer = load_tokenizer(ref, flag="--teacher")
    data.check_tokenizer(tokenizer_identity(tokenizer), what=config.teacher)
    device = resolve_device(config.device)
    teacher = load_model(ref, dtype=resolve_dtype(config.dtype, device), device=device, flag="--teacher")
    if config.top_k > teacher.config.vocab_size:
        raise UsageError(f"--top-k {config.top_k} is larger than the vocabulary ({teacher.config.vocab_size})")
    train = PackedSequences(data.split_path("train"))
    if len(train) == 0:
        raise UsageError(f"--data: {data.path} has no training sequences")
    sequences = covered_sequences(config.tokens, data.seq_len, len(train), config.seed)
    pad_id = int(data.tokenizer["eos_token_id"])
    head = teacher.get_output_embeddings()
    total = int(sum(len(train[int(i)]) for i in sequences))
    watch = ui.Stopwatch()
    with atomic_output(out, config.overwrite) as tmp:
        writer = CacheWriter(tmp / FILE)
        done = 0
        with ui.token_progress() as progress, torch.no_grad():
            task = progress.add_task(Stage.TEACHER_LOGITS, total=total, tokens=0)
            for start in range(0, len(sequences), config.batch_size):
                index = [int(i) for i in sequences[start: start + config.batch_size]]
                rows = [train[i] for i in index]
                ids, mask = collate(rows, pad_id, device)
                hidden = hidden_states(teacher, ids, mask)  # (B, T, d)
                top = teacher_topk(hidden, head, config.top_k, config.temperature, config.chunk)
                writer.write(index, *top, [len(r) for r in rows])
                done += int(mask.sum())
                progress.update(task, advance=int(mask.sum()), tokens=done)
        writer.close()
        seconds = watch.seconds
        bytes_per_token = (tmp / FILE).stat().st_size / max(total, 1)
        write_manifest(
            tmp, Stage.TEACHER_LOGITS, config=asdict(config),
            inputs=[{"role": "teacher", **ref.describe(), "content": model_content_hash(ref)}, data.ref()],
            teacher={**ref.describe(), "content": model_content_hash(ref), "vocab_size": teacher.config.vocab_size},
            coverage={"positions": math.ceil(config.tokens / data.seq_len), "sequences": len(sequences),
                      "tokens": total},
            tail={"mean_mass": writer.mean_tail_mass, "temperature": config.temperature,
                  "what": "the teacher's probability mass beyond its top k, mean over positions"},
            tokenizer=data.tokenizer,
            timing={"seconds": round(seconds, 3), "tokens_per_s": round(total / seconds, 1) if seconds else None,
                    "bytes_per_token": round(bytes_per_token, 1), "device": device},
        )
    ui.info(f"teacher-logits: top-{config.top_k} of {len(sequences):,} sequences ({total:,} tokens, "
            f"{bytes_per_token:,.0f} bytes/token) in {seconds:,.1f} s; mean tail mass beyond the top "
            f"{config.top_k}: {writer.mean_tail_mass or 0:.4f} at T = {config.temperature:g}")
    return out
