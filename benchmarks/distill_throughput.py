"""Distillation throughput, peak memory and MFU: bltool side by side with competent peers.

Same teacher, student, data, batch, sequence length, teacher kernels and batch prefetching for every row;
one command, one run:

  peft-lora      the naive peer: PEFT `get_peft_model` LoRA (r 128, α 256, dropout 0.05, q k v o gate up
                 down) on the student, the plain full-logit KD loss of docs/method.md §4 (both models'
                 (B, T, V) logits, F.kl_div of the log-softmaxes at T = 3 times T², weight 0.8, plus 0.2 ·
                 cross-entropy, over the non-padding next-token positions), torch.optim.AdamW, gradient
                 clipping at 1.0: the afternoon version.
  peft-chunked   the competent peer: the same PEFT LoRA and loss, chunked over positions through both LM
                 heads (torchtune's chunked-output KL, taken one step further): both models' final hidden
                 states, then per chunk of --chunk tokens the two heads' logits, the loss by autograd and
                 its backward into a detached copy of the student's hidden states, and one backward of the
                 decoder from there. No (B, T, V) tensor of either model, each head once per position.
  peft-cache     the cache peer: the same chunked PEFT loop reading the same top-64 teacher-logits cache
                 as kd-lora-cache (bltool's reader), with the same loss form (the teacher's top k and its
                 tail as one bucket, docs/method.md §4), written by autograd.
  full-ft        the naive loop training every student weight (AdamW, lr 1e-4).
  kd-lora        bltool `distill --method kd-lora`, live teacher.
  kd-lora-cache  bltool kd-lora from the top-64 teacher-logits cache (`bltool teacher-logits`).
  bl-0.4, bl-0.0 bltool budgeted-lora at F = 0.4 and F = 0, live teacher, steady state: ρ at F.
  bl-0.4-sched, bl-0.0-sched  the same over a whole schedule (see below).
  kd-full        bltool kd-full, live teacher.

Fairness switches, alike for every row. --kernels onednn (the default): every row's live teacher runs
its linears through bltool's oneDNN frozen linear (`bltool.adapt.kernels.use_onednn`, what bltool's
`distill` does; the peers call it on their teacher too), the students' own kernels are each row's own;
--kernels aten: BLTOOL_ONEDNN=0 in every worker, every linear of every row through `F.linear`.
--prefetch on (the default): every row builds its coming batches (collation, cache reads) in a
background thread (`bltool.train.batches.Prefetcher`, what `distill` does); off: every row builds them
inside the timed step.

bltool's rows run bltool's own training step: `bltool.stages.distill` builds its `Run` and `TrainState`
with `distill.prepare`, as `distill.run` does, and each step is `distill.train_step`. Steady-state
budgeted rows (bl-F): the timed steps must see ρ at the final budget, after the decay window and the
EMA settling. The run is W + S steps long, so s ≥ s1 from the first controller step; before the warm-up
the controller is stepped on its own (`_advance_budget`, no training, which changes nothing but ρ) until
ρ stops moving, and the worker checks that the target and the actual dense fraction equal F.

Schedule rows (bl-F-sched): the run is as long as a `distill` run of --schedule-tokens (default 2M, the
`--tokens` default) at the setting's batch, N steps, so ρ moves from 1 through the decay (s0 0.1 to s1
0.3) to F. The controller's trajectory over the N steps is simulated on its own; the run is sampled at
the midpoints of --schedule-points equal strata (default 10), and each distinct set of computed modules
(ρ > 0: what a step's cost depends on) among them is timed: the controller is set to that point's
state, pinned there for its W + S steps (restored after each step), and the step times taken. The
schedule's step time is the mean over the points (each point the median of its set's steps), i.e. the
time-weighted mean over the schedule, whose mean retention is ρ̄ of docs/method.md §7 (in the JSON,
beside the sampled and the exact mean computed fraction).

Protocol. Every (setting, row, repetition) runs in its own process (a fork of a server that imported
torch, transformers, peft and bltool once: `--launcher forkserver`, the default; `--launcher subprocess`
starts a fresh interpreter instead), which loads the models, runs `--warmup` steps and `--steps` timed
steps, and reports the step times and its peak memory. For each setting and each repetition the rows
run one after another in an order rotated by one per repetition. A row's step time is the median over
all its timed steps of all repetitions; tokens/s is the tokens of a step (batch × seq len) divided by
it. Loading and process start-up are not timed. The step time is a perf_counter around the whole
optimizer step (data collation unless prefetched, teacher forward or cache read, student forward +
backward, clipping, AdamW; on CUDA synchronised before and after).

Ratios. Speed: a live-teacher row against the faster of peft-lora and peft-chunked in that setting, a
cached row (kd-lora-cache, its variants) against peft-cache. Memory: a live row against peft-chunked,
a cached row against peft-cache. (A missing peer falls back to the other peers; the table names the
peer of every ratio.)

Peak memory. CUDA: `torch.cuda.max_memory_allocated` of the process (weights, optimizer state,
activations; bf16 frozen teacher and bf16 frozen base weights, autocast bf16). CPU: the peak resident
set (`ru_maxrss`) over the warm-up and timed steps: the process's peak is reset (/proc/self/clear_refs,
"5") once the models are loaded, so the transient of loading a checkpoint, which differs between the
loaders, does not count, while the weights, optimizer state and the Python/torch runtime do. The peak
over the whole process, loading included, is in the JSON as `load_peak_mib`. The maximum over
repetitions is reported.

Model FLOPs (for TFLOP/s and MFU), per token, with M = matmul MACs per token:

    FLOPs/token = 2·M_teacher + 4·M_student + 2·M_trainable

  forward 2·M for each model; the student's backward ≈ 2·M for the activation gradients (through frozen
  weights too) plus 2·M_trainable for the weight gradients of the trained matrices only (LoRA A and B for
  the LoRA rows; every projection and the LM head for the full rows). M counts the seven projections
  (for budgeted rows only the modules with ρ > 0, which are computed; over a schedule their mean over
  the sampled points), the LoRA factors r·(d_in + d_out), the LM head V·d and attention,
  n_heads·head_dim·(T + 1) per layer (QKᵀ and A·V over the causal mean context (T + 1)/2). The cached
  rows have no teacher term. Softmaxes and norms are not counted, as MFU conventionally counts only the
  model's work; nor is recomputation (activation checkpointing).
  MFU = achieved FLOP/s ÷ the measured matmul peak of the dtype the row computes in (bf16 on CUDA
  under autocast; on the CPU the dtype of its frozen weights, float32 for the full rows): the best
  median rate of an n × n × n product over the kernels the rows use (`torch.mm`, oneDNN's linear),
  measured in a worker like the rows (same threads) before and after the rows, the larger taken.
  --peak-tflops replaces the measurement with one figure for every row.

    .venv/bin/python benchmarks/distill_throughput.py --settings 2x512,8x1024 --out results.json
    .venv/bin/python benchmarks/distill_throughput.py --smoke        # tiny random models, < 1 min on CPU

Data: prepared with `bltool prepare-data` at each setting's sequence length into --work (unless given
with --data), the student built with `bltool build-student` (mixed, 6 layers) unless --student is
given, and the teacher-logits cache made with `bltool teacher-logits --top-k 64` to cover the steps.
PEFT is the `bench` extra (`pip install -e '.[bench]'`); bltool itself never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bltool.models.families import FAMILIES
from bltool.options import from_flags

TARGETS = FAMILIES["llama"].targets  # the teacher here is a Llama
LIVE_PEERS = ("peft-lora", "peft-chunked")  # a live-teacher row's speed is compared with the faster of these
CHUNKED_PEER = "peft-chunked"  # ... and its memory with this one
CACHE_PEER = "peft-cache"  # a cached row's speed and memory are compared with this one
PEERS = (*LIVE_PEERS, CACHE_PEER)
PEAK_JOB = "matmul-peak"  # the worker job measuring the matmul peak (not a row)
# name → what it runs; "kind" picks the worker, "loss" the peers' loss, the rest is bltool's DistillConfig
CONFIGS: dict[str, dict] = {
    "peft-lora": {"kind": "plain", "lora": True, "loss": "full",
                  "what": "PEFT LoRA, plain full-logit KD loss, AdamW (the naive peer)"},
    "peft-chunked": {"kind": "plain", "lora": True, "loss": "chunked",
                     "what": "PEFT LoRA, KD loss chunked through both heads, AdamW (the competent peer)"},
    "peft-cache": {"kind": "plain", "lora": True, "loss": "topk", "cache": True,
                   "what": "PEFT LoRA, chunked top-64 KD loss from the same cache, AdamW (the cache peer)"},
    "full-ft": {"kind": "plain", "lora": False, "loss": "full",
                "what": "plain full fine-tune, full-logit KD loss, AdamW"},
    "kd-lora": {"kind": "bltool", "method": "kd-lora", "what": "bltool kd-lora, live teacher"},
    "kd-lora-cache": {"kind": "bltool", "method": "kd-lora", "cache": True,
                      "what": "bltool kd-lora, top-64 teacher-logits cache"},
    "bl-0.4": {"kind": "bltool", "method": "budgeted-lora", "budget": 0.4,
               "what": "bltool budgeted-lora F = 0.4, steady state (ρ at F), live teacher"},
    "bl-0.0": {"kind": "bltool", "method": "budgeted-lora", "budget": 0.0,
               "what": "bltool budgeted-lora F = 0, steady state (ρ at F), live teacher"},
    "bl-0.4-sched": {"kind": "bltool", "method": "budgeted-lora", "budget": 0.4, "schedule": True,
                     "what": "bltool budgeted-lora F = 0.4 over a whole schedule (ρ from 1 to F), live teacher"},
    "bl-0.0-sched": {"kind": "bltool", "method": "budgeted-lora", "budget": 0.0, "schedule": True,
                     "what": "bltool budgeted-lora F = 0 over a whole schedule (ρ from 1 to F), live teacher"},
    "kd-full": {"kind": "bltool", "method": "kd-full", "what": "bltool kd-full, live teacher"},
    # bltool's options for speed and memory (not the defaults)
    "kd-lora-ckpt": {"kind": "bltool", "method": "kd-lora", "activation_checkpointing": True,
                     "what": "bltool kd-lora --activation-checkpointing, live teacher"},
    "kd-lora-cache-ckpt": {"kind": "bltool", "method": "kd-lora", "cache": True, "activation_checkpointing": True,
                           "what": "bltool kd-lora --activation-checkpointing, top-64 cache"},
    "kd-lora-compile": {"kind": "bltool", "method": "kd-lora", "compile": True,
                        "what": "bltool kd-lora --compile (student and teacher layers), live teacher"},
    "bl-0.0-compile": {"kind": "bltool", "method": "budgeted-lora", "budget": 0.0, "compile": True,
                       "what": "bltool budgeted-lora F = 0 --compile (ρ at F), live teacher"},
}
DEFAULT_CONFIGS = ("peft-lora", "peft-chunked", "peft-cache", "full-ft", "kd-lora", "kd-lora-cache", "bl-0.4",
                   "bl-0.0", "bl-0.4-sched", "bl-0.0-sched", "kd-full")
FLOPS_FORMULA = ("FLOPs/token = 2*M_teacher + 4*M_student + 2*M_trainable; M = matmul MACs/token: the 7 "
                 "projections (budgeted: only modules with rho > 0; over a schedule, their mean over the sampled "
                 "points), LoRA r*(d_in+d_out), LM head V*d, attention n_heads*head_dim*(T+1) per layer; no teacher "
                 "term from a cache; recomputation not counted")


# ---------------------------------------------------------------------------------------------------
# Memory and FLOPs (used in the workers)


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux ≥ 4.0), so ru_maxrss counts from here."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _shapes(cfg) -> dict[str, tuple[int, int]]:
    d, ff = cfg.hidden_size, cfg.intermediate_size
    nh = cfg.num_attention_heads
    nkv = getattr(cfg, "num_key_value_heads", None) or nh
    hd = getattr(cfg, "head_dim", None) or d // nh
    return {"q_proj": (d, nh * hd), "k_proj": (d, nkv * hd), "v_proj": (d, nkv * hd), "o_proj": (nh * hd, d),
            "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}


def matmul_macs(cfg, seq_len: int, dense_fraction: float = 1.0, rank: int = 0) -> dict[str, float]:
    """Matmul MACs per token of a Llama-style model (see the module docstring)."""
    layers = cfg.num_hidden_layers
    shapes = _shapes(cfg)
    nh = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    dense = layers * sum(i * o for i, o in shapes.values())
    return {"dense": dense * dense_fraction, "lora": layers * sum(rank * (i + o) for i, o in shapes.values()),
            "head": cfg.vocab_size * cfg.hidden_size, "attention": layers * nh * hd * (seq_len + 1),
            "dense_all": dense}


def model_flops(student_cfg, teacher_cfg, seq_len: int, lora_rank: int, dense_fraction: float) -> dict:
    """FLOPs per token: 2·M_teacher + 4·M_student + 2·M_trainable (lora_rank 0: full training)."""
    s = matmul_macs(student_cfg, seq_len, dense_fraction, lora_rank)
    m_student = s["dense"] + s["lora"] + s["head"] + s["attention"]
    m_train = s["lora"] if lora_rank else s["dense_all"] + s["head"]
    m_teacher = 0.0
    if teacher_cfg is not None:
        t = matmul_macs(teacher_cfg, seq_len)
        m_teacher = t["dense"] + t["head"] + t["attention"]
    return {"flops_per_token": 2 * m_teacher + 4 * m_student + 2 * m_train, "macs_teacher": m_teacher,
            "macs_student": m_student, "macs_trainable": m_train}


# ---------------------------------------------------------------------------------------------------
# Workers: one configuration, W + S steps, in this process


def _device(flag: str) -> str:
    import torch

    if flag == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return flag


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def matmul_peak(dtype: str, device: str = "cpu", n: int | None = None, repeats: int = 10) -> dict:
    """The measured matmul peak of `dtype` on `device` in TFLOP/s (`bltool.serve.timing.matmul_peak`: the best
    kernel the rows' frozen linears can take, an n × n × n product, n 2048 on the CPU and 8192 on CUDA)."""
    from bltool.serve.timing import matmul_peak as measured_peak

    n = n or (8192 if device.startswith("cuda") else 2048)
    peak = measured_peak((dtype,), size=n, warmup=3, repeats=repeats, device=device)[dtype]
    return {"tflops": peak["gflops"] / 1e3, "kernels": {k: v / 1e3 for k, v in peak["kernels"].items()}, "n": n,
            "dtype": dtype, "repeats": repeats}


def peak_worker(spec: dict) -> dict:
    """The matmul peak of each dtype in spec["dtypes"], measured in a worker like the rows'."""
    device = _device(spec["device"])
    return {"peaks": {d: matmul_peak(d, device, spec.get("peak_n"), spec.get("peak_repeats", 10))
                      for d in spec["dtypes"]}}


def _timed_steps(step, spec: dict, device: str) -> tuple[list[float], list[float], list[float]]:
    """Run `step(i)` for warm-up then timed steps; (timed seconds, warm-up seconds, losses)."""
    times, losses = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        _sync(device)
        began = time.perf_counter()
        losses.append(float(step(i)))
        _sync(device)
        times.append(time.perf_counter() - began)
    return times[spec["warmup"]:], times[: spec["warmup"]], losses


def _memory(device: str, reset_ok: bool, load_peak: float) -> dict:
    if device.startswith("cuda"):
        import torch

        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20, "memory": "cuda max_memory_allocated",
                "load_peak_mib": load_peak}
    return {"peak_mib": _peak_rss_mib(), "load_peak_mib": load_peak,
            "memory": "peak RSS after loading" if reset_ok else "peak RSS (whole process)"}


