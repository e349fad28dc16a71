"""Compression (docs/method.md §5): the low-rank layer and its kernels, gate hardening, the form and SVD-rank
rules, the correctness of each form against the gated module, and the compressed checkpoint's strict
round trip through `bltool.load_model`."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import IDS, distilled_student
from torch import nn

import bltool
from bltool.adapt.adapters import adapted_modules, merge_into_linear
from bltool.adapt.compression import (
    CompressionPolicy,
    choose_form,
    compress_model,
    compress_module,
    harden,
    load_compressed,
    macs_per_token,
    svd_rank,
    truncated_svd,
)
from bltool.adapt.lora import GatedLoRALinear
from bltool.adapt.lowrank import KERNEL_ENV, LowRankGroup, LowRankLinear, groups, set_grouped, set_kernel
from bltool.errors import ArtifactError, UsageError
from bltool.models.loading import load_model, resolve_model


def gated_module(d_in=12, d_out=10, rank=4, rho=1.0, gate_logits=(4.0, 4.0, 4.0, 4.0), bias=False, seed=0):
    torch.manual_seed(seed)
    module = GatedLoRALinear(nn.Linear(d_in, d_out, bias=bias), rank=rank, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        module.lora_B.normal_()
        module.gate_logits.copy_(torch.tensor(gate_logits))
    module.set_rho(rho)
    return module.eval()


# ---------------------------------------------------------------------------------------------------
# The low-rank layer


def test_lowrank_layer_hand_set_values():
    layer = LowRankLinear.from_factors(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[1.0], [-1.0]]),
                                       torch.tensor([0.5, 0.5]))
    x = torch.tensor([[1.0, 1.0, 5.0]])  # A x = 3
    assert torch.equal(layer(x), torch.tensor([[3.5, -2.5]]))
    assert layer.macs == 1 * (3 + 2) and layer.rank == 1
    assert torch.equal(layer.to_dense().weight, torch.tensor([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0]]))
    with pytest.raises(ValueError):
        LowRankLinear.from_factors(torch.ones(2, 3), torch.ones(4, 3))


@pytest.mark.parametrize("bias", [False, True])
def test_kernels_compute_the_same_function(bias):
    torch.manual_seed(0)
    layer = LowRankLinear(24, 16, 5, bias=bias)
    x = torch.randn(3, 7, 24)
    reference = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert set_kernel(layer, "mm") == "mm" and layer.kernel == "mm"
    assert layer.up.weight.t().is_contiguous() and layer.down.weight.t().is_contiguous()  # re-laid out in place
    assert torch.allclose(layer(x), reference, atol=1e-6)
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())  # same values, same keys
    assert set_kernel(layer, "auto") == "linear" and layer.down.weight.is_contiguous()
    assert torch.allclose(layer(x), reference, atol=1e-6)
    with pytest.raises(ValueError):
        set_kernel(layer, "fastest")


def test_compile_kernel_runs_and_matches():
    torch.manual_seed(0)
    layer = LowRankLinear(16, 8, 3)
    x = torch.randn(2, 16)
    reference = layer(x)
    assert set_kernel(layer, "compile") == "compile"
    assert torch.allclose(layer(x), reference, atol=1e-5)


def test_a_group_computes_its_members_with_one_down_gemm(monkeypatch):
    torch.manual_seed(0)
    layers = [LowRankLinear(16, d_out, rank, bias=bias) for d_out, rank, bias in ((16, 3, True), (8, 5, False),
                                                                                  (8, 2, True))]
    x = torch.randn(2, 5, 16)
    expected = [layer(x) for layer in layers]
    group = LowRankGroup(layers)
    gemms = []
    compute = LowRankGroup._compute
    monkeypatch.setattr(LowRankGroup, "_compute", lambda self, x: gemms.append(1) or compute(self, x))
    for kernel in ("linear", "mm", "compile"):
        for layer in layers:
            set_kernel(layer, kernel)
        group.kernel = kernel
        gemms.clear()
        with torch.no_grad():
            outputs = [layer(x) for layer in layers]
        assert len(gemms) == 1, kernel  # the first member computed the group, the siblings took theirs
        assert all(torch.allclose(o, e, atol=1e-5) for o, e in zip(outputs, expected, strict=True)), kernel
        stacked = group.stacked
        assert all(stacked.untyped_storage().data_ptr() == layer.down.weight.untyped_storage().data_ptr()
                   for layer in layers)  # the factors are views of the stacked tensor: no copy kept
    with torch.no_grad():  # a member called on another input computes again
        assert torch.allclose(layers[1](x[:1]), expected[1][:1], atol=1e-5) and len(gemms) == 2
    # with gradients for the factors (training) each layer computes alone and every factor gets its gradient
    sum(layer(x).sum() for layer in layers).backward()
    assert len(gemms) == 2 and all(layer.down.weight.grad is not None for layer in layers)


# ---------------------------------------------------------------------------------------------------
# Rules


def test_form_thresholds_and_svd_rank():
    policy = CompressionPolicy()
    assert [choose_form(r, policy) for r in (0.0, 0.0499, 0.05, 0.4999, 0.5, 1.0)] == [
        "drop", "drop", "svd", "svd", "keep", "keep"]
    # k = clip(round(64 · (ρ − 0.05)/0.45), 1, 64), round half up
    assert svd_rank(0.05, policy) == 1  # 0 → clipped to 1
    assert svd_rank(0.275, policy) == 32
    assert svd_rank(0.05 + 0.45 * 2.5 / 64, policy) == 3  # 2.5 rounds up
    assert svd_rank(0.4999, policy) == 64
    assert svd_rank(0.4999, policy, max_rank=10) == 10
    assert svd_rank(0.3, CompressionPolicy(tau_drop=0.1, tau_svd=0.3, k_max=8)) == 8


@pytest.mark.parametrize("kwargs, flag", [
    ({"tau_rank": 1.5}, "--tau-rank"), ({"tau_drop": 0.6}, "--tau-drop"), ({"tau_svd": 1.2}, "--tau-drop"),
    ({"k_max": 0}, "--k-max"),
])
def test_policy_validation_names_the_flag(kwargs, flag):
    with pytest.raises(UsageError, match=flag):
        CompressionPolicy(**kwargs)


def test_harden_keeps_ranks_above_tau_and_folds_gates_and_scaling():
    module = gated_module(gate_logits=(4.0, -4.0, 0.0, 1.0))  # g ≈ 0.982, 0.018, 0.5, 0.731
    down, up = harden(module, 0.5)
    kept = [0, 2, 3]
    gates = torch.sigmoid(module.gate_logits)[kept]
    assert torch.equal(down, module.lora_A[kept])
    assert torch.allclose(up, module.lora_B[:, kept] * 2.0 * gates)  # α/r = 8/4
    down, up = harden(gated_module(gate_logits=(-5.0, -3.0, -4.0, -6.0)), 0.5)
    assert down.shape == (1, 12) and up.shape == (10, 1)  # at least one rank: the largest gate (index 1)
    plain = GatedLoRALinear(nn.Linear(12, 10), rank=4, alpha=8.0, dropout=0.0, gated=False)
    down, up = harden(plain, 0.5)
    assert torch.equal(down, plain.lora_A) and torch.equal(up, plain.lora_B * 2.0)


# ---------------------------------------------------------------------------------------------------
# Correctness of each form (issue part 3)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rho", [1.0, 0.7, 0.5])
def test_keep_equals_the_gated_module_and_its_merge(rho, bias):
    module = gated_module(rho=rho, bias=bias)  # all gates ≥ τ_rank
    layer, record = compress_module(module, CompressionPolicy())
    x = torch.randn(5, 12)
    assert isinstance(layer, nn.Linear) and record["form"] == "keep" and record["layout"] == "dense"
    assert torch.allclose(layer(x), module(x), atol=1e-5)
    assert torch.allclose(layer.weight, merge_into_linear(module).weight, atol=1e-6)
    assert record["macs"] == record["dense_macs"] == 120 and record["kept_rank"] == 4


def test_keep_with_pruned_ranks_equals_the_module_with_those_gates_closed():
    module = gated_module(gate_logits=(4.0, -4.0, 0.0, 1.0))
    layer, record = compress_module(module, CompressionPolicy())
    closed = gated_module(gate_logits=(4.0, -1e4, 0.0, 1.0))  # same seed: same weights, rank 1 gated off
    x = torch.randn(5, 12)
    assert torch.allclose(layer(x), closed(x), atol=1e-5) and record["kept_rank"] == 3


@pytest.mark.parametrize("bias", [False, True])
def test_drop_equals_the_lora_path(bias):
    module = gated_module(rho=0.0, bias=bias)
    layer, record = compress_module(module, CompressionPolicy())
    x = torch.randn(5, 12)
    assert isinstance(layer, LowRankLinear) and record["form"] == "drop"
    # a biased module keeps its bias parameter, ρb = 0, so its layout is the architecture's
    assert (layer.up.bias is not None) == bias and record["bias"] == bias
    if bias:
        assert torch.equal(layer.up.bias, torch.zeros(10))
    assert torch.allclose(layer(x), module.lora(x), atol=1e-6)
    assert torch.allclose(layer(x), module(x), atol=1e-6)
    assert record["macs"] == 4 * (12 + 10) and record["params"] == 4 * 22 + 10 * bias and record["rank"] == 4


def test_svd_error_falls_with_k_and_vanishes_at_full_rank():
    module = gated_module(d_in=40, d_out=30, rho=0.4999, bias=True)  # just below τ_svd: k = k_max
    x = torch.randn(64, 40)
    with torch.no_grad():
        target = module(x)
    errors = []
    for k in (1, 5, 10, 20, 30):  # min(d_in, d_out) = 30 is full rank
        layer, record = compress_module(module, CompressionPolicy(k_max=k, dense_fallback=False))
        assert record["form"] == "svd" and record["svd_rank"] == k and record["rank"] == 4 + k
        with torch.no_grad():
            errors.append(float((layer(x) - target).norm() / target.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-5


def test_truncated_svd_is_the_best_rank_k_approximation():
    torch.manual_seed(0)
    w = torch.randn(8, 6)
    u, sv = truncated_svd(w, 6)
    assert torch.allclose(u @ sv, w, atol=1e-5)
    u, sv = truncated_svd(w, 2)
    singular = torch.linalg.svdvals(w)
    assert torch.allclose((w - u @ sv).norm(), singular[2:].norm(), atol=1e-5)  # Eckart–Young


def test_costlier_lowrank_form_is_multiplied_out():
    module = gated_module(d_in=12, d_out=10, rho=0.45)  # SVD band: k = min(58, 10) → rank 14 · 22 > 120
    layer, record = compress_module(module, CompressionPolicy())
    kept_lowrank, _ = compress_module(module, CompressionPolicy(dense_fallback=False))
    x = torch.randn(5, 12)
    assert isinstance(layer, nn.Linear) and record["multiplied_out"] and record["macs"] == 120
    assert isinstance(kept_lowrank, LowRankLinear) and kept_lowrank.macs > 120
    assert torch.allclose(layer(x), kept_lowrank(x), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Whole models and the checkpoint


def test_compressed_model_matches_uncompressed_without_svd(tmp_path, family, family_models):
    teacher = family_models(family.model_type)
    _, model = distilled_student(tmp_path / "s", teacher, rhos=(0.0, 1.0, 0.6), gate_scale=0.0)  # g = 0.5
    with torch.no_grad():
        expected = model(IDS).logits
    records = compress_model(model, CompressionPolicy())
    assert {r["form"] for r in records} == {"drop", "keep"} and not adapted_modules(model)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, expected, atol=1e-4)


def test_checkpoint_round_trip_is_exact_and_strict(tmp_path, family, family_models, monkeypatch):
    from bltool.stages.compress import CompressConfig, run

    teacher = family_models(family.model_type)
    source, _ = distilled_student(tmp_path / "s", teacher)
    out = run(CompressConfig(model=str(source), out=str(tmp_path / "c"), dense_fallback=False))
    section = json.loads((out / "manifest.json").read_text())["compressed"]
    loaded = bltool.load_model(out)
    assert type(loaded).__name__ == family.compressed_class
    layouts = {r["name"]: r["layout"] for r in section["modules"]}
    assert {type(loaded.get_submodule(n)).__name__ for n, lay in layouts.items() if lay == "lowrank"} == {
        "LowRankLinear"}
    assert {r["form"] for r in section["modules"]} == {"drop", "svd", "keep"}
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    # the same weights as compressing in memory
    _, again = distilled_student(tmp_path / "s2", teacher)
    compress_model(again, CompressionPolicy(dense_fallback=False))
    with torch.no_grad():  # (ungrouped: the grouped form equals it to float tolerance, tested below)
        set_grouped(loaded, False)
        assert torch.equal(loaded(IDS).logits, again(IDS).logits)
        set_grouped(loaded, True)
    # generate() runs the compressed model (cached decoding equals the uncached greedy loop)
    generated = loaded.generate(IDS, max_new_tokens=5, do_sample=False)
    ids = IDS
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, loaded(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)
    # the kernel switch reaches models loaded by bltool.load_model
    monkeypatch.setenv(KERNEL_ENV, "mm")
    assert {m.kernel for m in bltool.load_model(out).modules() if isinstance(m, LowRankLinear)} == {"mm"}
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    with pytest.raises(UsageError, match=KERNEL_ENV):
        bltool.load_model(out)
    # strict: a manifest that does not match the weights is refused
    first_lowrank = next(i for i, r in enumerate(section["modules"]) if r["layout"] == "lowrank")
    bad = json.loads(json.dumps(section))
    bad["modules"][first_lowrank]["rank"] += 1
    with pytest.raises(ArtifactError, match="cannot load|does not match|disagree"):
        load_compressed(out, bad)
    bad = json.loads(json.dumps(section))
    bad["modules"][0]["name"] = f"{family.layers}.0.self_attn.nope"
    with pytest.raises(ArtifactError, match="absent from its config"):
        load_compressed(out, bad)


def test_grouped_products_equal_the_ungrouped_form(tmp_path, family, family_models):
    """q/k/v and gate/up mix dense, SVD and dropped forms here: the low-rank members of each group share one
    down GEMM in the loaded model, and the logits equal those of the ungrouped form, for every kernel, after
    a cast too."""
    from bltool.stages.compress import CompressConfig, run

    source, _ = distilled_student(tmp_path / "s", family_models(family.model_type))
    out = run(CompressConfig(model=str(source), out=str(tmp_path / "c"), dense_fallback=False))
    model = bltool.load_model(out)
    found = groups(model)
    expected = []
    for layer in model.get_submodule(family.layers):
        for fused in family.fused:
            members = [layer.get_submodule(m) for m in fused.members]
            lowrank = [m for m in members if isinstance(m, LowRankLinear)]
            if len(lowrank) >= 2:
                expected.append((lowrank, len(lowrank) < len(members)))
    assert [g.members for g in found] == [members for members, _ in expected]
    assert any(mixed for _, mixed in expected)  # a group with a dense member: only the low-rank ones stacked
    for kernel in ("linear", "mm"):
        set_kernel(model, kernel)
        with torch.inference_mode():
            grouped = model(IDS).logits
            set_grouped(model, False)
            alone = model(IDS).logits
            set_grouped(model, True)
        assert torch.allclose(grouped, alone, atol=1e-5), kernel
    model.to(torch.float64)  # new storage for every factor: the groups stack again
    with torch.no_grad():
        grouped = model(IDS).logits
        set_grouped(model, False)
        assert torch.allclose(grouped, model(IDS).logits, atol=1e-10)
    assert all(g.stacked.dtype == torch.float64 for g in found)


def test_macs_per_token_of_the_tiny_llama(tmp_path, tiny_llama):
    model = load_model(resolve_model(str(tiny_llama)))
    # 12 layers of q 32·32, k 32·16, v 32·16, o 32·32, gate/up 32·64, down 64·32; 4 heads of 8
    projections = 12 * (2 * 1024 + 2 * 512 + 3 * 2048)
    macs = macs_per_token(model, context=10, logits_per_token=0.5)
    assert macs["projections"] == projections
    assert macs["attention"] == 2 * 12 * 4 * 8 * 10
    assert macs["lm_head"] == 32 * model.config.vocab_size * 0.5
    assert macs["total"] == projections + macs["attention"] + macs["lm_head"]
