"""distill: KD-Full, KD-LoRA and Budgeted LoRA (docs/method.md §2–4, §7), from a live teacher or its
`teacher-logits` cache (top-k logits or samples).

The loop, per optimizer step: read the step's sequences (a pure function of seed and step, so a data
position is a step count), run the teacher under no_grad, the student's loss over sequence chunks,
backward (gradient accumulation, DDP all-reduce on the last micro-batch), clip, AdamW, cosine
schedule, then the controller. Checkpoints every `--save-every` steps and on SIGTERM / SIGINT hold
everything needed to continue bit for bit (`--resume`). Under torchrun the data is sharded by rank,
the controller runs identically on every rank, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from bltool import ui
from bltool.adapt.adapters import adapter_section, save_adapted
from bltool.adapt.kernels import use_onednn
from bltool.adapt.lora import GatedLoRALinear, LoRASpec, inject_lora, target_linears
from bltool.artifacts import (
    Stage,
    atomic_output,
    check_apart,
    check_output_dir,
    check_replaceable,
    read_manifest,
    recover_output,
    remove_stale_temporaries,
    write_arrow,
    write_manifest,
)
from bltool.configs import DistillConfig
from bltool.data.prepared import PreparedData
from bltool.errors import BltoolError, Interrupted, UsageError
from bltool.eval.nll import PieceCounter, document_separator, heldout_windows, hidden_states, token_nll
from bltool.models.compiling import checkpoint_layers, compile_layers
from bltool.models.devices import dtype_name, resolve_dtype
from bltool.models.loading import (
    artifact_manifest,
    count_parameters,
    load_model,
    load_tokenizer,
    model_content_hash,
    model_inputs,
    resolve_model,
    tokenizer_identity,
)
from bltool.train import distributed, methods, trainstate
from bltool.train.accounting import ComputeMeter
from bltool.train.batches import (
    PackedSequences,
    Prefetcher,
    collate,
    global_batch_size,
    micro_batch_indices,
    positions_to_indices,
)
from bltool.train.budget import BudgetController
from bltool.train.losses import chunk_positions, kd_loss, kd_loss_sampled, kd_loss_topk
from bltool.train.signals import StopSignals
from bltool.train.teacher_cache import TeacherCache

# Fields that may differ between a run and its resumption (they do not change what is computed).
RESUME_FREE = ("out", "checkpoint_dir", "resume", "overwrite", "save_every", "device", "compile", "eval_every",
               "eval_tokens", "activation_checkpointing")
# ... and the peak learning rate, which may be changed on --resume (lowered after a non-finite loss): the
# schedule's warm-up and cosine decay go on at the same step, scaled by the new peak (`_set_peak_lr`), and
# the checkpoint and the output's manifest record from which step each value was used (`lr_history`).
RESUME_RESCALE = ("lr",)


def lora_spec(config: DistillConfig) -> LoRASpec:
    """The adapters' spec from --rank, --lora-alpha, --lora-dropout and --target-modules (gated if the method is)."""
    lora = config.lora
    return LoRASpec(lora.rank, lora.lora_alpha, lora.lora_dropout, tuple(lora.target_modules),
                    gated=methods.get(config.method).gated)


class Objective(torch.nn.Module):
    """The student's side of a step: its hidden states and the fused §4 loss (what DDP wraps).

    `padded` (known on the host) says whether any row is shorter than the batch: when none is, the model
    runs without an attention mask (plain causal attention, no mask tensor to build or inspect)."""

    def __init__(self, student, config: DistillConfig):
        super().__init__()
        self.student = student
        self.kw = {"temperature": config.kd.temperature, "kd_weight": config.kd.kd_weight, "chunk": config.chunk}

    def forward(self, input_ids, attention_mask, normalizer, padded=True, teacher_hidden=None, teacher_head=None,
                topk=None, sampled=None):
        hidden = hidden_states(self.student, input_ids, attention_mask if padded else None)  # (B, T, d)
        head = self.student.get_output_embeddings()
        kw = {**self.kw, "normalizer": normalizer}
        if topk is not None:
            return kd_loss_topk(hidden, head, *topk, input_ids, attention_mask, **kw)
        if sampled is not None:
            return kd_loss_sampled(hidden, head, *sampled, input_ids, attention_mask, **kw)
        return kd_loss(hidden, teacher_hidden, head, teacher_head, input_ids, attention_mask, **kw)


# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    data: PreparedData
    train: PackedSequences
    student_ref: object
    tokenizer: object  # the student's (= the data's) tokenizer
    teacher_ref: object | None
    cache: TeacherCache | None