def _after_load(device: str) -> tuple[bool, float]:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        return False, torch.cuda.max_memory_allocated(device) / 2**20
    load_peak = _peak_rss_mib()
    return _reset_peak_rss(), load_peak


def _frozen_dtype(spec: dict, device: str):
    """The dtype of the frozen teacher and frozen base weights, as `distill --dtype` resolves it (auto: bf16 on
    CUDA and on CPUs with native bf16, float32 elsewhere), so that every row runs alike."""
    from bltool.models.devices import resolve_dtype

    return resolve_dtype(spec["dtype"], device, cpu_auto_bf16=True)


def _fairness(teacher, prefetched: bool) -> dict:
    """What must be alike for every row: the live teacher's linears through bltool's frozen-linear kernel
    (how many; 0 from a cache), whether that kernel is oneDNN (--kernels), whether batches were prefetched."""
    from bltool.adapt.kernels import InferenceLinear, onednn_available

    onednn = 0 if teacher is None else sum(isinstance(m, InferenceLinear) for m in teacher.modules())
    return {"teacher_onednn_linears": onednn, "prefetched": prefetched,
            "onednn": os.environ.get("BLTOOL_ONEDNN", "1") != "0" and onednn_available()}


def _compute_dtype(device: str, base_dtype: str) -> str:
    """The dtype a row's matmuls run in, for its MFU: bf16 under CUDA autocast, else its frozen weights'."""
    return "bfloat16" if device.startswith("cuda") else base_dtype.removeprefix("torch.")


