"""End-to-end timing of a causal LM as transformers runs it: one prefill over a prompt writing a fresh
KV cache, and greedy decode steps (one token per sequence) after a prompt, for each model of a set timed
interleaved. Beside each figure: the MACs per token and the bytes one step must move (weights as
deployed plus the KV cache), the bounds a speedup is read against. Used by `bench` and by
`bench --engine vllm` (its transformers side)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from bltool.adapt.compression import layer_weight_bytes, macs_per_token, projection_layers
from bltool.adapt.lora import GatedLoRALinear
from bltool.serve.queueing import kv_bytes_per_token, kv_shape
from bltool.serve.timing import measure


def step(model, ids, cache, logits_to_keep: int = 1):
    """One forward pass that appends to `cache` (a DynamicCache); logits for the last position only.
    transformers renamed `past_key_values` to `cache` during 5.x: pass whichever this version takes."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(input_ids=ids, use_cache=True, logits_to_keep=logits_to_keep, **{name: cache})


def new_cache(model):
    return DynamicCache(config=model.config)


def end_to_end(models: dict[str, nn.Module], *, prefill_tokens: int, decode_batches: Sequence[int],
               decode_context: int, decode_steps: int, warmup: int, repeats: int,
               device: str | torch.device) -> list[dict[str, Any]]:
    """Prefill and greedy decode of every model in `models`, timed interleaved (one row per model, phase
    and batch): tokens/s beside MACs per token and the bytes a decode step must move."""
    vocab = next(iter(models.values())).config.vocab_size
    generator = torch.Generator().manual_seed(0)
    rows = []
    # prefill: one forward over the prompt writing a fresh KV cache, logits for the last position only
    ids = torch.randint(0, vocab, (1, prefill_tokens), generator=generator).to(device)
    timing = measure({name: (lambda m=m: step(m, ids, new_cache(m))) for name, m in models.items()},
                     warmup, repeats, device)
    for name, m in models.items():
        macs = macs_per_token(m, context=(prefill_tokens + 1) / 2, logits_per_token=1 / prefill_tokens)
        moved = decode_bytes_per_step(m, 1, prefill_tokens - 1)  # the weights once, the KV it writes
        rows.append({"model": name, "phase": "prefill", "batch": 1, "tokens": prefill_tokens,
                     "seconds": timing[name]["median_s"],
                     "tokens_per_s": prefill_tokens / timing[name]["median_s"], "macs_per_token": macs,
                     "weight_bytes_per_step": moved["weights"], "kv_bytes_per_step": moved["kv"]})
    # decode: --decode-steps greedy steps, one token per sequence each, after a --decode-context prompt
    context = (decode_context + decode_context + decode_steps - 1) / 2 + 1
    for batch in decode_batches:
        prompt = torch.randint(0, vocab, (batch, decode_context), generator=generator).to(device)
        state: dict[str, Any] = {}

        def setup(name, m, prompt=prompt, state=state):
            cache = new_cache(m)
            state[name] = (cache, step(m, prompt, cache).logits[:, -1].argmax(-1, keepdim=True))

        def decode(name, m, state=state):
            cache, token = state[name]
            for _ in range(decode_steps):
                token = step(m, token, cache).logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)

        timing = measure({name: (lambda n=name, m=m: decode(n, m)) for name, m in models.items()},
                         warmup, repeats, device,
                         setup={name: (lambda n=name, m=m: setup(n, m)) for name, m in models.items()})
        for name, m in models.items():
            moved = decode_bytes_per_step(m, batch, context)
            rows.append({"model": name, "phase": "decode", "batch": batch, "tokens": batch * decode_steps,
                         "seconds": timing[name]["median_s"],
                         "tokens_per_s": batch * decode_steps / timing[name]["median_s"],
                         "macs_per_token": macs_per_token(m, context=context),
                         "weight_bytes_per_step": moved["weights"], "kv_bytes_per_step": moved["kv"]})
    return rows


def _deployed_bytes(module: nn.Module) -> int:
    """Weight bytes one forward of a projection reads: a gated LoRA module at ρ = 0 skips its dense weight."""
    if isinstance(module, GatedLoRALinear) and not module.dense_active:
        return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if not n.startswith("base."))
    return layer_weight_bytes(module)


def decode_bytes_per_step(model: nn.Module, batch: int, context: float) -> dict[str, float]:
    """Bytes one decode step (one new token for each of `batch` sequences) must move, the bound of a
    memory-bound step: every weight it uses, once (the projections as deployed, the LM head, the norms,
    and one embedding row per sequence), plus each sequence's KV cache: `context` cached positions read
    and one written, for every layer and KV head. Activations are left out (they stay in cache)."""
    projections = projection_layers(model)
    seen = {id(p) for m in projections.values() for p in m.parameters()}
    weights = sum(_deployed_bytes(m) for m in projections.values())
    head = model.get_output_embeddings().weight
    embedding = model.get_input_embeddings().weight
    weights += head.numel() * head.element_size()
    seen.add(id(head))
    if id(embedding) not in seen:  # untied: one row per sequence is read
        weights += batch * embedding.shape[1] * embedding.element_size()
        seen.add(id(embedding))
    weights += sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in seen)  # norms
    kv = kv_bytes_per_token(kv_shape(model.config), head.element_size()) * batch * (context + 1)
    return {"weights": float(weights), "kv": float(kv), "total": float(weights + kv)}
