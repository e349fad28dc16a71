"""Gated LoRA linear (docs/method.md §2): exact outputs, the ρ = 0 skip, and injection into a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bltool.adapt.kernels import frozen_linear
from bltool.adapt.lora import DEFAULT_TARGETS, GatedLoRALinear, LoRASpec, inject_lora
from bltool.errors import UsageError


def hand_set(rank=2, gated=True, rho=1.0, bias=False):
    base = nn.Linear(3, 2, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]]))
        if bias:
            base.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = GatedLoRALinear(base, rank=rank, alpha=4.0, dropout=0.0, gated=gated, gate_init=0.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
        layer.lora_B.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
    layer.set_rho(rho)
    return layer


def test_exact_output_with_gates_and_rho():
    layer = hand_set(rho=0.5)
    x = torch.tensor([[1.0, 1.0, 2.0]])
    # W x = [1+2+6, -1+0+2] = [9, 1]; A x = [1, 3]; g = sigmoid(0) = 0.5 → [0.5, 1.5]
    # B·(g∘Ax) = [0.5 + 3, -1.5] = [3.5, -1.5]; scaling α/r = 2 → [7, -3]; ρ W x = [4.5, 0.5]
    assert torch.allclose(layer(x), torch.tensor([[11.5, -2.5]]))
    plain = hand_set(gated=False, rho=1.0)  # no gates: B A x = [1 + 6, -3] → ×2 = [14, -6]
    assert torch.allclose(plain(x), torch.tensor([[23.0, -5.0]]))


def test_bias_is_scaled_with_the_dense_path():
    layer = hand_set(rho=0.5, bias=True)
    x = torch.tensor([[1.0, 1.0, 2.0]])
    assert torch.allclose(layer(x), torch.tensor([[11.5 + 0.25, -2.5 - 0.25]]))


def test_starts_equal_to_dense_layer():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = GatedLoRALinear(base, rank=4, alpha=8.0, dropout=0.0)
    x = torch.randn(5, 16)
    # B = 0: the dense layer's output (its matmul runs through oneDNN here: float32 rounding apart)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    assert torch.sigmoid(layer.gate_logits).min() > 0.98  # γ starts at +4


def test_rho_zero_never_touches_dense_weight(monkeypatch):
    import bltool.adapt.lora

    def exploding(x, weight, bias=None):
        raise AssertionError("the dense matmul ran at rho == 0")

    monkeypatch.setattr(bltool.adapt.lora, "frozen_linear", exploding)  # the dense path's only matmul
    base = nn.Linear(6, 4)
    layer = GatedLoRALinear(base, rank=2, alpha=2.0, dropout=0.0)
    nn.init.normal_(layer.lora_B)
    layer.set_rho(0.0)
    base.requires_grad_(True)  # were the dense path in the graph, its weight would now get a gradient
    x = torch.randn(3, 6, requires_grad=True)
    out = layer(x)
    assert torch.allclose(out, layer.lora(x))
    out.sum().backward()  # backward does not need the dense weight either
    assert base.weight.grad is None and layer.lora_B.grad is not None and x.grad is not None
    layer.set_rho(0.3)
    with pytest.raises(AssertionError, match="dense matmul ran"):
        layer(x)


def test_dropout_acts_on_the_lora_path_only():
    """In train mode, dropout drops entries of the low-rank path's input, never the dense path's: with
    B = 0 the module is exactly the dense layer; with B ≠ 0 the difference from it changes with the mask."""
    torch.manual_seed(0)
    layer = GatedLoRALinear(nn.Linear(16, 8), rank=4, alpha=8.0, dropout=0.5).train()
    x = torch.randn(32, 16)
    dense = frozen_linear(x, layer.base.weight, layer.base.bias)  # W x as the module computes it
    for _ in range(3):
        assert torch.equal(layer(x), dense)
    nn.init.normal_(layer.lora_B)
    first, second = layer(x) - dense, layer(x) - dense
    assert not torch.allclose(first, second)  # a new mask each call, on the LoRA path
    layer.eval()
    assert torch.allclose(layer(x) - dense, layer.lora(x)) and torch.equal(layer(x), layer(x))


def test_only_lora_and_gates_train():
    layer = GatedLoRALinear(nn.Linear(6, 4), rank=3)
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "gate_logits"}
    assert "rho" in dict(layer.named_buffers())


def test_rho_survives_state_dict_round_trip():
    layer = GatedLoRALinear(nn.Linear(6, 4), rank=3)
    layer.set_rho(0.25)
    fresh = GatedLoRALinear(nn.Linear(6, 4), rank=3)
    fresh.load_state_dict(layer.state_dict())
    assert fresh._rho == 0.25 and float(fresh.rho) == 0.25
    with pytest.raises(ValueError):
        layer.set_rho(1.5)


def test_mac_accounting():
    layer = GatedLoRALinear(nn.Linear(768, 192), rank=128)
    assert layer.dense_macs == 768 * 192
    assert layer.lora_macs == 128 * (768 + 192)


def test_inject_in_registration_order(family, tokenizer):
    """The default targets adapt every projection of every decoder layer of each family, layer by layer in
    registration order (q, k, v, o, gate, up, down)."""
    from helpers import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family.model_type, len(tokenizer), 2, tied=True)).eval()
    ids = torch.randint(0, len(tokenizer), (2, 9))
    before = model(ids).logits
    adapted = inject_lora(model, LoRASpec(rank=4, alpha=8.0, dropout=0.0))
    names = [name for name, _ in adapted]
    assert names == [f"{family.layers}.{i}.{p}" for i in range(2) for p in family.projections]
    assert [n.rsplit(".", 1)[-1] for n in names[:7]] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"]
    assert all(isinstance(model.get_submodule(n), GatedLoRALinear) for n in names)
    assert torch.allclose(model(ids).logits, before)  # B = 0: unchanged at start
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "gate_logits" in n for n in trainable)
    assert set(DEFAULT_TARGETS) == {n.rsplit(".", 1)[-1] for n in names}


def test_inject_unknown_target_and_spec_validation(tokenizer):
    from helpers import tiny_config
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer), 1, tied=True))
    with pytest.raises(UsageError, match="--target-modules.*qkv"):
        inject_lora(model, LoRASpec(targets=("q_proj", "qkv")))
    for kwargs, flag in (({"rank": 0}, "--rank"), ({"alpha": 0}, "--lora-alpha"),
                         ({"dropout": 1.0}, "--lora-dropout"), ({"targets": ()}, "--target-modules")):
        with pytest.raises(UsageError, match=flag):
            LoRASpec(**kwargs)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_path_gradients_equal_autograd(gated, dropout):
    """The low-rank path's hand-written backward (`_LoRAPath`) against autograd on the same formula, in
    float64, with the same dropout mask: output and the gradients of x, A, B and the gate logits."""
    torch.manual_seed(1)
    layer = GatedLoRALinear(nn.Linear(6, 5).double(), rank=3, alpha=6.0, dropout=dropout, gated=gated).train()
    with torch.no_grad():
        nn.init.normal_(layer.lora_B)
        if gated:
            layer.gate_logits.normal_()
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    state = torch.get_rng_state()
    out = layer.lora(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    mine = [x.grad, layer.lora_A.grad, layer.lora_B.grad] + ([layer.gate_logits.grad] if gated else [])

    torch.set_rng_state(state)  # the same mask, drawn the same way
    keep = (torch.rand(x.shape) >= dropout).double() / (1 - dropout) if dropout else torch.ones_like(x)
    xr = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in
              ([layer.lora_A, layer.lora_B] + ([layer.gate_logits] if gated else []))]
    h = (xr * keep) @ params[0].t()
    if gated:
        h = h * torch.sigmoid(params[2])
    ref = h @ params[1].t() * layer.scaling
    ref.backward(grad)
    assert torch.allclose(out, ref, atol=1e-12)
    for got, want in zip(mine, [xr.grad] + [p.grad for p in params]):
        assert torch.allclose(got, want, atol=1e-12)


def test_lora_path_keeps_one_input_and_a_bool_mask():
    """What q, k and v's low-rank paths keep for the backward when they read one input with dropout: that
    input once (shared), a one-byte mask each and each rank-r code, not three float copies of the
    dropped-out input (the memory that made distill's peak at 8 × 1024 tokens)."""
    torch.manual_seed(0)
    layers = [GatedLoRALinear(nn.Linear(64, 64), rank=4, alpha=8.0, dropout=0.05).train() for _ in range(3)]
    x = torch.randn(8, 32, 64, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sum(layer.lora(x) for layer in layers)
    x_bytes = x.numel() * 4
    params = sum(p.numel() * 4 for layer in layers for p in (layer.lora_A, layer.lora_B, layer.gate_logits))
    codes = 3 * 8 * 32 * 4 * 4
    # x once, three bool masks, three codes, the parameters (and a few scalars)
    assert sum(saved.values()) <= x_bytes + 3 * x.numel() + codes + params + 1024
    out.sum().backward()
    assert x.grad is not None and all(layer.lora_A.grad is not None for layer in layers)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rho", [0.0, 0.37, 1.0])
def test_module_gradients_equal_autograd_on_the_written_out_formula(rho, bias, dropout, dtype):
    """The whole module against autograd on docs/method.md §2 written out,

        y = ρ · (W x + b) + (α / r) · B · diag(sigmoid(γ)) · A · dropout(x),

    in float64 with the same dropout mask: the output and the gradients of x, A, B and the gate logits γ
    (W and b are frozen in every method). x's gradient is where the dense path shows: ρ · Wᵀ ∂y plus the
    low-rank path's. In float32 the dense path runs through oneDNN (`frozen_linear`'s own backward): the
    same reference, to float32 precision."""
    torch.manual_seed(2)
    layer = GatedLoRALinear(nn.Linear(6, 5, bias=bias, dtype=dtype), rank=3, alpha=6.0, dropout=dropout).train()
    with torch.no_grad():
        nn.init.normal_(layer.lora_B)
        layer.gate_logits.normal_()
        if bias:
            layer.base.bias.normal_()
    layer.set_rho(rho)
    x = torch.randn(2, 4, 6, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(2, 4, 5, dtype=dtype)
    state = torch.get_rng_state()
    out = layer(x)
    out.backward(grad_y)
    got = [out, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.gate_logits.grad]
    assert layer.base.weight.grad is None

    torch.set_rng_state(state)  # the module's mask, drawn the same way
    keep = (torch.rand(x.shape) >= dropout).double() / (1 - dropout) if dropout else torch.ones(x.shape).double()
    xr, a, b, gamma = (t.detach().double().requires_grad_(True)
                       for t in (x, layer.lora_A, layer.lora_B, layer.gate_logits))
    w = layer.base.weight.detach().double()
    dense = xr @ w.t() + (layer.base.bias.detach().double() if bias else 0.0)
    r = layer._rho  # the ρ the module holds (float32-rounded, as the buffer)
    ref = r * dense + layer.scaling * (((xr * keep) @ a.t()) * torch.sigmoid(gamma)) @ b.t()
    ref.backward(grad_y.double())
    want = [ref, xr.grad, a.grad, b.grad, gamma.grad]
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for name, g, ref_g in zip(("y", "x", "A", "B", "gate logits"), got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), ref_g, **tol, msg=lambda m, name=name: f"{name}: {m}")