def _open_inputs(config: DistillConfig) -> Inputs:
    data = PreparedData.open(Path(config.data))
    student_ref = resolve_model(config.student, flag="--student")
    manifest = artifact_manifest(student_ref.path, "--student")
    if manifest is not None and (manifest.get("adapters") or manifest.get("compressed")):
        made = "distilled with adapters" if manifest.get("adapters") else "compressed"
        raise UsageError(f"--student: {config.student} is already {made}; distil the `bltool build-student` output")
    tokenizer = load_tokenizer(student_ref, flag="--student")
    data.check_tokenizer(tokenizer_identity(tokenizer), what=config.student)
    cache = TeacherCache.open(Path(config.teacher_logits)) if config.teacher_logits else None
    teacher_ref = None
    if config.teacher is not None:
        teacher_ref = resolve_model(config.teacher, flag="--teacher")
        data.check_tokenizer(tokenizer_identity(load_tokenizer(teacher_ref, flag="--teacher")), what=config.teacher)
    if cache is not None:
        _check_cache(cache, data, config)
    train = PackedSequences(data.split_path("train"))
    if len(train) == 0:
        raise UsageError(f"--data: {data.path} has no training sequences")
    return Inputs(data, train, student_ref, tokenizer, teacher_ref, cache)


def _check_cache(cache: TeacherCache, data: PreparedData, config: DistillConfig) -> None:
    made = cache.manifest
    data_ref = next((i for i in made["inputs"] if i.get("role") == "data"), {})
    if data_ref.get("hash") != data.manifest["hash"]:
        raise UsageError(f"--teacher-logits: {cache.path} was made from another dataset than --data {data.path}")
    if made["config"]["seed"] != config.seed:
        raise UsageError(f"--teacher-logits: {cache.path} holds the data order of --seed {made['config']['seed']}; "
                         f"this run has --seed {config.seed}")
    if abs(cache.temperature - config.kd.temperature) > 1e-12:
        raise UsageError(f"--teacher-logits: {cache.path} was made at --temperature {cache.temperature}; "
                         f"this run has --temperature {config.kd.temperature}")
    if config.teacher is not None:
        cached = made["teacher"]["content"]
        wanted = model_content_hash(resolve_model(config.teacher, flag="--teacher"))
        if cached != wanted:
            raise UsageError(f"--teacher-logits: {cache.path} was made with another teacher than --teacher "
                             f"{config.teacher}")


def _check_models(student, teacher_config, vocab: int) -> None:
    s = student.config
    if s.vocab_size != vocab:
        raise UsageError(f"--student: its vocabulary ({s.vocab_size}) does not fit the teacher's ({vocab}); "
                         "KD needs the same vocabulary on both sides")
    if teacher_config is not None and s.hidden_size > teacher_config.hidden_size:
        raise UsageError(f"--student: its hidden size ({s.hidden_size}) is larger than the teacher's "
                         f"({teacher_config.hidden_size}); are --student and --teacher swapped?")


def _check_paths(config: DistillConfig) -> None:
    """--out must be free; a checkpoint must exist for --resume and must not be clobbered without it; neither
may be over an input, and --overwrite deletes only an earlier run's checkpoint."""
    ckpt = config.checkpoint_path
    inputs = [*model_inputs("--student", config.student), ("--data", config.data),
              *model_inputs("--teacher", config.teacher), ("--teacher-logits", config.teacher_logits)]
    check_output_dir(Path(config.out), config.overwrite, stage=Stage.DISTILL,
                     inputs=[*inputs, ("--checkpoint-dir", ckpt)])
    check_apart(ckpt, inputs, "--checkpoint-dir")
    if config.checkpoint.resume and not (ckpt / "manifest.json").is_file():
        raise UsageError(f"--resume: no checkpoint in {ckpt} (set --checkpoint-dir to where it is)")
    if config.checkpoint.resume:  # every file of it whole, before any work
        read_manifest(ckpt, (Stage.DISTILL_CHECKPOINT,), "--checkpoint-dir")
    if not config.checkpoint.resume and ckpt.exists() and not config.overwrite:
        raise UsageError(f"--checkpoint-dir {ckpt} holds the checkpoint of an earlier run; pass --resume to "
                         "continue it or --overwrite to start over")
    if not config.checkpoint.resume and ckpt.exists() and (not ckpt.is_dir() or any(ckpt.iterdir())):
        # --overwrite deletes it
        check_replaceable(ckpt, Stage.DISTILL_CHECKPOINT, "--checkpoint-dir")


