"""eval-harness: EleutherAI's lm-evaluation-harness on any model bltool names (an optional extra).

The model is loaded the way every bltool stage loads it (`bltool.models.loading.load_model`: checkpoints, `.gguf`
files, aliases, built, distilled and compressed students, compressed modules kept compressed) and handed
to lm_eval's Hugging Face wrapper as an instance, `HFLM(pretrained=model, tokenizer=tokenizer)`, so the
harness measures exactly the model bltool would serve. Tasks are the harness's own (fetched from the Hub
on first use, so they need network) or local task YAMLs under `--include-path`.

Writes into `--out`: `results.json` (lm_eval's results, per task metrics and their stderr, the task
configs and versions; no per-sample logs) and `manifest.json` (config, the model's content hash, the task
files under --include-path by SHA-256, lm_eval's version, and the headline metrics).

Install with `pip install 'bltool[harness]'` (lm-eval >= 0.4).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from bltool import ui
from bltool.artifacts import Stage, atomic_output, check_output_dir, sha256_file, write_json, write_manifest
from bltool.configs import EvalHarnessConfig
from bltool.errors import UsageError
from bltool.models.devices import resolve_device, resolve_dtype
from bltool.models.loading import (
    check_vocab_fits,
    load_model,
    load_tokenizer,
    model_content_hash,
    model_inputs,
    resolve_model,
)

INSTALL = "pip install 'bltool[harness]'"


def import_lm_eval():
    """lm_eval's evaluator, task manager and HF wrapper, or a one-line usage error saying how to install them."""
    try:
        import lm_eval
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise UsageError(f"eval-harness needs lm-evaluation-harness, which is not installed ({err.name or err}): "
                         f"{INSTALL}") from None
    return lm_eval, evaluator, TaskManager, HFLM


def _limit(limit: float | None) -> float | int | None:
    return int(limit) if limit is not None and limit >= 1 else limit


def _plain(value):
    """lm_eval's results as JSON: NaN (a stderr of one example) as null, other non-JSON values as text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _task_files(include_path: str | None) -> list[dict]:
    if include_path is None:
        return []
    root = Path(include_path)
    return [{"role": "tasks", "path": str(p.absolute()), "sha256": sha256_file(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".yaml", ".yml", ".py")]


def headline(results: dict) -> dict[str, dict[str, float | None]]:
    """Per task, its metrics without the stderr entries: {task: {"acc,none": 0.5, ...}}."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {k: v for k, v in metrics.items()
                     if "_stderr" not in k and k != "alias" and isinstance(v, (int, float))}
    return out


def run(config: EvalHarnessConfig) -> Path:
    lm_eval, evaluator, TaskManager, HFLM = import_lm_eval()
    label = resolve_model(config.model, flag="MODEL", convert=False).label  # no GGUF converted before the check
    out = Path(config.out) if config.out else Path("harness") / label
    check_output_dir(out, config.overwrite, stage=Stage.EVAL_HARNESS,
                     inputs=[*model_inputs("MODEL", config.model), ("--include-path", config.include_path)])
    ref = resolve_model(config.model, flag="MODEL")
    manager = TaskManager(include_path=config.include_path) if config.include_path else TaskManager()
    known = set(manager.all_tasks)
    unknown = [t for t in config.tasks if t not in known]
    if unknown:
        where = f"lm_eval's tasks or {config.include_path}" if config.include_path else "lm_eval's tasks"
        raise UsageError(f"--tasks: unknown task {unknown[0]!r} (not among {where}; `lm-eval ls tasks` lists them)")
    tokenizer = load_tokenizer(ref)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model = load_model(ref, dtype=dtype, device=device)
    check_vocab_fits(model.config, tokenizer, "MODEL")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, device=device)
    ui.info(f"eval-harness: {', '.join(config.tasks)} on {config.model} ({device} {str(dtype).replace('torch.', '')})")
    watch = ui.Stopwatch()
    results = evaluator.simple_evaluate(
        model=lm, tasks=list(config.tasks), num_fewshot=config.num_fewshot, limit=_limit(config.limit),
        task_manager=manager, log_samples=False, batch_size=config.batch_size, device=device,
    )
    seconds = watch.seconds
    if results is None:  # lm_eval returns None on ranks other than 0; bltool runs one process
        raise UsageError("eval-harness: lm_eval returned no results")
    results = _plain({k: v for k, v in results.items() if k not in ("samples", "model")})
    results.update(bltool={"model": config.model, "model_path": str(ref.path), "device": device,
                           "dtype": str(dtype).replace("torch.", ""), "seconds": round(seconds, 3)})
    with atomic_output(out, config.overwrite) as tmp:
        write_json(tmp / "results.json", results)
        write_manifest(
            tmp,
            Stage.EVAL_HARNESS,
            config={**asdict(config), "out": str(out)},
            inputs=[{"role": "model", **ref.describe(), "content": model_content_hash(ref)},
                    *_task_files(config.include_path)],
            lm_eval={"version": getattr(lm_eval, "__version__", None)},
            result=headline(results),
        )
    for task, metrics in headline(results).items():
        ui.info(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return out
