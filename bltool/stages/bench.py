"""bench: measure what compression buys at inference, next to what the MAC count promises (docs/method.md §7).

(a) Modules. Every adapted module of MODEL (the modules its `compressed` section lists, or a distilled
    student's gated LoRA modules) is timed against the dense module of the same name in --baseline, on
    the same random input, at a prefill shape (1 × --prefill-tokens) and decode shapes (B × 1 for each
    --decode-batch). Sums over modules give the measured speedup, printed next to the MAC ratio (the
    bound at compute-bound shapes) and the weight-bytes ratio (the bound at memory-bound decode shapes).
    The low-rank members of a group (q/k/v, gate/up) share one down GEMM, so they are timed together, as
    they run, and also each computing alone (the `ungrouped` column: what grouping buys).
(b) End to end. Prefill tokens/s (one forward pass with a KV cache, logits for the last position only,
    as `generate()` does) and decode tokens/s (--decode-steps greedy steps after a --decode-context
    token prompt, per batch size), --baseline against MODEL, next to the MAC estimate (the ratio of their
    forward MACs: attention and the LM head are not compressed, so it is smaller than the module ratio)
    and, for decode, the bytes bound: the ratio of the bytes a decode step moves (every weight it uses
    once, and the KV cache it reads), the bound of a memory-bound step, where the MAC ratio says little.
(c) Parameters and weight bytes of both models.
(d) Training compute: the proxy and the realised value from the distill manifest (carried by
    `compress`, or found by following the manifests' inputs).

With --engine vllm, dense and compressed are served by the same vLLM instead, beside transformers'
end-to-end speedup (`bltool.serve.vllm_bench`).

Timing protocol (bltool.serve.timing): warm-up calls, then the median of --repeats, the compared candidates
interleaved; CUDA events on GPU. Device, dtype, threads, kernel and the machine's load are recorded.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bltool import ui
from bltool.adapt.compression import layer_macs, layer_weight_bytes
from bltool.adapt.lora import GatedLoRALinear
from bltool.adapt.lowrank import LowRankLinear, set_kernel
from bltool.artifacts import (
    MANIFEST,
    Stage,
    atomic_output,
    check_output_dir,
    read_manifest,
    write_arrow,
    write_json,
    write_manifest,
)
from bltool.configs import BenchConfig
from bltool.errors import ArtifactError, UsageError
from bltool.models.devices import resolve_device, resolve_dtype
from bltool.models.families import plain_type
from bltool.models.loading import load_model, model_content_hash, model_inputs, resolve_model
from bltool.serve import engines, vllm_bench
from bltool.serve.end_to_end import end_to_end
from bltool.serve.timing import machine_info, measure

SAME_ARCHITECTURE = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size")


# ---------------------------------------------------------------------------------------------------
# What is compared


def compared_modules(model: nn.Module, manifest: dict | None) -> list[dict[str, Any]]:
    """The adapted modules of MODEL: its `compressed` section's list, else its gated LoRA modules."""
    if manifest and manifest.get("compressed"):
        return [{"name": m["name"], "form": m["form"], "layout": m["layout"]}
                for m in manifest["compressed"]["modules"]]
    return [{"name": name, "form": "lora", "layout": "gated-lora"} for name, m in model.named_modules()
            if isinstance(m, GatedLoRALinear)]


def check_baseline(model, baseline, modules: list[dict], spec: str) -> None:
    for key in SAME_ARCHITECTURE:
        a, b = getattr(model.config, key, None), getattr(baseline.config, key, None)
        if key == "model_type":  # a compressed student is of its family's compressed type
            a, b = plain_type(a), plain_type(b)
        if a != b:
            raise UsageError(f"--baseline: {spec} is not the same architecture as MODEL ({key} {b} vs {a})")
    for entry in modules:
        try:
            dense = baseline.get_submodule(entry["name"])
        except AttributeError:
            raise UsageError(f"--baseline: {spec} has no module {entry['name']}") from None
        mine = model.get_submodule(entry["name"])
        if isinstance(dense, (GatedLoRALinear, LowRankLinear)):
            kind = "a gated LoRA module" if isinstance(dense, GatedLoRALinear) else "low-rank"
            raise UsageError(f"--baseline: {spec}'s {entry['name']} is {kind}, not dense; pass the dense model MODEL "
                             "replaces (the `bltool build-student` output), or a student's `bltool compress "
                             "--densify` form")
        if not isinstance(dense, nn.Linear) or (dense.in_features, dense.out_features) != (
                mine.in_features, mine.out_features):
            raise UsageError(f"--baseline: {spec}'s {entry['name']} is not a dense linear of MODEL's shape")


