"""The two-factor low-rank linear layer that `compress` deploys (docs/method.md §5), and its kernel switch.

    y = B · (A · x) + b        A = down.weight (rank × d_in),  B = up.weight (d_out × rank)

It is two plain `nn.Linear` layers (`down` without bias, `up` with the original bias if any), so a
checkpoint stores it as two ordinary linear weights, and its cost per token is rank · (d_in + d_out)
MACs instead of d_in · d_out. It never builds the d_out × d_in matrix.

How the two matmuls run is one switch, `set_kernel(model, kernel)` (or `$BLTOOL_LOWRANK_KERNEL` for
models loaded by `bltool.load_model`), recorded by every stage that times it:
  linear   two `F.linear` calls on the factors as stored (nn.Linear's row-major layout), on the input
           flattened to 2-D.
  mm       the input flattened to 2-D and `torch.mm` / `torch.addmm` on factors re-laid out so that
           Aᵀ and Bᵀ are contiguous (same memory, no copy kept): meant to cut per-call dispatch at
           decode shapes; on this project's CPU it did not beat `linear`.
  compile  `torch.compile` of the `linear` path (dynamic shapes; needs a C compiler on CPU).
  auto     `linear`: on this project's CPU (fp32) it reached 90–91% of the MAC ratio at prefill, tied
           with `mm` there, beat it at most decode shapes, and beat `compile` everywhere
           (benchmarks/lowrank_kernels.py; docs/benchmarks.md). No GPU was available to measure, so
           CUDA also gets `linear` until a measurement says otherwise.

Grouped products (`LowRankGroup`): layers that read the same input (a decoder layer's q/k/v, its gate/up)
can share one `down` GEMM. `group_layers(layers)` stacks their A factors into one (Σ rank × d_in) tensor
and makes each layer's `down.weight` a view of its rows (no copy kept; the checkpoint format is
unchanged: each layer still has its own `down.weight`). When the first layer of a group is called on x,
the group computes code = A_stacked · x once, splits it, and every member's B · code + b; the siblings
called next on the same tensor x take their outputs from there. The kernel switch applies to the group
as a whole. With gradients needed for the factors (training), each layer computes alone, as before.
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
    # (N, d_in) → (N, rank) → (N, d_out), x flattened to 2-D: on this project's CPU F.linear on a 3-D input
    # took a slower path (~10 µs more per call at decode shapes)
    shape = x.shape
    return F.linear(F.linear(x.reshape(-1, shape[-1]), down), up, bias).view(*shape[:-1], up.shape[0])


def _grouped_lowrank(x: torch.Tensor, down: torch.Tensor, ups: list[torch.Tensor], biases: list,
                     ranks: list[int]) -> list[torch.Tensor]:
    """One GEMM with the stacked A factors, then each member's B: (N, d_in) → (N, Σ rank) → outputs (x
    flattened to 2-D, as in `_lowrank_linear`)."""
    shape = x.shape
    codes = F.linear(x.reshape(-1, shape[-1]), down).split(ranks, dim=-1)
    return [F.linear(h, up, bias).view(*shape[:-1], up.shape[0]) for h, up, bias in zip(codes, ups, biases,
                                                                                        strict=True)]


_compiled: dict = {}


def _compiled_fn(fn):
    if fn not in _compiled:
        # one graph per (module shape, size-1 or not) combination: more than dynamo's default limit of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def _compiled_lowrank():
    return _compiled_fn(_lowrank_linear)


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
        self.group: LowRankGroup | None = None  # set by group_layers

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
        group = self.group
        if group is not None and group.enabled and not (torch.is_grad_enabled() and group.needs_grad()):
            return group.output(self, x)
        return self.forward_alone(x)

    def forward_alone(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's two products on their own (the ungrouped form)."""
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


