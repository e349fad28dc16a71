"""teacher-logits: run the teacher once and store what it says about the sequences distillation reads, in
the top-k or the sampled form of docs/method.md §4 (file format: `bltool.train.teacher_cache`).

The sequences are those at positions [0, ⌈tokens / seq_len⌉) of the run order for `--seed` (see
`bltool.train.batches`), so any `distill --teacher-logits DIR` with the same data, seed and temperature and at
most `--tokens` tokens finds every sequence it needs, whatever its batch size or number of processes.
A sweep over budgets then pays for the teacher once.

Work and files. The covered sequences, in run order, are cut into batches of `--batch-size`; batch b is
always the same sequences, so the stored rows do not depend on how the batches are spread over processes
or resumptions. Under `torchrun` each rank takes a contiguous share of the batches that are not done yet
and writes its own part files; a single process is a world of one.

Resuming. The output is built in OUT.partial: `run.json` (the settings), and under `shards/` one Arrow
file per completed part with a small JSON beside it naming the positions it holds. A part is written as
`….arrow.tmp`, made durable and renamed, and only then is its JSON written, so a killed run loses at most
the part in progress (`--save-seconds`). SIGTERM / SIGINT complete the current part and stop (exit
128 + signal); `--resume` with the same flags does only the batches no completed part holds. When every
batch is done, rank 0 links the parts into OUT with `manifest.json` (an `atomic_output`) and removes
OUT.partial: OUT never exists unfinished, and `distill` refuses an OUT.partial.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bltool import ui
from bltool.adapt.kernels import use_onednn
from bltool.artifacts import (
    MANIFEST,
    Stage,
    atomic_output,
    check_apart,
    check_output_dir,
    recover_output,
    remove_stale_temporaries,
    write_json,
    write_manifest,
)
from bltool.configs import TeacherLogitsConfig
from bltool.data.prepared import PreparedData
from bltool.errors import BltoolError, Interrupted, UsageError
from bltool.eval.nll import hidden_states
from bltool.models.compiling import compile_layers
from bltool.models.devices import dtype_name, resolve_device, resolve_dtype
from bltool.models.loading import (
    load_model,
    load_tokenizer,
    model_content_hash,
    model_inputs,
    resolve_model,
    tokenizer_identity,
)
from bltool.train import distributed
from bltool.train.batches import PackedSequences, collate, positions_to_indices
from bltool.train.signals import StopSignals
from bltool.train.teacher_cache import (
    ESTIMATORS,
    RUN_FILE,
    SAMPLED,
    TOPK,
    CacheWriter,
    partial_path,
    sample_uniforms,
    teacher_sample_rows,
    teacher_topk_rows,
)

SHARDS = "shards"  # the part files, in OUT.partial while the run works and in OUT when it is finished
# Fields that may differ between a run and its resumption (they do not change what is stored).
RESUME_FREE = ("out", "resume", "overwrite", "save_seconds", "device", "compile")


def covered_sequences(tokens: int, seq_len: int, n: int, seed: int) -> np.ndarray:
    """Sequence indices a run's first ⌈tokens / seq_len⌉ positions read: the start of epoch 0, or all n
    sequences once the run goes past one epoch (later epochs re-read them)."""
    return positions_to_indices(0, min(math.ceil(tokens / seq_len), n), n, seed)


def form(config: TeacherLogitsConfig) -> str:
    """The cache's form: sampled with --sample, else top-k."""
    return SAMPLED if config.sample is not None else TOPK


def run(config: TeacherLogitsConfig) -> Path | None:
    """Write the cache; return its path on rank 0 (None on the other ranks of a `torchrun` job)."""
    return distributed.run_ranked(config.device, lambda world: _run(config, world))