def training_compute(path: Path, depth: int = 0) -> dict[str, Any] | None:
    """The `compute` section of the distill manifest behind a model: found by following the manifests'
    inputs (role "model") back to `distill`, else the copy a later stage (compress) carried over."""
    try:
        manifest = read_manifest(path, None, str(path)) if (path / MANIFEST).is_file() else None
    except ArtifactError:
        return None  # an input that has changed since: fall back to what the later stage copied
    if manifest is None or depth > 8:
        return None
    if manifest["stage"] != Stage.DISTILL:
        for item in manifest.get("inputs", []):
            if item.get("role") == "model" and item.get("path"):
                found = training_compute(Path(item["path"]), depth + 1)
                if found:
                    return found
    if manifest.get("compute"):
        return {**manifest["compute"], "source": str(path.absolute()), "source_stage": manifest["stage"]}
    return None


# ---------------------------------------------------------------------------------------------------
# (a) modules


def module_units(model, modules: list[dict]) -> list[list[dict]]:
    """The compared modules as timing units: the low-rank members of one group (q/k/v, gate/up: they share
    one down GEMM, so only the group is timed as it runs) together, every other module alone."""
    names = {id(m): name for name, m in model.named_modules()}
    by_name = {entry["name"]: entry for entry in modules}
    units, seen = [], set()
    for entry in modules:
        if entry["name"] in seen:
            continue
        group = getattr(model.get_submodule(entry["name"]), "group", None)
        members = [names[id(m)] for m in group.members] if group is not None else []
        unit = [by_name[n] for n in members] if members and all(n in by_name for n in members) else [entry]
        seen.update(e["name"] for e in unit)
        units.append(unit)
    return units


def _set_enabled(group, enabled: bool) -> None:
    group.enabled = enabled


def bench_modules(model, baseline, modules, config: BenchConfig, device: str, dtype) -> list[dict[str, Any]]:
    """One row per timing unit (`module_units`) and shape: the dense modules, the compressed ones as they run
    (grouped), and, for a group, the same members each computing alone (`ungrouped_s`), interleaved."""
    shapes = [("prefill", 1, config.prefill_tokens)] + [("decode", b, 1) for b in config.decode_batch]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for unit in module_units(model, modules):
        dense = [baseline.get_submodule(e["name"]) for e in unit]
        mine = [model.get_submodule(e["name"]) for e in unit]
        group = mine[0].group if len(unit) > 1 else None
        first = dense[0]
        for phase, batch, tokens in shapes:
            x = torch.randn(batch, tokens, first.in_features, generator=generator).to(device=device, dtype=dtype)
            candidates = {"dense": lambda d=dense, x=x: [m(x) for m in d],
                          "compressed": lambda c=mine, x=x: [m(x) for m in c]}
            if group is not None:
                candidates["ungrouped"] = lambda c=mine, x=x, g=group: (
                    _set_enabled(g, False), [m(x) for m in c], _set_enabled(g, True))
            timing = measure(candidates, config.warmup, config.repeats, device)
            rows.append({
                "name": "+".join(e["name"] for e in unit), "form": "+".join(e["form"] for e in unit),
                "layout": "+".join(e["layout"] for e in unit), "members": len(unit),
                "phase": phase, "batch": batch, "tokens": tokens,
                "in_features": first.in_features, "out_features": sum(d.out_features for d in dense),
                "dense_s": timing["dense"]["median_s"], "compressed_s": timing["compressed"]["median_s"],
                "ungrouped_s": timing["ungrouped" if group is not None else "compressed"]["median_s"],
                "dense_macs": sum(layer_macs(d) for d in dense), "macs": sum(layer_macs(m) for m in mine),
                "dense_weight_bytes": sum(layer_weight_bytes(d) for d in dense),
                "weight_bytes": sum(layer_weight_bytes(m) for m in mine),
            })
    return rows


