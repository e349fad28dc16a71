"""The family table (bltool/models/families.py) checked against what transformers builds for each family:
class names, where the decoder layers are, their projections and biases, the groups vLLM fuses; the table
stays free of torch and transformers; a model of no family is refused in one line naming the table's."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import tiny_config

from bltool.adapt import lowrank_models
from bltool.errors import UsageError
from bltool.models.compiling import decoder_layers
from bltool.models.families import (
    COMPRESSED_TYPES,
    DEFAULT_TARGETS,
    FAMILIES,
    compressed_family,
    family_for,
    family_of,
    plain_type,
)


def test_the_table_imports_neither_torch_nor_transformers():
    code = ("import sys, bltool.models.families; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_a_family_is_what_transformers_builds(family, tokenizer):
    import transformers

    config = tiny_config(family.model_type, len(tokenizer), 2, tied=False)
    assert type(config) is getattr(transformers, family.config_class)
    assert config.model_type == family.model_type
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert type(model) is getattr(transformers, family.model_class)
    layers = model.get_submodule(family.layers)
    assert decoder_layers(model) is layers and len(layers) == 2
    for layer in layers:
        linears = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
        assert tuple(linears) == family.projections  # every projection, in registration order
        assert tuple(n for n in linears if layer.get_submodule(n).bias is not None) == family.biases
    # vLLM's fused groups and row-parallel layers cover every projection once; a group's members are in the
    # order of the layer's own (the order vLLM's fused output is split in)
    grouped = [m for group in family.fused for m in group.members] + list(family.row_parallel)
    assert sorted(grouped) == sorted(family.projections)
    for group in family.fused:
        assert tuple(p for p in family.projections if p in group.members) == group.members
    assert set(DEFAULT_TARGETS) <= set(family.targets)


def test_names_of_the_compressed_forms(family):
    assert family_of(family.model_type) is family and compressed_family(family.model_type) is None
    assert family_of(family.compressed_type) is family is compressed_family(family.compressed_type)
    assert plain_type(family.compressed_type) == family.model_type == plain_type(family.model_type)
    assert family.compressed_type in COMPRESSED_TYPES
    config_cls, model_cls = lowrank_models.classes(family.model_type)
    assert config_cls.model_type == family.compressed_type
    assert model_cls.__name__ == family.compressed_class
    # reachable by name, as pickle (vLLM's engine processes) looks them up
    assert getattr(lowrank_models, family.compressed_config_class) is config_cls
    assert getattr(lowrank_models, family.compressed_class) is model_cls


@pytest.mark.parametrize("model_type", ["gpt2", None, "bltool_lowrank_gpt2"])
def test_a_model_of_no_family_is_refused_naming_the_table(model_type):
    assert family_of(model_type) is None
    with pytest.raises(UsageError) as info:
        family_for(model_type, "--teacher: /m")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--teacher: /m is a {model_type!r} model")
    assert message.endswith(f"supported: {', '.join(FAMILIES)} (and bltool's compressed forms of them)")


def test_decoder_layers_refuses_a_model_of_no_family():
    with pytest.raises(UsageError, match="--compile: Sequential is a None model; supported: llama"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