def _run(config: TeacherLogitsConfig, world: distributed.World) -> Path | None:
    out = Path(config.out)
    partial = partial_path(out)
    if world.main:  # what a run killed while finishing left behind
        recover_output(out)
        _drop_leftover(out, partial)
    distributed.barrier(world)
    _check_paths(config, out, partial)
    data = PreparedData.open(Path(config.data))
    ref = resolve_model(config.teacher, flag="--teacher")
    tokenizer = load_tokenizer(ref, flag="--teacher")
    data.check_tokenizer(tokenizer_identity(tokenizer), what=config.teacher)
    train = PackedSequences(data.split_path("train"))
    if len(train) == 0:
        raise UsageError(f"--data: {data.path} has no training sequences")
    content = model_content_hash(ref)
    device = world.device if world.distributed else resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device, cpu_auto_bf16=True)  # auto: bf16 on CUDA and native-bf16 CPUs
    record = {"config": {k: v for k, v in asdict(config).items() if k not in RESUME_FREE},
              "teacher": content, "data": data.manifest["hash"], "dtype": dtype_name(dtype)}
    if config.resume:
        _check_resume(partial, record)
    teacher = load_model(ref, dtype=dtype, device=device, flag="--teacher")
    if config.top_k is not None and config.top_k > teacher.config.vocab_size:
        raise UsageError(f"--top-k {config.top_k} is larger than the vocabulary ({teacher.config.vocab_size})")
    use_onednn(teacher)  # its linears through oneDNN on the CPU (bltool.adapt.kernels)
    if config.compile:
        compile_layers(teacher)

    if world.main:
        if config.resume:
            remove_stale_temporaries(out)
            _clean_parts(partial)
        else:
            if partial.exists():  # --overwrite: an unfinished earlier run must not be resumed later
                shutil.rmtree(partial)
            (partial / SHARDS).mkdir(parents=True)
            write_json(partial / RUN_FILE, {**record, "run_id": uuid.uuid4().hex, "processes": world.size})
    distributed.barrier(world)
    run_id = json.loads((partial / RUN_FILE).read_text(encoding="utf-8"))["run_id"]

    sequences = covered_sequences(config.tokens, data.seq_len, len(train), config.seed)
    batches = math.ceil(len(sequences) / config.batch_size)
    todo = np.flatnonzero(~_done_batches(_completed_parts(partial), len(sequences), config.batch_size))
    shares = np.array_split(todo, world.size)
    mine = [int(b) for b in shares[world.rank]]
    if config.resume:
        ui.info(f"teacher-logits: resuming {partial}: {batches - len(todo)} of {batches} batches done")
    pad_id = int(data.tokenizer["eos_token_id"])
    head = teacher.get_output_embeddings()

    def rows_of(b: int) -> tuple[list[int], list]:
        index = [int(i) for i in sequences[b * config.batch_size: (b + 1) * config.batch_size]]
        return index, [train[i] for i in index]

    total = int(sum(len(train[i]) for b in mine for i in rows_of(b)[0]))
    computed = 0
    part: _Part | None = None
    watch = ui.Stopwatch()
    with StopSignals() as stop, ui.token_progress() as progress, torch.inference_mode():
        task = progress.add_task(Stage.TEACHER_LOGITS, total=total, tokens=0)
        try:
            for step in range(max(len(s) for s in shares)):  # every rank takes part in each round's vote
                if step < len(mine):
                    index, rows = rows_of(mine[step])
                    if part is None:
                        part = _Part(partial, mine[step], config.batch_size, len(sequences), world.rank,
                                     teacher.config.vocab_size if form(config) == SAMPLED else None)
                    ids, mask = collate(rows, pad_id, device)
                    hidden = hidden_states(teacher, ids, mask)  # (B, T, d)
                    predicting = hidden[:, :-1][mask[:, 1:].bool()]  # (Σ len − 1, d), row after row
                    lengths = [len(r) for r in rows]
                    if form(config) == SAMPLED:
                        uniforms = torch.cat([sample_uniforms(config.seed, i, n - 1, config.sample)
                                              for i, n in zip(index, lengths)])
                        top = teacher_sample_rows(predicting, head, config.temperature, uniforms,
                                                  len(rows) * config.chunk)
                    else:
                        top = teacher_topk_rows(predicting, head, config.top_k, config.temperature,
                                                len(rows) * config.chunk)
                    part.write(mine[step], index, top, lengths)
                    computed += sum(lengths)
                    progress.update(task, advance=sum(lengths), tokens=computed)
                    if time.perf_counter() - part.began >= config.save_seconds:
                        part = part.complete()
                if distributed.any_true(world, stop.received is not None):
                    if part is not None:
                        part = part.complete()
                    raise Interrupted(
                        f"stopped by {stop.name or 'a signal on another rank'}; the completed parts are in "
                        f"{partial}: continue with --resume (the same flags)", stop.received or signal.SIGTERM)
            if part is not None:
                part = part.complete()
        except KeyboardInterrupt:  # a second Ctrl-C: the part in progress is dropped, the rest is kept
            raise Interrupted(f"interrupted; the completed parts are in {partial}: continue with --resume "
                              "(the same flags)", signal.SIGINT) from None
        except Exception:
            if part is not None and part.whole:  # keep its whole batches for --resume
                with contextlib.suppress(Exception):
                    part.complete()
            raise
    seconds = watch.seconds
    computed = distributed.sum_ints(world, [computed])[0]
    distributed.barrier(world)
    if not world.main:
        return None
    return _finish(config, out, partial, run_id=run_id, world=world, device=device, dtype=dtype_name(dtype), ref=ref,
                   content=content, data=data, vocab=teacher.config.vocab_size, sequences=len(sequences),
                   computed=computed, seconds=seconds)


