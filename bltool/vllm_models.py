"""Compressed students in vLLM: the `vllm.general_plugins` entry point and its model classes.

`pip install 'bltool[vllm]'` registers `register` as a vLLM plugin, so `vllm serve runs/bl-0.4-c` loads a
compressed student (`config.json` architecture `BltoolLowRank<Family>ForCausalLM`) with no fork and no
`trust_remote_code`. Each class is vLLM's own model for the family (Llama, Mistral, Qwen2, Qwen3:
attention, KV cache, rotary, norms, sampling and the compiled graph stay vLLM's), with the projections
that `compress` made low-rank swapped at construction:

- a low-rank projection is two of vLLM's linear layers, `down` (A, rank × d_in) then `up`
  (B, d_out × rank), computing B·(A·x) + b without building the d_out × d_in matrix;
- projections that vLLM fuses (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`) are computed part by
  part when any part of the group is low-rank, each part dense or low-rank as `compress` wrote it, and
  their outputs concatenated in the order vLLM's forward splits them; a group with no low-rank part
  keeps vLLM's fused layer.

Tensor parallelism (vLLM shards column-parallel layers by output rows and row-parallel layers by input
columns, with one all-reduce after):
- column-parallel projections (q, k, v, gate, up): `down` is replicated on every rank, `up` is split by
  its output rows, so each rank produces its own heads / intermediate slice from the full rank-r code;
- row-parallel projections (o, down_proj): `down` is split by its input columns (the rank's shard of
  heads or intermediate units) and its r-wide partial result is all-reduced, which is r values per
  token instead of d_out; `up` is then replicated and adds the bias once.
When the projections of a split q/k/v group are sharded over more ranks than there are KV heads (where
vLLM replicates KV heads), the model refuses to load.

Weights load straight from the compressed safetensors (`…q_proj.down.weight`, `…q_proj.up.weight`,
`…q_proj.up.bias`), through each vLLM layer's own weight loader, so they are sharded as above; every
parameter must be loaded and every tensor used.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bltool.lowrank_models import FAMILIES, PREFIX, replace_module
from bltool.lowrank_models import register as register_transformers

# family → (vLLM module, vLLM class) it extends
VLLM_BASES = {
    "llama": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
    "mistral": ("vllm.model_executor.models.mistral", "MistralForCausalLM"),
    "qwen2": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("vllm.model_executor.models.qwen3", "Qwen3ForCausalLM"),
}
# vLLM's fused layer → the projections it holds, in the order its forward splits the output
GROUPS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def architecture(family: str) -> str:
    return f"BltoolLowRank{FAMILIES[family]}ForCausalLM"


def register() -> None:
    """The plugin: bltool's compressed model types for transformers' AutoConfig (which vLLM reads the
    config with) and their vLLM classes for vLLM's model registry. Safe to call in every process."""
    from vllm import ModelRegistry

    register_transformers()
    for family in FAMILIES:
        ModelRegistry.register_model(architecture(family), f"{__name__}:{architecture(family)}")


class LowRankColumnParallel(nn.Module):
    """B·(A·x) + b for a column-parallel projection: A replicated, B split by output rows."""

    def __init__(self, d_in: int, d_out: int, rank: int, bias: bool, prefix: str):
        from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear

        super().__init__()
        self.down = ReplicatedLinear(d_in, rank, bias=False, prefix=f"{prefix}.down")
        self.up = ColumnParallelLinear(rank, d_out, bias=bias, gather_output=False, prefix=f"{prefix}.up")

    def forward(self, x: torch.Tensor):
        h, _ = self.down(x)
        return self.up(h)


class LowRankRowParallel(nn.Module):
    """B·(A·x) + b for a row-parallel projection: A split by input columns and its rank-wide output
    all-reduced, B replicated (so the bias is added once)."""

    def __init__(self, d_in: int, d_out: int, rank: int, bias: bool, prefix: str):
        from vllm.model_executor.layers.linear import ReplicatedLinear, RowParallelLinear

        super().__init__()
        self.down = RowParallelLinear(d_in, rank, bias=False, input_is_parallel=True, reduce_results=True,
                                      prefix=f"{prefix}.down")
        self.up = ReplicatedLinear(rank, d_out, bias=bias, prefix=f"{prefix}.up")

    def forward(self, x: torch.Tensor):
        h, _ = self.down(x)
        return self.up(h)