def summarize_modules(rows: list[dict]) -> list[dict[str, Any]]:
    """Per shape: Σ time dense / Σ time compressed against Σ MACs and Σ weight bytes; the same for the
    ungrouped form of the compressed modules (`ungrouped_*`: each low-rank member computing alone)."""
    out = []
    for key in dict.fromkeys((r["phase"], r["batch"], r["tokens"]) for r in rows):
        group = [r for r in rows if (r["phase"], r["batch"], r["tokens"]) == key]
        dense_s, mine_s = sum(r["dense_s"] for r in group), sum(r["compressed_s"] for r in group)
        ungrouped_s = sum(r.get("ungrouped_s", r["compressed_s"]) for r in group)
        mac_ratio = sum(r["dense_macs"] for r in group) / sum(r["macs"] for r in group)
        bytes_ratio = sum(r["dense_weight_bytes"] for r in group) / sum(r["weight_bytes"] for r in group)
        speedup = dense_s / mine_s
        bound = mac_ratio if key[0] == "prefill" else bytes_ratio
        out.append({"phase": key[0], "batch": key[1], "tokens": key[2], "modules": sum(r.get("members", 1)
                                                                                       for r in group),
                    "dense_s": dense_s, "compressed_s": mine_s, "speedup": speedup, "mac_ratio": mac_ratio,
                    "bytes_ratio": bytes_ratio, "bound": "macs" if key[0] == "prefill" else "weight bytes",
                    "fraction_of_bound": speedup / bound, "ungrouped_s": ungrouped_s,
                    "ungrouped_speedup": dense_s / ungrouped_s,
                    "ungrouped_fraction_of_bound": dense_s / ungrouped_s / bound})
    return out


# ---------------------------------------------------------------------------------------------------
# (b) end to end


def summarize_end_to_end(rows: list[dict]) -> list[dict[str, Any]]:
    """Per phase and batch: MODEL's tokens/s over the baseline's, next to the MAC estimate (`mac_bound`:
    the forward MACs' ratio, the bound where a step is compute-bound, as prefill is) and, for decode, the
    bytes bound (`bytes_bound`: the ratio of the weight + KV bytes a step moves, the bound where it is
    memory-bound, as small-batch decode is)."""
    out = []
    for key in dict.fromkeys((r["phase"], r["batch"]) for r in rows):
        pair = {r["model"]: r for r in rows if (r["phase"], r["batch"]) == key}
        base, mine = pair["baseline"]["macs_per_token"], pair["model"]["macs_per_token"]
        base_rate, rate = pair["baseline"]["tokens_per_s"], pair["model"]["tokens_per_s"]
        row = {"phase": key[0], "batch": key[1], "baseline_tokens_per_s": base_rate,
               "model_tokens_per_s": rate, "speedup": rate / base_rate,
               "mac_bound": base["total"] / mine["total"],
               "projection_mac_ratio": base["projections"] / mine["projections"],
               "projection_share_of_baseline_macs": base["projections"] / base["total"]}
        if key[0] == "decode" and "weight_bytes_per_step" in pair["baseline"]:
            moved = {name: r["weight_bytes_per_step"] + r["kv_bytes_per_step"] for name, r in pair.items()}
            row["bytes_bound"] = moved["baseline"] / moved["model"]
            row["kv_share_of_baseline_bytes"] = pair["baseline"]["kv_bytes_per_step"] / moved["baseline"]
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------
# (c) size


def model_size(model: nn.Module) -> dict[str, int]:
    seen, params, nbytes = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
            nbytes += p.numel() * p.element_size()
    return {"parameters": params, "weight_bytes": nbytes}


# ---------------------------------------------------------------------------------------------------


def default_out(config: BenchConfig, label: str) -> Path:
    return Path(config.model).absolute().parent / "bench" / label


def _flat(row: dict) -> dict:
    """One Arrow row: the per-token MAC breakdown spread into columns."""
    out = {k: v for k, v in row.items() if k != "macs_per_token"}
    out.update({f"macs_per_token_{k}": float(v) for k, v in row.get("macs_per_token", {}).items()})
    return out


def run(config: BenchConfig) -> Path:
    """`bench` on the engine --engine names: transformers (parts (a) to (d)), or dense against compressed in
    vLLM beside transformers' end-to-end speedup (`bltool.serve.vllm_bench`)."""
    engine = engines.engine(config.engine)
    if engine.name == "vllm":
        return _run_vllm(config, engine)
    threads = torch.get_num_threads()
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)  # --threads applies to this run only