def chunked_backward(hidden, positions: int, chunk_loss):
    """The competent peer's chunked KD loss: `chunk_loss(h, start, stop)` is the loss of predicting
    positions [start, stop) from `h`, a slice of a detached copy of `hidden` (B, T, d); each chunk's loss is
    backpropagated at once (through the LM heads into the copy's gradient), so only one chunk's logits ever
    exist and each head runs once per position; then one backward of the decoder from `hidden`. Returns
    the summed loss (detached)."""
    import torch

    leaf = hidden.detach().requires_grad_()
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    predicting = hidden.shape[1] - 1
    for start in range(0, predicting, positions):
        stop = min(start + positions, predicting)
        loss = chunk_loss(leaf[:, start:stop], start, stop)
        loss.backward()
        total += loss.detach().float()
    hidden.backward(leaf.grad)
    return total


def plain_worker(spec: dict) -> dict:
    """The peers (PEFT LoRA) and the plain full fine-tune: the naive full-logit loop, the chunked loop, and
    the chunked loop reading the teacher-logits cache."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from bltool.adapt.kernels import use_onednn
    from bltool.data.prepared import PreparedData
    from bltool.models.loading import resolve_model
    from bltool.train.batches import PackedSequences, Prefetcher, collate, micro_batch_indices
    from bltool.train.teacher_cache import TeacherCache

    cfg = CONFIGS[spec["config"]]
    loss_kind = cfg["loss"]
    device = _device(spec["device"])
    frozen = _frozen_dtype(spec, device)
    data = PreparedData.open(Path(spec["data"]))
    train = PackedSequences(data.split_path("train"))
    pad_id = int(data.tokenizer["eos_token_id"])
    batch, seed, temp, kd_weight = spec["batch"], spec["seed"], spec["temperature"], spec["kd_weight"]
    positions = max(1, spec["chunk"] // batch)  # --chunk tokens over the batch's rows, as bltool's loss
    cache = TeacherCache.open(Path(spec["cache"])) if cfg.get("cache") else None

    teacher = None
    if cache is None:
        teacher = AutoModelForCausalLM.from_pretrained(str(resolve_model(spec["teacher"]).path), dtype=frozen)
        teacher = teacher.to(device).eval().requires_grad_(False)
        use_onednn(teacher)  # the same teacher kernels as bltool's rows (F.linear under --kernels aten)
    torch.manual_seed(seed)
    if cfg["lora"]:
        from peft import LoraConfig, get_peft_model

        student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=frozen).to(device)
        student = get_peft_model(student, LoraConfig(r=spec["rank"], lora_alpha=spec["lora_alpha"],
                                                     lora_dropout=spec["lora_dropout"],
                                                     target_modules=list(TARGETS), task_type="CAUSAL_LM"))
        lr = 3e-4
    else:
        student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32).to(device)
        lr = 1e-4
    student.train()
    base = student.get_base_model() if cfg["lora"] else student
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.startswith("cuda") else \
        contextlib.nullcontext

    def host_batch(i: int) -> tuple:
        index = [int(j) for j in micro_batch_indices(i, 0, 0, 1, batch, 1, len(train), seed)]
        rows = [train[j] for j in index]
        ids, mask = collate(rows, pad_id, None)
        padded = any(len(r) < ids.shape[1] for r in rows)
        predicted = int(mask[:, 1:].sum())
        return ids, mask, padded, predicted, *(cache.batch(index, ids.shape[1], "cpu") if cache else ())

    steps = spec["warmup"] + spec["steps"]
    prefetch = Prefetcher(host_batch, range(steps), device) if spec["prefetch"] == "on" else None

    def naive(ids, mask) -> torch.Tensor:
        with torch.no_grad(), autocast():
            teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
        with autocast():
            student_logits = student(input_ids=ids, attention_mask=mask).logits
        valid = mask[:, 1:].bool()  # position t predicts token t+1, where it is not padding
        s = student_logits[:, :-1][valid].float()
        t = teacher_logits[:, :-1][valid].float()
        kl = F.kl_div(F.log_softmax(s / temp, dim=-1), F.log_softmax(t / temp, dim=-1), log_target=True,
                      reduction="batchmean")
        ce = F.cross_entropy(s, ids[:, 1:][valid])
        loss = kd_weight * temp**2 * kl + (1 - kd_weight) * ce
        loss.backward()
        return loss.detach()

    def chunked(ids, mask, padded, predicted, *cached) -> torch.Tensor:
        attention = mask if padded else None  # unpadded rows: plain causal attention
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        teacher_hidden = None
        if teacher is not None:
            with torch.no_grad(), autocast():
                teacher_hidden = teacher.get_decoder()(input_ids=ids, attention_mask=attention,
                                                       use_cache=False).last_hidden_state
        with autocast():
            hidden = base.get_decoder()(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
        head, n = base.get_output_embeddings(), max(predicted, 1)

        def live_loss(h, start, stop):
            with autocast():
                z = head(h).float()  # (B, c, V)
                with torch.no_grad():
                    z_t = teacher.get_output_embeddings()(teacher_hidden[:, start:stop]).float()
            y = labels[:, start:stop]
            kl = F.kl_div(F.log_softmax(z / temp, dim=-1), F.log_softmax(z_t / temp, dim=-1), log_target=True,
                          reduction="none").sum(-1)  # (B, c)
            ce = F.cross_entropy(z.transpose(1, 2), y, ignore_index=-100, reduction="sum")
            return (kd_weight * temp**2 * torch.where(y != -100, kl, 0.0).sum() + (1 - kd_weight) * ce) / n

        def topk_loss(h, start, stop):
            # the teacher's top k and the rest of its mass as one bucket (docs/method.md §4, the cache's form)
            ids_k, logits_k, lse_t, log_tail = (x[:, start:stop] for x in cached)
            with autocast():
                z = head(h).float()
            y = labels[:, start:stop]
            zt = z / temp
            lse = torch.logsumexp(zt, dim=-1, keepdim=True)
            log_q = zt.gather(-1, ids_k) - lse  # (B, c, k)
            log_q_tail = torch.logsumexp(zt.scatter(-1, ids_k, float("-inf")), dim=-1) - lse.squeeze(-1)
            log_p = logits_k.float() / temp - lse_t.float().unsqueeze(-1)
            p_tail = log_tail.float().exp()
            kl = (log_p.exp() * (log_p - log_q)).sum(-1) + torch.where(
                p_tail > 0, p_tail * (log_tail.float() - log_q_tail), 0.0)
            ce = F.cross_entropy(z.transpose(1, 2), y, ignore_index=-100, reduction="sum")
            return (kd_weight * temp**2 * torch.where(y != -100, kl, 0.0).sum() + (1 - kd_weight) * ce) / n

        return chunked_backward(hidden, positions, topk_loss if cached else live_loss)

    def step(i: int) -> float:
        if prefetch is not None:
            ids, mask, padded, predicted, *cached = prefetch.get(i)
        else:
            ids, mask, padded, predicted, *cached = (t.to(device) if isinstance(t, torch.Tensor) else t
                                                     for t in host_batch(i))
        loss = naive(ids, mask) if loss_kind == "full" else chunked(ids, mask, padded, predicted, *cached)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    reset_ok, load_peak = _after_load(device)
    try:
        timed, warm, losses = _timed_steps(step, spec, device)
    finally:
        if prefetch is not None:
            prefetch.close()
    flops = model_flops(base.config, None if teacher is None else teacher.config, spec["seq_len"],
                        spec["rank"] if cfg["lora"] else 0, 1.0)
    base_dtype = str(next(p for p in student.parameters() if not p.requires_grad).dtype) if cfg["lora"] else \
        str(params[0].dtype)
    return {"step_seconds": timed, "warmup_seconds": warm, "losses": losses, **_memory(device, reset_ok, load_peak),
            **flops, "trainable_parameters": sum(p.numel() for p in params), "base_dtype": base_dtype,
            "compute_dtype": _compute_dtype(device, base_dtype), "dense_computed_fraction": 1.0,
            **_fairness(teacher, prefetch is not None)}


def _bltool_state(config):
    """`distill.run`'s set-up (`distill.prepare`: inputs, schedule, teacher, student, background loader)."""
    from bltool.stages import distill
    from bltool.train import distributed

    return distill.prepare(config, distributed.setup(config.device))


