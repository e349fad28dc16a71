"""The two-factor low-rank linear layer that `compress` deploys (docs/method.md §5), and its kernel switch.

    y = B · (A · x) + b        A = down.weight (rank × d_in),  B = up.weight (d_out × rank)

It is two plain `nn.Linear` layers (`down` without bias, `up` with the original bias if any), so a
checkpoint stores it as two ordinary linear weights, and its cost per token is rank · (d_in + d_out)
MACs instead of d_in · d_out. It never builds the d_out × d_in matrix.

How the two matmuls run is one switch, `set_kernel(model, kernel)` (or `$BLTOOL_LOWRANK_KERNEL` for
models loaded by `bltool.load_model`), recorded by every stage that times it:
  linear   two `F.linear` calls on the factors as stored (nn.Linear's row-major layout).
  mm       the input flattened to 2-D and `torch.mm` / `torch.addmm` on factors re-laid out so that
           Aᵀ and Bᵀ are contiguous (same memory, no copy kept): meant to cut per-call dispatch at
           decode shapes; on this project's CPU it did not beat `linear`.
  compile  `torch.compile` of the `linear` path (dynamic shapes; needs a C compiler on CPU).
  auto     `linear`: on this project's CPU (fp32) it reached 90–91% of the MAC ratio at prefill, tied
           with `mm` there, beat it at most decode shapes, and beat `compile` everywhere
           (benchmarks/lowrank_kernels.py; docs/benchmarks.md). No GPU was available to measure, so
           CUDA also gets `linear` until a measurement says otherwise.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from bltool.errors import UsageError

KERNELS = ("auto", "linear", "mm", "compile")
KERNEL_ENV = "BLTOOL_LOWRANK_KERNEL"


def _lowrank_linear(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None):
    return F.linear(F.linear(x, down), up, bias)  # (..., d_in) → (..., rank) → (..., d_out)


_compiled = None


def _compiled_lowrank():
    global _compiled
    if _compiled is None:
        # one graph per (module shape, size-1 or not) combination: more than dynamo's default limit of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled = torch.compile(_lowrank_linear, dynamic=True)
    return _compiled


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self.kernel = "linear"

    @classmethod
    def from_factors(cls, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype=None) -> LowRankLinear:
        """A layer computing up · (down · x) + bias from given factors (copied, cast to `dtype`)."""
        rank, in_features = down.shape
        out_features = up.shape[0]
        if up.shape[1] != rank:
            raise ValueError(f"factor shapes do not chain: {tuple(down.shape)} and {tuple(up.shape)}")
        dtype = dtype or down.dtype
        layer = cls(in_features, out_features, rank, bias=bias is not None, device=down.device, dtype=dtype)
        with torch.no_grad():
            layer.down.weight.copy_(down)
            layer.up.weight.copy_(up)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @property
    def macs(self) -> int:
        """Multiply-accumulates per token: rank · (d_in + d_out)."""
        return self.rank * (self.in_features + self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "mm":
            shape = x.shape
            h = torch.mm(x.reshape(-1, shape[-1]), self.down.weight.t())  # (N, rank)
            wt = self.up.weight.t()  # (rank, d_out), contiguous after set_kernel("mm")
            y = torch.mm(h, wt) if self.up.bias is None else torch.addmm(self.up.bias, h, wt)
            return y.view(*shape[:-1], self.out_features)
        if self.kernel == "compile":
            return _compiled_lowrank()(x, self.down.weight, self.up.weight, self.up.bias)
        return _lowrank_linear(x, self.down.weight, self.up.weight, self.up.bias)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """The same function as one dense linear W = B·A (computed in float32): gives up the saving."""
        weight = self.up.weight.float() @ self.down.weight.float()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None,
                           device=weight.device, dtype=self.up.weight.dtype)
        linear.weight.copy_(weight)
        if self.up.bias is not None:
            linear.bias.copy_(self.up.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, kernel={self.kernel}"


def resolve_kernel(kernel: str) -> str:
    """`auto` → the measured-best path; other names are returned as they are."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    return "linear" if kernel == "auto" else kernel


def _relayout(weight: nn.Parameter, transposed: bool) -> None:
    """Store `weight` row-major (transposed=False) or column-major (its .t() contiguous), in place."""
    data = weight.data
    if transposed and not data.t().is_contiguous():
        weight.data = data.t().contiguous().t()
    elif not transposed and not data.is_contiguous():
        weight.data = data.contiguous()


def set_kernel(model: nn.Module, kernel: str = "auto") -> str:
    """Select how every LowRankLinear in `model` computes; returns the resolved kernel name."""
    resolved = resolve_kernel(kernel)
    for layer in (m for m in model.modules() if isinstance(m, LowRankLinear)):
        _relayout(layer.down.weight, resolved == "mm")
        _relayout(layer.up.weight, resolved == "mm")
        layer.kernel = resolved
    return resolved


def default_kernel() -> str:
    """The kernel `bltool.load_model` selects: $BLTOOL_LOWRANK_KERNEL, else auto."""
    kernel = os.environ.get(KERNEL_ENV, "") or "auto"
    if kernel not in KERNELS:
        raise UsageError(f"${KERNEL_ENV} must be one of {', '.join(KERNELS)}, got {kernel!r}")
    return kernel
