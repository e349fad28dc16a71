"""Adapted students: save, strict reload through `bltool.load_model`, and the merged dense form."""

from __future__ import annotations

import json

import pytest
import torch

import bltool
from bltool.adapt.adapters import adapted_modules, adapter_section, load_adapted, merge_into_linear, save_adapted
from bltool.adapt.lora import LoRASpec, inject_lora
from bltool.artifacts import write_manifest
from bltool.errors import ArtifactError
from bltool.models.loading import load_model, load_tokenizer, resolve_model


def adapted_student(path, tiny_llama, gated=True, seed=0):
    """The tiny Llama with random LoRA factors, gates and ρ, written as a distill-style artifact."""
    ref = resolve_model(str(tiny_llama))
    model = load_model(ref)
    spec = LoRASpec(rank=4, alpha=8.0, dropout=0.0, gated=gated)
    adapted = inject_lora(model, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (_, m) in enumerate(adapted):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
            if m.gate_logits is not None:
                m.gate_logits.copy_(torch.randn(m.rank, generator=g) * 3)
            m.set_rho([0.0, 0.3, 1.0][i % 3] if gated else 1.0)
    path.mkdir()
    save_adapted(path, model, load_tokenizer(ref))
    write_manifest(path, "distill", config={}, inputs=[], adapters=adapter_section(spec, adapted))
    return path, model


@pytest.mark.parametrize("gated", [True, False])
def test_round_trip_is_exact(tmp_path, tiny_llama, gated):
    path, model = adapted_student(tmp_path / "s", tiny_llama, gated)
    loaded = bltool.load_model(path)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    rhos = [m._rho for _, m in adapted_modules(loaded)]
    assert rhos == [m._rho for _, m in adapted_modules(model)]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied


def test_manifest_that_does_not_match_the_weights_is_refused(tmp_path, tiny_llama):
    path, _ = adapted_student(tmp_path / "s", tiny_llama)
    manifest = json.loads((path / "manifest.json").read_text())
    section = dict(manifest["adapters"], rank=8)
    with pytest.raises(ArtifactError, match="does not match|cannot load"):
        load_adapted(path, section)
    section = dict(manifest["adapters"], targets=["q_proj"])
    with pytest.raises(ArtifactError, match="adapted modules"):
        load_adapted(path, section)


def test_merge_equals_the_module(tmp_path, tiny_llama):
    _, model = adapted_student(tmp_path / "s", tiny_llama)
    for _, m in adapted_modules(model.eval()):
        x = torch.randn(3, m.in_features)
        with torch.no_grad():
            assert torch.allclose(merge_into_linear(m)(x), m(x), atol=1e-5)