def _finish(config, out: Path, partial: Path, *, run_id: str, world, device: str, dtype: str, ref, content, data,
            vocab: int, sequences: int, computed: int, seconds: float) -> Path:
    """Link the completed parts into `out` with the manifest, atomically, and drop OUT.partial."""
    parts = sorted(_completed_parts(partial), key=lambda p: p["positions"][0][0])
    if not _done_batches(parts, sequences, config.batch_size).all():
        raise BltoolError(f"{partial} lacks parts for some batches (removed while the run worked?); "
                          "run the same command with --resume to compute them")
    tokens = sum(p["tokens"] for p in parts)
    positions = sum(p["predicted"] for p in parts)
    mean_tail = sum(p["tail_mass"] for p in parts) / positions if positions else None
    mean_distinct = sum(p.get("distinct", 0) for p in parts) / positions if positions else None
    size = sum(p["bytes"] for p in parts)
    bytes_per_token = round(size / max(tokens, 1), 1)
    sampled = form(config) == SAMPLED
    cache = {"form": form(config), "temperature": config.temperature, "bytes_per_token": bytes_per_token,
             "estimator": ESTIMATORS[form(config)],
             **({"samples": config.sample, "mean_distinct": mean_distinct,
                 "what": "N draws with replacement from the teacher's softmax(z/T) per position, kept as distinct "
                         "ids and counts; the loss's gradient uses p̂ = counts / N, unbiased (losses.kd_loss_sampled)"}
                if sampled else
                {"top_k": config.top_k,
                 "what": "the teacher's k largest logits per position and the mass beyond them as one bucket "
                         "(losses.kd_loss_topk)"})}
    sections = ({} if sampled else
                {"tail": {"mean_mass": mean_tail, "temperature": config.temperature,
                          "what": "the teacher's probability mass beyond its top k, mean over positions"}})
    with atomic_output(out, config.overwrite) as tmp:
        (tmp / SHARDS).mkdir()
        for p in parts:
            _link(partial / p["file"], tmp / p["file"])
        write_manifest(
            tmp, Stage.TEACHER_LOGITS, config=asdict(config),
            inputs=[{"role": "teacher", **ref.describe(), "content": content}, data.ref()],
            teacher={**ref.describe(), "content": content, "vocab_size": vocab, "dtype": dtype},
            coverage={"positions": math.ceil(config.tokens / data.seq_len), "sequences": sequences,
                      "tokens": tokens},
            cache=cache, **sections,
            tokenizer=data.tokenizer,
            shards=[{"file": p["file"], "rank": p["rank"], "rows": p["rows"], "positions": p["positions"],
                     "tokens": p["tokens"]} for p in parts],
            timing={"seconds": round(seconds, 3), "tokens": computed,
                    "tokens_per_s": round(computed / seconds, 1) if seconds else None,
                    "bytes_per_token": bytes_per_token, "device": device,
                    "processes": world.size, "resumed": config.resume},
            run_id=run_id,
        )
    shutil.rmtree(partial, ignore_errors=True)
    what = (f"{config.sample} draws per position" if sampled else f"top-{config.top_k}")
    detail = (f"mean distinct ids per position: {mean_distinct or 0:.1f}" if sampled else
              f"mean tail mass beyond the top {config.top_k}: {mean_tail or 0:.4f}")
    ui.info(f"teacher-logits: {what} of {sequences:,} sequences ({tokens:,} tokens, "
            f"{size / max(tokens, 1):,.0f} bytes/token, {len(parts)} part(s)); {computed:,} tokens computed in "
            f"{seconds:,.1f} s on {world.size} process(es), teacher in {dtype}; {detail} at T = {config.temperature:g}")
    return out


