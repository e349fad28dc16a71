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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

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
from bltool.models.loading import checkpoint_parameters, load_model, model_content_hash, model_inputs, resolve_model
from bltool.serve.iteration import IterationModel
from bltool.serve.queueing import (
    DTYPE_BYTES,
    Bounds,
    KVShape,
    SaturatedBatch,
    concurrency_bound,
    gpus_needed,
    iteration_model_bounds,
    iterations,
    kv_bytes_per_token,
    kv_capacity,
    kv_shape,
    lifetime_memory,
    lifetime_memory_smooth,
    memory_slack,
    service_rate,
    token_throughput_bound,
)
from bltool.serve.serving import SAFETY_MARGIN, TransformersServer
from bltool.serve.simulator import ServerSpec, simulate_server
from bltool.serve.validation import (
    LIVE_LOADS,
    REPEATED_LOAD,
    fit_error,
    knee,
    measure_load,
    memory_bound_cache,
    offered_loads,
    server_spec,
    simulate_load,
    speed_factor,
    warm_up,
)
from bltool.serve.validation import row as validation_row
from bltool.serve.vllm_serving import VllmServer
from bltool.serve.workload import Workload, check_fits, read_trace, synthetic
from bltool.units import format_bytes

LOADS = (0.8, 1.0, 1.2)  # --validate: arrival rate as a multiple of the predicted maximum stable rate
SIM_MIN_REQUESTS, SIM_MAX_REQUESTS = 2_000, 20_000  # requests per simulated load
OVERLOAD = 3.0  # the simulated capacity: throughput at this multiple of the formula's rate (saturated)
# b̄ measured at a concurrency more than this many times below M / E[s + o] is reported as extrapolated
EXTRAPOLATION_FACTOR = 2.0
@dataclass(frozen=True)
class ModelInfo:
    """What capacity needs about one model, from its checkpoint or its bench-serving artifact."""

    spec: str
    label: str
    shape: KVShape
    parameters: int
    measured: dict | None  # the bench-serving result, when MODEL is one
    input_ref: dict  # how the manifest cites it


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


def measured_iteration(measured: dict, stat: str, label: str) -> tuple[IterationModel | None, float, str]:
    """The iteration time a bench-serving artifact gives for --iteration-stat: the fitted b(p, d, k)
    (`fit`, returned with the median b̄, which it replaces), or the median or mean of the saturated run's
    iterations as a constant. An artifact from before the fit falls back to the median."""
    device = measured["device"]
    if stat == "fit":
        if "iteration_model" in measured:
            return (IterationModel.from_dict(measured["iteration_model"]), float(measured["iteration_s"]),
                    f"measured (b(p, d, k) at saturation, {device})")
        ui.warn(f"{label}: the bench-serving artifact has no iteration-time fit (made before it existed); "
                "using the median b̄")
        stat = "median"
    key = "iteration_s" if stat == "median" else "iteration_s_mean"
    return None, float(measured[key]), f"measured ({stat}, {device})"


def rate_bounds(iteration: IterationModel | None, b_bar: float, m_tokens: int, max_seqs: int | None,
                prefill_tps: float | None, decode_tps: float | None, mean_s: float, mean_o: float, mean_g: float,
                mean_iterations: float, mean_g_paged: float) -> tuple[Bounds, SaturatedBatch | None]:
    """docs/method.md §8's bounds: with a fitted b(p, d, k), evaluated at the saturated batch
    (`queueing.iteration_model_bounds`); else with the constant b̄ and the measured P and D. Memory is
    counted in pages: `m_tokens` the cache's whole pages, `mean_g_paged` E[g] in whole pages."""
    if iteration is not None:
        return iteration_model_bounds(iteration, m_tokens, max_seqs, mean_s, mean_o, mean_g, mean_iterations,
                                      mean_g_paged)
    return Bounds(
        memory=service_rate(m_tokens, b_bar, mean_g_paged),
        tokens=token_throughput_bound(mean_s, mean_o, prefill_tps, decode_tps) if prefill_tps and decode_tps
        else None,
        sequences=concurrency_bound(max_seqs, b_bar, mean_iterations) if max_seqs else None,
    ), None