def _settle_budget(state, budget: float) -> dict:
    """Step the controller on its own until ρ stops moving at the final budget F (no training)."""
    from bltool.stages import distill

    ctl = state.controller
    for _ in range(5000):
        before = list(ctl.rho)
        distill._advance_budget(state)
        if max(abs(a - b) for a, b in zip(before, ctl.rho)) < 1e-9 and ctl.target(ctl.step_count) == budget:
            break
    target, actual = ctl.target(ctl.step_count), ctl.actual_fraction()
    if target != budget or abs(actual - budget) > 1e-6:
        raise RuntimeError(f"the budget controller did not settle at F = {budget}: target {target}, actual {actual}")
    return {"controller_steps": ctl.step_count, "target_fraction": target, "actual_fraction": actual,
            "modules_dropped": sum(r == 0 for r in ctl.rho), "dense_computed_fraction": ctl.computed_fraction()}


def schedule_points(controller, points: int) -> dict:
    """The controller's trajectory over its whole run (simulated on its own from ρ = 1), sampled at the
    midpoints of `points` equal strata of the run: the phases to time, one per distinct set of computed
    modules (ρ > 0) among the points, in the order they come, each with its first point's controller state
    and its share of the points; and the exact means over every step of the run."""
    from bltool.train.budget import BudgetController, scheduled_mean_retention

    n, config = controller.total_steps, controller.config
    sim = BudgetController(controller.costs, config, n)
    marks = [min(n - 1, int((k + 0.5) * n / points)) for k in range(points)]
    wanted, seen = set(marks), {}
    computed = actual = 0.0
    for t in range(n):  # the state step t computes with: the controller after t steps
        if t in wanted:
            seen[t] = {"step": t, "state": sim.state_dict(), "computed_fraction": sim.computed_fraction(),
                       "actual_fraction": sim.actual_fraction(), "target_fraction": sim.target(t),
                       "modules_dropped": sum(r == 0 for r in sim.rho),
                       "computed": tuple(r > 0 for r in sim.rho)}
        computed += sim.computed_fraction()
        actual += sim.actual_fraction()
        sim.step()
    phases: dict[tuple, dict] = {}
    for t in marks:
        point = seen[t]
        phase = phases.setdefault(point["computed"], {**point, "points": 0, "point_steps": []})
        phase["points"] += 1
        phase["point_steps"].append(t)
    for phase in phases.values():
        del phase["computed"]
    return {"steps": n, "points": points, "phases": list(phases.values()),
            "mean_retention": scheduled_mean_retention(config.budget, config.decay_start, config.decay_end),
            "mean_computed_fraction": computed / n, "mean_actual_fraction": actual / n,
            "sampled_computed_fraction": sum(p["computed_fraction"] * p["points"] for p in phases.values()) / points}


