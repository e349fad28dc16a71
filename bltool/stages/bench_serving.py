"""bench-serving: the serving measurements `capacity` needs (docs/method.md §8), on this device.

Measures, with transformers' continuous batching (see `bltool.serve.serving` for exactly what is timed):
b̄, the median batch-iteration time of memory-constrained continuous batching (chunked prefill plus
decode) at saturation; P, prefill tokens/s; D, decode tokens/s; and b(p, d, k), the iteration time as a
function of the prefill tokens, decoding sequences and KV tokens an iteration processed
(`bltool.serve.iteration`), fitted to every iteration of the three runs. Each iteration's record (what
it processed, how long it took) is in iterations.arrow, the fit and its error in result.json under
`iteration_model`. The artifact also records what capacity needs about the model (KV shape,
parameters), so `bltool capacity DIR` works from it alone. The CLI reaches this stage as
`bltool bench-serving MODEL --out DIR` (`bench MODEL --serving` is a deprecated alias).

`engine="vllm"` (`--engine vllm`) measures the same things on a vLLM engine instead
(`bltool.serve.vllm_serving`: one engine, its KV cache sized for the largest of the three runs, the
same token budget, sequence cap and page size), so capacity plans, and `capacity --validate` checks,
against the server users deploy. bltool's vLLM plugin serves compressed students there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import transformers

from bltool import ui
from bltool.artifacts import Stage, atomic_output, check_output_dir, write_arrow, write_json, write_manifest
from bltool.errors import UsageError
from bltool.models.devices import check_dtype, resolve_device, resolve_dtype
from bltool.models.loading import checkpoint_parameters, model_content_hash, model_inputs, resolve_model
from bltool.serve import engines
from bltool.serve.queueing import kv_bytes_per_token, kv_shape, lifetime_memory
from bltool.serve.serving import ServingSettings, measure
from bltool.serve.timing import machine_info


@dataclass(frozen=True)
class BenchServingConfig:
    model: str  # MODEL: checkpoint directory, .gguf or alias
    out: str  # --out: output directory
    chunk: int = 256  # --chunk: prefill tokens per iteration (ŝ), beside one decode token per sequence
    concurrency: int = 8  # --concurrency: sequences the KV cache holds at their peak (the saturated batch)
    prompt_len: int = 256  # --prompt-len: prompt tokens per request (pick the workload's mean)
    output_len: int = 64  # --output-len: generated tokens per request (pick the workload's mean)
    requests: int = 0  # --requests: requests in the saturated run (0: 4 × concurrency)
    page_size: int = 0  # --page-size: KV cache page size in tokens (0: the engine's default, `Engine.page_size`)
    repeats: int = 3  # --repeats: measurement repeats after one warm-up run
    dtype: str = "auto"  # --dtype: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # --device: auto | cpu | cuda | cuda:N
    seed: int = 0  # --seed: random prompt tokens
    engine: str = "transformers"  # --engine: transformers (continuous batching) | vllm
    eager: bool = False  # --eager: vLLM's enforce_eager (default: its compiled graph, as `vllm serve` runs)
    overwrite: bool = False  # --overwrite: replace an existing --out

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
        if self.eager and self.engine != "vllm":
            raise UsageError("--eager applies to --engine vllm only")

    @property
    def settings(self) -> ServingSettings:
        return ServingSettings(chunk=self.chunk, concurrency=self.concurrency, prompt_len=self.prompt_len,
                               output_len=self.output_len, requests=self.requests or 4 * self.concurrency,
                               page_size=self.page_size, repeats=self.repeats, seed=self.seed)


def run(config: BenchServingConfig) -> Path:
    engine = engines.engine(config.engine)
    out = Path(config.out)
    check_output_dir(out, config.overwrite, stage=Stage.BENCH_SERVING, inputs=model_inputs("MODEL", config.model))
    ref = resolve_model(config.model, flag="MODEL")
    engine.check_model(ref, "MODEL")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    settings = replace(config.settings, page_size=engine.page_size(config.page_size, device))
    dtype_name = str(dtype).replace("torch.", "")
    server = engine.server(ref, settings, dtype=dtype, device=device, eager=config.eager)
    shape = kv_shape(server.config)
    ui.info(f"bench-serving {ref.label} on {config.engine}: {settings.requests} requests of {settings.prompt_len}+"
            f"{settings.output_len} tokens, {settings.concurrency} sequences, chunk {settings.chunk}, "
            f"{settings.repeats} repeat(s) on {device}")
    measured = measure(server, settings)
    iteration_records = measured.pop("iterations")
    # in whole pages, as the cache holds it
    g = lifetime_memory(settings.prompt_len, settings.output_len, settings.chunk, settings.page_size)
    result = {
        "model": config.model,
        "model_path": str(ref.path),
        "label": ref.label,
        "kv_shape": shape.as_dict(),
        "kv_bytes_per_token": kv_bytes_per_token(shape, torch.finfo(dtype).bits // 8),
        "parameters": checkpoint_parameters(ref.path),
        "settings": asdict(settings),
        **measured,
        # the saturated run as a small real-system check of μ = M / (b̄ · g) for its own cache M,
        # with b̄ the median (docs/method.md §8) and the mean iteration time
        "lifetime_memory": g,
        "predicted_requests_per_s": measured["kv_cache_tokens"] / (measured["iteration_s"] * g),
        "predicted_requests_per_s_mean": measured["kv_cache_tokens"] / (measured["iteration_s_mean"] * g),
        "dtype": dtype_name,
        **machine_info(device),
        "transformers": transformers.__version__,
        **server.describe(),
    }
    with atomic_output(out, config.overwrite) as tmp:
        write_json(tmp / "result.json", result)
        row = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
        row.update({f"kv_{k}": v for k, v in result["kv_shape"].items()})
        row.update({f"settings_{k}": v for k, v in result["settings"].items()})
        write_arrow(tmp / "result.arrow", [row])
        write_arrow(tmp / "iterations.arrow", iteration_records)
        write_manifest(
            tmp,
            Stage.BENCH_SERVING,
            config={**asdict(config), "out": str(out)},
            inputs=[{"role": "model", **ref.describe(), "content": model_content_hash(ref)}],
            result={k: result[k] for k in ("iteration_s", "prefill_tokens_per_s", "decode_tokens_per_s")},
        )
    ui.info(
        f"{ref.label}: b̄ {measured['iteration_s'] * 1e3:.1f} ms (mean {measured['iteration_s_mean'] * 1e3:.1f}, "
        f"{measured['iterations_measured']} iterations), prefill {measured['prefill_tokens_per_s']:,.0f} tok/s, "
        f"decode {measured['decode_tokens_per_s']:,.0f} tok/s, saturated {measured['saturated_requests_per_s']:.3g} "
        f"req/s on {config.engine}, {device} {dtype_name}, {result['threads']} threads"
    )
    b = measured["iteration_model"]
    ui.info(f"{ref.label}: b(p, d, k) = {b['intercept_s'] * 1e3:.2f} ms + {b['prefill_token_s'] * 1e6:.1f} µs × p "
            f"+ {b['decode_seq_s'] * 1e6:.1f} µs × d + {b['attention_s'] * 1e9:.2f} ns × (p + d) × k (prefill tokens, "
            f"decode sequences, KV tokens); over {b['records']} iterations the fit is off by "
            f"{b['mean_abs_rel_error']:.1%} on average (rmse {b['rmse_s'] * 1e3:.2f} ms)")
    return out
