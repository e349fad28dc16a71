"""Students that carry LoRA adapters (the output of `distill --method kd-lora|budgeted-lora`).

Such a student is a directory that looks like a Hugging Face checkpoint (config.json, the tokenizer,
`model.safetensors`) whose weights are the state dict of the *adapted* model: every adapted linear
`…q_proj` is stored as its frozen base (`…q_proj.base.weight`), its LoRA factors (`…q_proj.lora_A`,
`…q_proj.lora_B`), its gate logits (`…q_proj.gate_logits`, budgeted-lora only) and its dense retention
`…q_proj.rho`. The producing stage's manifest carries an `adapters` section (this module's
`adapter_section`) that says how to rebuild the modules before loading the weights strictly.

`compress` turns this into deployable dense / low-rank linears; until then `load_adapted` gives a model
that computes exactly what was trained (modules at ρ = 0 skip their dense matmul here too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bltool.adapt.lora import GatedLoRALinear, LoRASpec, inject_lora
from bltool.errors import ArtifactError
from bltool.models.weights import load_weights_strict, quiet_transformers

WEIGHTS = "model.safetensors"


def adapter_section(spec: LoRASpec, adapted: list[tuple[str, GatedLoRALinear]]) -> dict[str, Any]:
    """The manifest section that lets a loader rebuild the adapted modules (registration order)."""
    return {
        "rank": spec.rank,
        "alpha": spec.alpha,
        "dropout": spec.dropout,
        "targets": list(spec.targets),
        "gated": spec.gated,
        "modules": [
            {"name": name, "in_features": m.in_features, "out_features": m.out_features, "rho": m._rho}
            for name, m in adapted
        ],
    }


def spec_from_section(section: dict[str, Any]) -> LoRASpec:
    return LoRASpec(rank=int(section["rank"]), alpha=float(section["alpha"]), dropout=float(section["dropout"]),
                    targets=tuple(section["targets"]), gated=bool(section["gated"]))


def save_adapted(directory: Path, model, tokenizer) -> None:
    """Config, generation config, tokenizer and the adapted model's full state dict (safetensors;
    tied embeddings are stored once and re-tied on load)."""
    from safetensors.torch import save_model

    directory = Path(directory)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_model(model, str(directory / WEIGHTS), metadata={"format": "pt", "bltool": "adapted"})


def load_adapted(directory: Path, section: dict[str, Any], dtype=None, flag: str = "MODEL"):
    """Rebuild the student from its config, inject the recorded adapters, load every weight strictly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    with quiet_transformers():
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype if dtype is not None else config.dtype)
    adapted = inject_lora(model, spec_from_section(section))
    names = [name for name, _ in adapted]
    recorded = [m["name"] for m in section["modules"]]
    if names != recorded:
        raise ArtifactError(f"{flag}: {directory}'s manifest lists {len(recorded)} adapted modules but its config "
                            f"yields {len(names)} (first difference near {_first_difference(names, recorded)})")
    load_weights_strict(model, directory / WEIGHTS, flag, "adapters")
    for _, module in adapted:
        module._sync_rho()
    return model.eval()


def _first_difference(a: list[str], b: list[str]) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{x} / {y}"
    return "the end of the list"


def adapted_modules(model) -> list[tuple[str, GatedLoRALinear]]:
    """The adapted modules of a model, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GatedLoRALinear)]


@torch.no_grad()
def merge_into_linear(module: GatedLoRALinear) -> torch.nn.Linear:
    """One dense linear equal to the module in eval mode: W' = ρW + (α/r) · B · diag(g) · A (bias ρb).

    Computed in float32 and checked for finiteness before it replaces anything (PEFT's safe merge)."""
    weight = module.base.weight.float() * module._rho
    factor_b = module.lora_B.float() * module.scaling
    if module.gate_logits is not None:
        factor_b = factor_b * torch.sigmoid(module.gate_logits.float())
    weight = weight + factor_b @ module.lora_A.float()
    if not torch.isfinite(weight).all():
        raise ArtifactError("merging the LoRA factors produced non-finite weights")
    bias = module.base.bias
    linear = torch.nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                             device=weight.device, dtype=module.base.weight.dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias.float() * module._rho)
    return linear