def bltool_worker(spec: dict) -> dict:
    """bltool's rows: `distill.train_step` on the state `distill.run` builds."""
    import dataclasses

    from bltool.stages import distill

    cfg = CONFIGS[spec["config"]]
    device = _device(spec["device"])
    per_step = spec["batch"] * spec["seq_len"]
    steps = spec["warmup"] + spec["steps"]
    if cfg.get("schedule"):  # the run of a `distill --tokens SCHEDULE_TOKENS`, so ρ goes from 1 to F
        steps = max(steps, spec["schedule_tokens"] // per_step)
    kw = {"student": spec["student"], "data": spec["data"], "out": str(Path(spec["tmp"]) / "out"),
          "teacher": None if cfg.get("cache") else spec["teacher"], "method": cfg["method"],
          "budget": cfg.get("budget"), "tokens": steps * per_step,
          "batch_size": spec["batch"], "temperature": spec["temperature"], "kd_weight": spec["kd_weight"],
          "rank": spec["rank"], "lora_alpha": spec["lora_alpha"], "lora_dropout": spec["lora_dropout"],
          "teacher_logits": spec["cache"] if cfg.get("cache") else None, "seed": spec["seed"], "save_every": 0,
          "device": device, "overwrite": True, "compile": bool(cfg.get("compile")), "chunk": spec["chunk"],
          "activation_checkpointing": bool(cfg.get("activation_checkpointing"))}
    fields = {f.name for f in dataclasses.fields(distill.DistillConfig)}
    if "dtype" in fields:  # `distill --dtype`, where this bltool has it
        kw["dtype"] = spec["dtype"]
    run, state = _bltool_state(from_flags(distill.DistillConfig, **kw))
    if spec["prefetch"] == "off":  # every row builds its batches inside the timed step
        state.prefetch.close()
        state.prefetch = None
    fair = _fairness(run.teacher, state.prefetch is not None)
    ctl = state.controller
    budget = {"dense_computed_fraction": 1.0}
    if ctl is not None and not cfg.get("schedule"):
        budget = _settle_budget(state, cfg["budget"])
    rows = []

    def step(i: int, pinned: dict | None = None) -> float:
        row = distill.train_step(run, state)
        rows.append(row)
        if pinned is not None:  # the controller stays at the sampled point
            ctl.load_state_dict(pinned)
            distill._set_rho(state.adapted, ctl)
        return row["loss"]

    reset_ok, load_peak = _after_load(device)
    try:
        if cfg.get("schedule"):
            schedule = schedule_points(ctl, spec["schedule_points"])
            timed, warm, losses = [], [], []
            for phase in schedule["phases"]:
                pinned = phase.pop("state")
                ctl.load_state_dict(pinned)
                distill._set_rho(state.adapted, ctl)
                t, w, lo = _timed_steps(lambda i, pinned=pinned: step(i, pinned), spec, device)
                phase.update(step_seconds=t, warmup_seconds=w, losses=lo, controller_step_after=ctl.step_count,
                             computed_fraction_steps=sorted({r["computed_fraction"] for r in rows[-len(lo):]}))
                timed, warm, losses = timed + t, warm + w, losses + lo
            budget = {"schedule": schedule, "dense_computed_fraction": schedule["sampled_computed_fraction"]}
        else:
            timed, warm, losses = _timed_steps(step, spec, device)
    finally:
        if state.prefetch is not None:
            state.prefetch.close()
    if ctl is not None and not cfg.get("schedule"):  # still at F after the timed steps
        budget["actual_fraction_after"] = ctl.actual_fraction()
    teacher_cfg = run.teacher.config if run.teacher is not None else None
    lora_rank = 0 if cfg["method"] == "kd-full" else spec["rank"]
    flops = model_flops(state.student.config, teacher_cfg, spec["seq_len"], lora_rank,
                        budget["dense_computed_fraction"])
    frozen = [p for p in state.student.parameters() if not p.requires_grad]
    base_dtype = str((frozen or state.params)[0].dtype)
    return {"step_seconds": timed, "warmup_seconds": warm, "losses": losses, **_memory(device, reset_ok, load_peak),
            **flops, **budget, "trainable_parameters": sum(p.numel() for p in state.params),
            "train_step_seconds": [r["seconds"] for r in rows],  # every step, warm-up included
            "base_dtype": base_dtype,
            "compute_dtype": _compute_dtype(device, base_dtype), **fair}


def worker(spec: dict) -> dict:
    """One configuration in this process; never raises (the error is in the result)."""
    began = time.perf_counter()
    try:
        if spec.get("kernels") == "aten":  # every linear of every row through F.linear
            os.environ["BLTOOL_ONEDNN"] = "0"
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        if spec["config"] == PEAK_JOB:
            result = peak_worker(spec)
        else:
            kind = CONFIGS[spec["config"]]["kind"]
            result = (plain_worker if kind == "plain" else bltool_worker)(spec)
    except BaseException as err:  # noqa: BLE001 - reported, the parent decides
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
    result.update(config=spec["config"], setting=spec["setting"], repeat=spec["repeat"],
                  tokens_per_step=spec["batch"] * spec["seq_len"], wall_seconds=time.perf_counter() - began)
    return result


def _child(spec: dict, conn) -> None:
    """multiprocessing target: run the worker and send its result."""
    conn.send(worker(spec))
    conn.close()


# ---------------------------------------------------------------------------------------------------
# Launchers


class Launcher:
    def __init__(self, kind: str, preload: list[str]):
        self.kind = kind
        if kind == "forkserver":
            import multiprocessing as mp

            self.ctx = mp.get_context("forkserver")
            self.ctx.set_forkserver_preload(preload)

    def __call__(self, spec: dict, timeout: float | None) -> dict:
        if self.kind == "subprocess":
            return self._subprocess(spec, timeout)
        parent, child = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=_child, args=(spec, child), daemon=True)
        process.start()
        child.close()
        result = None
        try:
            if parent.poll(timeout):
                result = parent.recv()
        except EOFError:
            pass
        process.join(5 if result is not None else 0)
        if process.is_alive():
            process.kill()
            process.join()
        if result is None:
            why = "timed out" if process.exitcode in (None, -9) and timeout else f"exited with {process.exitcode}"
            result = {"error": f"worker {why} (killed for memory?)", "config": spec["config"],
                      "setting": spec["setting"], "repeat": spec["repeat"]}
        return result

    def _subprocess(self, spec: dict, timeout: float | None) -> dict:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        try:
            proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": "worker timed out", "config": spec["config"], "setting": spec["setting"],
                    "repeat": spec["repeat"]}
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            return {"error": f"worker exited with {proc.returncode}", "config": spec["config"],
                    "setting": spec["setting"], "repeat": spec["repeat"]}
        return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------------
