"""Compressed students in vLLM: the `vllm.general_plugins` entry point and its model classes.

`pip install 'bltool[vllm]'` registers `register` as a vLLM plugin, so `vllm serve runs/bl-0.4-c` loads a
compressed student (`config.json` architecture `BltoolLowRank<Family>ForCausalLM`) with no fork and no
`trust_remote_code`. Each class is vLLM's own model for the family (Llama, Mistral, Qwen2, Qwen3:
attention, KV cache, rotary, norms, sampling and the compiled graph stay vLLM's), built with the
projections that `compress` made low-rank in the low-rank form from the start:

- a low-rank projection is two of vLLM's linear layers, `down` (A, rank × d_in) then `up`
  (B, d_out × rank), computing B·(A·x) + b without building the d_out × d_in matrix;
- projections that vLLM fuses (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`) are computed part by
  part when any part of the group is low-rank (`Parts`): the low-rank parts' A factors are stacked into
  one `down` layer (one GEMM for the group; the checkpoint still stores each part's factor, loaded into
  its rows), the code is split and each low-rank part applies its own B (`ups`), each dense part is one
  dense linear (`dense`), and the outputs are concatenated in the order vLLM's forward splits them; a
  group with no low-rank part keeps vLLM's fused layer.

Built in place: vLLM's attention and MLP classes create their projections with the linear classes they
import by name (`QKVParallelLinear`, `MergedColumnParallelLinear`, `RowParallelLinear`). While a
compressed model is constructed, those names build, for the projections `lowrank_modules` lists (by the
`prefix` vLLM gives each layer), the modules above instead, so no dense weight of a low-rank projection
is ever allocated: loading never holds the dense model's weights. Every other layer is vLLM's own.
After construction every listed projection is checked to be in its low-rank form.

Tensor parallelism (vLLM shards column-parallel layers by output rows and row-parallel layers by input
columns, with one all-reduce after):
- column-parallel projections (q, k, v, gate, up): `down` (a group's stacked A) is replicated on every
  rank, `up` is split by its output rows, so each rank produces its own heads / intermediate slice from
  the full rank-r code;
- row-parallel projections (o, down_proj): `down` is split by its input columns (the rank's shard of
  heads or intermediate units) and its r-wide partial result is all-reduced, which is r values per
  token instead of d_out; `up` is then replicated and adds the bias once.
When the projections of a split q/k/v group are sharded over more ranks than there are KV heads (where
vLLM replicates KV heads), the model refuses to load.

Pipeline parallelism: vLLM builds only the decoder layers a stage owns (the others are `PPMissingLayer`),
so only those get low-rank projections, and the tensors of the other stages' layers are skipped.

Weights load straight from the compressed safetensors (`…q_proj.down.weight`, `…q_proj.up.weight`,
`…q_proj.up.bias`), through each vLLM layer's own weight loader, so they are sharded as above (a part's
`down.weight` is copied into its rows of the group's replicated stacked `down`); every parameter must be
loaded and every tensor used.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import threading
from collections.abc import Callable, Iterable

import torch
from torch import nn

from bltool.adapt.lowrank_models import register as register_transformers
from bltool.models.families import FAMILIES, Family, Fused, compressed_family

ROW_PARALLEL_LINEAR = "RowParallelLinear"  # the vLLM class a family's `row_parallel` projections are built with


def register() -> None:
    """The plugin: bltool's compressed model types for transformers' AutoConfig (which vLLM reads the
    config with) and their vLLM classes for vLLM's model registry. Safe to call in every process."""
    from vllm import ModelRegistry

    register_transformers()
    for family in FAMILIES.values():
        ModelRegistry.register_model(family.compressed_class, f"{__name__}:{family.compressed_class}")


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
    """Stands in for a fused `qkv_proj` / `gate_up_proj` whose parts differ in form: the low-rank parts'
    A factors stacked into one replicated `down` (one GEMM), its code split by rank and each low-rank part's
    B applied (`ups`, column-parallel), each dense part one column-parallel linear (`dense`); the parts'
    (local) outputs concatenated in `order`, as the fused layer's would be."""

    def __init__(self, order: list[str], ranks: dict[str, int], down: nn.Module, ups: dict[str, nn.Module],
                 dense: dict[str, nn.Module]):
        super().__init__()
        self.order = list(order)
        self.lowrank = [name for name in order if name in ranks]
        self.ranks = [ranks[name] for name in self.lowrank]
        self.down = down
        self.ups = nn.ModuleDict(ups)
        self.dense = nn.ModuleDict(dense)

    def forward(self, x: torch.Tensor):
        code, _ = self.down(x)
        outputs = {name: self.ups[name](h)[0] for name, h in zip(self.lowrank, code.split(self.ranks, dim=-1),
                                                                  strict=True)}
        outputs.update({name: layer(x)[0] for name, layer in self.dense.items()})
        return torch.cat([outputs[name] for name in self.order], dim=-1), None


