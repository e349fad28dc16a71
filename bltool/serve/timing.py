"""Wall-clock timing for benchmarks: warm-up, then the median of repeats.

Candidates that are compared (dense against compressed) are timed interleaved, one repeat of each in
turn, so that a change in machine load during the run affects both alike. On CUDA each call is timed
with CUDA events around it (start and end recorded on the model device's current stream, then
synchronised); on CPU with `time.perf_counter`. An optional per-candidate `setup` runs before each of its calls, untimed
(e.g. re-prefilling a KV cache before timing decode steps).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bltool.adapt.kernels import onednn_available


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds that one call of `fn` took. On CUDA the events are recorded on `device`'s current stream,
    which is not the current device's when the model sits on another GPU (`--device cuda:1`)."""
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def measure(candidates: dict[str, Callable[[], Any]], warmup: int = 3, repeats: int = 10,
            device: str | torch.device = "cpu",
            setup: dict[str, Callable[[], Any]] | None = None) -> dict[str, dict]:
    """Time each candidate `repeats` times, interleaved, after `warmup` untimed calls of each.

    Returns {name: {"median_s", "min_s", "max_s", "repeats", "samples_s"}}."""
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be at least 1 and warmup at least 0")
    device = torch.device(device)
    setup = setup or {}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for _ in range(warmup):
            for name, fn in candidates.items():
                if name in setup:
                    setup[name]()
                fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        for _ in range(repeats):
            for name, fn in candidates.items():
                if name in setup:
                    setup[name]()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                samples[name].append(_timed(fn, device))
    return {
        name: {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
               "repeats": len(values), "samples_s": values}
        for name, values in samples.items()
    }


def matmul_peak(dtypes: tuple[str, ...] = ("float32", "bfloat16"), size: int = 2048, warmup: int = 2,
                repeats: int = 5, device: str | torch.device = "cpu") -> dict[str, dict[str, Any]]:
    """The machine's matmul rate per dtype, the denominator of a benchmark's MFU: a (size × size) ·
    (size × size) product, 2·size³ FLOPs, through each kernel bltool's frozen linears can take (`F.linear`;
    oneDNN's for float32 on the CPU, bltool.adapt.kernels), every candidate timed interleaved (`measure`)
    on this process's threads; the fastest kernel's median is the dtype's peak.

    Returns {dtype: {"gflops", "kernel", "median_s", "size", "kernels": {kernel: gflops}}}."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    x, w = (torch.randn(size, size, generator=generator) for _ in range(2))
    candidates = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        xd, wd = x.to(device, dtype), w.to(device, dtype)
        candidates[(name, "linear")] = lambda xd=xd, wd=wd: F.linear(xd, wd)
        if device.type == "cpu" and dtype == torch.float32 and onednn_available():
            candidates[(name, "onednn")] = (
                lambda xd=xd, wd=wd: torch.ops.mkldnn._linear_pointwise(xd, wd, None, "none", [], ""))
    timings = measure({f"{n}/{k}": fn for (n, k), fn in candidates.items()}, warmup, repeats, device)
    flops = 2.0 * size**3
    peaks = {}
    for name in dtypes:
        rates = {k: flops / timings[f"{n}/{k}"]["median_s"] / 1e9 for n, k in candidates if n == name}
        kernel = max(rates, key=rates.get)
        peaks[name] = {"gflops": rates[kernel], "kernel": kernel, "median_s": timings[f"{name}/{kernel}"]["median_s"],
                       "size": size, "kernels": rates}
    return peaks


def machine_info(device: str | torch.device) -> dict[str, Any]:
    """Where a timing was taken: device, threads, CPU, torch build and the load at the time."""
    device = torch.device(device)
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"
