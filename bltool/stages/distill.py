"""distill: KD-Full, KD-LoRA and Budgeted LoRA (METHOD.md §2–4, §7).

A teacher (or its cached top-k logits) supervises a student on the prepared training split with the
loss of §4. `kd-full` trains every student weight; `kd-lora` freezes the student and trains LoRA on the
target projections; `budgeted-lora` adds per-rank gates and the budget controller, which lowers each
module's dense retention ρ along the schedule until the dense cost is the budget F (modules at ρ = 0
stop computing their dense matmul, so training gets cheaper as it goes).

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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bltool import distributed, trainstate, ui
from bltool.adapters import adapter_section, save_adapted
from bltool.artifacts import atomic_output, check_output_dir, read_manifest, write_arrow, write_manifest
from bltool.batches import PackedSequences, collate, micro_batch_indices, positions_to_indices
from bltool.budget import BudgetConfig, BudgetController
from bltool.compute import ComputeMeter
from bltool.data import PreparedData
from bltool.errors import BltoolError, Interrupted, UsageError
from bltool.lora import DEFAULT_TARGETS, LoRASpec, inject_lora
from bltool.losses import check_kd_args, kd_loss, kd_loss_topk
from bltool.models import (
    artifact_manifest,
    count_parameters,
    load_model,
    load_tokenizer,
    model_content_hash,
    resolve_model,
    tokenizer_identity,
)
from bltool.nll import hidden_states
from bltool.signals import StopSignals
from bltool.teacher_cache import TeacherCache

STAGE = "distill"
METHODS = ("kd-full", "kd-lora", "budgeted-lora")
DEFAULT_LR = {"kd-full": 1e-4, "kd-lora": 3e-4, "budgeted-lora": 3e-4}
# Fields that may differ between a run and its resumption (they do not change what is computed).
RESUME_FREE = ("out", "checkpoint_dir", "resume", "overwrite", "save_every", "device")


@dataclass(frozen=True)
class DistillConfig:
    student: str  # student model (a build-student output, any checkpoint directory or alias)
    data: str  # a prepare-data output directory
    out: str  # output directory
    teacher: str | None = None  # teacher model; may be omitted with --teacher-logits
    method: str = "budgeted-lora"  # kd-full | kd-lora | budgeted-lora
    budget: float | None = None  # --budget F (budgeted-lora only): final fraction of dense cost kept
    tokens: int = 2_000_000  # token budget (global, all ranks); steps = tokens // tokens per step
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # peak learning rate (default 3e-4 for LoRA methods, 1e-4 for kd-full)
    temperature: float = 3.0  # KD temperature T
    kd_weight: float = 0.8  # α_kd: weight of the KL term (1 − α_kd on cross-entropy)
    rank: int = 128  # LoRA rank r
    lora_alpha: float = 256.0  # LoRA α (scaling α / r)
    lora_dropout: float = 0.05  # dropout on the LoRA path's input
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # adapted linears by attribute name
    decay_start: float = 0.1  # s0: the budget starts to fall at this fraction of training
    decay_end: float = 0.3  # s1: and reaches F here
    rho_ema: float = 0.9  # β: smoothing of ρ toward its target
    tau_drop: float = 0.05  # ρ below this is clamped to 0 (the dense matmul stops)
    warmup: float = 0.03  # warm-up fraction of the steps ...
    warmup_cap: int = 2000  # ... capped at this many steps
    grad_clip: float = 1.0  # max gradient norm
    seed: int = 0  # data order, LoRA initialisation and dropout
    save_every: int = 200  # checkpoint every N steps (0: only when stopped)
    checkpoint_dir: str | None = None  # default: OUT.checkpoint
    resume: bool = False  # continue the run whose checkpoint is in --checkpoint-dir
    teacher_logits: str | None = None  # a teacher-logits output: read cached top-k logits instead of the teacher
    chunk: int = 256  # positions per LM-head chunk in the loss (bounds logits memory)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    overwrite: bool = False  # replace an existing --out and checkpoint

    def __post_init__(self):
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "budgeted-lora":
            if self.budget is None:
                raise UsageError("--budget is required with --method budgeted-lora (e.g. --budget 0.4)")
            BudgetConfig(self.budget, self.decay_start, self.decay_end, self.rho_ema, self.tau_drop)
        elif self.budget is not None:
            raise UsageError(f"--budget applies to --method budgeted-lora only, not {self.method}")
        if self.method != "kd-full":
            LoRASpec(self.rank, self.lora_alpha, self.lora_dropout, tuple(self.target_modules))
        check_kd_args(self.temperature, self.kd_weight, self.chunk)
        for flag, value in (("--tokens", self.tokens), ("--batch-size", self.batch_size),
                            ("--grad-accum", self.grad_accum)):
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise UsageError(f"--warmup must be in [0, 1), got {self.warmup}")
        if self.warmup_cap < 0 or self.save_every < 0:
            raise UsageError("--warmup-cap and --save-every must not be negative")
        if not self.grad_clip > 0:
            raise UsageError(f"--grad-clip must be positive, got {self.grad_clip}")
        if self.teacher is None and self.teacher_logits is None:
            raise UsageError("--teacher is required (or --teacher-logits DIR made by `bltool teacher-logits`)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(f"{self.out}.checkpoint")

    def budget_config(self) -> BudgetConfig:
        return BudgetConfig(self.budget, self.decay_start, self.decay_end, self.rho_ema, self.tau_drop)

    def lora_spec(self) -> LoRASpec:
        return LoRASpec(self.rank, self.lora_alpha, self.lora_dropout, tuple(self.target_modules),
                        gated=self.method == "budgeted-lora")


class Objective(torch.nn.Module):
    """The student's side of a step: its hidden states and the chunked §4 loss (what DDP wraps)."""

    def __init__(self, student, config: DistillConfig):
        super().__init__()
        self.student = student
        self.kw = {"temperature": config.temperature, "kd_weight": config.kd_weight, "chunk": config.chunk}

    def forward(self, input_ids, attention_mask, teacher_hidden=None, teacher_head=None, topk=None):
        hidden = hidden_states(self.student, input_ids, attention_mask)  # (B, T, d)
        head = self.student.get_output_embeddings()
        if topk is not None:
            return kd_loss_topk(hidden, head, *topk, input_ids, attention_mask, **self.kw)
        return kd_loss(hidden, teacher_hidden, head, teacher_head, input_ids, attention_mask, **self.kw)


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
    manifest = artifact_manifest(student_ref.path)
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
    if abs(cache.temperature - config.temperature) > 1e-12:
        raise UsageError(f"--teacher-logits: {cache.path} was made at --temperature {cache.temperature}; "
                         f"this run has --temperature {config.temperature}")
    if config.teacher is not None:
        cached = made["teacher"]["content"]
        wanted = model_content_hash(resolve_model(config.teacher, flag="--teacher"))
        if cached != wanted:
            raise UsageError(f"--teacher-logits: {cache.path} was made with another teacher than --teacher "
                             f"{config.teacher}")