def _layer_ranks(family: Family, lowrank: dict, n_layers: int) -> list[dict[str, int]]:
    """`lowrank_modules` ({"model.layers.3.self_attn.q_proj": 12, ...}) as one {local name: rank} per
    layer; refuses names that are not an adapted projection of a decoder layer."""
    per_layer: list[dict[str, int]] = [{} for _ in range(n_layers)]
    known = set(family.row_parallel) | {p for group in family.fused for p in group.members}
    for name, rank in lowrank.items():
        head, _, local = name.partition(f"{family.layers}.")
        index, _, projection = local.partition(".")
        if head or not index.isdigit() or int(index) >= n_layers or projection not in known:
            raise ValueError(f"config.json lowrank_modules: {name!r} is not an adapted projection of one of "
                             f"the model's {n_layers} decoder layers")
        per_layer[int(index)][projection] = int(rank)
    return per_layer


def _parts(prefix: str, members: dict[str, int], ranks: dict[str, int], d_in: int, bias: bool) -> Parts:
    """A `Parts` for the fused layer at `prefix`: `members` is {local projection name: d_out}, in order."""
    from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear

    order, group_ranks, ups, dense = [], {}, {}, {}
    for member, d_out in members.items():
        short = member.rpartition(".")[2]
        order.append(short)
        if member in ranks:
            group_ranks[short] = ranks[member]
            ups[short] = ColumnParallelLinear(ranks[member], d_out, bias=bias, gather_output=False,
                                              prefix=f"{prefix}.ups.{short}")
        else:
            dense[short] = ColumnParallelLinear(d_in, d_out, bias=bias, gather_output=False,
                                                prefix=f"{prefix}.dense.{short}")
    down = ReplicatedLinear(d_in, sum(group_ranks.values()), bias=False, prefix=f"{prefix}.down")
    return Parts(order, group_ranks, down, ups, dense)


def _fused_builder(group: Fused, ranks: dict[str, int]) -> Callable[[dict], nn.Module]:
    """What builds a fused group's layer from the arguments vLLM called its linear class with."""
    if group.vllm_linear == "QKVParallelLinear":
        def build(a: dict) -> nn.Module:
            from vllm.distributed import get_tensor_model_parallel_world_size

            heads = a["total_num_heads"]
            kv_heads = a["total_num_kv_heads"] or heads
            tp = get_tensor_model_parallel_world_size()
            if tp > kv_heads:
                raise ValueError(f"{a['prefix']}: low-rank q/k/v projections cannot be split over {tp} tensor-"
                                 f"parallel ranks, more than the model's {kv_heads} KV heads")
            q, kv = heads * a["head_size"], kv_heads * a["head_size"]
            members = dict(zip(group.members, (q, kv, kv), strict=True))
            return _parts(a["prefix"], members, ranks, a["hidden_size"], a["bias"])
    elif group.vllm_linear == "MergedColumnParallelLinear":
        def build(a: dict) -> nn.Module:
            members = dict(zip(group.members, a["output_sizes"], strict=True))
            return _parts(a["prefix"], members, ranks, a["input_size"], a["bias"])
    else:
        raise ValueError(f"{group.name}: no low-rank form for vLLM's {group.vllm_linear}")
    return build


