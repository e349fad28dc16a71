"""Gated LoRA linear layer (docs/method.md §2) and its injection into a model.

    y = ρ · W x  +  (α / r) · B · diag(g) · A · dropout(x)

W is the frozen dense weight (with its bias, if any, scaled by ρ as well). A (r × d_in) and
B (d_out × r) are the LoRA factors, and B starts at zero so the module starts equal to the dense layer.
g = sigmoid(γ) are per-rank gates with trainable logits γ started at +4 (g ≈ 0.98). ρ ∈ [0, 1] is the
dense retention coefficient: a buffer that the budget controller sets, not gradients. When ρ == 0 the
dense matmul is not computed at all. The low-rank path never builds the d_out × d_in matrix.

The LoRA parameters are float32 even when the frozen base weight is bfloat16 (`distill --dtype`): the
low-rank path runs on its input upcast to float32 and its output is cast back to the input's dtype, so
the parameters and their optimizer state keep full precision. ρ enters the computation as a tensor and
the skip (ρ == 0 or not) is the module's only Python branch, so `torch.compile` (`distill --compile`)
compiles each layer at most once per set of skipped modules, not once per value of ρ.

Plain LoRA (`kd-lora`) is the same layer with `gated=False` and ρ left at 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bltool.errors import UsageError
from bltool.kernels import frozen_linear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
        """(α/r) · B · diag(g) · A · dropout(x): (..., d_in) → (..., d_out), two thin matmuls."""
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # (..., r)
        if self.gate_logits is not None:
            h = h * torch.sigmoid(self.gate_logits)
        return (F.linear(h, self.lora_B) * self.scaling).to(x.dtype)  # (..., d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lora(x)
        if not self._dense:
            return out  # ρ = 0: the dense weight is not touched
        dense = frozen_linear(x, self.base.weight, self.base.bias)  # W x (oneDNN on the CPU: bltool.kernels)
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


@dataclass(frozen=True)
class LoRASpec:
    rank: int = 128  # --rank: maximum LoRA rank r
    alpha: float = 256.0  # --lora-alpha: scaling is alpha / rank
    dropout: float = 0.05  # --lora-dropout on the low-rank path's input
    targets: tuple[str, ...] = DEFAULT_TARGETS  # --target-modules: linear layers by attribute name
    gated: bool = True  # per-rank gates (budgeted-lora) or plain LoRA (kd-lora)

    def __post_init__(self):
        if self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise UsageError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise UsageError("--target-modules must name at least one module")


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