class Parts(nn.Module):
    """Stands in for a fused `qkv_proj` / `gate_up_proj` whose parts differ in form: each part computes
    its own (local) output and the outputs are concatenated, as the fused layer's would be."""

    def __init__(self, parts: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(parts)

    def forward(self, x: torch.Tensor):
        return torch.cat([part(x)[0] for part in self.parts.values()], dim=-1), None


def _shapes(config) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every adapted projection of one decoder layer, from the HF config."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = config.intermediate_size
    return {
        "self_attn.q_proj": (hidden, heads * head_dim), "self_attn.k_proj": (hidden, kv * head_dim),
        "self_attn.v_proj": (hidden, kv * head_dim), "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden),
    }


def _layer_ranks(lowrank: dict, n_layers: int) -> list[dict[str, int]]:
    """`lowrank_modules` ({"model.layers.3.self_attn.q_proj": 12, ...}) as one {local name: rank} per
    layer; refuses names that are not an adapted projection of a decoder layer."""
    per_layer: list[dict[str, int]] = [{} for _ in range(n_layers)]
    known = set(ROW_PARALLEL) | {p for parts in GROUPS.values() for p in parts}
    for name, rank in lowrank.items():
        head, _, local = name.partition(".layers.")
        index, _, projection = local.partition(".")
        if head != "model" or not index.isdigit() or int(index) >= n_layers or projection not in known:
            raise ValueError(f"config.json lowrank_modules: {name!r} is not an adapted projection of one of "
                             f"the model's {n_layers} decoder layers")
        per_layer[int(index)][projection] = int(rank)
    return per_layer


def swap_lowrank(model: nn.Module, config) -> dict[str, str]:
    """Replace, in a constructed vLLM causal LM, the projections `config.lowrank_modules` names (and the
    fused groups holding them) by the modules above. Returns {checkpoint module name: vLLM module name}
    for every projection now computed by them, which `load_weights` routes to directly."""
    from vllm.distributed import get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    shapes = _shapes(config)
    tp = get_tensor_model_parallel_world_size()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    routes: dict[str, str] = {}
    for index, ranks in enumerate(_layer_ranks(config.lowrank_modules or {}, config.num_hidden_layers)):
        prefix = f"model.layers.{index}"
        try:
            layer = model.get_submodule(prefix)
        except AttributeError:  # a pipeline-parallel stage without this layer
            continue
        for fused, members in GROUPS.items():
            if not any(m in ranks for m in members):
                continue
            if fused == "self_attn.qkv_proj" and tp > kv_heads:
                raise ValueError(f"{prefix}: low-rank q/k/v projections cannot be split over {tp} tensor-"
                                 f"parallel ranks, more than the model's {kv_heads} KV heads")
            has_bias = layer.get_submodule(fused).bias is not None
            parts = {}
            for member in members:
                d_in, d_out = shapes[member]
                name = f"{prefix}.{fused}.parts.{member.rpartition('.')[2]}"
                parts[member.rpartition(".")[2]] = (
                    LowRankColumnParallel(d_in, d_out, ranks[member], has_bias, name) if member in ranks
                    else ColumnParallelLinear(d_in, d_out, bias=has_bias, gather_output=False, prefix=name))
                routes[f"{prefix}.{member}"] = name
            replace_module(layer, fused, Parts(parts))
        for member in ROW_PARALLEL:
            if member in ranks:
                d_in, d_out = shapes[member]
                has_bias = layer.get_submodule(member).bias is not None
                name = f"{prefix}.{member}"
                replace_module(layer, member, LowRankRowParallel(d_in, d_out, ranks[member], has_bias, name))
                routes[name] = name
    return routes


def load_routed(model: nn.Module, routes: dict[str, str], weights: Iterable[tuple[str, torch.Tensor]],
                loaded: set[str]):
    """Load the tensors of routed projections through their layers' own weight loaders (which shard
    them), adding the parameter names to `loaded`; yield every other (name, tensor) for vLLM's loader."""
    params = dict(model.named_parameters())
    for name, tensor in weights:
        module, _, leaf = name.rpartition(".")
        if module.endswith((".down", ".up")) and module.rpartition(".")[0] in routes:
            module, _, factor = module.rpartition(".")
            leaf = f"{factor}.{leaf}"
        if module not in routes:
            yield name, tensor
            continue
        target = f"{routes[module]}.{leaf}"
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} does not belong to the compressed layout in "
                             f"config.json (no parameter {target!r})")
        param.weight_loader(param, tensor)
        loaded.add(target)


def _model_class(family: str) -> type:
    import importlib

    module_name, class_name = VLLM_BASES[family]
    base = getattr(importlib.import_module(module_name), class_name)

    class Compressed(base):
        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            config = vllm_config.model_config.hf_config
            if config.model_type != PREFIX + family:
                raise ValueError(f"{architecture(family)} serves model type {PREFIX + family}, not "
                                 f"{config.model_type!r}")
            self._bltool_routes = swap_lowrank(self, config)

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            loaded: set[str] = set()
            rest = super().load_weights(load_routed(self, self._bltool_routes, weights, loaded))
            return loaded | set(rest)

    Compressed.__name__ = Compressed.__qualname__ = architecture(family)
    Compressed.__module__ = __name__
    return Compressed


def __getattr__(name: str):
    """`BltoolLowRankLlamaForCausalLM` and its siblings, built on first use (vLLM imports them lazily
    from the registry's `module:class` strings)."""
    for family in FAMILIES:
        if name == architecture(family):
            cls = _model_class(family)
            globals()[name] = cls
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