def _schedule(config: DistillConfig, world: distributed.World, inputs: Inputs, global_batch: int) -> tuple[int, int]:
    """(optimizer steps, warm-up steps) for the token budget; a teacher-logits cache must cover them."""
    seq_len = inputs.data.seq_len
    per_step = global_batch * seq_len
    steps = config.tokens // per_step
    if steps < 1:
        raise UsageError(
            f"--tokens {config.tokens:,} is below one optimizer step: {per_step:,} tokens "
            f"({world.size} process(es) × --batch-size {config.batch_size} × --grad-accum {config.grad_accum} "
            f"× sequence length {seq_len})")
    if inputs.cache is not None:
        needed = min(steps * global_batch, len(inputs.train))
        missing = [int(i) for i in positions_to_indices(0, needed, len(inputs.train), config.seed)
                   if int(i) not in inputs.cache]
        if missing:
            raise UsageError(f"--teacher-logits: {inputs.cache.path} lacks {len(missing)} of the {needed} sequences "
                             "this run reads; make it with `bltool teacher-logits --tokens` at least --tokens")
    return steps, min(round(config.optim.warmup * steps), config.optim.warmup_cap)


def _load_teacher(config: DistillConfig, world: distributed.World, inputs: Inputs) -> torch.nn.Module | None:
    """The live teacher, frozen, in --dtype (auto: bf16 on CUDA and on CPUs with native bf16); None when the run
    reads --teacher-logits."""
    if inputs.cache is not None:
        return None
    teacher = load_model(inputs.teacher_ref, dtype=resolve_dtype(config.dtype, world.device, cpu_auto_bf16=True),
                         device=world.device, flag="--teacher")
    teacher.requires_grad_(False).eval()
    use_onednn(teacher)  # its linears through oneDNN on the CPU (bltool.adapt.kernels)
    if config.compile:  # the live teacher's forward is most of a step: compile its layers too
        compile_layers(teacher)
    return teacher


# ---------------------------------------------------------------------------------------------------
# The run, in the shape of torchtune's KD recipe: `setup` builds a `TrainState`, `train_step` does one
# optimizer step, `save_checkpoint` / `save` write it.