def plan(info: ModelInfo, workload: Workload, config: CapacityConfig) -> dict:
    """Every figure of docs/method.md §8 for one model on the workload."""
    dtype_bytes = DTYPE_BYTES[config.dtype]
    weight_bytes = info.parameters * dtype_bytes
    kv_bytes = kv_bytes_per_token(info.shape, dtype_bytes)
    m_tokens = kv_capacity(config.gpu_mem, config.mem_util, weight_bytes, config.activation_reserve, kv_bytes)
    if m_tokens < 1:
        raise UsageError(
            f"--gpu-mem {format_bytes(config.gpu_mem)} × --mem-util {config.mem_util} leaves no KV cache for "
            f"{info.label}: "
            f"weights need {weight_bytes / 2**30:.2f} GiB ({config.dtype}) and --activation-reserve "
            f"{config.activation_reserve / 2**30:.2f} GiB"
        )
    measured = info.measured
    # memory as the engines allocate it: whole pages (E[g] in pages, and the cache's whole pages); every
    # request must fit alone
    page = int(measured["settings"]["page_size"]) if measured is not None else config.page_size
    m_paged = m_tokens // page * page
    check_fits(workload, m_paged, info.label)

    iteration = None  # the fitted b(p, d, k), when used
    if measured is not None:
        iteration, b_bar, b_source = measured_iteration(measured, config.iteration_stat, info.label)
        prefill_tps, decode_tps = measured["prefill_tokens_per_s"], measured["decode_tokens_per_s"]
        measured_concurrency = int(measured["settings"]["concurrency"])
        max_seqs = config.max_seqs or measured_concurrency
        seqs_source = "--max-seqs" if config.max_seqs else "measured concurrency"
        if config.max_seqs and config.max_seqs != measured_concurrency:
            ui.warn(f"{info.label}: --max-seqs {config.max_seqs} overrides the concurrency b̄ was measured at "
                    f"({measured_concurrency} sequences)")
        if measured["settings"]["chunk"] != config.chunk:
            ui.warn(f"{info.label}: b̄ was measured with chunk {measured['settings']['chunk']}, "
                    f"capacity uses --chunk {config.chunk}")
    elif config.iteration_time is not None:
        b_bar, b_source = config.iteration_time, "--iteration-time"
        prefill_tps, decode_tps = config.prefill_tps, config.decode_tps
        max_seqs, seqs_source = config.max_seqs, "--max-seqs" if config.max_seqs else None
        measured_concurrency = None
    else:
        raise UsageError(
            f"MODELS {info.spec}: no measured iteration time; pass the output of "
            f"`bltool bench-serving {info.spec} --out DIR` instead, or give --iteration-time SECONDS"
        )

    s, o = workload.prompt, workload.output
    g = lifetime_memory(s, o, config.chunk)
    mean_g = float(g.mean())
    mean_g_paged = float(lifetime_memory(s, o, config.chunk, page).mean())
    mean_s, mean_o = float(s.mean()), float(o.mean())
    mean_iterations = float(iterations(s, o, config.chunk).mean())
    # the concurrency the KV cache allows (M / E[s + o]); b̄ measured far below it is extrapolated there
    implied_concurrency = m_tokens / (mean_s + mean_o)
    extrapolated = (measured_concurrency is not None
                    and implied_concurrency > EXTRAPOLATION_FACTOR * measured_concurrency)
    if extrapolated:
        ui.warn(f"{info.label}: the KV cache holds about {implied_concurrency:,.0f} sequences of this workload "
                f"(M / E[s + o]) but b̄ was measured at {measured_concurrency}: the memory bound μ is extrapolated; "
                f"measure at that concurrency with `bltool bench-serving --concurrency "
                f"{round(implied_concurrency)}`")
    bounds, batch = rate_bounds(iteration, b_bar, m_paged, max_seqs, prefill_tps, decode_tps,
                                mean_s, mean_o, mean_g, mean_iterations, mean_g_paged)
    if batch is not None:
        b_bar = batch.iteration_s
    delta = memory_slack(int((s + o).max()), m_tokens)
    return {
        "model": info.spec,
        "label": info.label,
        "parameters": info.parameters,
        "weight_bytes": weight_bytes,
        **{f"kv_{k}": v for k, v in info.shape.as_dict().items()},
        "kv_bytes_per_token": kv_bytes,
        "kv_capacity_tokens": m_tokens,
        "page_size": page,
        "mean_lifetime_memory": mean_g,
        "mean_lifetime_memory_paged": mean_g_paged,
        "lifetime_memory_at_means": lifetime_memory_smooth(mean_s, mean_o, config.chunk),
        "mean_iterations": mean_iterations,
        "iteration_s": b_bar,
        "iteration_source": b_source,
        "iteration_model": iteration.as_dict() if iteration is not None else None,
        "saturated_batch": asdict(batch) if batch is not None else None,
        "prefill_tokens_per_s": prefill_tps,
        "decode_tokens_per_s": decode_tps,
        "max_seqs": max_seqs,
        "max_seqs_source": seqs_source,
        "mean_prompt_len": mean_s,
        "mean_output_len": mean_o,
        "measured_concurrency": measured_concurrency,
        "implied_concurrency": implied_concurrency,
        "iteration_extrapolated": extrapolated,
        "memory_rate": bounds.memory,
        "delta": delta,
        "guaranteed_stable_rate": bounds.memory * (1 - delta),
        "token_rate": bounds.tokens,
        "sequence_rate": bounds.sequences,
        "binding": bounds.binding,
        "max_stable_rate": bounds.max_stable_rate,
        "max_output_tokens_per_s": bounds.max_stable_rate * mean_o,
        "rate": config.rate,
        "gpus": gpus_needed(config.rate, bounds.max_stable_rate, config.target_util) if config.rate else None,
    }


