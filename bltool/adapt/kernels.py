"""Linear layers through oneDNN on the CPU, for the matmuls whose weights do not train.

On x86 CPUs PyTorch's `F.linear` calls MKL's sgemm. On AMD CPUs MKL does not take its AVX-512 paths,
while oneDNN (PyTorch's `mkldnn` backend, built into every CPU wheel) does: measured on the 2-core AMD
EPYC (AVX-512) that CI runs on, a (2048 × 576) · (576 × 1536) float32 product ran at 200 GFLOP/s through
oneDNN against 120–150 through `F.linear`, and SmolLM2's LM head at 141 against 96 (docs/benchmarks.md).
PyTorch uses the same oneDNN kernel (`torch.ops.mkldnn._linear_pointwise`) for the linears of a model
compiled with inductor's weight freezing; here it is called directly, so eager code gets it without
compiling.

Where it applies: float32 tensors on the CPU, when no gradient has to flow through the op itself
(`linear` under `no_grad`, or inputs and weights that do not require grad); anything else, and any
PyTorch without the op, goes to `F.linear` unchanged, and so does code that `torch.compile` traces
(`--compile`: inductor picks its own kernels there). `frozen_linear` is the one autograd-aware form: the
weight is frozen, the input may require grad, and the backward's x-gradient (grad · W) runs through
oneDNN too. `BLTOOL_ONEDNN=0` in the environment turns all of it off.

Used for the frozen teacher (`distill`'s live teacher, `teacher-logits`), the fused KD loss's heads
(`bltool.train.losses`) and the frozen base of a gated LoRA linear (`bltool.adapt.lora`). Results differ
from `F.linear` only by float32 rounding (another summation order).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

_available: bool | None = None


def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's linear and it agrees with `F.linear` (checked once)."""
    global _available
    if _available is None:
        _available = False
        op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
        if op is not None and torch.backends.mkldnn.is_available():
            try:
                g = torch.Generator().manual_seed(0)
                x, w, b = (torch.randn(*s, generator=g) for s in ((3, 5, 8), (4, 8), (4,)))
                _available = bool(torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5))
            except (RuntimeError, TypeError, NotImplementedError):
                _available = False
    return _available


def _enabled() -> bool:
    # inductor lowers this op only for frozen (constant) weights: a compiled region keeps F.linear
    return (os.environ.get("BLTOOL_ONEDNN", "1") != "0" and not torch.compiler.is_compiling()
            and onednn_available())


def _fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() >= 2
            and weight.device.type == "cpu" and (bias is None or bias.dtype == torch.float32) and _enabled())


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; through oneDNN where it applies and no gradient flows through it."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if not needs_grad and _fits(x, weight, bias):
        return _onednn(x, weight, bias)
    return F.linear(x, weight, bias)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return _onednn(grad.contiguous(), weight.t(), None), None, None  # grad · W, W as a (d_in, d_out) view


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` with a weight (and bias) that do not train: the input may require grad, and its gradient
    is computed through oneDNN as well. Falls back to `F.linear` wherever oneDNN does not apply."""
    if weight.requires_grad or (bias is not None and bias.requires_grad) or not _fits(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenLinear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


class InferenceLinear(nn.Linear):
    """An `nn.Linear` whose forward is `linear` (what `use_onednn` turns a frozen model's linears into; the
    parameters and the state dict are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn(model: nn.Module) -> int:
    """Route every plain `nn.Linear` of a frozen model (a teacher) through `linear`; returns how many.
    Where oneDNN does not apply (another device or dtype, a gradient to compute) `linear` is `F.linear`."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = InferenceLinear
            count += 1
    return count