@dataclass(frozen=True)
class Run:
    """What stays fixed while a run trains: its settings, processes, inputs, schedule and teacher (`prepare`
    builds it whole)."""

    config: DistillConfig
    world: distributed.World
    inputs: Inputs
    method: methods.Method  # config.method's registry entry
    global_batch: int  # sequences per optimizer step, over every process and micro-batch
    steps: int  # optimizer steps of the whole run
    warmup: int  # warm-up steps of the cosine schedule
    teacher: torch.nn.Module | None  # the live teacher; None when reading --teacher-logits

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The dtype of the weights that do not train: the teacher, and the student's base under LoRA (auto:
        bf16 on CUDA and on CPUs with native bf16, `bltool.models.devices.cpu_bf16`)."""
        return resolve_dtype(self.config.dtype, self.world.device, cpu_auto_bf16=True)

    @property
    def pad_id(self) -> int:
        return int(self.inputs.data.tokenizer["eos_token_id"])

    def autocast(self):
        """bf16 autocast on CUDA, nothing on the CPU."""
        if self.world.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


@dataclass
class TrainState:
    """What training changes, and (with the RNG states) what a checkpoint holds."""

    student: torch.nn.Module
    model: torch.nn.Module  # the Objective around the student; DDP-wrapped under torchrun
    params: list[torch.nn.Parameter]  # the parameters that train
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    controller: BudgetController | None  # budgeted-lora only
    adapted: list[tuple[str, GatedLoRALinear]]  # the LoRA methods' modules ([] for kd-full)
    costs: list[int]  # dense MACs per token of each adapted (kd-full: targeted) linear
    meter: ComputeMeter
    log: list[dict] = field(default_factory=list)  # one row per optimizer step (log.arrow)
    step: int = 0  # optimizer steps done
    seconds: float = 0.0  # training wall time so far, over every resumption
    stop_requested: bool = False  # a stop signal reached some rank during the last step (all ranks agree)
    lr_history: list[dict] = field(default_factory=list)  # [{"step": s, "lr": peak}]: peak lr from step s + 1
    prefetch: Prefetcher | None = None  # builds the coming micro-batches in the background (`setup`)


def run(config: DistillConfig) -> Path | None:
    """Train; return the output path on rank 0 (None on other ranks)."""
    return distributed.run_ranked(config.device, lambda world: _run(config, world))


def _run(config: DistillConfig, world: distributed.World) -> Path | None:
    if world.main:  # what a run killed while writing its checkpoint left behind
        recover_output(config.checkpoint_path)
        remove_stale_temporaries(config.checkpoint_path)
    distributed.barrier(world)
    _check_paths(config)
    if not config.checkpoint.resume and config.checkpoint_path.exists() and world.main:
        shutil.rmtree(config.checkpoint_path)  # --overwrite: a stale checkpoint must not be resumed later
    # Signals are recorded from before the set-up, so that one arriving while the models load (or while
    # another rank is still loading) stops the run after its first step instead of killing the process.
    with StopSignals() as stop:
        run_, state = prepare(config, world)
        finished = state.step >= run_.steps  # resumed after its last step: only the output is missing
        with contextlib.closing(state.prefetch):
            _train(run_, state, stop)
    if not finished:
        save_checkpoint(run_, state)
    if not world.main:
        return None
    try:
        save(run_, state)
    except BltoolError as err:
        raise BltoolError(f"{err}. The checkpoint in {config.checkpoint_path} holds all {run_.steps} steps: "
                          "free the space and run the same command with --resume to write the output") from None
    return Path(config.out)


def _train(run: Run, state: TrainState, stop: StopSignals) -> None:
    """The step loop: steps, held-out evaluations, progress, checkpoints; a stop signal checkpoints and
    raises Interrupted."""
    config, world = run.config, run.world
    with _progress(world) as progress:
        ui.info(f"distill {config.method}: {run.steps} steps × {run.global_batch} sequences of "
                f"{run.inputs.data.seq_len} on {world.size} × {world.device} ({dtype_name(run.frozen_dtype)} frozen "
                f"weights), lr {config.learning_rate:g}, "
                f"warm-up {run.warmup}"
                + (f", budget {config.controller.budget}" if state.controller else ""))
        task = progress.add_task(Stage.DISTILL, total=run.steps, completed=state.step, loss=float("nan"), dense=1.0,
                                 rate=0.0)
        while state.step < run.steps:
            row = train_step(run, state, stop)
            if row is not None and config.evaluation.eval_every:
                row.update(evaluate_heldout(run, state) if _eval_due(run, state.step) else _NO_EVAL)
            if row is not None:
                progress.update(task, advance=1, loss=row["loss"], dense=row["actual_fraction"],
                                rate=row["tokens"] / state.seconds)
            if row is None or state.stop_requested:
                save_checkpoint(run, state)
                where = f"after step {state.step}" if row is not None else f"during step {state.step + 1}"
                raise Interrupted(f"stopped by {stop.name or 'a signal on another rank'} {where} of {run.steps}; "
                                  f"checkpoint (after step {state.step}) in {config.checkpoint_path}; continue with "
                                  "--resume", stop.received or 15)
            every = config.checkpoint.save_every
            if every and state.step % every == 0 and state.step < run.steps:
                save_checkpoint(run, state)


def prepare(config: DistillConfig, world: distributed.World) -> tuple[Run, TrainState]:
    """Everything up to the first step, for one process of `world`: the inputs (checked), the schedule,
    the teacher, the student made trainable (`setup`, restoring --resume), and the background loader of
    the coming batches (close `state.prefetch` when done). `run` calls it; so can a benchmark or a
    notebook that then calls `train_step` itself."""
    inputs = _open_inputs(config)
    global_batch = global_batch_size(world.size, config.batch_size, config.grad_accum)
    steps, warmup = _schedule(config, world, inputs, global_batch)
    torch.manual_seed(config.seed)
    teacher = _load_teacher(config, world, inputs)
    run_ = Run(config, world, inputs, methods.get(config.method), global_batch, steps, warmup, teacher)
    return run_, setup(run_)


def setup(run: Run) -> TrainState:
    """Load the student, make it trainable the method's way, build optimizer, schedule and controller,
    restore a checkpoint with --resume, and start the background loader of the coming batches."""
    config, world, method = run.config, run.world, run.method
    # a full fine-tune trains every weight, in float32; LoRA keeps the frozen base in --dtype (auto: bf16 where native)
    dtype = run.frozen_dtype if method.lora else torch.float32
    student = load_model(run.inputs.student_ref, dtype=dtype, device=world.device, flag="--student")
    if run.teacher is not None:
        vocab, teacher_config = run.teacher.config.vocab_size, run.teacher.config
    else:
        vocab, teacher_config = int(run.inputs.cache.manifest["teacher"]["vocab_size"]), None
    _check_models(student, teacher_config, vocab)
    if method.lora:
        adapted = inject_lora(student, lora_spec(config))
        costs = [m.dense_macs for _, m in adapted]
        lora_macs = sum(m.lora_macs for _, m in adapted)
    else:  # every weight trains; the targeted linears are only counted
        student.requires_grad_(True)
        linears = target_linears(student, config.lora.target_modules)
        adapted, costs, lora_macs = [], [m.in_features * m.out_features for _, m in linears], 0
    # Dropout from here on: every rank draws its own masks (the LoRA initialisation above is the same on
    # every rank, as the seed is); a pure function of --seed and the rank, so a run is reproducible.
    torch.manual_seed(int(np.random.SeedSequence([config.seed, world.rank]).generate_state(1)[0]))
    student.to(world.device).train()
    controller = None
    if method.controller is not None:
        controller = method.controller(costs, config.budget_config(), run.steps)
        if warning := config.budget_config().short_run_warning(run.steps):
            ui.warn(warning)

    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, run.warmup, run.steps)
    meter = ComputeMeter(method.compute, costs, lora_macs)
    progress = {"step": 0, "log": [], "seconds": 0.0, "lr_history": [{"step": 0, "lr": config.learning_rate}]}
    if config.checkpoint.resume:
        progress = _resume(run, student, optimizer, scheduler, meter, controller, adapted)
    if config.activation_checkpointing:
        checkpoint_layers(student)
    if config.compile:
        compile_layers(student)
    model = Objective(student, config)
    if world.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[world.device] if world.device.startswith("cuda") else None, broadcast_buffers=False)
    return TrainState(student, model, params, optimizer, scheduler, controller, adapted, costs, meter, **progress,
                      prefetch=_prefetcher(run, progress["step"]))


def train_step(run: Run, state: TrainState, stop: StopSignals | None = None) -> dict | None:
    """One optimizer step: the micro-batches (gradient accumulation; DDP all-reduces on the last), clip,
    AdamW, schedule, then the budget controller. Appends and returns the step's log row.

    The loss is the mean over every predicted token of the step, on all ranks (docs/method.md §4), however
    the step is split into micro-batches and processes. A stop signal seen between micro-batches abandons
    the step (None is returned; the state, random generators included, is as after the previous step).

    One collective and one device→host sync per step (with gradient accumulation under torchrun, one more
    small collective between micro-batches, to stop together): the logged means, the gradient norm and
    whether a stop signal reached any rank travel in one tensor, read once before the optimizer steps."""
    config, world = run.config, run.world
    began = time.perf_counter()
    rng = trainstate.local_rng_state()  # given back if the step is abandoned
    rho = list(state.controller.rho) if state.controller else None  # the ρ this step computes with
    tokens, predicted = _step_tokens(run, state.step)
    normalizer = predicted / world.size  # DDP averages gradients over ranks
    stats = torch.zeros(5, dtype=torch.float32, device=world.device)  # loss, kl, ce, grad norm, stop
    for micro in range(config.grad_accum):
        if micro and stop is not None and distributed.any_true(world, stop.received is not None):
            state.optimizer.zero_grad(set_to_none=True)
            trainstate.set_local_rng_state(rng)
            return None
        ids, mask, padded, targets = _micro_batch(run, state, micro)
        last = micro == config.grad_accum - 1
        with state.model.no_sync() if world.distributed and not last else contextlib.nullcontext():
            with run.autocast():
                result = state.model(ids, mask, normalizer, padded, **targets)
            result.loss.backward()
        stats[:3] += torch.stack([result.loss.detach().float(), result.kl, result.ce])
    # the norm of the all-reduced gradient: the same on every rank, so the mean below is that norm
    stats[3] = torch.nn.utils.clip_grad_norm_(state.params, config.optim.grad_clip).detach().float()
    if stop is not None and stop.received is not None:
        stats[4] = 1.0
    loss, kl, ce, grad_norm, stops = (distributed.sum_tensor(world, stats) / world.size).tolist()
    state.stop_requested = stops > 0
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # the same verdict on every rank
        state.optimizer.zero_grad(set_to_none=True)
        trainstate.set_local_rng_state(rng)  # the generators as the step found them: exactly "after step N"
        save_checkpoint(run, state)
        raise BltoolError(
            f"non-finite loss or gradient at step {state.step + 1}; stopped. The last good state (after step "
            f"{state.step}) is checkpointed in {config.checkpoint_path}: lower --lr and continue with --resume, "
            "or start over")
    lr = state.scheduler.get_last_lr()[0]
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.meter.add(tokens, rho)
    computed = 1.0 if rho is None else sum(c for r, c in zip(rho, state.costs) if r > 0) / sum(state.costs)
    target, actual, dropped = _advance_budget(state)
    seconds = time.perf_counter() - began
    state.seconds += seconds
    state.step += 1
    state.log.append({
        "step": state.step, "tokens": state.meter.tokens, "loss": loss, "kl": kl, "ce": ce, "lr": lr,
        "grad_norm": grad_norm, "target_fraction": target, "actual_fraction": actual, "computed_fraction": computed,
        "modules_dropped": dropped, "tokens_per_s": tokens / seconds, "seconds": seconds,
    })
    return state.log[-1]


_NO_EVAL = {"eval_nll": None, "eval_ppl": None, "eval_nll_se": None, "eval_ppl_se": None}


def _eval_due(run: Run, step: int) -> bool:
    return step % run.config.evaluation.eval_every == 0 or step == run.steps


def evaluate_heldout(run: Run, state: TrainState) -> dict:
    """The student's mean NLL and perplexity on the held-out slice (--eval-tokens: the first tokens of the
    held-out split, the same for every run on this data), with their standard errors as eval-ppl computes
    them (over the slice's documents, or windows: `bltool.eval.stats`), dropout off; rank 0 scores, the others go
    on."""
    if not run.world.main:
        return dict(_NO_EVAL)
    config, data = run.config, run.inputs.data
    windows = [ids for ids, _ in heldout_windows(data, config.evaluation.eval_tokens)]
    if not windows:
        raise UsageError(f"--eval-every: {data.path} has no held-out tokens to score")
    counter = PieceCounter(document_separator(data))
    state.student.eval()
    try:
        with torch.no_grad(), run.autocast():
            for start in range(0, len(windows), config.batch_size):
                ids, mask = collate(windows[start: start + config.batch_size], run.pad_id, run.world.device)
                positions = chunk_positions(config.chunk, ids.shape[0])  # --chunk counts tokens over the rows
                counter.add(windows[start: start + config.batch_size],
                            token_nll(state.student, ids, mask, chunk=positions))
    finally:
        state.student.train()
    summary = counter.pieces().summary()
    return {"eval_nll": summary["mean_nll"], "eval_ppl": summary["perplexity"], "eval_nll_se": summary["mean_nll_se"],
            "eval_ppl_se": summary["perplexity_se"]}


def _step_tokens(run: Run, step: int) -> tuple[int, int]:
    """(tokens, predicted tokens) of optimizer step `step` over every rank and micro-batch, from the row
    lengths (the data order is a pure function of the step: no collective needed)."""
    config, train = run.config, run.inputs.train
    per_step = run.global_batch
    lengths = [train.length(int(i)) for i in positions_to_indices(step * per_step, per_step, len(train), config.seed)]
    return sum(lengths), sum(length - 1 for length in lengths)


def _host_batch(run: Run, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Micro-batch `key` = (step, micro) of this rank on the host: token ids and mask (B, T), whether any
    row is padded, and with --teacher-logits the cache's tensors (`TeacherCache.batch`)."""
    config, world, train = run.config, run.world, run.inputs.train
    step, micro = key
    index = [int(i) for i in micro_batch_indices(step, micro, world.rank, world.size, config.batch_size,
                                                 config.grad_accum, len(train), config.seed)]
    rows = [train[i] for i in index]
    ids, mask = collate(rows, run.pad_id, None)
    padded = any(len(r) < ids.shape[1] for r in rows)
    if run.inputs.cache is None:
        return ids, mask, padded
    return ids, mask, padded, *run.inputs.cache.batch(index, ids.shape[1], "cpu")


def _prefetcher(run: Run, start: int) -> Prefetcher:
    """The micro-batches of steps start.. built ahead in a background thread."""
    keys = ((step, micro) for step in range(start, run.steps) for micro in range(run.config.grad_accum))
    return Prefetcher(lambda key: _host_batch(run, key), keys, run.world.device)


def _micro_batch(run: Run, state: TrainState, micro: int) -> tuple[torch.Tensor, torch.Tensor, bool, dict]:
    """A micro-batch's token ids and mask (B, T) on the device, whether it is padded, and the teacher's
    side of the loss: the live teacher's final hidden states and head, or the cache's top-k logits or samples."""
    key = (state.step, micro)
    if state.prefetch is not None:
        ids, mask, padded, *cached = state.prefetch.get(key)
    else:
        ids, mask, padded, *cached = (t.to(run.world.device) if isinstance(t, torch.Tensor) else t
                                      for t in _host_batch(run, key))
    if cached:
        return ids, mask, padded, {run.inputs.cache.form: tuple(cached)}  # topk= or sampled= of the Objective
    with torch.no_grad(), run.autocast():
        teacher_hidden = hidden_states(run.teacher, ids, mask if padded else None)  # (B, T, d_T)
    return ids, mask, padded, {"teacher_hidden": teacher_hidden,
                               "teacher_head": run.teacher.get_output_embeddings()}


def _advance_budget(state: TrainState) -> tuple[float, float, int]:
    """Step the budget controller and hand the new ρ to the modules; (target, actual, modules dropped)."""
    if state.controller is None:
        return 1.0, 1.0, 0
    ctl = state.controller.step()
    _set_rho(state.adapted, state.controller)
    return ctl["target_fraction"], ctl["actual_fraction"], ctl["modules_dropped"]


def _set_rho(adapted: list[tuple[str, GatedLoRALinear]], controller: BudgetController) -> None:
    for (_, module), value in zip(adapted, controller.rho):
        module.set_rho(value)


def save_checkpoint(run: Run, state: TrainState) -> None:
    """Everything needed to continue bit for bit, after `state.step` steps (collective: every rank calls)."""
    rng = trainstate.rng_tensors(_gather_rng(run.world))
    if run.world.main:
        meta = {"step": state.step, "total_steps": run.steps, "scheduler": state.scheduler.state_dict(),
                "controller": state.controller.state_dict() if state.controller else None,
                "meter": state.meter.state_dict(), "log": state.log, "world_size": run.world.size,
                "seconds": state.seconds, "lr_history": state.lr_history,
                "frozen_dtype": dtype_name(run.frozen_dtype)}
        trainstate.save(run.config.checkpoint_path, state.student, state.optimizer, rng, meta, run.config.record())
    distributed.barrier(run.world)


def _gather_rng(world: distributed.World) -> list[dict[str, torch.Tensor]]:
    local = trainstate.local_rng_state()
    gathered = {key: distributed.gather_tensors(world, value) for key, value in local.items()}
    return [{key: gathered[key][r] for key in gathered} for r in range(world.size)]


def _resume(run: Run, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, meter: ComputeMeter, controller: BudgetController | None,
            adapted: list[tuple[str, GatedLoRALinear]]) -> dict:
    """Restore the checkpoint in --checkpoint-dir into the freshly built run's objects; its progress (step,
    log, seconds, lr_history: the rest of a TrainState)."""
    ckpt, record, world = run.config.checkpoint_path, run.config.record(), run.world
    saved_state, trainable, optim, rng = trainstate.load(ckpt)
    saved = read_manifest(ckpt, (Stage.DISTILL_CHECKPOINT,), "--checkpoint-dir")["config"]
    # --dtype: what it resolved to (auto differs between machines, and with BLTOOL_CPU_BF16), where recorded
    frozen, saved_frozen = dtype_name(run.frozen_dtype), saved_state.get("frozen_dtype")
    free = RESUME_FREE + RESUME_RESCALE + (("dtype",) if saved_frozen is not None else ())
    differing = [k for k in record if k not in free and saved.get(k) != record[k]]
    if differing:
        flags = ", ".join(f"--{k.replace('_', '-')} ({saved.get(k)!r} there, {record[k]!r} here)"
                          for k in differing)
        raise UsageError(f"--resume: the checkpoint in {ckpt} is from a run with other settings: {flags}")
    if saved_frozen is not None and saved_frozen != frozen:  # a run keeps its frozen weights' precision
        raise UsageError(f"--resume: the checkpoint in {ckpt} trained with its frozen weights in {saved_frozen}, "
                         f"--dtype {run.config.dtype} is {frozen} here; resume with --dtype {saved_frozen}")
    if saved_state["world_size"] != world.size:
        raise UsageError(
            f"--resume: the checkpoint in {ckpt} was written by {saved_state['world_size']} process(es), this run "
            f"has {world.size}; the global batch, the step count, the learning-rate schedule, the budget "
            f"controller and the data order all follow from it: resume with {saved_state['world_size']} "
            "process(es)")
    trainstate.restore(student, optimizer, trainable, optim, saved_state["param_groups"])
    scheduler.load_state_dict(saved_state["scheduler"])
    step = int(saved_state["step"])
    # the method is not RESUME_FREE: the checkpoint's is this run's
    saved_lr = saved["lr"] if saved.get("lr") is not None else run.method.default_lr
    lr_history = list(saved_state.get("lr_history") or [{"step": 0, "lr": saved_lr}])
    if run.config.learning_rate != saved_lr:
        _set_peak_lr(optimizer, scheduler, run.config.learning_rate)
        # a second change at the same step replaces the first
        lr_history = [h for h in lr_history if h["step"] < step] + [{"step": step, "lr": run.config.learning_rate}]
        ui.info(f"--lr {run.config.learning_rate:g} (was {saved_lr:g}) from step {step + 1} on")
    meter.load_state_dict(saved_state["meter"])
    if controller is not None:
        controller.load_state_dict(saved_state["controller"])
        _set_rho(adapted, controller)
    trainstate.set_local_rng_state({k.split(".", 1)[1]: v for k, v in rng.items()
                                    if k.startswith(f"rank{world.rank}.")})
    if step >= run.steps:
        ui.info(f"the run in {ckpt} finished its {run.steps} steps; writing its output")
    else:
        ui.info(f"resuming at step {step} of {run.steps} from {ckpt}")
    return {"step": step, "log": list(saved_state["log"]), "seconds": float(saved_state.get("seconds", 0.0)),
            "lr_history": lr_history}


def _set_peak_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 lr: float) -> None:
    """Rescale the restored schedule to the peak `lr`: the same warm-up and cosine factor at the same step,
    in the scheduler (which sets every later step's lr) and in the optimizer (which the next step uses)."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _progress(world: distributed.World):
    return ui.progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  dense {task.fields[dense]:.2f}  {task.fields[rate]:,.0f} tok/s"),
        TimeElapsedColumn(), disable=not world.main,
    )


def _peak_memory_mib(device: str) -> dict:
    """Peak memory of this process: CUDA allocations on a GPU, and the resident set (which includes both
    models' weights and the Python runtime) on the host."""
    import resource

    peak = {"host_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    if device.startswith("cuda"):
        peak["cuda_allocated"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def _with_float32_base(run: Run, state: TrainState) -> torch.nn.Module:
    """The trained student to save. Its frozen base weights trained in --dtype (auto: bf16 on CUDA and on
    CPUs with native bf16) but never changed: the saved student gets them from the --student checkpoint at
    full precision, with the trained adapters and ρ."""
    if all(m.base.weight.dtype == torch.float32 for _, m in state.adapted):
        return state.student
    model = load_model(run.inputs.student_ref, dtype=torch.float32, device="cpu", flag="--student")
    with torch.no_grad():
        for (_, new), (_, old) in zip(inject_lora(model, lora_spec(run.config)), state.adapted):
            for name in ("lora_A", "lora_B", "gate_logits"):
                if getattr(new, name) is not None:
                    getattr(new, name).copy_(getattr(old, name))
            new.set_rho(old._rho)
    return model.eval()


def save(run: Run, state: TrainState) -> None:
    """Write the distilled student with its log and manifest to --out (rank 0)."""
    config, inputs, world, meter, log = run.config, run.inputs, run.world, state.meter, state.log
    seconds = state.seconds
    teacher_input = (inputs.cache.ref() if inputs.cache is not None else
                     {"role": "teacher", **inputs.teacher_ref.describe(),
                      "content": model_content_hash(inputs.teacher_ref)})
    student_input = {"role": "student", **inputs.student_ref.describe(),
                     "content": model_content_hash(inputs.student_ref)}
    compute = meter.summary(config.controller.budget, config.controller.decay_start, config.controller.decay_end)
    student, adapted, controller = state.student.eval(), state.adapted, state.controller
    with atomic_output(Path(config.out), config.overwrite) as tmp:
        if adapted:
            save_adapted(tmp, _with_float32_base(run, state), inputs.tokenizer)
        else:
            student.save_pretrained(tmp)
            inputs.tokenizer.save_pretrained(tmp)
        keys = list(dict.fromkeys(k for row in log for k in row))  # eval columns may start mid-run (--resume)
        write_arrow(tmp / "log.arrow", [{k: row.get(k) for k in keys} for row in log])
        write_manifest(
            tmp, Stage.DISTILL,
            config=config.record(),
            inputs=[teacher_input, student_input, inputs.data.ref()],
            method=config.method,
            adapters=adapter_section(lora_spec(config), adapted) if adapted else None,
            budget=asdict(config.budget_config()) if controller else None,
            schedule={"steps": run.steps, "warmup_steps": run.warmup, "lr": config.learning_rate,
                      "lr_history": state.lr_history,
                      "scheduler": "cosine", "sequences_per_step": run.global_batch,
                      "seq_len": inputs.data.seq_len, "world_size": world.size},
            training={"tokens_seen": meter.tokens, "steps": run.steps, "seconds": round(seconds, 3),
                      "tokens_per_s": round(meter.tokens / seconds, 1) if seconds > 0 else None,
                      "final_loss": log[-1]["loss"] if log else None, "device": world.device,
                      "frozen_dtype": dtype_name(run.frozen_dtype),
                      "peak_memory_mib": _peak_memory_mib(world.device),
                      "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
                      "parameters": count_parameters(student)},
            compute=compute,
            evaluation={"every": config.evaluation.eval_every, "tokens": config.evaluation.eval_tokens,
                        "split": "heldout",
                        "data": inputs.data.manifest["hash"],
                        "rule": "the first --eval-tokens tokens of the held-out split, windows in file order",
                        "se": "eval_nll_se, eval_ppl_se: the delta method over the slice's documents (its windows "
                              "where the data does not mark them), as eval-ppl; docs/method.md §6"}
            if config.evaluation.eval_every else None,
            controller={"rho": list(controller.rho), "modules_dropped": sum(r == 0 for r in controller.rho)}
            if controller else None,
            tokenizer=inputs.data.tokenizer,
        )
    last = log[-1]
    ui.info(f"{config.method}: {run.steps} steps, {meter.tokens:,} tokens, final loss {last['loss']:.4f} "
            f"(kl {last['kl']:.4f}, ce {last['ce']:.4f}); dense fraction {last['actual_fraction']:.3f}, "
            f"{last['modules_dropped']} modules at ρ = 0; training compute proxy {compute['proxy']:.3f}, "
            f"realised {compute['realised']:.3f} (kd-full = 1)")