def _run_vllm(config: BenchConfig, engine: engines.Engine) -> Path:
    if config.threads is not None or config.kernel != "auto" or not config.modules:
        ui.warn("--threads, --kernel and --no-modules apply to --engine transformers only: vLLM picks its "
                "own threads (VLLM_CPU_OMP_THREADS_BIND) and kernels, and times whole requests")
    vllm_bench.require_vllm()
    ref = resolve_model(config.model, flag="MODEL", convert=False)  # no GGUF converted before the check
    out = Path(config.out) if config.out else ref.path.absolute().parent / "bench" / f"{ref.label}-vllm"
    check_output_dir(out, config.overwrite, stage=Stage.BENCH,
                     inputs=[*model_inputs("MODEL", config.model), *model_inputs("--baseline", config.baseline)])
    ref = resolve_model(config.model, flag="MODEL")
    base_ref = resolve_model(config.baseline, flag="--baseline")
    engine.check_model(ref, "MODEL")
    engine.check_model(base_ref, "--baseline")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    result = vllm_bench.measure_pair(ref, base_ref, config, device, dtype)
    with atomic_output(out, config.overwrite) as tmp:
        write_json(tmp / "result.json", result)
        write_manifest(
            tmp, Stage.BENCH, config={**asdict(config), "out": str(out)},
            inputs=[{"role": "model", **ref.describe(), "content": model_content_hash(ref)},
                    {"role": "baseline", **base_ref.describe(), "content": model_content_hash(base_ref)}],
            machine=result["machine"])
    print_vllm_table(result)
    return out


def _run(config: BenchConfig) -> Path:
    ref = resolve_model(config.model, flag="MODEL", convert=False)  # no GGUF converted before the check
    out = Path(config.out) if config.out else default_out(config, ref.label)
    check_output_dir(out, config.overwrite, stage=Stage.BENCH,
                     inputs=[*model_inputs("MODEL", config.model), *model_inputs("--baseline", config.baseline)])
    ref = resolve_model(config.model, flag="MODEL")
    base_ref = resolve_model(config.baseline, flag="--baseline")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    manifest = read_manifest(ref.path, None, "MODEL") if (ref.path / MANIFEST).is_file() else None
    model = load_model(ref, dtype=dtype, device=device, flag="MODEL")
    kernel = set_kernel(model, config.kernel)
    baseline = load_model(base_ref, dtype=dtype, device=device, flag="--baseline")
    modules = compared_modules(model, manifest)
    check_baseline(model, baseline, modules, config.baseline)
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(config.prefill_tokens, config.decode_context + config.decode_steps)
    if limit is not None and longest > limit:
        raise UsageError(f"--prefill-tokens / --decode-context + --decode-steps: {longest} positions exceed MODEL's "
                         f"max_position_embeddings ({limit})")
    if config.modules and not modules:
        ui.info("MODEL has no compressed or adapted modules: the module comparison (a) is skipped")
    compute = training_compute(ref.path)

    machine = {**machine_info(device), "dtype": str(dtype).replace("torch.", ""), "kernel": kernel}
    ui.info(f"bench on {machine['device_name']} ({device}, {machine['dtype']}, {machine['threads']} threads, "
            f"low-rank kernel {kernel}; load average {machine.get('load_average', 'n/a')})")
    module_rows = bench_modules(model, baseline, modules, config, device, dtype) if config.modules else []
    e2e_rows = (end_to_end({"baseline": baseline, "model": model}, prefill_tokens=config.prefill_tokens,
                           decode_batches=config.decode_batch, decode_context=config.decode_context,
                           decode_steps=config.decode_steps, warmup=config.warmup, repeats=config.repeats,
                           device=device)
                if config.end_to_end else [])
    result = {
        "model": config.model, "model_path": str(ref.path), "baseline": config.baseline,
        "baseline_path": str(base_ref.path), "machine": machine,
        "protocol": {"warmup": config.warmup, "repeats": config.repeats, "statistic": "median",
                     "interleaved": True, "timer": "cuda events" if device.startswith("cuda") else "perf_counter",
                     "prefill_tokens": config.prefill_tokens, "decode_batches": list(config.decode_batch),
                     "decode_context": config.decode_context, "decode_steps": config.decode_steps},
        "modules": summarize_modules(module_rows) if module_rows else [],
        "end_to_end": summarize_end_to_end(e2e_rows) if e2e_rows else [],
        "end_to_end_runs": e2e_rows,
        "size": {"baseline": model_size(baseline), "model": model_size(model)},
        "training_compute": compute,
    }
    if hasattr(os, "getloadavg"):
        machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    with atomic_output(out, config.overwrite) as tmp:
        write_json(tmp / "result.json", {**result, "module_runs": module_rows})
        if module_rows:
            write_arrow(tmp / "modules.arrow", module_rows)
        if e2e_rows:
            write_arrow(tmp / "end_to_end.arrow", [_flat(r) for r in e2e_rows])
        write_manifest(
            tmp, Stage.BENCH, config={**asdict(config), "out": str(out)},
            inputs=[{"role": "model", **ref.describe(), "content": model_content_hash(ref)},
                    {"role": "baseline", **base_ref.describe(), "content": model_content_hash(base_ref)}],
            machine=machine,
        )
    print_tables(result)
    return out