def _total_steps(config: DistillConfig, world: distributed.World, seq_len: int) -> int:
    per_step = world.size * config.batch_size * config.grad_accum * seq_len
    steps = config.tokens // per_step
    if steps < 1:
        raise UsageError(
            f"--tokens {config.tokens:,} is below one optimizer step: {per_step:,} tokens "
            f"({world.size} process(es) × --batch-size {config.batch_size} × --grad-accum {config.grad_accum} "
            f"× sequence length {seq_len})")
    return steps


def _check_models(student, teacher_config, vocab: int) -> None:
    s = student.config
    if s.vocab_size != vocab:
        raise UsageError(f"--student: its vocabulary ({s.vocab_size}) does not fit the teacher's ({vocab}); "
                         "KD needs the same vocabulary on both sides")
    if teacher_config is not None and s.hidden_size > teacher_config.hidden_size:
        raise UsageError(f"--student: its hidden size ({s.hidden_size}) is larger than the teacher's "
                         f"({teacher_config.hidden_size}); are --student and --teacher swapped?")


# ---------------------------------------------------------------------------------------------------
# The run


def run(config: DistillConfig) -> Path | None:
    """Train; return the output path on rank 0 (None on other ranks)."""
    world = distributed.setup(config.device)
    if not world.main:
        ui.console.quiet = True
    try:
        return _run(config, world)
    finally:
        distributed.teardown(world)


