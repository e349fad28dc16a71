"""capacity's plan (docs/method.md §8): for one model on a workload, KV capacity M, E[g] in whole pages, b̄
or b(p, d, k), μ = M / (b̄ · E[g]), the token and sequence bounds, which binds, the maximum stable rate and
the GPUs for a rate; and its check by simulation (`validate`: the server simulator at several multiples
of that rate). The check against the real server is `bltool.serve.validation`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bltool import ui
from bltool.errors import UsageError
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
    lifetime_memory,
    lifetime_memory_smooth,
    memory_slack,
    service_rate,
    token_throughput_bound,
)
from bltool.serve.serving import SAFETY_MARGIN
from bltool.serve.simulator import ServerSpec, simulate_server
from bltool.serve.workload import Workload, check_fits
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


def plan(info: ModelInfo, workload: Workload, config) -> dict:
    """Every figure of docs/method.md §8 for one model on the workload (`config`: capacity's `CapacityConfig`)."""
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


def simulated_server(row: dict, workload: Workload, config, measured: dict | None) -> ServerSpec:
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


def validate(row: dict, workload: Workload, config, measured: dict | None) -> tuple[dict, list[dict]]:
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


def spec_dict(spec: ServerSpec) -> dict:
    return {"kv_tokens": spec.kv_tokens, "page_size": spec.page_size, "max_batch_tokens": spec.max_batch_tokens,
            "max_seqs": spec.max_seqs, "safety_margin": spec.safety_margin, "iteration": spec.iteration.as_dict()}
