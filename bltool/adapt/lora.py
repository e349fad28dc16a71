"""Gated LoRA linear layer, `GatedLoRALinear` (docs/method.md §2), and its injection into a model (`inject_lora`).

The low-rank path never builds the d_out × d_in matrix. The LoRA parameters are float32 even when the frozen
base weight is bfloat16 (`distill --dtype`): the low-rank path runs on its input upcast to float32 and its
output is cast back to the input's dtype, so the parameters and their optimizer state keep full precision.
ρ enters the computation as a tensor and the skip (ρ == 0 or not) is the module's only Python branch, so
`torch.compile` (`distill --compile`) compiles each layer at most once per set of skipped modules, not once
per value of ρ.

Plain LoRA (`kd-lora`) is the same layer with `gated=False` and ρ left at 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bltool.adapt.kernels import frozen_linear
from bltool.checks import check_lora
from bltool.errors import UsageError
from bltool.models.families import DEFAULT_TARGETS


class GatedLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int = 128, alpha: float = 256.0, dropout: float = 0.05,
                 gated: bool = True, gate_init: float = 4.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = rank
        self.scaling = alpha / rank
        device, dtype = base.weight.device, torch.promote_types(base.weight.dtype, torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        self.gate_logits = (
            nn.Parameter(torch.full((rank,), float(gate_init), device=device, dtype=dtype)) if gated else None
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("rho", torch.ones((), dtype=torch.float32))
        self._rho = 1.0  # Python mirror of the buffer: the skip decision must not sync the device
        self._dense = True  # ρ > 0: the only Python branch of forward (a compiled graph guards on it)
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_rho())

    # -- retention ------------------------------------------------------------------------------

    def set_rho(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {value}")
        self._rho = float(torch.tensor(value, dtype=torch.float32))  # the value the buffer holds
        self._dense = self._rho > 0.0
        self.rho.fill_(self._rho)

    def _sync_rho(self) -> None:
        self._rho = float(self.rho)
        self._dense = self._rho > 0.0

    @property
    def dense_active(self) -> bool:
        return self._rho > 0.0

    # -- forward --------------------------------------------------------------------------------

    def gates(self) -> torch.Tensor | None:
        return torch.sigmoid(self.gate_logits) if self.gate_logits is not None else None

    def lora(self, x: torch.Tensor) -> torch.Tensor:
        """(α/r) · B · diag(g) · A · dropout(x): (..., d_in) → (..., d_out), two thin matmuls (`_LoRAPath`)."""
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        mask = torch.rand(x.shape, device=x.device) >= p if self.training and p > 0 else None
        if not torch.is_grad_enabled():
            return _LoRAPath.compute(x, mask, self.lora_A, self.lora_B, self.gate_logits, 1.0 / (1.0 - p),
                                     self.scaling)[0]
        return _LoRAPath.apply(x, mask, self.lora_A, self.lora_B, self.gate_logits, 1.0 / (1.0 - p), self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lora(x)
        if not self._dense:
            return out  # ρ = 0: the dense weight is not touched
        dense = frozen_linear(x, self.base.weight, self.base.bias)  # W x (oneDNN on the CPU: bltool.adapt.kernels)
        return torch.addcmul(out, dense, self.rho.to(x.dtype))  # lora + ρ · W x, one fused op

    # -- accounting -----------------------------------------------------------------------------

    @property
    def dense_macs(self) -> int:
        """c_m: multiply-accumulates per token of the dense matmul."""
        return self.in_features * self.out_features

    @property
    def lora_macs(self) -> int:
        """MACs per token of the low-rank path at full rank: r · (d_in + d_out)."""
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}, "
                f"gated={self.gate_logits is not None}, rho={self._rho:.4g}")


class _LoRAPath(torch.autograd.Function):
    """The low-rank path `(α/r) · B · diag(g) · A · (x ⊙ m / (1 − p))`, keeping for the backward only what it
    cannot cheaply rebuild: x itself (the tensor the projections reading it share; q, k and v keep one
    copy between them, not three dropped-out ones), the dropout mask m as bool (a byte an element) and the
    rank-r code h = A · x_d. The dropped-out input and the gated code diag(g) · h are rebuilt in the
    backward (elementwise, no matmul is repeated). The path runs in the LoRA parameters' dtype (float32)
    on its input upcast, and returns the input's dtype. Under CUDA autocast it runs as autograd would
    (custom_fwd / custom_bwd keep the autocast state)."""

    @staticmethod
    def compute(x, mask, a, b, gate_logits, keep_scale: float, scaling: float):
        xd = x.to(a.dtype)
        if mask is not None:
            xd = xd * mask * keep_scale
        h = F.linear(xd, a)  # (..., r)
        code = h * torch.sigmoid(gate_logits) if gate_logits is not None else h
        return (F.linear(code, b) * scaling).to(x.dtype), h

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, mask, a, b, gate_logits, keep_scale: float, scaling: float):
        y, h = _LoRAPath.compute(x, mask, a, b, gate_logits, keep_scale, scaling)
        ctx.save_for_backward(x, mask, a, b, gate_logits, h)
        ctx.keep_scale, ctx.scaling = keep_scale, scaling
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y):
        x, mask, a, b, gate_logits, h = ctx.saved_tensors
        need_x, _, need_a, need_b, need_gate = ctx.needs_input_grad[:5]
        r = h.shape[-1]
        h2 = h.reshape(-1, r)
        gy = grad_y.reshape(-1, grad_y.shape[-1]).to(b.dtype) * ctx.scaling  # (n, d_out)
        gates = torch.sigmoid(gate_logits) if gate_logits is not None else None
        grad_b = gy.t() @ (h2 * gates if gates is not None else h2) if need_b else None
        grad_code = gy @ b.to(gy.dtype)  # (n, r)
        grad_gate = (grad_code * h2).sum(0) * gates * (1 - gates) if need_gate and gates is not None else None
        grad_h = grad_code * gates if gates is not None else grad_code
        grad_a = grad_x = None
        if need_a:
            xd = x.reshape(-1, x.shape[-1]).to(a.dtype)
            if mask is not None:
                xd = xd * mask.reshape(xd.shape) * ctx.keep_scale
            grad_a = grad_h.t() @ xd
        if need_x:
            gx = grad_h @ a
            if mask is not None:
                gx = gx * mask.reshape(gx.shape) * ctx.keep_scale
            grad_x = gx.reshape(x.shape).to(x.dtype)
        return grad_x, None, grad_a, grad_b, grad_gate, None, None


@dataclass(frozen=True)
class LoRASpec:
    rank: int = 128  # --rank: maximum LoRA rank r
    alpha: float = 256.0  # --lora-alpha: scaling is alpha / rank
    dropout: float = 0.05  # --lora-dropout on the low-rank path's input
    targets: tuple[str, ...] = DEFAULT_TARGETS  # --target-modules: linear layers by attribute name
    gated: bool = True  # per-rank gates (budgeted-lora) or plain LoRA (kd-lora)

    def __post_init__(self):
        check_lora(self.rank, self.alpha, self.dropout, self.targets)


def target_linears(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers whose attribute name is in `targets`, in registration order; every target
    must name at least one (a typo would otherwise train, or count, nothing)."""
    found = [(name, module) for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear)]
    missing = set(targets) - {name.rsplit(".", 1)[-1] for name, _ in found}
    if missing:
        raise UsageError(f"--target-modules: no linear layer named {sorted(missing)} in the model")
    return found


def inject_lora(model: nn.Module, spec: LoRASpec) -> list[tuple[str, GatedLoRALinear]]:
    """Freeze `model` and wrap every nn.Linear whose attribute name is in `spec.targets`.

    Returns the adapted modules as (qualified name, module) in `named_modules()` registration order,
    the order the budget controller uses to break cost ties.
    """
    found = target_linears(model, spec.targets)
    model.requires_grad_(False)
    adapted = []
    for name, linear in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = GatedLoRALinear(linear, spec.rank, spec.alpha, spec.dropout, spec.gated)
        setattr(parent, attr, wrapped)
        adapted.append((name, wrapped))
    return adapted