class LowRankGroup:
    """Low-rank layers that read the same input, computed with one `down` GEMM (see the module docstring).

    Not a module: the members stay where the model has them (and so do their parameters' names); each
    member points here. `stacked` holds the members' A factors, row-stacked (`linear`, `compile`) or as its
    contiguous transpose (`mm`); the members' `down.weight` are views of it. If a member's factor no longer
    is that view (the model was cast or moved: `.to()` gives each parameter new storage; or a parameter was
    replaced), the next call stacks again."""

    def __init__(self, members: list[LowRankLinear]):
        if len(members) < 2:
            raise ValueError("a group needs at least two low-rank layers")
        if len({m.in_features for m in members}) != 1:
            raise ValueError("the layers of a group must read the same input size")
        self.members = list(members)
        self.ranks = [m.rank for m in members]
        self.enabled = True
        self.kernel = members[0].kernel
        self.stacked: torch.Tensor | None = None
        # per member, as stacked: (its down's and up's parameter dicts, the down, up and bias parameters, the
        # down's data pointer): checked on every call, so kept to plain lookups
        self._state: list[tuple] = []
        self._ups: list[torch.Tensor] = []
        self._biases: list[torch.Tensor | None] = []
        self._pending: tuple | None = None  # (x, its version, {member: output}) not yet taken
        for member in members:
            member.group = self

    @torch.no_grad()
    def stack(self) -> None:
        """Copy the members' A factors into one tensor in the kernel's layout; their `down.weight` become
        views of it."""
        with torch.inference_mode(False):
            weights = [m.down.weight.data for m in self.members]
            if self.kernel == "mm":  # Aᵀ (d_in × Σ rank) contiguous
                stacked = torch.cat([w.t() for w in weights], dim=1)
                views = [v.t() for v in stacked.split(self.ranks, dim=1)]
            else:  # A (Σ rank × d_in) row-major
                stacked = torch.cat(weights, dim=0)
                views = list(stacked.split(self.ranks, dim=0))
        for member, view in zip(self.members, views, strict=True):
            member.down.weight.data = view
        self.stacked = stacked
        self._ups = [m.up.weight for m in self.members]
        self._biases = [m.up.bias for m in self.members]
        self._state = [(m.down._parameters, m.up._parameters, m.down.weight, m.up.weight, m.up.bias,
                        m.down.weight.data_ptr()) for m in self.members]
        self._pending = None

    def unstack(self) -> None:
        """Give every member its own copy of its A factor again and forget the stacked tensor."""
        for member in self.members:
            data = member.down.weight.data
            member.down.weight.data = data.t().contiguous().t() if self.kernel == "mm" else data.contiguous().clone()
        self.stacked, self._state, self._ups, self._biases, self._pending = None, [], [], [], None

    def _stale(self) -> bool:
        for down_params, up_params, down, up, bias, pointer in self._state:
            if (down_params["weight"] is not down or down.data_ptr() != pointer or up_params["weight"] is not up
                    or up_params.get("bias") is not bias):
                return True
        return not self._state

    def needs_grad(self) -> bool:
        """Whether a factor of the group needs gradients (then each member computes alone)."""
        return any(m.down.weight.requires_grad or m.up.weight.requires_grad for m in self.members)

    def _compute(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._stale():
            self.stack()
        if self.kernel == "mm":
            shape = x.shape
            codes = torch.mm(x.reshape(-1, shape[-1]), self.stacked).split(self.ranks, dim=1)
            return [(torch.mm(h, up.t()) if bias is None else torch.addmm(bias, h, up.t())).view(
                *shape[:-1], up.shape[0]) for h, up, bias in zip(codes, self._ups, self._biases, strict=True)]
        if self.kernel == "compile":
            return _compiled_fn(_grouped_lowrank)(x, self.stacked, self._ups, self._biases, self.ranks)
        return _grouped_lowrank(x, self.stacked, self._ups, self._biases, self.ranks)

    def output(self, member: LowRankLinear, x: torch.Tensor) -> torch.Tensor:
        """`member`'s output for x: computed for the whole group on the first call, taken from there by the
        siblings called on the same tensor (unchanged since) next."""
        version = None if x.is_inference() else x._version
        pending = self._pending
        if pending is not None and pending[0] is x and pending[1] == version:
            out = pending[2].pop(member, None)
            if out is not None:
                if not pending[2]:
                    self._pending = None
                return out
        outputs = dict(zip(self.members, self._compute(x), strict=True))
        out = outputs.pop(member)
        self._pending = (x, version, outputs)
        return out


def group_layers(layers: list[LowRankLinear]) -> LowRankGroup | None:
    """Group low-rank layers that read the same input (any group they were in is dissolved first); None,
    and nothing grouped, for fewer than two layers."""
    for layer in layers:
        if layer.group is not None:
            ungroup(layer.group)
    return LowRankGroup(layers) if len(layers) >= 2 else None


def ungroup(group: LowRankGroup) -> None:
    group.unstack()
    for member in group.members:
        member.group = None


def groups(model: nn.Module) -> list[LowRankGroup]:
    """The low-rank groups of `model`'s layers, in module order."""
    return list({id(m.group): m.group for m in model.modules()
                 if isinstance(m, LowRankLinear) and m.group is not None}.values())


def set_grouped(model: nn.Module, enabled: bool) -> None:
    """Switch grouped computation on or off for every group of `model` (the weights stay as they are)."""
    for group in groups(model):
        group.enabled, group._pending = enabled, None


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
    for group in groups(model):  # the A factors of a group stacked again, in the kernel's layout
        group.kernel = resolved
        group.stack()
    return resolved


def default_kernel() -> str:
    """The kernel `bltool.load_model` selects: $BLTOOL_LOWRANK_KERNEL, else auto."""
    kernel = os.environ.get(KERNEL_ENV, "") or "auto"
    if kernel not in KERNELS:
        raise UsageError(f"${KERNEL_ENV} must be one of {', '.join(KERNELS)}, got {kernel!r}")
    return kernel
