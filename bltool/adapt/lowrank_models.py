"""Compressed students as transformers models of their own type.

`compress` replaces some dense projections by two-factor low-rank layers (`LowRankLinear`: `down`,
`up`). A checkpoint holding them must not pass for a plain Llama: a loader that does not know those
layers would only warn and fill `q_proj.weight` with random values. So such a checkpoint has its own
model type, `bltool_lowrank_<family>` (architecture `BltoolLowRank<Family>ForCausalLM`), and lists its
low-rank modules with their ranks in `config.json` (`lowrank_modules`). A loader that does not know the
type refuses it with its own error. `import bltool` registers the types with transformers' Auto classes
(as soon as transformers is imported), so `AutoModelForCausalLM.from_pretrained(dir)` builds the
low-rank model and loads every weight, without `trust_remote_code`.

Each class is the family's own (`LlamaConfig` / `LlamaForCausalLM`, ...) with the listed modules swapped
for `LowRankLinear` at construction: generation, caching and attention stay transformers' own. The
low-rank members of each group that reads one input (the family's q/k/v and gate/up) are grouped
(`group_model`), so their `down` factors run as one GEMM; the checkpoint still stores them one by one.
"""

from __future__ import annotations

import functools

from torch import nn

from bltool.adapt.lowrank import LowRankLinear, group_layers
from bltool.models.families import FAMILIES, compressed_family


def replace_module(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Put `layer` at the dotted path `name` of `model`."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, layer)


def group_model(model: nn.Module) -> int:
    """Group, in every decoder layer, the low-rank members of each of the family's groups that read the same
    input (q/k/v, gate/up: the groups vLLM fuses), so each group's `down` factors run as one GEMM; dense
    members stay as they are. Returns the number of groups formed (a group needs two low-rank members)."""
    family = compressed_family(model.config.model_type) or FAMILIES.get(model.config.model_type)
    if family is None:
        return 0
    formed = 0
    for layer in model.get_submodule(family.layers):
        for fused in family.fused:
            members = [layer.get_submodule(m) for m in fused.members]
            formed += group_layers([m for m in members if isinstance(m, LowRankLinear)]) is not None
    return formed


@functools.cache
def classes(model_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) of the compressed form of a model family (by its plain model type)."""
    import transformers

    family = FAMILIES[model_type]
    base_config = getattr(transformers, family.config_class)
    base_model = getattr(transformers, family.model_class)

    class Config(base_config):
        model_type = family.compressed_type
        lowrank_modules: dict | None = None  # dotted module name → rank of its LowRankLinear

    class ForCausalLM(base_model):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            for module_name, rank in (config.lowrank_modules or {}).items():
                dense = self.get_submodule(module_name)
                replace_module(self, module_name, LowRankLinear(
                    dense.in_features, dense.out_features, int(rank), bias=dense.bias is not None,
                    device=dense.weight.device, dtype=dense.weight.dtype))
            group_model(self)

    for cls, name in ((Config, family.compressed_config_class), (ForCausalLM, family.compressed_class)):
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = __name__
    return Config, ForCausalLM


def register(_transformers=None) -> None:
    """Make every compressed model type known to transformers' AutoConfig and AutoModelForCausalLM
    (called by `import bltool` once transformers is imported; safe to call again)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for model_type in FAMILIES:
        config_cls, model_cls = classes(model_type)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def as_compressed(model: nn.Module) -> nn.Module:
    """The same model as an instance of its compressed class, with `lowrank_modules` in its config, so
    that `save_pretrained` writes the compressed model type. A model without low-rank layers (all kept
    dense, kd-lora merged, --densify) is returned as it is: a plain checkpoint every loader reads."""
    lowrank = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not lowrank:
        return model
    family = compressed_family(model.config.model_type) or FAMILIES.get(model.config.model_type)
    if family is None:
        raise ValueError(f"no compressed form for model type {model.config.model_type!r}")
    config_cls, model_cls = classes(family.model_type)
    values = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")}
    config = config_cls(**{**values, "lowrank_modules": lowrank})
    config.architectures = [model_cls.__name__]
    old = model.config
    for module in model.modules():  # the causal LM and its base model share one config
        if getattr(module, "config", None) is old:
            module.config = config
    model.__class__ = model_cls  # the object model_cls would build: same modules, same weights
    return model


def as_plain(model: nn.Module) -> nn.Module:
    """The inverse of `as_compressed` for a model whose layers are all dense again: an instance of its
    family's own class (`LlamaForCausalLM`, ...) with the family's config. Other models are returned as
    they are."""
    family = compressed_family(model.config.model_type)
    if family is None:
        return model
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise ValueError("as_plain: the model still has low-rank layers")
    import transformers

    config_cls, model_cls = getattr(transformers, family.config_class), getattr(transformers, family.model_class)
    values = {k: v for k, v in model.config.to_dict().items()
              if k not in ("model_type", "architectures", "lowrank_modules")}
    config = config_cls(**values)
    config.architectures = [model_cls.__name__]
    old = model.config
    for module in model.modules():  # the causal LM and its base model share one config
        if getattr(module, "config", None) is old:
            module.config = config
    model.__class__ = model_cls
    return model


def __getattr__(name: str):
    """`BltoolLowRankLlamaConfig`, `BltoolLowRankLlamaForCausalLM`, ...: the classes `classes()` builds,
    reachable by name so that pickle (vLLM sends the config to its engine processes) finds them."""
    for family in FAMILIES.values():
        for index, class_name in enumerate((family.compressed_config_class, family.compressed_class)):
            if name == class_name:
                return classes(family.model_type)[index]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