def _row_builder(local: str, ranks: dict[str, int]) -> Callable[[dict], nn.Module]:
    """What builds a row-parallel projection from the arguments vLLM called RowParallelLinear with."""
    def build(a: dict) -> nn.Module:
        return LowRankRowParallel(a["input_size"], a["output_size"], ranks[local], a["bias"], a["prefix"])
    return build


Route = tuple[str, int | None]  # (vLLM parameter name, first row in a stacked `down`, or None: the whole tensor)


def plan(config, prefix: str = "") -> tuple[dict[str, Callable[[dict], nn.Module]], dict[str, dict[str, Route]]]:
    """From `config.lowrank_modules`: ({vLLM layer prefix: builder} for the fused and row-parallel layers
    to build in low-rank form, {checkpoint module name: {tensor leaf: route}} for every projection they
    compute, which `load_routed` loads directly). `prefix` is the causal LM's own vLLM prefix."""
    family = compressed_family(config.model_type)
    if family is None:
        raise ValueError(f"model type {config.model_type!r} is not one of bltool's compressed model types")
    layers = f"{prefix}.{family.layers}" if prefix else family.layers
    builders: dict[str, Callable[[dict], nn.Module]] = {}
    routes: dict[str, dict[str, Route]] = {}
    for index, ranks in enumerate(_layer_ranks(family, config.lowrank_modules or {}, config.num_hidden_layers)):
        layer = f"{family.layers}.{index}"
        for group in family.fused:
            if any(m in ranks for m in group.members):
                builders[f"{layers}.{index}.{group.name}"] = _fused_builder(group, ranks)
                fused, row = f"{layer}.{group.name}", 0
                for member in group.members:
                    short = member.rpartition(".")[2]
                    if member in ranks:
                        routes[f"{layer}.{member}"] = {"down.weight": (f"{fused}.down.weight", row),
                                                       "up.weight": (f"{fused}.ups.{short}.weight", None),
                                                       "up.bias": (f"{fused}.ups.{short}.bias", None)}
                        row += ranks[member]
                    else:
                        routes[f"{layer}.{member}"] = {"weight": (f"{fused}.dense.{short}.weight", None),
                                                       "bias": (f"{fused}.dense.{short}.bias", None)}
        for member in family.row_parallel:
            if member in ranks:
                builders[f"{layers}.{index}.{member}"] = _row_builder(member, ranks)
                routes[f"{layer}.{member}"] = {leaf: (f"{layer}.{member}.{leaf}", None)
                                               for leaf in ("down.weight", "up.weight", "up.bias")}
    return builders, routes


_building_lock = threading.Lock()


@contextlib.contextmanager
def building(builders: dict[str, Callable[[dict], nn.Module]]):
    """While the model is constructed (in this thread): the linear classes vLLM's family modules build
    their projections with build the modules of `builders` for the prefixes it names, and vLLM's own
    layers for every other call."""
    from vllm.model_executor.layers import linear

    modules = [importlib.import_module(family.vllm_module) for family in FAMILIES.values()]
    owner = threading.get_ident()

    def divert(original: type) -> Callable[..., nn.Module]:
        signature = inspect.signature(original.__init__)

        def build(*args, **kwargs):
            if threading.get_ident() == owner:
                bound = signature.bind(None, *args, **kwargs)
                bound.apply_defaults()
                builder = builders.get(bound.arguments["prefix"])
                if builder is not None:
                    return builder(bound.arguments)
            return original(*args, **kwargs)

        return build

    names = {ROW_PARALLEL_LINEAR} | {group.vllm_linear for family in FAMILIES.values() for group in family.fused}
    classes = {name: getattr(linear, name) for name in names}
    with _building_lock:
        saved = [(m, name, m.__dict__[name]) for m in modules for name in classes if name in m.__dict__]
        try:
            for module, name, _ in saved:
                setattr(module, name, divert(classes[name]))
            yield
        finally:
            for module, name, original in saved:
                setattr(module, name, original)


