"""capacity: from a model (or its bench-serving measurement) and a workload to a serving plan under
KV-cache memory (docs/method.md §8), optionally checked by simulation.

For each model: KV bytes per token, weight bytes, KV capacity M, E[g] over the workload's joint length
distribution (memory counted in whole pages, as the engines allocate it), b̄, μ = M / (b̄ · E[g]), δ, the
token-throughput and concurrent-sequences bounds, which one binds, the maximum stable rate, and the GPUs
needed for --rate at --target-util. With --validate, a simulator of the continuous-batching server
(`bltool.serve.simulator.replay`: admission by prompt, KV growing per token in pages, the scheduler's
margin, preemption, b(p, d, k) per iteration) runs each model at 0.8, 1.0 and 1.2 times its predicted rate
and far above it (the simulated capacity); and each `bench-serving` input is served for real at 0.5 to 1.6
times the formula's rate for that server, with a KV cache small enough that memory, not the sequence cap,
binds, beside the simulator's replay of the same requests (`bltool.serve.validation`).

The plan and its simulated check are `bltool.serve.plan`, the check against the server
`bltool.serve.validation`, the figures `bltool.results.figures`; this stage reads the inputs, runs them
and writes the artifact.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from bltool import ui
from bltool.artifacts import (
    MANIFEST,
    MODEL_STAGES,
    Stage,
    artifact_ref,
    atomic_output,
    check_output_dir,
    read_manifest,
    sha256_file,
    write_arrow,
    write_json,
    write_manifest,
)
from bltool.configs import CapacityConfig
from bltool.errors import ArtifactError, UsageError
from bltool.models.loading import checkpoint_parameters, model_content_hash, model_inputs, resolve_model
from bltool.results.figures import capacity_queues, capacity_validation
from bltool.serve.plan import LOADS, ModelInfo, plan, validate
from bltool.serve.queueing import KVShape, kv_shape
from bltool.serve.validation import validate_server
from bltool.serve.workload import Workload, read_trace, synthetic
from bltool.units import format_bytes


def load_model_info(spec: str) -> ModelInfo:
    path = Path(spec)
    stages = (Stage.BENCH_SERVING, *MODEL_STAGES)
    manifest = read_manifest(path, stages, "MODELS") if (path / MANIFEST).is_file() else None
    if manifest is not None and manifest["stage"] == Stage.BENCH_SERVING:
        try:
            result = json.loads((path / "result.json").read_text(encoding="utf-8"))
            shape = KVShape(**result["kv_shape"])
            return ModelInfo(spec, result["label"], shape, int(result["parameters"]), result,
                             artifact_ref(path, manifest, Stage.BENCH_SERVING))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ArtifactError(f"MODELS: {path}/result.json is not a bench-serving result ({err})") from None
    ref = resolve_model(spec, flag="MODELS")
    config = json.loads((ref.path / "config.json").read_text(encoding="utf-8"))
    try:
        shape = kv_shape(config)
    except ValueError as err:
        raise UsageError(f"MODELS: {ref.path}/config.json: {err}") from None
    return ModelInfo(spec, ref.label, shape, checkpoint_parameters(ref.path), None,
                     {"role": "model", **ref.describe(), "content": model_content_hash(ref)})


def load_workload(config: CapacityConfig) -> Workload:
    if config.workload is not None:
        return read_trace(config.workload, config.prompt_column, config.output_column)
    return synthetic(config.prompt_len, config.output_len, config.samples, config.seed)


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == RATE and abs(value) >= 1000:
        spec = COUNT
    return spec.format(value)


COUNT, RATE, SHORT, TEXT = "{:,.0f}", "{:.4g}", "{:.3g}", "{}"


def print_table(rows: list[dict], workload: Workload, config: CapacityConfig) -> None:
    """The models side by side (one column each), on stderr."""
    from rich.markup import escape
    from rich.table import Table

    w = workload.summary()
    title = (f"capacity: {w['requests']:,} requests, E[s] {w['mean_prompt']:.1f}, E[o] {w['mean_output']:.1f}; "
             f"ŝ {config.chunk}; --gpu-mem {format_bytes(config.gpu_mem)} × {config.mem_util:g}; {config.dtype}")
    table = Table(title=escape(title), title_justify="left")
    table.add_column("")
    for row in rows:
        table.add_column(escape(row["label"]), justify="right")
    lines = [
        ("parameters", "parameters", COUNT), ("weights (GiB)", lambda r: r["weight_bytes"] / 2**30, SHORT),
        ("KV bytes / token", "kv_bytes_per_token", COUNT), ("M (KV tokens)", "kv_capacity_tokens", COUNT),
        ("E[g] (token·iterations)", "mean_lifetime_memory", COUNT),
        ("E[g] in whole pages", "mean_lifetime_memory_paged", COUNT),
        ("g(E[s], E[o])", "lifetime_memory_at_means", COUNT),
        ("b̄ (ms)", lambda r: r["iteration_s"] * 1e3, RATE), ("b̄ source", "iteration_source", TEXT),
        ("μ = M/(b̄·E[g]) (req/s)", "memory_rate", RATE), ("δ = max(s+o)/M", "delta", SHORT),
        ("μ(1−δ) (req/s)", "guaranteed_stable_rate", RATE), ("token bound (req/s)", "token_rate", RATE),
        ("max sequences", "max_seqs", COUNT), ("sequence bound (req/s)", "sequence_rate", RATE),
        ("binds", "binding", TEXT), ("max stable rate (req/s)", "max_stable_rate", RATE),
        ("output tok/s at that rate", "max_output_tokens_per_s", RATE),
    ]
    if config.rate:
        lines.append((f"GPUs for λ = {config.rate:g} req/s at u = {config.target_util:g}", "gpus", COUNT))
    if config.validate:
        lines += [("simulated capacity (req/s)", lambda r: r["validation"]["simulated_capacity"], RATE),
                  ("simulated / predicted", lambda r: r["validation"]["capacity_ratio"], "{:.3f}"),
                  ("sim. p90 latency at 0.8× (s)", lambda r: r["validation"]["runs"][0]["latency_p90_s"], SHORT),
                  ("sim. preemptions at 1.2×", lambda r: r["validation"]["runs"][-1]["preemptions"], COUNT)]
    if any("server_validation" in r for r in rows):
        def served(key):
            return lambda r: r["server_validation"][key] if "server_validation" in r else None

        lines += [("server: M (KV tokens)", lambda r: r["server_validation"]["server"]["kv_tokens"]
                   if "server_validation" in r else None, COUNT),
                  ("server: binds", served("binding"), TEXT),
                  ("server: formula rate (req/s)", lambda r: r["server_validation"]["prediction"]["max_stable_rate"]
                   if "server_validation" in r else None, RATE),
                  ("server: simulated capacity (req/s)", served("simulated_capacity"), RATE),
                  ("server: measured knee (req/s)", served("measured_knee"), RATE),
                  ("server: formula / simulator", served("formula_vs_simulator"), "{:.3f}"),
                  ("server: formula / measured knee", served("formula_vs_measured_knee"), "{:.3f}"),
                  ("server: formula on offered / measured knee", served("offered_formula_vs_measured_knee"), "{:.3f}"),
                  ("server: simulator / measured knee", served("simulator_vs_measured_knee"), "{:.3f}"),
                  ("server: knee noise (load served twice)", lambda r: r["server_validation"]["noise"]["spread"]
                   if "server_validation" in r else None, "{:.3f}"),
                  ("server: within targets", served("within_targets"), TEXT)]
    for name, key, spec in lines:
        values = [key(r) if callable(key) else r[key] for r in rows]
        table.add_row(escape(name), *[escape(_fmt(v, spec)) for v in values])
    ui.console.print(table)
    same_kv: dict[int, list[str]] = {}
    for r in rows:
        same_kv.setdefault(r["kv_bytes_per_token"], []).append(r["label"])
    for kv, labels in same_kv.items():
        if len(labels) > 1:
            ui.info(escape(f"{', '.join(labels)}: same KV bytes per token ({kv:,}: same layers and KV heads), so "
                           "their capacities differ only through b̄ and the weight memory left to the cache"))


def default_out(config: CapacityConfig) -> Path:
    return Path("capacity") / (Path(config.workload).stem if config.workload else "synthetic")


def run(config: CapacityConfig) -> Path:
    out = Path(config.out) if config.out else default_out(config)
    check_output_dir(out, config.overwrite, stage=Stage.CAPACITY,
                     inputs=[*(i for m in config.models for i in model_inputs("MODELS", m)),
                             ("--workload", config.workload)])
    workload = load_workload(config)
    infos = [load_model_info(spec) for spec in config.models]
    seen: dict[str, int] = {}
    rows, series, served_rows = [], [], []
    for info in infos:
        row = plan(info, workload, config)
        seen[row["label"]] = seen.get(row["label"], 0) + 1
        if seen[row["label"]] > 1:  # two models with one name: keep the columns apart
            row["label"] = f"{row['label']}#{seen[row['label']]}"
        if config.validate:
            row["validation"], points = validate(row, workload, config, info.measured)
            series += points
            if info.measured is not None:
                row["server_validation"], served = validate_server(info, workload, config)
                served_rows += served
        rows.append(row)
    print_table(rows, workload, config)
    result = {"workload": workload.summary(), "settings": {**asdict(config), "out": str(out)}, "models": rows}
    with atomic_output(out, config.overwrite) as tmp:
        write_json(tmp / "result.json", result)
        flat = []
        for row in rows:
            entry = {k: v for k, v in row.items() if k not in ("validation", "server_validation")}
            if "validation" in row:
                v = row["validation"]
                entry.update(sim_capacity=v["simulated_capacity"], sim_capacity_ratio=v["capacity_ratio"])
                for run_ in v["runs"]:
                    tag = f"sim_{run_['load']:g}x".replace(".", "_")
                    entry.update({f"{tag}_throughput": run_["throughput"], f"{tag}_preemptions": run_["preemptions"],
                                  f"{tag}_max_queue": run_["max_queue"], f"{tag}_latency_p90_s": run_["latency_p90_s"]})
            if "server_validation" in row:
                v = row["server_validation"]
                entry.update(server_formula_rate=v["prediction"]["max_stable_rate"], server_binding=v["binding"],
                             server_kv_tokens=v["server"]["kv_tokens"],
                             server_simulated_capacity=v["simulated_capacity"], server_measured_knee=v["measured_knee"],
                             server_within_targets=v["within_targets"])
            flat.append(entry)
        write_arrow(tmp / "result.arrow", flat)
        if config.validate:
            write_arrow(tmp / "simulation.arrow", series)
            capacity_queues(series, rows, LOADS, tmp / "queue.png")
        if served_rows:
            write_arrow(tmp / "validation.arrow", served_rows)
            capacity_validation(rows, served_rows, tmp / "validation.png")
        write_manifest(tmp, Stage.CAPACITY, config={**asdict(config), "out": str(out)},
                       inputs=[info.input_ref for info in infos] +
                       ([{"role": "workload", "path": str(Path(config.workload).absolute()),
                          "sha256": sha256_file(Path(config.workload))}] if config.workload else []),
                       result=[{k: r[k] for k in ("label", "max_stable_rate", "binding", "gpus")} for r in rows])
    return out