# Inputs: data per sequence length, student, teacher-logits cache


_STARTED = time.perf_counter()


def _log(message: str) -> None:
    print(f"distill_throughput [{time.perf_counter() - _STARTED:6.1f} s]: {message}", file=sys.stderr, flush=True)


def parse_settings(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        b, _, t = item.strip().lower().partition("x")
        if not (b.isdigit() and t.isdigit() and int(b) > 0 and int(t) > 1):
            raise SystemExit(f"--settings: expected BATCHxSEQ_LEN items such as 2x512, got {item!r}")
        out.append((int(b), int(t)))
    return out


def _corpus(args) -> tuple[str, str]:
    if args.corpus:
        return args.corpus, args.glob
    script = Path(__file__).resolve().parent.parent / "scripts" / "install-corpus.sh"
    out = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    return out, args.glob


def prepare_inputs(args, settings: list[tuple[int, int]]) -> dict:
    """Data for each sequence length, the student, and a teacher-logits cache per data covering its steps."""
    from bltool.data.prepared import PreparedData
    from bltool.stages import build_student, prepare_data, teacher_logits
    from bltool.train.batches import PackedSequences, positions_to_indices
    from bltool.train.teacher_cache import TeacherCache

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    given = {}
    for path in filter(None, (args.data or "").split(",")):
        given[PreparedData.open(Path(path)).seq_len] = path
    data, corpus = {}, None
    for seq_len in sorted({t for _, t in settings}):
        if seq_len in given:
            data[seq_len] = given[seq_len]
            continue
        out = work / f"data-{seq_len}"
        if not (out / "manifest.json").is_file():
            if corpus is None:
                corpus = _corpus(args)
            _log(f"preparing data at seq len {seq_len} into {out}")
            prepare_data.run(prepare_data.PrepareDataConfig(inputs=(corpus[0],), tokenizer=args.teacher, out=str(out),
                                                            heldout=0.02, seq_len=seq_len, glob=corpus[1],
                                                            overwrite=True))
        data[seq_len] = str(out)
    student = args.student
    if student is None:
        student = str(work / "student")
        if not (Path(student) / "manifest.json").is_file():
            _log(f"building the student ({args.student_layers} layers, mixed) into {student}")
            build_student.run(build_student.BuildStudentConfig(teacher=args.teacher, out=student,
                                                               layers=args.student_layers, mode="mixed",
                                                               overwrite=True))
    caches = {}
    if any(CONFIGS[c].get("cache") for c in args.configs):
        given_caches = [TeacherCache.open(Path(p)) for p in filter(None, (args.cache or "").split(","))]
        steps = args.warmup + args.steps
        for seq_len, path in data.items():
            prepared = PreparedData.open(Path(path))
            n = len(PackedSequences(prepared.split_path("train")))
            sequences = max(b for b, t in settings if t == seq_len) * steps
            needed = [int(i) for i in positions_to_indices(0, min(sequences, n), n, args.seed)]

            def fits(cache, prepared=prepared, needed=needed):
                made = cache.manifest
                ref = next((i for i in made["inputs"] if i.get("role") == "data"), {})
                return (ref.get("hash") == prepared.manifest["hash"] and made["config"]["seed"] == args.seed
                        and abs(cache.temperature - args.temperature) < 1e-12 and all(i in cache for i in needed))

            found = next((c for c in given_caches if fits(c)), None)
            out = work / f"teacher-logits-{seq_len}"
            if found is None and (out / "manifest.json").is_file() and fits(TeacherCache.open(out)):
                found = TeacherCache.open(out)
            if found is None:
                if args.cache:
                    _log(f"--cache: none of {args.cache} fits the data at seq len {seq_len}; making one")
                _log(f"caching the teacher's top-64 logits for {sequences} sequences of {seq_len} into {out}")
                teacher_logits.run(teacher_logits.TeacherLogitsConfig(
                    teacher=args.teacher, data=path, out=str(out), tokens=sequences * seq_len, seed=args.seed,
                    top_k=64, temperature=args.temperature, device=args.device, overwrite=True))
                found = TeacherCache.open(out)
            caches[seq_len] = str(found.path)
    return {"data": data, "student": student, "caches": caches}


def build_smoke(work: Path) -> tuple[str, str]:
    """A tiny random Llama teacher (4 layers, hidden 64) with a BPE tokenizer trained here, and a text
    corpus; returns (teacher dir, corpus dir). Nothing is downloaded."""
    import random

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ("the a model layer student teacher budget token data train held out python function class return "
             "value list dict string number import module error file path loop while for if else river house "
             "dog cat tree green blue small large fast slow read write open close begin end").split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 240))).capitalize() + "." for _ in range(120)]
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (corpus / f"doc{i:04d}.txt").write_text(text, encoding="utf-8")
    teacher = work / "teacher"
    if not (teacher / "config.json").is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=0,
                                             pad_token_id=0))
        model.save_pretrained(teacher)
        tokenizer.save_pretrained(teacher)
    return str(teacher), str(corpus)


# ---------------------------------------------------------------------------------------------------
# Aggregation and report


def _ok(rows: dict, name: str) -> bool:
    return name in rows and "error" not in rows[name]


def peers_of(config: str, rows: dict) -> tuple[str | None, str | None]:
    """(speed peer, memory peer) of a row: a live row's speed against the faster live peer and its memory
    against the chunked peer; a cached row's both against the cache peer (missing peers: the others)."""
    live = [p for p in LIVE_PEERS if _ok(rows, p)]
    fastest = max(live, key=lambda p: rows[p]["tokens_per_s"]) if live else None
    chunked = CHUNKED_PEER if _ok(rows, CHUNKED_PEER) else fastest
    if CONFIGS[config].get("cache") and _ok(rows, CACHE_PEER):
        return CACHE_PEER, CACHE_PEER
    return (fastest or (CACHE_PEER if _ok(rows, CACHE_PEER) else None),
            chunked or (CACHE_PEER if _ok(rows, CACHE_PEER) else None))


def _schedule_summary(runs: list[dict]) -> tuple[float, dict]:
    """A schedule row's step time: the mean over the sampled points, each point the median step time of
    its phase over every repetition; and the schedule's figures."""
    first = runs[0]["schedule"]
    phases = []
    for k, phase in enumerate(first["phases"]):
        times = [t for r in runs for t in r["schedule"]["phases"][k]["step_seconds"]]
        phases.append({key: phase[key] for key in ("point_steps", "points", "computed_fraction", "actual_fraction",
                                                   "target_fraction", "modules_dropped", "computed_fraction_steps",
                                                   "controller_step_after")}
                      | {"step_seconds_median": statistics.median(times), "timed_steps": len(times)})
    step = sum(p["points"] * p["step_seconds_median"] for p in phases) / first["points"]
    keys = ("steps", "points", "mean_retention", "mean_computed_fraction", "mean_actual_fraction",
            "sampled_computed_fraction")
    return step, {key: first[key] for key in keys} | {"phases": phases}