def print_tables(result: dict) -> None:
    from rich.table import Table

    console = ui.console
    if result["modules"]:
        table = Table(title="(a) adapted modules: dense vs compressed, Σ over modules", title_justify="left")
        for column in ("shape", "modules", "dense ms", "compressed ms", "speedup", "MAC ratio", "bytes ratio",
                       "of bound", "ungrouped"):
            table.add_column(column, justify="right")
        for s in result["modules"]:
            shape = f"{s['phase']} {s['batch']}×{s['tokens']}"
            table.add_row(shape, str(s["modules"]), f"{s['dense_s'] * 1e3:.2f}", f"{s['compressed_s'] * 1e3:.2f}",
                          f"{s['speedup']:.2f}×", f"{s['mac_ratio']:.2f}×", f"{s['bytes_ratio']:.2f}×",
                          f"{s['fraction_of_bound']:.0%} of {s['bound']}",
                          f"{s['ungrouped_speedup']:.2f}× ({s['ungrouped_fraction_of_bound']:.0%})")
        console.print(table)
    if result["end_to_end"]:
        table = Table(title="(b) end to end with KV cache: tokens/s", title_justify="left")
        for column in ("phase", "batch", "baseline tok/s", "model tok/s", "speedup", "MAC estimate",
                       "bytes bound", "projections' share of MACs"):
            table.add_column(column, justify="right")
        for s in result["end_to_end"]:
            moved = f"{s['bytes_bound']:.2f}×" if s.get("bytes_bound") is not None else "—"
            table.add_row(s["phase"], str(s["batch"]), f"{s['baseline_tokens_per_s']:,.1f}",
                          f"{s['model_tokens_per_s']:,.1f}", f"{s['speedup']:.2f}×", f"{s['mac_bound']:.2f}×",
                          moved, f"{s['projection_share_of_baseline_macs']:.0%}")
        console.print(table)
    table = Table(title="(c) size", title_justify="left")
    for column in ("model", "parameters", "weight MB"):
        table.add_column(column, justify="right")
    for name, size in result["size"].items():
        table.add_row(name, f"{size['parameters']:,}", f"{size['weight_bytes'] / 1e6:,.1f}")
    console.print(table)
    compute = result["training_compute"]
    if compute:
        realised = compute.get("realised")
        console.print(f"(d) training compute (kd-full = 1.00): proxy {compute.get('proxy', float('nan')):.2f}, "
                      f"realised {'n/a' if realised is None else format(realised, '.2f')} "
                      f"(from {compute['source']})", soft_wrap=True)
    else:
        console.print("(d) training compute: no distill manifest with a compute section in MODEL's inputs",
                      soft_wrap=True)
    m = result["machine"]
    console.print(f"measured on {m['device_name']} ({m['device']}, {m['dtype']}, {m['threads']} threads, kernel "
                  f"{m['kernel']}); load average before {m.get('load_average', 'n/a')}, after "
                  f"{m.get('load_average_after', 'n/a')}", soft_wrap=True)


def print_vllm_table(result: dict) -> None:
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