def check_built(model: nn.Module, family: Family, builders: dict, prefix: str = "") -> None:
    """Every layer `builders` names, in the decoder layers this pipeline stage holds, was built in its
    low-rank form (a vLLM whose model classes build projections differently would leave it dense)."""
    from vllm.model_executor.models.utils import PPMissingLayer

    for name in builders:
        local = name[len(prefix) + 1:] if prefix else name
        index = local[len(family.layers) + 1:].partition(".")[0]
        layer_name = f"{family.layers}.{index}"
        if isinstance(model.get_submodule(layer_name), PPMissingLayer):
            continue
        built = model.get_submodule(local)
        if not isinstance(built, (Parts, LowRankRowParallel)):
            raise RuntimeError(f"{local}: vLLM built it as {type(built).__name__}, not in the low-rank form "
                               f"config.json lists; this vLLM builds its models in a way bltool's plugin does not "
                               f"know (it is tested with vLLM 0.32)")


def load_routed(model: nn.Module, routes: dict[str, dict[str, Route]],
                weights: Iterable[tuple[str, torch.Tensor]], loaded: set[str]):
    """Load the tensors of routed projections through their layers' own weight loaders (which shard
    them; a low-rank part's `down.weight` is copied into its rows of the group's stacked `down`, which is
    loaded once every part's rows are), adding the parameter names to `loaded`; skip those of decoder
    layers another pipeline stage holds; yield every other (name, tensor) for vLLM's loader."""
    from vllm.model_executor.models.utils import is_pp_missing_parameter

    params = dict(model.named_parameters())
    rows: dict[str, int] = {}  # stacked `down` parameter → rows loaded so far
    for name, tensor in weights:
        module, _, leaf = name.rpartition(".")
        if module.endswith((".down", ".up")) and module.rpartition(".")[0] in routes:
            module, _, factor = module.rpartition(".")
            leaf = f"{factor}.{leaf}"
        if module not in routes:
            yield name, tensor
            continue
        target, row = routes[module].get(leaf, (f"{module}.{leaf}", None))
        param = params.get(target)
        if param is None:
            if is_pp_missing_parameter(target, model):
                continue
            raise ValueError(f"checkpoint tensor {name!r} does not belong to the compressed layout in "
                             f"config.json (no parameter {target!r})")
        if row is None:
            param.weight_loader(param, tensor)
            loaded.add(target)
            continue
        if tensor.dim() != 2 or row + tensor.shape[0] > param.shape[0] or tensor.shape[1] != param.shape[1]:
            raise ValueError(f"checkpoint tensor {name!r} {tuple(tensor.shape)} does not fit rows {row}.. of "
                             f"{target!r} {tuple(param.shape)}")
        with torch.no_grad():
            param.data[row:row + tensor.shape[0]].copy_(tensor)
        rows[target] = rows.get(target, 0) + tensor.shape[0]
        if rows[target] == param.shape[0]:
            loaded.add(target)


def _model_class(family: Family) -> type:
    base = getattr(importlib.import_module(family.vllm_module), family.model_class)

    class Compressed(base):
        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            config = vllm_config.model_config.hf_config
            if config.model_type != family.compressed_type:
                raise ValueError(f"{family.compressed_class} serves model type {family.compressed_type}, not "
                                 f"{config.model_type!r}")
            builders, routes = plan(config, prefix)
            with building(builders):
                super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            check_built(self, family, builders, prefix)
            self._bltool_routes = routes

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            loaded: set[str] = set()
            rest = super().load_weights(load_routed(self, self._bltool_routes, weights, loaded))
            return loaded | set(rest)

    Compressed.__name__ = Compressed.__qualname__ = family.compressed_class
    Compressed.__module__ = __name__
    return Compressed


def __getattr__(name: str):
    """`BltoolLowRankLlamaForCausalLM` and its siblings, built on first use (vLLM imports them lazily
    from the registry's `module:class` strings)."""
    for family in FAMILIES.values():
        if name == family.compressed_class:
            cls = _model_class(family)
            globals()[name] = cls
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