def aggregate(results: list[dict], settings, configs, peaks: dict[str, float]) -> dict:
    """Per setting and row: the median step time, tokens/s, peak memory, FLOPs, MFU (`peaks`: TFLOP/s by
    dtype, or {"*": one figure}) and the ratios against the row's peers (`peers_of`)."""
    out = {}
    for batch, seq_len in settings:
        name = f"{batch}x{seq_len}"
        rows = {}
        for config in configs:
            runs = [r for r in results if r["setting"] == name and r["config"] == config]
            errors = [r["error"] for r in runs if "error" in r]
            row = {"what": CONFIGS[config]["what"], "repeats": len(runs)}
            if errors or not runs:
                row["error"] = errors[0] if errors else "no result"
            else:
                times = [t for r in runs for t in r["step_seconds"]]
                first = runs[0]
                if "schedule" in first:
                    step, row["schedule"] = _schedule_summary(runs)
                else:
                    step = statistics.median(times)
                row.update(
                    step_seconds_median=step, step_seconds=times, timed_steps=len(times),
                    tokens_per_step=first["tokens_per_step"], tokens_per_s=first["tokens_per_step"] / step,
                    peak_mib=max(r["peak_mib"] for r in runs), peak_mib_each=[r["peak_mib"] for r in runs],
                    load_peak_mib=max(r["load_peak_mib"] for r in runs), memory=first["memory"],
                    first_loss=first["losses"][0], flops_per_token=first["flops_per_token"],
                    macs_teacher=first["macs_teacher"], macs_student=first["macs_student"],
                    macs_trainable=first["macs_trainable"], trainable_parameters=first["trainable_parameters"],
                    base_dtype=first["base_dtype"], compute_dtype=first["compute_dtype"],
                    teacher_onednn_linears=first["teacher_onednn_linears"], prefetched=first["prefetched"],
                    onednn=first["onednn"],
                    dense_computed_fraction=first["dense_computed_fraction"],
                    achieved_tflops=first["flops_per_token"] * first["tokens_per_step"] / step / 1e12,
                )
                for key in ("target_fraction", "actual_fraction", "actual_fraction_after", "modules_dropped",
                            "controller_steps"):
                    if key in first:
                        row[key] = first[key]
                peak = peaks.get(row["compute_dtype"], peaks.get("*"))
                if peak:
                    row.update(mfu=row["achieved_tflops"] / peak, peak_tflops=peak)
            rows[config] = row
        for config, row in rows.items():
            if "error" in row:
                continue
            speed, memory = peers_of(config, rows)
            row.update(speed_peer=speed, memory_peer=memory)
            if speed:
                row["tokens_per_s_vs_peer"] = row["tokens_per_s"] / rows[speed]["tokens_per_s"]
            if memory:
                row["peak_mib_vs_peer"] = row["peak_mib"] / rows[memory]["peak_mib"]
        out[name] = rows
    return out