def simulated_server(row: dict, workload: Workload, config: CapacityConfig, measured: dict | None) -> ServerSpec:
    """The plan's worker as the simulator runs it: the plan's M and sequence cap, --page-size pages (a
    bench-serving input's own), the scheduler's safety margin, a token budget of one decode token per
    sequence plus the --chunk, and b(p, d, k) when bench-serving fitted it (else the constant b̄)."""
    if measured is not None and "iteration_model" in measured:
        iteration = IterationModel.from_dict(measured["iteration_model"])
    else:
        iteration = IterationModel.constant(row["iteration_s"])
    page = int(measured["settings"]["page_size"]) if measured is not None else config.page_size
    m_tokens = row["kv_capacity_tokens"]
    seqs = row["max_seqs"] or max(1, m_tokens // max(1, int((workload.prompt + workload.output).min())))
    return ServerSpec(kv_tokens=m_tokens, page_size=page, max_batch_tokens=seqs + config.chunk, max_seqs=seqs,
                      safety_margin=SAFETY_MARGIN, iteration=iteration)


def validate(row: dict, workload: Workload, config: CapacityConfig, measured: dict | None) -> tuple[dict, list[dict]]:
    """Simulate the worker at 0.8, 1.0 and 1.2 × the predicted maximum stable rate with the simulator that
    does not know the future (admission by prompt, KV growing per token, pages, margin, preemption)."""
    spec = simulated_server(row, workload, config, measured)
    target = row["max_stable_rate"]
    concurrency = min(spec.max_seqs, row["implied_concurrency"])
    requests = int(min(SIM_MAX_REQUESTS, max(SIM_MIN_REQUESTS, 40 * concurrency)))
    runs, series = [], []
    for load in LOADS:
        sim = simulate_server(workload.prompt, workload.output, rate=load * target, server=spec, requests=requests,
                              seed=config.seed)
        summary = sim.summary()
        summary.pop("steady_window_s")
        runs.append({"load": load, "rate": load * target, **summary,
                     "throughput_ratio": summary["throughput"] / target})
        stride = max(1, len(sim.iteration_start) // 2000)
        series += [{"label": row["label"], "load": load, "time_s": float(t), "queue": int(q), "kv_tokens": int(k)}
                   for t, q, k in zip(sim.iteration_start[::stride], sim.queue[::stride], sim.kv_tokens[::stride])]
    # the simulated capacity: the completion rate far above the predicted rate, where the worker is saturated
    # whatever the formula got wrong
    capacity = simulate_server(workload.prompt, workload.output, rate=OVERLOAD * target, server=spec,
                               requests=requests, seed=config.seed).throughput()
    summary = {
        "target_rate": target,
        "requests_per_load": requests,
        "server": spec_dict(spec),
        "runs": runs,
        "simulated_capacity": capacity,
        "capacity_ratio": capacity / target,
    }
    return summary, series


def server_prediction(measured: dict, spec: ServerSpec, workload: Workload, stat: str = "fit",
                      iteration: IterationModel | None = None) -> dict:
    """The formula for the server the check serves with (its cache in whole pages, its settings): the
    memory, token and sequence bounds, which binds, the maximum stable rate, and the resident requests the
    cache holds by the formula (n_M; memory binds when it is below the sequence cap). With `iteration`,
    that b(p, d, k) instead of the one --iteration-stat takes from the measurement."""
    chunk = spec.max_batch_tokens - spec.max_seqs
    s, o = workload.prompt, workload.output
    if iteration is None:
        iteration, b_bar, _ = measured_iteration(measured, stat, "the measured server")
    else:
        b_bar = float(measured["iteration_s"])  # replaced by the fit
    mean_g = float(lifetime_memory(s, o, chunk).mean())
    mean_g_paged = float(lifetime_memory(s, o, chunk, spec.page_size).mean())
    mean_iterations = float(iterations(s, o, chunk).mean())
    m_paged = spec.pages * spec.page_size
    bounds, batch = rate_bounds(iteration, b_bar, m_paged, spec.max_seqs, measured["prefill_tokens_per_s"],
                                measured["decode_tokens_per_s"], float(s.mean()), float(o.mean()), mean_g,
                                mean_iterations, mean_g_paged)
    return {"chunk": chunk, "iteration_s": batch.iteration_s if batch is not None else b_bar,
            "mean_lifetime_memory": mean_g, "mean_lifetime_memory_paged": mean_g_paged,
            "mean_iterations": mean_iterations, "memory_residents": m_paged * mean_iterations / mean_g_paged,
            "memory_rate": bounds.memory, "token_rate": bounds.tokens, "sequence_rate": bounds.sequences,
            "binding": bounds.binding, "max_stable_rate": bounds.max_stable_rate}


def measured_server(ref, measured: dict, spec: ServerSpec, longest: int):
    """The server bench-serving measured, made again: transformers' continuous batching on the model, or a
    vLLM engine with the measured cache, budget, cap and pages (`--engine vllm`)."""
    if measured.get("engine", "transformers") == "vllm":
        max_model_len = -(-longest // spec.page_size) * spec.page_size
        return VllmServer(ref.path, dtype=measured["dtype"], kv_tokens=spec.kv_tokens,
                          max_batch_tokens=spec.max_batch_tokens, max_requests=spec.max_seqs, page_size=spec.page_size,
                          max_model_len=max_model_len, eager=bool(measured.get("eager", False)))
    device = measured["device"]
    return TransformersServer(load_model(ref, dtype=getattr(torch, measured["dtype"]), device=device, flag="MODELS"))


def validate_server(info: ModelInfo, workload: Workload, config: CapacityConfig) -> tuple[dict, list[dict]]:
    """Serve the workload on the engine and model bench-serving measured, with a KV cache in which memory
    binds (`validation.memory_bound_cache`), at LIVE_LOADS × the formula's rate (the highest load twice, for
    the run's own noise), and replay the same requests in the simulator (`bltool.serve.validation`)."""
    measured = info.measured
    measured_spec = server_spec(measured)
    largest = int((workload.prompt + workload.output).max())
    if -(-largest // measured_spec.page_size) > measured_spec.pages:
        raise UsageError(
            f"--validate: requests of up to {largest:,} tokens do not fit the KV cache of {info.spec} "
            f"({measured_spec.kv_tokens:,} tokens, measured with --concurrency {measured_spec.max_seqs}); measure "
            "with a larger --concurrency or --output-len, or validate on a workload of shorter requests")
    device = measured["device"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--validate: {info.spec} was measured on {device}, and this machine has no CUDA device")
    ref = resolve_model(measured["model_path"], flag="MODELS")
    recorded = read_manifest(Path(info.spec), (Stage.BENCH_SERVING,), "MODELS")["inputs"][0].get("content")
    if recorded is not None and recorded != model_content_hash(ref):
        raise ArtifactError(f"MODELS: {measured['model_path']} changed since {info.spec} measured it; "
                            "run bench-serving again")
    # bench-serving's cache holds --concurrency requests at their peak, so there the sequence cap binds: the
    # check serves with a cache in which memory does
    spec = replace(measured_spec, kv_tokens=memory_bound_cache(measured_spec, workload.prompt, workload.output))
    chunk = spec.max_batch_tokens - spec.max_seqs
    strata = lifetime_memory(workload.prompt, workload.output, chunk, spec.page_size)
    server = measured_server(ref, measured, spec, largest)
    rows, runs, records = [], [], []  # each load's measured run and iterations
    try:
        spec = replace(spec, kv_tokens=warm_up(server, spec))  # the cache as the engine allocated it
        prediction = server_prediction(measured, spec, workload, config.iteration_stat)
        rate = prediction["max_stable_rate"]
        loads = offered_loads(workload, [m * rate for m in LIVE_LOADS], config.validate_requests, config.seed,
                              strata)
        for multiple, load in zip(LIVE_LOADS, loads):
            ui.info(f"{info.label}: serving {len(load.arrival_s)} requests at {load.rate:.3g} req/s "
                    f"({multiple:g} × the formula's {rate:.3g}; KV cache {spec.kv_tokens:,} tokens, "
                    f"{prediction['binding']} bind)")
            served, its = measure_load(server, load, spec, config.seed)
            runs.append(served)
            records.append(its)
            replayed = simulate_load(load, spec)
            rows += [{"label": info.label, **validation_row("measured", load, multiple, served),
                      "fit_error": fit_error(its, spec.iteration)},
                     {"label": info.label, **validation_row("simulator", load, multiple, replayed), "fit_error": None}]
        ui.info(f"{info.label}: serving the {REPEATED_LOAD:g} × load again, for the run's own noise")
        repeat, _ = measure_load(server, loads[LIVE_LOADS.index(REPEATED_LOAD)], spec, config.seed)
    finally:
        server.close()  # the next model's server (a vLLM engine reserves its cache) starts with the memory free
    long_run = simulate_server(workload.prompt, workload.output, rate=OVERLOAD * rate, server=spec,
                               requests=SIM_MIN_REQUESTS, seed=config.seed)
    measured_rows = [r for r in rows if r["source"] == "measured"]
    measured_knee = knee(measured_rows)
    replay_knee = knee([r for r in rows if r["source"] == "simulator"])
    simulated_capacity = long_run.throughput()
    below = [r for r in measured_rows if r["load"] < 1]
    pairs = list(zip(measured_rows, [r for r in rows if r["source"] == "simulator"]))
    offered = server_prediction(measured, spec, Workload(loads[0].prompt, loads[0].output, "offered requests"),
                                config.iteration_stat)
    first = next(r["throughput"] for r in measured_rows if r["load"] == REPEATED_LOAD)
    again = repeat.throughput()
    summary = {
        "server": spec_dict(spec),
        "measured_kv_tokens": measured_spec.kv_tokens,  # bench-serving's cache, where the sequence cap binds
        "binding": prediction["binding"],
        "prediction": prediction,
        "loads": list(LIVE_LOADS),
        "requests_per_load": config.validate_requests,
        "measured_knee": measured_knee,
        "replayed_knee": replay_knee,
        "simulated_capacity": simulated_capacity,
        "simulated_capacity_requests": SIM_MIN_REQUESTS,
        # the targets (issue 17): formula vs simulator within 10%, vs the measured server below saturation
        # within 15% (throughput there is min(λ, rate)), the knee within 15% of the measured one
        "formula_vs_simulator": rate / simulated_capacity,
        "formula_vs_measured_below": [min(r["window_offered_rate"], rate) / r["throughput"] for r in below],
        "formula_vs_measured_knee": rate / measured_knee,
        # diagnostic: the formula on the requests actually offered (their own E[g]; drawn stratified by g, they
        # hold the workload's E[g] to a few percent)
        "offered_prediction": offered,
        "offered_formula_vs_measured_knee": offered["max_stable_rate"] / measured_knee,
        "simulator_vs_measured_knee": replay_knee / measured_knee,
        # the replay against the measured run, load by load, on the same requests
        "simulator_vs_measured_throughput": [s["throughput"] / m["throughput"] for m, s in pairs],
        "simulator_vs_measured_latency_p90": [s["latency_p90_s"] / m["latency_p90_s"] for m, s in pairs],
        # how well b(p, d, k), fitted on bench-serving's fixed-length runs, times this workload's iterations
        "live_fit_error": float(np.mean([r["fit_error"] for r in measured_rows if r["fit_error"] is not None])),
        # the highest load served twice, the same requests at the same times: how far the server's throughput
        # moves between two runs of this check (the machine's own noise)
        "noise": {"load": REPEATED_LOAD, "throughput": [first, again],
                  "spread": abs(first - again) / ((first + again) / 2)},
        "in_run": in_run_check(measured, spec, workload, loads, runs, records, measured_rows, rate),
    }
    summary["targets"] = {
        "formula_vs_simulator_within_10pct": abs(summary["formula_vs_simulator"] - 1) <= 0.10,
        "formula_vs_measured_below_within_15pct": all(abs(x - 1) <= 0.15 for x in summary["formula_vs_measured_below"]),
        "knee_within_15pct": abs(summary["formula_vs_measured_knee"] - 1) <= 0.15,
    }
    summary["within_targets"] = all(summary["targets"].values())
    return summary, rows


def in_run_check(measured: dict, spec: ServerSpec, workload: Workload, loads: list, runs: list,
                 records: list[list[dict]], measured_rows: list[dict], rate: float) -> dict:
    """The formula and the simulator judged within one run: each load's b(p, d, k) scaled by how much slower or
    faster the server ran during that load than bench-serving's fit says (`validation.speed_factor`), so a
    machine busier or idler than when bench-serving ran, or than during another load, moves both sides alike.
    Each load is replayed with its own scaling, and the knee is set beside the replay of its own load; the
    formula (its rate divides by the factor) is taken at the knee's load too, as min(λ, rate) with λ the
    rate offered in that load's steady window (a server faster than bench-serving measured may keep up even
    at the highest load, and then the knee is λ, not its capacity)."""
    factors = [speed_factor(its, run, spec.iteration) for its, run in zip(records, runs)]
    throughputs = [simulate_load(load, replace(spec, iteration=spec.iteration.scaled(f))).throughput()
                   if f is not None else None for load, f in zip(loads, factors)]
    measured_knee = knee(measured_rows)
    at = max(range(len(measured_rows)), key=lambda i: measured_rows[i]["throughput"])  # the knee's load
    offered = measured_rows[at]["window_offered_rate"]
    formula = rate / factors[at] if factors[at] is not None else None
    return {
        "speed_factors": factors,
        "simulator_vs_measured_throughput": [t / r["throughput"] if t is not None else None
                                             for t, r in zip(throughputs, measured_rows)],
        "knee_load": measured_rows[at]["load"],
        "replayed_at_knee_load": throughputs[at],
        "simulator_vs_measured_knee": throughputs[at] / measured_knee if throughputs[at] is not None else None,
        "knee_saturated": measured_knee < 0.9 * offered,  # the server fell behind what was offered there
        "formula_rate": formula,
        "formula_vs_measured_knee": min(offered, formula) / measured_knee if formula is not None else None,
    }


def spec_dict(spec: ServerSpec) -> dict:
    return {"kv_tokens": spec.kv_tokens, "page_size": spec.page_size, "max_batch_tokens": spec.max_batch_tokens,
            "max_seqs": spec.max_seqs, "safety_margin": spec.safety_margin, "iteration": spec.iteration.as_dict()}


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


def plot_queues(series: list[dict], rows: list[dict], path: Path) -> None:
    """Queue length over time for each model at each simulated load (one panel per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.6), squeeze=False)
    for ax, row in zip(axes[0], rows):
        target = row["validation"]["target_rate"]
        for load in LOADS:
            points = [p for p in series if p["label"] == row["label"] and p["load"] == load]
            ax.plot([p["time_s"] for p in points], [p["queue"] for p in points], label=f"λ = {load:g} × {target:.3g}")
        ax.set_title(f"{row['label']}\npredicted {target:.3g} req/s", fontsize=10)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("requests waiting")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_validation(rows: list[dict], served: list[dict], path: Path) -> None:
    """Throughput against offered load for each validated model: the measured server, the simulator's
    replay of the same requests and the formula's min(λ, rate), the knees marked; below, p90 latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checked = [r for r in rows if "server_validation" in r]
    fig, axes = plt.subplots(2, len(checked), figsize=(4.8 * len(checked), 6.4), squeeze=False)
    for column, row in enumerate(checked):
        v = row["server_validation"]
        rate = v["prediction"]["max_stable_rate"]
        points = [p for p in served if p["label"] == row["label"]]
        top, bottom = axes[0][column], axes[1][column]
        for source, marker in (("measured", "o"), ("simulator", "x")):
            ps = [p for p in points if p["source"] == source]
            top.plot([p["offered_rate"] for p in ps], [p["throughput"] for p in ps], marker=marker, label=source)
            bottom.plot([p["offered_rate"] for p in ps], [p["latency_p90_s"] for p in ps], marker=marker,
                        label=source)
        offered = sorted(p["offered_rate"] for p in points)
        top.plot(offered, [min(x, rate) for x in offered], linestyle="--", color="grey", label="formula min(λ, rate)")
        top.axvline(rate, color="grey", linestyle=":", label=f"formula knee {rate:.3g}")
        top.axvline(v["measured_knee"], color="C0", linestyle=":", label=f"measured knee {v['measured_knee']:.3g}")
        top.set_title(f"{row['label']}: M = {v['server']['kv_tokens']:,} tokens", fontsize=10)
        top.set_xlabel("offered load (req/s)")
        top.set_ylabel("throughput (req/s)")
        top.legend(fontsize=7)
        bottom.set_xlabel("offered load (req/s)")
        bottom.set_ylabel("p90 latency (s)")
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
            plot_queues(series, rows, tmp / "queue.png")
        if served_rows:
            write_arrow(tmp / "validation.arrow", served_rows)
            plot_validation(rows, served_rows, tmp / "validation.png")
        write_manifest(tmp, Stage.CAPACITY, config={**asdict(config), "out": str(out)},
                       inputs=[info.input_ref for info in infos] +
                       ([{"role": "workload", "path": str(Path(config.workload).absolute()),
                          "sha256": sha256_file(Path(config.workload))}] if config.workload else []),
                       result=[{k: r[k] for k in ("label", "max_stable_rate", "binding", "gpus")} for r in rows])
    return out
