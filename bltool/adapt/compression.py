"""Post-training compression of adapted students (docs/method.md §5): each gated LoRA module to a dense linear
or a `LowRankLinear` (`compress_model`, `merge_model`, `densify_model`), the compressed checkpoint format
(`save_compressed`, `load_compressed`), and its MAC / parameter accounting (docs/method.md §7).

The compressed student is a Hugging Face checkpoint whose adapted linears are plain `nn.Linear`
(`…q_proj.weight`) or `LowRankLinear` (`…q_proj.down.weight`, `…q_proj.up.weight`, `…q_proj.up.bias`).
The producing manifest's `compressed` section lists every module's layout and rank, which is all
`load_compressed` needs to rebuild the model before loading its weights strictly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bltool.adapt.adapters import adapted_modules, merge_into_linear
from bltool.adapt.lora import GatedLoRALinear
from bltool.adapt.lowrank import LowRankLinear, default_kernel, set_kernel
from bltool.adapt.lowrank_models import as_compressed, as_plain, group_model, replace_module
from bltool.checks import check_compression
from bltool.errors import ArtifactError
from bltool.models.families import compressed_family, family_of
from bltool.models.weights import load_weights_strict, quiet_transformers

FORMS = ("keep", "svd", "drop")
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class CompressionPolicy:
    tau_rank: float = 0.5  # --tau-rank: a rank survives when its gate g_i ≥ τ_rank
    tau_drop: float = 0.05  # --tau-drop: ρ below this drops the dense weight
    tau_svd: float = 0.5  # --tau-svd: ρ at or above this keeps it dense (merged)
    k_max: int = 64  # --k-max: SVD rank at ρ just below τ_svd
    dense_fallback: bool = True  # --dense-fallback: multiply out low-rank forms that cost ≥ dense

    def __post_init__(self):
        check_compression(self.tau_rank, self.tau_drop, self.tau_svd, self.k_max)


def choose_form(rho: float, policy: CompressionPolicy) -> str:
    if rho < policy.tau_drop:
        return "drop"
    if rho < policy.tau_svd:
        return "svd"
    return "keep"


def svd_rank(rho: float, policy: CompressionPolicy, max_rank: int | None = None) -> int:
    """k = clip(round(k_max · (ρ − τ_drop)/(τ_svd − τ_drop)), 1, k_max), capped at min(d_in, d_out)."""
    scaled = policy.k_max * (rho - policy.tau_drop) / (policy.tau_svd - policy.tau_drop)
    k = min(max(math.floor(scaled + 0.5), 1), policy.k_max)
    return min(k, max_rank) if max_rank is not None else k


@torch.no_grad()
def harden(module: GatedLoRALinear, tau_rank: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') in float32: the ranks whose gate is ≥ τ_rank, gates and α/r folded into B'.

    A' is (kept × d_in) and B' is (d_out × kept). Plain LoRA (no gates) keeps every rank."""
    a, b = module.lora_A.float(), module.lora_B.float() * module.scaling
    if module.gate_logits is None:
        return a, b
    gates = torch.sigmoid(module.gate_logits.float())  # (r,)
    kept = gates >= tau_rank
    if not bool(kept.any()):
        kept = gates == gates.max()  # at least one rank
    return a[kept], b[:, kept] * gates[kept]


@torch.no_grad()
def truncated_svd(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k, Σ_k V_kᵀ) with U_k (d_out × k), Σ_k V_kᵀ (k × d_in): the best rank-k approximation."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return u[:, :k], s[:k, None] * vh[:k]