def _run(config: DistillConfig, world: distributed.World) -> Path | None:
    out, ckpt = Path(config.out), config.checkpoint_path
    check_output_dir(out, config.overwrite)
    if config.resume and not (ckpt / "manifest.json").is_file():
        raise UsageError(f"--resume: no checkpoint in {ckpt} (set --checkpoint-dir to where it is)")
    if not config.resume and ckpt.exists() and not config.overwrite:
        raise UsageError(f"--checkpoint-dir {ckpt} holds the checkpoint of an earlier run; pass --resume to "
                         "continue it or --overwrite to start over")
    inputs = _open_inputs(config)
    if not config.resume and ckpt.exists() and world.main:
        shutil.rmtree(ckpt)  # --overwrite: a stale checkpoint must not be resumed by mistake later
    seq_len = inputs.data.seq_len
    steps = _total_steps(config, world, seq_len)
    if inputs.cache is not None:
        needed = min(steps * world.size * config.batch_size * config.grad_accum, len(inputs.train))
        missing = [int(i) for i in positions_to_indices(0, needed, len(inputs.train), config.seed)
                   if int(i) not in inputs.cache]
        if missing:
            raise UsageError(f"--teacher-logits: {inputs.cache.path} lacks {len(missing)} of the {needed} sequences "
                             "this run reads; make it with `bltool teacher-logits --tokens` at least --tokens")
    cuda = world.device.startswith("cuda")
    torch.manual_seed(config.seed)

    teacher = None
    if inputs.cache is None:
        teacher = load_model(inputs.teacher_ref, dtype=torch.bfloat16 if cuda else torch.float32,
                             device=world.device, flag="--teacher").requires_grad_(False).eval()
        vocab, teacher_config = teacher.config.vocab_size, teacher.config
    else:
        vocab, teacher_config = int(inputs.cache.manifest["teacher"]["vocab_size"]), None
    student = load_model(inputs.student_ref, dtype=torch.float32, device=world.device, flag="--student")
    _check_models(student, teacher_config, vocab)

    # method: which weights train, and the adapted modules' dense costs
    if config.method == "kd-full":
        student.requires_grad_(True)
        linears = [m for n, m in student.named_modules()
                   if n.rsplit(".", 1)[-1] in config.target_modules and isinstance(m, torch.nn.Linear)]
        adapted, costs, lora_macs = [], [m.in_features * m.out_features for m in linears], 0
    else:
        adapted = inject_lora(student, config.lora_spec())
        costs = [m.dense_macs for _, m in adapted]
        lora_macs = sum(m.lora_macs for _, m in adapted)
    student.to(world.device).train()
    controller = None
    if config.method == "budgeted-lora":
        controller = BudgetController(costs, config.budget_config(), steps)
        if warning := config.budget_config().short_run_warning(steps):
            ui.warn(warning)
    meter = ComputeMeter(config.method, costs, lora_macs)

    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    warmup = min(round(config.warmup * steps), config.warmup_cap)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)

    run_config = {**asdict(config), "target_modules": list(config.target_modules)}
    start, log = 0, []
    if config.resume:
        start, log = _resume(ckpt, run_config, world, student, optimizer, scheduler, controller, adapted, meter)
        if start >= steps:
            raise UsageError(f"--resume: the run in {ckpt} already finished its {steps} steps")
        ui.info(f"resuming at step {start} of {steps} from {ckpt}")

    objective = Objective(student, config)
    model = objective
    if world.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[world.device] if cuda else None, broadcast_buffers=False)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    pad_id = int(inputs.data.tokenizer["eos_token_id"])
    teacher_head = teacher.get_output_embeddings() if teacher is not None else None

    def checkpoint(step: int) -> None:
        rng = trainstate.rng_tensors(_gather_rng(world))
        if world.main:
            state = {"step": step, "total_steps": steps, "scheduler": scheduler.state_dict(),
                     "controller": controller.state_dict() if controller else None, "meter": meter.state_dict(),
                     "log": log, "world_size": world.size}
            trainstate.save(ckpt, student, optimizer, rng, state, run_config)
        distributed.barrier(world)

    ui.info(f"distill {config.method}: {steps} steps × {world.size * config.batch_size * config.grad_accum} "
            f"sequences of {seq_len} on {world.size} × {world.device}, lr {config.learning_rate:g}, warm-up {warmup}"
            + (f", budget {config.budget}" if controller else ""))
    watch = ui.Stopwatch()
    with StopSignals() as stop, _progress(world) as progress:
        task = progress.add_task("distill", total=steps, completed=start, loss=float("nan"), dense=1.0, rate=0.0)
        for step in range(start, steps):
            began = time.perf_counter()
            rho = list(controller.rho) if controller else None
            sums = torch.zeros(3, dtype=torch.float64)  # loss, kl, ce (sums of micro-batch means)
            tokens = 0
            for micro in range(config.grad_accum):
                index = micro_batch_indices(step, micro, world.rank, world.size, config.batch_size,
                                            config.grad_accum, len(inputs.train), config.seed)
                ids, mask = collate([inputs.train[int(i)] for i in index], pad_id, world.device)
                kwargs = {}
                if inputs.cache is not None:
                    kwargs["topk"] = inputs.cache.batch([int(i) for i in index], ids.shape[1], world.device)
                else:
                    with torch.no_grad(), autocast():
                        kwargs["teacher_hidden"] = hidden_states(teacher, ids, mask)  # (B, T, d_T)
                    kwargs["teacher_head"] = teacher_head
                last = micro == config.grad_accum - 1
                sync = model.no_sync() if world.distributed and not last else contextlib.nullcontext()
                with sync:
                    with autocast():
                        result = model(ids, mask, **kwargs)
                    (result.loss / config.grad_accum).backward()
                sums += torch.stack([result.loss, result.kl, result.ce]).detach().to("cpu", torch.float64)
                tokens += int(mask.sum())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
            finite = math.isfinite(float(sums[0])) and math.isfinite(grad_norm)
            if distributed.any_true(world, not finite):
                optimizer.zero_grad(set_to_none=True)
                checkpoint(step)
                raise BltoolError(
                    f"non-finite loss or gradient at step {step + 1}; stopped. The last good state (after step "
                    f"{step}) is checkpointed in {ckpt}: lower --lr and continue with --resume, or start over")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens = distributed.sum_int(world, tokens)
            meter.add(tokens, rho)
            computed = 1.0 if rho is None else sum(c for r, c in zip(rho, costs) if r > 0) / sum(costs)
            if controller:
                ctl = controller.step()
                for (_, module), value in zip(adapted, controller.rho):
                    module.set_rho(value)
                target, actual, dropped = ctl["target_fraction"], ctl["actual_fraction"], ctl["modules_dropped"]
            else:
                target, actual, dropped = 1.0, 1.0, 0
            seconds = time.perf_counter() - began
            loss, kl, ce = distributed.mean_floats(world, (sums / config.grad_accum).tolist())
            log.append({
                "step": step + 1, "tokens": meter.tokens, "loss": loss, "kl": kl, "ce": ce, "lr": lr,
                "grad_norm": grad_norm,
                "target_fraction": target, "actual_fraction": actual, "computed_fraction": computed,
                "modules_dropped": dropped, "tokens_per_s": tokens / seconds, "seconds": seconds,
            })
            progress.update(task, advance=1, loss=log[-1]["loss"], dense=actual, rate=meter.tokens / watch.seconds)
            if distributed.any_true(world, stop.received is not None):
                checkpoint(step + 1)
                signum = stop.received or 15
                raise Interrupted(f"stopped by {stop.name or 'a signal on another rank'} after step {step + 1} of "
                                  f"{steps}; checkpoint in {ckpt}; continue with --resume", signum)
            if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < steps:
                checkpoint(step + 1)
    checkpoint(steps)
    seconds = watch.seconds
    if not world.main:
        return None
    _write_output(config, inputs, student, adapted, controller, meter, log, steps, warmup, seconds, world, out)
    return out


