"""eval-icl: in-context-learning probes (docs/method.md §6, paper Appendix F.1).

Each task is asked `--n` queries under `--seeds` demonstration seeds with `--shots` demonstrations each
(protocol and sampling in `bltool.eval.icl`); a task's score for a seed is its exact-match accuracy, its score
is the mean over seeds, and the composite is the macro average of the task scores (every task weighs
the same, whatever its number of queries).

Uncertainty: `se` is the standard error of a score counting both which queries were drawn and which
demonstrations (`bltool.eval.icl.standard_error`; the composite's combines the tasks' as independent,
√(Σ se²) / tasks). `seed_std` is only the spread over demonstration seeds (sample, ddof = 1; none with one
seed): the seeds ask the same queries, so it says nothing about query sampling and understates the noise.
Baselines: `chance` is the best constant answer's rate over the task's whole pool; `copy_chance`, for
list tasks, is the rate of copying a random item of the prompt's list (1/k); `baseline` is the larger.

Writes into `--out`: `result.json` (protocol, per-task accuracy per seed, mean, se, baselines, composite),
`result.arrow` (one row per task × seed), `predictions.arrow` (one row per query: input, target, answer)
and `manifest.json`.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from bltool import ui
from bltool.artifacts import (
    Stage,
    atomic_output,
    check_output_dir,
    sha256_file,
    sha256_json,
    write_arrow,
    write_json,
    write_manifest,
)
from bltool.configs import EvalIclConfig
from bltool.errors import UsageError
from bltool.eval.icl import (
    ANSWER_MARGIN,
    NewlineStop,
    Query,
    build_queries,
    cap_new_tokens,
    chance,
    copy_chance,
    greedy_answers,
    is_correct,
    min_eligible,
    newline_token_ids,
    standard_error,
)
from bltool.eval.probes import BUILTIN, Task, composite_se, load_tasks, vocabulary
from bltool.models.devices import resolve_device, resolve_dtype
from bltool.models.loading import (
    check_vocab_fits,
    load_model,
    load_tokenizer,
    model_content_hash,
    model_inputs,
    resolve_model,
)

PROMPT_FORMAT = "Q:{input}\\nA:{output} per demonstration, joined by a blank line; the query Q:{input}\\nA: last"


def plan(tasks: list[Task], config: EvalIclConfig) -> list[tuple[Task, list[Query]]]:
    """Every task's queries for every seed, built (and checked) before any model is loaded."""
    planned = []
    for task in tasks:
        if min_eligible(task) < config.shots:
            raise UsageError(
                f"--probes: task {task.name!r} ({task.source}) has too few distinct inputs for {config.shots} "
                f"demonstrations besides the query; lower --shots or add examples"
            )
        planned.append((task, [q for s in range(config.seeds) for q in build_queries(task, config.n, config.shots, s)]))
    return planned


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def evaluate(model, tokenizer, planned: list[tuple[Task, list[Query]]], config: EvalIclConfig) -> tuple[dict, list]:
    """Answer every planned query, score, and aggregate; `model` only needs `generate` and `device`.
    Returns the result and one prediction row per query."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UsageError("MODEL: the tokenizer has neither a pad nor an EOS token to pad prompts with")
    stop = NewlineStop(newline_token_ids(tokenizer))
    seeds = list(range(config.seeds))
    per_task, predictions = {}, []
    watch = ui.Stopwatch()
    progress = ui.progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), TimeRemainingColumn())
    with progress:
        bar = progress.add_task(Stage.EVAL_ICL, total=sum(len(qs) for _, qs in planned))
        for task, qs in planned:
            progress.update(bar, description=f"eval-icl {task.name}")
            cap = cap_new_tokens(tokenizer, [q.target for q in qs])
            answers = greedy_answers(model, tokenizer, [q.prompt for q in qs], cap, config.batch_size, pad_id, stop,
                                     on_batch=lambda k: progress.advance(bar, k))
            correct = [is_correct(a, q.target) for a, q in zip(answers, qs)]
            predictions += [{"task": q.task, "seed": q.seed, "query": q.index, "input": q.input, "target": q.target,
                             "answer": a, "correct": c} for q, a, c in zip(qs, answers, correct)]
            n = len(qs) // len(seeds)  # every seed asks the same queries
            grid = [[c for q, c in zip(qs, correct) if q.seed == s] for s in seeds]  # [seed][query]
            hits = [sum(row) for row in grid]
            accuracy = [h / n for h in hits]
            constant, copy = chance(task), copy_chance(task)
            per_task[task.name] = {
                "source": task.source,
                "pool": len(task.pairs),
                "n": n,
                "max_new_tokens": cap,
                "chance": constant,
                "copy_chance": copy,
                "baseline": max(constant, copy or 0.0),
                "correct": hits,
                "accuracy": accuracy,
                "mean": statistics.fmean(accuracy),
                "se": standard_error(grid),
                "seed_std": _std(accuracy),
            }
    seconds = watch.seconds
    per_seed = [statistics.fmean(t["accuracy"][s] for t in per_task.values()) for s in seeds]
    tasks = per_task.values()
    result = {
        "composite": {"mean": statistics.fmean(per_seed), "se": composite_se([t["se"] for t in tasks]),
                      "seed_std": _std(per_seed), "per_seed": per_seed,
                      "chance": statistics.fmean(t["chance"] for t in tasks),
                      "baseline": statistics.fmean(t["baseline"] for t in tasks)},
        "tasks": per_task,
        "protocol": {
            "shots": config.shots,
            "seeds": seeds,
            "n": config.n,
            "prompt": PROMPT_FORMAT,
            "decoding": f"greedy, until a newline or the task's cap (longest target in tokens + {ANSWER_MARGIN})",
            "match": "case-sensitive exact match after stripping surrounding whitespace",
            "composite": "macro average over tasks of the mean over seeds",
            "se": "standard error over queries of each query's mean correctness over seeds (ddof=1, / sqrt(n)); "
                  "composite: sqrt(sum of task se^2) / tasks",
            "seed_std": "sample std (ddof=1) over demonstration seeds, which share their queries",
            "chance": "best constant answer's rate over the task's whole pool",
            "copy_chance": "list tasks: rate of copying a uniformly random item of the prompt's list (mean 1/k)",
        },
        "queries": len(predictions),
        "seconds": round(seconds, 3),
        "queries_per_s": round(len(predictions) / seconds, 2) if seconds > 0 else None,
    }
    return result, predictions


def print_table(result: dict, title: str) -> None:
    """Per-task accuracy per seed, mean, standard error, seed spread and baselines, then the composite
    (on stderr)."""
    seeds = result["protocol"]["seeds"]
    table = Table(title=title, title_justify="left")
    table.add_column("task", no_wrap=True)
    for s in seeds:
        table.add_column(f"seed {s}", justify="right")
    for column in ("mean", "se", "seed std", "chance", "copy"):
        table.add_column(column, justify="right")

    def fmt(value):
        return "-" if value is None else f"{value:.3f}"

    for name, t in result["tasks"].items():
        table.add_row(name, *map(fmt, t["accuracy"]), fmt(t["mean"]), fmt(t["se"]), fmt(t["seed_std"]),
                      fmt(t["chance"]), fmt(t["copy_chance"]))
    c = result["composite"]
    table.add_section()
    table.add_row("composite", *map(fmt, c["per_seed"]), fmt(c["mean"]), fmt(c["se"]), fmt(c["seed_std"]),
                  fmt(c["chance"]), f"baseline {fmt(c['baseline'])}", style="bold")
    ui.console.print(table)


def _probe_inputs(tasks: list[Task]) -> list[dict]:
    """How the manifest cites the probes: each file by content; the built-in ones by their pairs."""
    inputs, files = [], {t.source for t in tasks if t.source != BUILTIN}
    for file in sorted(files):
        inputs.append({"role": "probes", "path": str(Path(file).absolute()), "sha256": sha256_file(Path(file))})
    builtin = [t for t in tasks if t.source == BUILTIN]
    if builtin:
        inputs.append({"role": "probes", "builtin": [t.name for t in builtin], "words": len(vocabulary()),
                       "pairs_sha256": sha256_json([[t.name, t.pairs] for t in builtin])})
    return inputs


def run(config: EvalIclConfig) -> Path:
    label = resolve_model(config.model, flag="MODEL", convert=False).label  # no GGUF converted before the check
    out = Path(config.out) if config.out else Path("icl") / label
    check_output_dir(out, config.overwrite, stage=Stage.EVAL_ICL,
                     inputs=[*model_inputs("MODEL", config.model),
                             *(("--probes", p) for p in config.probes if p != BUILTIN)])
    ref = resolve_model(config.model, flag="MODEL")
    tasks = load_tasks(config.probes, config.tasks)
    planned = plan(tasks, config)  # refuses impossible task files before the model loads
    tokenizer = load_tokenizer(ref)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model = load_model(ref, dtype=dtype, device=device)
    check_vocab_fits(model.config, tokenizer, "MODEL")
    ui.info(f"eval-icl: {len(tasks)} tasks × {config.seeds} seeds × ≤{config.n} queries, {config.shots}-shot, "
            f"on {device} {str(dtype).replace('torch.', '')}")

    result, predictions = evaluate(model, tokenizer, planned, config)
    result.update(model=config.model, model_path=str(ref.path), device=device,
                  dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads())
    rows = [{"model": config.model, "task": name, "source": t["source"], "seed": seed, "n": t["n"],
             "correct": t["correct"][i], "accuracy": t["accuracy"][i], "shots": config.shots, "chance": t["chance"],
             "copy_chance": t["copy_chance"], "se": t["se"], "max_new_tokens": t["max_new_tokens"]}
            for name, t in result["tasks"].items() for i, seed in enumerate(result["protocol"]["seeds"])]
    with atomic_output(out, config.overwrite) as tmp:
        write_json(tmp / "result.json", result)
        write_arrow(tmp / "result.arrow", rows)
        write_arrow(tmp / "predictions.arrow", predictions)
        write_manifest(
            tmp,
            Stage.EVAL_ICL,
            config={**asdict(config), "out": str(out)},
            inputs=[{"role": "model", **ref.describe(), "content": model_content_hash(ref)}, *_probe_inputs(tasks)],
            result={"composite": result["composite"]["mean"], "composite_se": result["composite"]["se"],
                    "composite_seed_std": result["composite"]["seed_std"],
                    "chance": result["composite"]["chance"], "baseline": result["composite"]["baseline"],
                    "tasks": {name: {"chance": t["chance"], "copy_chance": t["copy_chance"]}
                              for name, t in result["tasks"].items()}},
        )
    print_table(result, f"eval-icl {config.model} ({config.shots}-shot, {len(result['protocol']['seeds'])} seeds)")
    se = result["composite"]["se"]
    ui.info(f"{config.model}: ICL composite {result['composite']['mean']:.3f}"
            f"{'' if se is None else f' ± {se:.3f} (se)'} over {len(tasks)} tasks "
            f"({result['queries']} queries in {result['seconds']:.0f} s on {device})")
    return out