# ---------------------------------------------------------------------------------------------------
# OUT.partial: parts, their records, and the checks of a resumption


class _Part:
    """One part of a rank's shard: whole batches streamed into `shards/part-B.arrow.tmp` (B: its first
    batch), completed by making it durable, renaming it and then writing its record `part-B.json`."""

    def __init__(self, partial: Path, first: int, batch_size: int, sequences: int, rank: int,
                 vocab: int | None = None):
        self.partial, self.batch_size, self.sequences, self.rank = partial, batch_size, sequences, rank
        self.vocab = vocab  # given: the sampled form
        self.file = f"{SHARDS}/part-{first:09d}.arrow"
        self.tmp = partial / f"{self.file}.tmp"
        self.writer = CacheWriter(self.tmp, vocab)
        self.batches: list[int] = []
        self.tokens = 0
        self.whole = True  # holds whole batches only
        self.began = time.perf_counter()

    def write(self, batch: int, index: list[int], top, lengths: list[int]) -> None:
        self.whole = False  # until the batch is in the stream: a failure in between leaves it unusable
        if self.vocab is None:
            self.writer.write_rows(index, *top, lengths)
        else:
            self.writer.write_samples(index, *top, lengths)
        self.batches.append(batch)
        self.tokens += sum(lengths)
        self.whole = True

    def complete(self) -> None:
        """Make the part durable and record it; returns None (the caller's next part is not open yet)."""
        self.writer.close(sync=True)
        path = self.partial / self.file
        os.replace(self.tmp, path)
        _fsync_dir(path.parent)
        b = self.batch_size
        write_json(path.with_suffix(".json"), {
            "file": self.file, "rank": self.rank, "rows": self.writer.rows,
            "positions": [[start * b, min(stop * b, self.sequences)] for start, stop in _runs(self.batches)],
            "tokens": self.tokens, "predicted": self.writer.positions, "tail_mass": self.writer.tail_mass,
            "distinct": self.writer.distinct,
            "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - self.began, 3),
        })
        return None


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Sorted integers as [start, stop) runs."""
    runs: list[tuple[int, int]] = []
    for v in sorted(values):
        if runs and runs[-1][1] == v:
            runs[-1] = (runs[-1][0], v + 1)
        else:
            runs.append((v, v + 1))
    return runs


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link(source: Path, target: Path) -> None:
    """A hard link (no copy; OUT.partial keeps its file until OUT is in place), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _completed_parts(partial: Path) -> list[dict]:
    """The records of the parts that were completed: record and Arrow file present, sizes agreeing."""
    parts = []
    for record in sorted((partial / SHARDS).glob("part-*.json")):
        try:
            part = json.loads(record.read_text(encoding="utf-8"))
            if (partial / part["file"]).stat().st_size == part["bytes"]:
                parts.append(part)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return parts


