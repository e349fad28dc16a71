"""Regional compilation and activation checkpointing of a model's decoder layers.

`compile_layers` runs `torch.compile` on each decoder layer in place (`distill --compile` for the student
and the live teacher, `teacher-logits --compile` for the teacher). The layers of one model share one
compiled graph, as their code is the same and their weights are inputs to it, so compiling costs one
layer's compilation, not one per layer, and the state dict keeps its names.

A gated linear's only Python branch is its skip (ρ = 0; see `bltool.adapt.lora`), so a student layer recompiles
when one of its modules stops its dense matmul, not as ρ moves: at most (adapted modules per layer + 1)
variants per layer. Dynamo's recompile limit is raised to that bound so no layer falls back to eager.

`checkpoint_layers` turns on activation checkpointing (`distill --activation-checkpointing`): the backward
recomputes each decoder layer's forward from its input instead of keeping the layer's activations, so
the activations held between forward and backward shrink to one (B, T, d) tensor per layer, at the cost
of a second forward of the student's decoder layers. Non-reentrant `torch.utils.checkpoint` with the random
generator state preserved, so the recomputed dropout masks are the ones the forward drew and the
gradients equal the plain run's.
"""

from __future__ import annotations

import torch

from bltool.adapt.lora import GatedLoRALinear
from bltool.errors import UsageError
from bltool.models.families import family_of, unsupported


def decoder_layers(model: torch.nn.Module, flag: str = "--compile") -> torch.nn.ModuleList:
    """The decoder's layer list, where the model's family (bltool/models/families.py) keeps it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = family_of(model_type)
    if family is None:
        raise unsupported(f"{flag}: {type(model).__name__}", model_type)
    layers = model.get_submodule(family.layers)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise UsageError(f"{flag}: no decoder layers found in {type(model).__name__}")
    return layers


def compile_layers(model: torch.nn.Module, flag: str = "--compile") -> int:
    """`torch.compile` each decoder layer of `model` in place; returns the number of layers."""
    import torch._dynamo

    layers = decoder_layers(model, flag)
    per_layer = max(sum(isinstance(m, GatedLoRALinear) for m in layer.modules()) for layer in layers)
    settings = torch._dynamo.config
    name = "recompile_limit" if hasattr(settings, "recompile_limit") else "cache_size_limit"
    # every compiled model shares the layers' code object, and so its recompile budget: leave room for
    # this model's variants on top of what an earlier call asked for
    setattr(settings, name, getattr(settings, name) + len(layers) * per_layer + 8)
    for layer in layers:
        layer.compile()
    return len(layers)


def checkpoint_layers(model: torch.nn.Module, flag: str = "--activation-checkpointing") -> int:
    """Activation checkpointing of each decoder layer (while the model is in train mode); returns the
    number of layers."""
    layers = decoder_layers(model, flag)
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"{flag}: {type(model).__name__} does not support activation checkpointing")
    kwargs = {"use_reentrant": False, "preserve_rng_state": True}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x; the older name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return len(layers)
