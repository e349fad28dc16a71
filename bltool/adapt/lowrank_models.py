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
for `LowRankLinear` at construction: generation, caching and attention stay transformers' own.
"""

from __future__ import annotations

import functools

from torch import nn

from bltool.adapt.lowrank import LowRankLinear

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
PREFIX = "bltool_lowrank_"
MODEL_TYPES = tuple(PREFIX + family for family in FAMILIES)


def family_of(model_type: str) -> str | None:
    """`bltool_lowrank_llama` → `llama`; None for any other model type."""
    family = model_type[len(PREFIX):] if model_type.startswith(PREFIX) else None
    return family if family in FAMILIES else None


def replace_module(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Put `layer` at the dotted path `name` of `model`."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, layer)


@functools.cache
def classes(family: str) -> tuple[type, type]:
    """(config class, causal-LM class) of the compressed form of a model family."""
    import transformers

    name = FAMILIES[family]
    base_config = getattr(transformers, f"{name}Config")
    base_model = getattr(transformers, f"{name}ForCausalLM")

    class Config(base_config):
        model_type = PREFIX + family
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

    for cls, suffix in ((Config, "Config"), (ForCausalLM, "ForCausalLM")):
        cls.__name__ = cls.__qualname__ = f"BltoolLowRank{name}{suffix}"
        cls.__module__ = __name__
    return Config, ForCausalLM


def register(_transformers=None) -> None:
    """Make every compressed model type known to transformers' AutoConfig and AutoModelForCausalLM
    (called by `import bltool` once transformers is imported; safe to call again)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for family in FAMILIES:
        config_cls, model_cls = classes(family)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def as_compressed(model: nn.Module) -> nn.Module:
    """The same model as an instance of its compressed class, with `lowrank_modules` in its config, so
    that `save_pretrained` writes the compressed model type. A model without low-rank layers (all kept
    dense, kd-lora merged, --densify) is returned as it is: a plain checkpoint every loader reads."""
    lowrank = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not lowrank:
        return model
    family = family_of(model.config.model_type) or model.config.model_type
    if family not in FAMILIES:
        raise ValueError(f"no compressed form for model type {model.config.model_type!r}")
    config_cls, model_cls = classes(family)
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
    family = family_of(model.config.model_type)
    if family is None:
        return model
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise ValueError("as_plain: the model still has low-rank layers")
    import transformers

    name = FAMILIES[family]
    config_cls, model_cls = getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")
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
    for family, title in FAMILIES.items():
        for index, suffix in enumerate(("Config", "ForCausalLM")):
            if name == f"BltoolLowRank{title}{suffix}":
                return classes(family)[index]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
