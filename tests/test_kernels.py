"""bltool.adapt.kernels: frozen linears through oneDNN on the CPU. They equal `F.linear` (values and, for
`frozen_linear`, the input's gradient), really run oneDNN's kernel where it applies (seen in the profiler),
and fall back to `F.linear` where it does not: a gradient through the weight, float64, BLTOOL_ONEDNN=0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bltool.adapt import kernels
from bltool.adapt.kernels import InferenceLinear, frozen_linear, linear, use_onednn

pytestmark = pytest.mark.skipif(not kernels.onednn_available(), reason="this PyTorch has no oneDNN linear")


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def _tensors(shape=(3, 7, 16), out=12, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(out, shape[-1], generator=g)
    return x, w, torch.randn(out, generator=g) if bias else None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 16)])
def test_linear_equals_f_linear_and_runs_onednn(shape, bias):
    x, w, b = _tensors(shape, bias=bias)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        assert "mkldnn::_linear_pointwise" in _ops(lambda: linear(x, w, b))


def test_a_transposed_view_as_weight_gives_g_times_w():
    """The fused loss's x-gradient: g (n, V) · W (V, d), as a linear with W's (d, V) view as weight."""
    gen = torch.Generator().manual_seed(1)
    g, head = torch.randn(6, 40, generator=gen), torch.randn(40, 16, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(linear(g, head.t()), g @ head, rtol=1e-5, atol=1e-5)
        assert "mkldnn::_linear_pointwise" in _ops(lambda: linear(g, head.t()))


def test_frozen_linear_gives_the_input_gradient_through_onednn():
    x, w, b = _tensors()
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    grad_out = torch.randn(3, 7, 12)
    out = frozen_linear(x1, w, b)
    torch.testing.assert_close(out, F.linear(x2, w, b), rtol=1e-5, atol=1e-5)
    assert "mkldnn::_linear_pointwise" in _ops(lambda: out.backward(grad_out, retain_graph=True))
    x1.grad = None
    out.backward(grad_out)
    F.linear(x2, w, b).backward(grad_out)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_falls_back_where_onednn_does_not_apply(monkeypatch):
    x, w, b = _tensors()
    trained = w.clone().requires_grad_(True)
    out = linear(x, trained, b)  # a weight that trains: autograd's F.linear
    out.sum().backward()
    assert trained.grad is not None
    assert "mkldnn::_linear_pointwise" not in _ops(lambda: frozen_linear(x, trained, b))
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(x.double(), w.double(), b.double()))
        monkeypatch.setenv("BLTOOL_ONEDNN", "0")
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(x, w, b))


def test_use_onednn_keeps_the_state_dict_and_the_outputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8, bias=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 16)
    with torch.no_grad():
        want = model(x)
        assert use_onednn(model) == 2
        assert all(type(m) is InferenceLinear for m in (model[0], model[2]))
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