def _checked(weight: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(weight).all():
        raise ArtifactError(f"compressing {name} produced non-finite weights")
    return weight


@torch.no_grad()
def _dense(weight: torch.Tensor, bias: torch.Tensor | None, dtype) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


@torch.no_grad()
def compress_module(module: GatedLoRALinear, policy: CompressionPolicy, name: str = "module"):
    """The deployed replacement of one gated LoRA module and its record (form, ranks, MACs, params)."""
    rho = module._rho
    dtype = module.base.weight.dtype
    form = choose_form(rho, policy)
    down, up = harden(module, policy.tau_rank)  # (kept, d_in), (d_out, kept), float32
    kept = down.shape[0]
    base_bias = module.base.bias
    # ρb, zeros at ρ = 0: a module keeps its bias parameter whatever its form, so the compressed config's
    # architecture (bias where the family has one) describes every module without a per-module flag
    bias = None if base_bias is None else base_bias.float() * rho
    k = 0
    if form == "keep":
        weight = module.base.weight.float() * rho + up @ down
        layer = _dense(_checked(weight, name), bias, dtype)
    else:
        if form == "svd":
            k = svd_rank(rho, policy, min(module.in_features, module.out_features))
            u_k, sv_k = truncated_svd(module.base.weight.float() * rho, k)
            down, up = torch.cat([sv_k, down], dim=0), torch.cat([u_k, up], dim=1)
        _checked(down, name), _checked(up, name)
        layer = LowRankLinear.from_factors(down, up, bias, dtype=dtype)
    multiplied_out = False
    if isinstance(layer, LowRankLinear) and policy.dense_fallback and layer.macs >= module.dense_macs:
        layer, multiplied_out = layer.to_dense(), True
    return layer, module_record(name, layer, form=form, rho=rho, lora_rank=module.rank, kept_rank=kept,
                                svd_rank=k, multiplied_out=multiplied_out)


def module_record(name: str, layer: nn.Module, form: str, rho: float, lora_rank: int, kept_rank: int,
                  svd_rank: int, multiplied_out: bool = False) -> dict[str, Any]:
    """What the manifest says about one deployed module; `layout` and `rank` rebuild it."""
    lowrank = isinstance(layer, LowRankLinear)
    params = sum(p.numel() for p in layer.parameters())
    bias = (layer.up.bias if lowrank else layer.bias) is not None
    d_in, d_out = layer.in_features, layer.out_features
    return {
        "name": name,
        "form": form,
        "layout": "lowrank" if lowrank else "dense",
        "rank": layer.rank if lowrank else None,
        "rho": rho,
        "lora_rank": lora_rank,
        "kept_rank": kept_rank,
        "svd_rank": svd_rank,
        "multiplied_out": multiplied_out,
        "in_features": d_in,
        "out_features": d_out,
        "bias": bias,
        "dense_macs": d_in * d_out,
        "macs": layer.macs if lowrank else d_in * d_out,
        "dense_params": d_in * d_out + (d_out if bias else 0),
        "params": params,
    }


def compress_model(model: nn.Module, policy: CompressionPolicy) -> list[dict[str, Any]]:
    """Replace every gated LoRA module of `model` in place (budgeted-lora); returns the records."""
    records = []
    for name, module in adapted_modules(model):
        layer, record = compress_module(module, policy, name)
        replace_module(model, name, layer)
        records.append(record)
    return records


def merge_model(model: nn.Module) -> list[dict[str, Any]]:
    """kd-lora: merge every LoRA module into its dense weight (W + (α/r)BA); saves nothing."""
    records = []
    for name, module in adapted_modules(model):
        layer = merge_into_linear(module)
        replace_module(model, name, layer)
        records.append(module_record(name, layer, form="keep", rho=module._rho, lora_rank=module.rank,
                                     kept_rank=module.rank, svd_rank=0))
    return records


def densify_model(model: nn.Module, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Multiply every low-rank layer out into one dense linear computing the same function."""
    out = []
    for record in records:
        layer = model.get_submodule(record["name"])
        if isinstance(layer, LowRankLinear):
            layer = layer.to_dense()
            replace_module(model, record["name"], layer)
            record = module_record(record["name"], layer, record["form"], record["rho"], record["lora_rank"],
                                   record["kept_rank"], record["svd_rank"], multiplied_out=True)
        out.append(record)
    return out


def as_dense(model: nn.Module) -> int:
    """Make any model bltool loads a plain model of its family computing the same function (eval mode), in
    place: adapters merged (W' = ρW + B'A', bias ρb), low-rank layers multiplied out, the compressed model
    type undone. For stages that take a model's weights apart (build-student). Returns the modules replaced."""
    replaced = 0
    for name, module in adapted_modules(model):
        replace_module(model, name, merge_into_linear(module))
        replaced += 1
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]:
        replace_module(model, name, module.to_dense())
        replaced += 1
    as_plain(model)
    return replaced


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's Table 8 for the adapted modules: forms, average ranks, MAC speedup, parameters."""
    dense_macs = sum(r["dense_macs"] for r in records)
    macs = sum(r["macs"] for r in records)
    dense_params = sum(r["dense_params"] for r in records)
    params = sum(r["params"] for r in records)
    lowrank = [r["rank"] for r in records if r["layout"] == "lowrank"]
    return {
        "modules": len(records),
        "kept": sum(r["form"] == "keep" for r in records),
        "svd": sum(r["form"] == "svd" for r in records),
        "dropped": sum(r["form"] == "drop" for r in records),
        "multiplied_out": sum(r["multiplied_out"] for r in records),
        "average_kept_lora_rank": sum(r["kept_rank"] for r in records) / len(records) if records else None,
        "average_lowrank_rank": sum(lowrank) / len(lowrank) if lowrank else None,
        "dense_macs": dense_macs,
        "macs": macs,
        "mac_speedup": dense_macs / macs if macs else None,
        "dense_params": dense_params,
        "params": params,
        "param_reduction": 1.0 - params / dense_params if dense_params else None,
    }


def compressed_section(method: str, policy: CompressionPolicy | None, records: list[dict[str, Any]],
                       densified: bool) -> dict[str, Any]:
    return {
        "method": method,
        "policy": asdict(policy) if policy is not None else None,
        "densified": densified,
        "modules": records,
        "summary": summarize(records),
    }


# ---------------------------------------------------------------------------------------------------
# The checkpoint


def save_compressed(directory: Path, model: nn.Module, tokenizer) -> None:
    """A Hugging Face checkpoint (config, generation config, tokenizer, one model.safetensors). With
    low-rank layers it is of bltool's compressed model type (bltool/adapt/lowrank_models.py), so that a loader
    that does not know them refuses it instead of loading random dense weights."""
    set_kernel(model, "linear")  # the stored layout is nn.Linear's (row-major factors)
    as_compressed(model).save_pretrained(directory, max_shard_size="1000GB")
    tokenizer.save_pretrained(directory)


def load_compressed(directory: Path, section: dict[str, Any], dtype=None, flag: str = "MODEL"):
    """Rebuild a compressed student from its config and `compressed` section, load every weight strictly,
    and select the low-rank kernel ($BLTOOL_LOWRANK_KERNEL, default auto). Ready for `generate()`.

    A checkpoint of bltool's compressed model type builds its low-rank layers from its config; one
    written before that type existed (model type `llama` etc.) gets them from the manifest. Either way
    the manifest must describe the model that was built."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    with quiet_transformers():
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype if dtype is not None else config.dtype)
    dtype = next(model.parameters()).dtype
    built_lowrank = compressed_family(config.model_type) is not None
    for entry in section.get("modules", []):
        name = entry["name"]
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"{flag}: {directory}'s manifest lists {name}, absent from its config") from None
        if (layer.in_features, layer.out_features) != (entry["in_features"], entry["out_features"]):
            raise ArtifactError(f"{flag}: {directory}'s manifest says {name} is {entry['in_features']} → "
                                f"{entry['out_features']}, its config disagrees")
        lowrank = entry["layout"] == "lowrank"
        if built_lowrank:
            if lowrank != isinstance(layer, LowRankLinear) or (lowrank and layer.rank != int(entry["rank"])):
                raise ArtifactError(f"{flag}: {directory}'s manifest and config.json disagree about {name}")
        elif lowrank:
            replace_module(model, name, LowRankLinear(entry["in_features"], entry["out_features"],
                                                      int(entry["rank"]), bias=bool(entry["bias"]), dtype=dtype))
    load_weights_strict(model, directory / WEIGHTS, flag, "compressed modules")
    group_model(model)
    set_kernel(model, default_kernel())
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Accounting of whole models (docs/method.md §7): what a forward pass costs per token


def layer_macs(module: nn.Module) -> int:
    """MACs per token of one linear-like layer as it computes now (a gated LoRA module at ρ = 0 skips
    its dense matmul)."""
    if isinstance(module, LowRankLinear):
        return module.macs
    if isinstance(module, GatedLoRALinear):
        return (module.dense_macs if module.dense_active else 0) + module.lora_macs
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def layer_weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def projection_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear-like layer inside the decoder layers (projections; not the LM head), outermost only."""
    found: dict[str, nn.Module] = {}

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, (LowRankLinear, GatedLoRALinear, nn.Linear)):
                found[full] = child
            else:
                walk(full, child)

    family = family_of(model.config.model_type)
    if family is None:
        raise ValueError(f"no decoder layers known for model type {model.config.model_type!r}")
    walk(family.layers, model.get_submodule(family.layers))
    return found


def macs_per_token(model: nn.Module, context: float, logits_per_token: float = 1.0) -> dict[str, float]:
    """Forward MACs per token: projections as deployed, attention (QKᵀ and AV over `context` cached
    positions: 2 · layers · heads · head_dim · context), and the LM head (d · V for the share of tokens
    whose logits are computed). Norms, activations and rotary embeddings are left out."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    projections = sum(layer_macs(m) for m in projection_layers(model).values())
    attention = 2 * config.num_hidden_layers * heads * head_dim * context
    head = model.get_output_embeddings()
    lm_head = head.in_features * head.out_features * logits_per_token
    return {"projections": projections, "attention": attention, "lm_head": lm_head,
            "total": projections + attention + lm_head}