def _clean_parts(partial: Path) -> None:
    """Drop the part a killed run was writing, and any part whose record or file is broken."""
    (partial / SHARDS).mkdir(parents=True, exist_ok=True)
    good = {p["file"] for p in _completed_parts(partial)}
    for path in (partial / SHARDS).iterdir():
        name = f"{SHARDS}/{path.name}"
        if name.endswith(".json"):
            name = name[: -len(".json")] + ".arrow"
        if name not in good:
            path.unlink()


def _done_batches(parts: list[dict], sequences: int, batch_size: int) -> np.ndarray:
    """Which batches the completed parts hold (whole batches only)."""
    covered = np.zeros(sequences, dtype=bool)
    for p in parts:
        for start, stop in p["positions"]:
            covered[start: stop] = True
    batches = math.ceil(sequences / batch_size)
    return np.array([covered[b * batch_size: (b + 1) * batch_size].all() for b in range(batches)], dtype=bool)


def _drop_leftover(out: Path, partial: Path) -> None:
    """A run killed after renaming its output into place but before removing OUT.partial left both."""
    if not ((partial / RUN_FILE).is_file() and (out / MANIFEST).is_file()):
        return
    with contextlib.suppress(OSError, ValueError, KeyError):
        run_id = json.loads((partial / RUN_FILE).read_text(encoding="utf-8"))["run_id"]
        if json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("run_id") == run_id:
            shutil.rmtree(partial, ignore_errors=True)


def _check_paths(config: TeacherLogitsConfig, out: Path, partial: Path) -> None:
    """--out must be free; an unfinished run must exist for --resume and is not discarded without
    --overwrite."""
    if config.resume and not (partial / RUN_FILE).is_file():
        if (out / MANIFEST).is_file():
            raise UsageError(f"--resume: {out} is finished; there is nothing to resume")
        raise UsageError(f"--resume: no unfinished teacher-logits run in {partial} (run without --resume to "
                         "start one)")
    if not config.resume and partial.exists() and not config.overwrite:
        raise UsageError(f"--out {out}: {partial} holds an unfinished teacher-logits run; pass --resume to "
                         "continue it or --overwrite to start over")
    inputs = [*model_inputs("--teacher", config.teacher), ("--data", config.data)]
    check_output_dir(out, config.overwrite, stage=Stage.TEACHER_LOGITS, inputs=inputs)
    check_apart(partial, inputs)  # --overwrite deletes an unfinished run there


def _check_resume(partial: Path, record: dict) -> None:
    try:
        saved = json.loads((partial / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"--resume: {partial / RUN_FILE} is unreadable ({err}); start over with --overwrite") \
            from None
    # --dtype: what it resolved to (auto differs between machines, and with BLTOOL_CPU_BF16), where recorded
    free = ("dtype",) if "dtype" in saved else ()
    differing = [f"--{k.replace('_', '-')} ({saved['config'].get(k)!r} there, {v!r} here)"
                 for k, v in record["config"].items() if k not in free and saved.get("config", {}).get(k) != v]
    if saved.get("teacher") != record["teacher"]:
        differing.append("--teacher (another model's weights there)")
    if saved.get("data") != record["data"]:
        differing.append("--data (another dataset there)")
    if saved.get("dtype", record["dtype"]) != record["dtype"]:  # the cache's rows all from one precision
        differing.append(f"--dtype (the teacher ran in {saved['dtype']} there, {record['dtype']} here)")
    if differing:
        raise UsageError(f"--resume: the unfinished run in {partial} has other settings: {', '.join(differing)}; "
                         "resume with its flags or start over with --overwrite")