def table(name: str, rows: dict) -> str:
    head = ["row", "what", "tokens/s", "tok/s ÷ peer", "peak MiB", "mem ÷ peer", "peers (speed / mem)",
            "step s (median, n)", "MFLOP/token", "TFLOP/s", "MFU (dtype)"]
    lines = [f"### {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config, row in rows.items():
        if "error" in row:
            cells = [config, row["what"], f"FAILED: {row['error'][:120]}"] + [""] * (len(head) - 3)
        else:
            ratio = row.get("tokens_per_s_vs_peer")
            mem = row.get("peak_mib_vs_peer")
            how = "schedule, " if "schedule" in row else ""
            mfu = f"{100 * row['mfu']:.1f}% ({row['compute_dtype']})" if "mfu" in row else ""
            cells = [config, row["what"], f"{row['tokens_per_s']:,.0f}", f"{ratio:.2f}×" if ratio else "n/a",
                     f"{row['peak_mib']:,.0f}", f"{mem:.2f}×" if mem else "n/a",
                     f"{row.get('speed_peer') or '-'} / {row.get('memory_peer') or '-'}",
                     f"{row['step_seconds_median']:.3f} ({how}{row['timed_steps']})",
                     f"{row['flops_per_token'] / 1e6:,.1f}", f"{row['achieved_tflops']:.3g}", mfu]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------


def _peak_dtypes(device: str) -> list[str]:
    """The dtypes whose matmul peak is measured: bf16 on CUDA (autocast); float32 and bfloat16 on the CPU."""
    return ["bfloat16"] if device.startswith("cuda") else ["float32", "bfloat16"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m", help="teacher alias or path (default smollm2-135m)")
    parser.add_argument("--student", help="a build-student output (default: built into --work)")
    parser.add_argument("--student-layers", type=int, default=6, help="layers of the student built when none given")
    parser.add_argument("--data", help="prepare-data outputs, comma-separated, one per sequence length (default: "
                                       "prepared into --work)")
    parser.add_argument("--cache", help="teacher-logits outputs, comma-separated (default: made into --work)")
    parser.add_argument("--corpus", help="documents for prepare-data (default: the demo corpus, python3.11-doc)")
    parser.add_argument("--glob", default="**/*.rst.txt")
    parser.add_argument("--work", default="runs/bench-distill", help="where prepared inputs are kept")
    parser.add_argument("--settings", default="2x512,8x1024", help="BATCHxSEQ_LEN,... (default 2x512,8x1024)")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"rows to run (default: {','.join(DEFAULT_CONFIGS)}; all: {','.join(CONFIGS)})")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per worker")
    parser.add_argument("--repeats", type=int, default=3, help="workers per row and setting, interleaved")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="frozen teacher and base weights (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--lora-alpha", type=float, default=256.0)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=3.0)
    parser.add_argument("--kd-weight", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=512, help="tokens per LM-head chunk of every chunked loss "
                        "(bltool's --chunk and the peers'; default 512, bltool's default)")
    parser.add_argument("--kernels", choices=("onednn", "aten"), default="onednn",
                        help="onednn: every row's live teacher through bltool's oneDNN frozen linears (the peers' "
                             "too); aten: BLTOOL_ONEDNN=0 for every row, every linear through F.linear")
    parser.add_argument("--prefetch", choices=("on", "off"), default="on",
                        help="build the coming batches in a background thread, for every row (off: in the step)")
    parser.add_argument("--schedule-tokens", type=int, default=2_000_000,
                        help="the schedule rows' run length in tokens (default 2M, distill's --tokens default)")
    parser.add_argument("--schedule-points", type=int, default=10,
                        help="points sampled over a schedule row's run (midpoints of equal strata; default 10)")
    parser.add_argument("--peak-tflops", type=float,
                        help="one matmul peak for every row's MFU, instead of measuring each dtype's")
    parser.add_argument("--launcher", choices=("forkserver", "subprocess"), default="forkserver")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: torch's; --smoke: 1)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    parser.add_argument("--out", help="JSON results (default WORK/distill_throughput.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny random models and data built here, "
                        "setting 2x32, 1 warm-up + 2 steps, rank 8, every row; for the test suite")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one configuration's JSON spec (--launcher subprocess)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    if args.smoke:
        if args.work == parser.get_default("work"):
            args.work = str(Path(args.work) / "smoke")
        args.teacher, args.corpus = build_smoke(Path(args.work))
        args.glob, args.student_layers = "**/*.txt", 2
        for key, value in {"settings": "2x32", "warmup": 1, "steps": 2, "repeats": 1, "rank": 8, "chunk": 16,
                           "lora_alpha": 16.0, "threads": 1, "configs": ",".join(CONFIGS)}.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if args.warmup < 0 or args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1, --warmup at least 0")
    if args.chunk < 1 or args.schedule_points < 1 or args.schedule_tokens < 1:
        parser.error("--chunk, --schedule-points and --schedule-tokens must be at least 1")
    settings = parse_settings(args.settings)
    out = Path(args.out) if args.out else Path(args.work) / "distill_throughput.json"

    import torch

    device = _device(args.device)
    inputs = prepare_inputs(args, settings)
    machine = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count()}
    if device.startswith("cuda"):
        machine["device_name"] = torch.cuda.get_device_name(device)

    preload = ["torch", "transformers", "transformers.models.llama.modeling_llama", "bltool.stages.distill",
               "pyarrow", "pandas"]
    if any(CONFIGS[c]["kind"] == "plain" and CONFIGS[c]["lora"] for c in args.configs):
        preload.append("peft")
    launch = Launcher(args.launcher, preload)
    # the matmul peak of each dtype a row computes in, measured in a worker before and after the rows
    peak_spec = {"config": PEAK_JOB, "setting": "-", "repeat": 0, "batch": 0, "seq_len": 0, "device": args.device,
                 "threads": args.threads, "kernels": args.kernels, "dtypes": _peak_dtypes(device),
                 "peak_n": 256 if args.smoke else None, "peak_repeats": 3 if args.smoke else 10}
    peak_runs = []

    def measure_peak(when: str) -> None:
        if args.peak_tflops is None:
            result = launch(peak_spec, args.timeout)
            peak_runs.append({"when": when, **result})
            if "error" in result:
                _log(f"matmul peak ({when}): FAILED {result['error']}")
            else:
                _log(f"matmul peak ({when}): " + ", ".join(f"{d} {v['tflops'] * 1e3:,.0f} GFLOP/s"
                                                            for d, v in result["peaks"].items()))

    _log(f"inputs ready; {len(settings)} setting(s) × {args.repeats} repeat(s) × {len(args.configs)} rows")
    results, began = [], time.perf_counter()
    measure_peak("before")
    with tempfile.TemporaryDirectory(prefix="distill-throughput-") as tmp:
        for batch, seq_len in settings:
            name = f"{batch}x{seq_len}"
            for repeat in range(args.repeats):
                k = repeat % len(args.configs)
                for config in args.configs[k:] + args.configs[:k]:
                    spec = {"config": config, "setting": name, "repeat": repeat, "batch": batch, "seq_len": seq_len,
                            "warmup": args.warmup, "steps": args.steps, "device": args.device, "dtype": args.dtype,
                            "teacher": args.teacher, "student": inputs["student"], "data": inputs["data"][seq_len],
                            "cache": inputs["caches"].get(seq_len), "rank": args.rank,
                            "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
                            "temperature": args.temperature, "kd_weight": args.kd_weight, "seed": args.seed,
                            "threads": args.threads, "chunk": args.chunk, "kernels": args.kernels,
                            "prefetch": args.prefetch, "schedule_tokens": args.schedule_tokens,
                            "schedule_points": args.schedule_points,
                            "tmp": str(Path(tmp) / f"{name}-{config}-{repeat}")}
                    result = launch(spec, args.timeout)
                    results.append(result)
                    if "error" in result:
                        _log(f"{name} {config} #{repeat}: FAILED {result['error']}")
                        if result.get("traceback"):
                            print(result["traceback"], file=sys.stderr)
                    else:
                        med = statistics.median(result["step_seconds"])
                        _log(f"{name} {config} #{repeat}: {result['tokens_per_step'] / med:,.0f} tok/s, "
                             f"peak {result['peak_mib']:,.0f} MiB, first loss {result['losses'][0]:.4f}")
    measure_peak("after")
    peaks = {"*": args.peak_tflops} if args.peak_tflops is not None else {
        d: max(r["peaks"][d]["tflops"] for r in peak_runs if "error" not in r)
        for d in peak_spec["dtypes"] if any("error" not in r for r in peak_runs)}
    summary = aggregate(results, settings, args.configs, peaks)
    report = {
        "benchmark": "distill_throughput", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": time.perf_counter() - began, "machine": machine, "peak_tflops": peaks,
        "matmul_peak": peak_runs, "flops_formula": FLOPS_FORMULA,
        "peers": {"live": list(LIVE_PEERS), "chunked": CHUNKED_PEER, "cache": CACHE_PEER,
                  "rule": "speed: live rows against the faster live peer, cached rows against the cache peer; "
                          "memory: live rows against the chunked peer, cached rows against the cache peer"},
        "protocol": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "launcher": args.launcher,
                     "kernels": args.kernels, "prefetch": args.prefetch, "chunk": args.chunk,
                     "schedule_tokens": args.schedule_tokens, "schedule_points": args.schedule_points,
                     "order": "per setting and repetition, the rows in an order rotated by one per repetition",
                     "statistic": "median step time over all timed steps of all repetitions (schedule rows: the "
                                  "mean over the sampled points of each point's median); peak memory: max over "
                                  "repetitions"},
        "settings": [f"{b}x{t}" for b, t in settings], "configs": args.configs,
        "args": {k: v for k, v in vars(args).items() if k != "worker"}, "inputs": inputs,
        "results": summary, "workers": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"# Distillation throughput ({machine.get('device_name', device)}, dtype {args.dtype}, kernels "
          f"{args.kernels}, prefetch {args.prefetch}; {args.warmup} warm-up + {args.steps} timed steps × "
          f"{args.repeats} repeats)\n")
    for name, rows in summary.items():
        print(table(name, rows) + "\n")
    peak_text = ", ".join(f"{d} {v * 1e3:,.0f} GFLOP/s" for d, v in peaks.items())
    print(f"Tokens/s: batch × seq len ÷ median optimizer-step time (schedule rows: mean over the sampled points). "
          f"Speed ÷ the faster of {' and '.join(LIVE_PEERS)} (cached rows: {CACHE_PEER}); memory ÷ {CHUNKED_PEER} "
          f"(cached rows: {CACHE_PEER}). Peak memory: "
          f"{'CUDA max_memory_allocated' if device.startswith('cuda') else 'peak RSS after loading'}. "
          f"{FLOPS_FORMULA}; MFU against the matmul peak ({peak_text or 'not measured'}). JSON: {out}")
    failed = [(s, c) for s, rows in summary.items() for c, row in rows.items() if "error" in row]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