def _peak_memory_mib(device: str) -> dict:
    """Peak memory of this process: CUDA allocations on a GPU, and the resident set (which includes both
    models' weights and the Python runtime) on the host."""
    import resource

    peak = {"host_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    if device.startswith("cuda"):
        peak["cuda_allocated"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def _gather_rng(world: distributed.World) -> list[dict[str, torch.Tensor]]:
    local = trainstate.local_rng_state()
    gathered = {key: distributed.gather_tensors(world, value) for key, value in local.items()}
    return [{key: gathered[key][r] for key in gathered} for r in range(world.size)]


def _resume(ckpt, run_config, world, student, optimizer, scheduler, controller, adapted, meter):
    state, trainable, optim, rng = trainstate.load(ckpt)
    saved = read_manifest(ckpt, (trainstate.STAGE,), "--checkpoint-dir")["config"]
    differing = [k for k in run_config if k not in RESUME_FREE and saved.get(k) != run_config[k]]
    if differing:
        flags = ", ".join(f"--{k.replace('_', '-')} ({saved.get(k)!r} there, {run_config[k]!r} here)"
                          for k in differing)
        raise UsageError(f"--resume: the checkpoint in {ckpt} is from a run with other settings: {flags}")
    trainstate.restore(student, optimizer, trainable, optim, state["param_groups"])
    scheduler.load_state_dict(state["scheduler"])
    meter.load_state_dict(state["meter"])
    if controller is not None:
        controller.load_state_dict(state["controller"])
        for (_, module), value in zip(adapted, controller.rho):
            module.set_rho(value)
    if state["world_size"] == world.size:
        trainstate.set_local_rng_state({k.split(".", 1)[1]: v for k, v in rng.items()
                                        if k.startswith(f"rank{world.rank}.")})
    else:
        ui.warn(f"the checkpoint was written by {state['world_size']} process(es), this run has {world.size}: "
                "dropout randomness will differ from an uninterrupted run")
    return int(state["step"]), list(state["log"])


def _progress(world: distributed.World):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  dense {task.fields[dense]:.2f}  {task.fields[rate]:,.0f} tok/s"),
        TimeElapsedColumn(), console=ui.console, transient=True, disable=not world.main,
    )


def _write_output(config, inputs, student, adapted, controller, meter, log, steps, warmup, seconds, world, out):
    teacher_input = (inputs.cache.ref() if inputs.cache is not None else
                     {"role": "teacher", **inputs.teacher_ref.describe(),
                      "content": model_content_hash(inputs.teacher_ref)})
    student_input = {"role": "student", **inputs.student_ref.describe(),
                     "content": model_content_hash(inputs.student_ref)}
    compute = meter.summary(config.budget, config.decay_start, config.decay_end)
    student.eval()
    with atomic_output(out, config.overwrite) as tmp:
        if adapted:
            save_adapted(tmp, student, inputs.tokenizer)
        else:
            student.save_pretrained(tmp)
            inputs.tokenizer.save_pretrained(tmp)
        write_arrow(tmp / "log.arrow", log)
        spec = config.lora_spec() if adapted else None
        write_manifest(
            tmp, STAGE,
            config={**asdict(config), "target_modules": list(config.target_modules)},
            inputs=[teacher_input, student_input, inputs.data.ref()],
            method=config.method,
            adapters=adapter_section(spec, adapted) if adapted else None,
            budget=asdict(config.budget_config()) if controller else None,
            schedule={"steps": steps, "warmup_steps": warmup, "lr": config.learning_rate, "scheduler": "cosine",
                      "sequences_per_step": world.size * config.batch_size * config.grad_accum,
                      "seq_len": inputs.data.seq_len, "world_size": world.size},
            training={"tokens_seen": meter.tokens, "steps": steps, "seconds": round(seconds, 3),
                      "tokens_per_s": round(meter.tokens / seconds, 1) if seconds > 0 else None,
                      "final_loss": log[-1]["loss"] if log else None, "device": world.device,
                      "peak_memory_mib": _peak_memory_mib(world.device),
                      "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
                      "parameters": count_parameters(student)},
            compute=compute,
            controller={"rho": list(controller.rho), "modules_dropped": sum(r == 0 for r in controller.rho)}
            if controller else None,
            tokenizer=inputs.data.tokenizer,
        )
    last = log[-1]
    ui.info(f"{config.method}: {steps} steps, {meter.tokens:,} tokens, final loss {last['loss']:.4f} "
            f"(kl {last['kl']:.4f}, ce {last['ce']:.4f}); dense fraction {last['actual_fraction']:.3f}, "
            f"{last['modules_dropped']} modules at ρ = 0; training compute proxy {compute['proxy']:.3f}, "
            f"realised {compute['realised']:.3f} (kd-full = 1)")

