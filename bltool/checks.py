"""Range checks of settings that both the config layer (`configs.py`, torch-free) and the components
(`adapt/lora.py`, `adapt/compression.py`, `train/losses.py`) apply: written once, each error naming the flag."""

from __future__ import annotations

import math

from bltool.errors import UsageError


def check_lora(rank: int, alpha: float, dropout: float, targets) -> None:
    """--rank, --lora-alpha, --lora-dropout, --target-modules (docs/method.md §2)."""
    if rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    if alpha <= 0:
        raise UsageError(f"--lora-alpha must be positive, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"--lora-dropout must be in [0, 1), got {dropout}")
    if not targets:
        raise UsageError("--target-modules must name at least one module")


def check_kd(temperature: float, kd_weight: float, chunk: int = 1) -> None:
    """--temperature, --kd-weight, --chunk (docs/method.md §4)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"--temperature must be a positive number, got {temperature}")
    if not 0.0 <= kd_weight <= 1.0:  # also rejects NaN
        raise UsageError(f"--kd-weight must be in [0, 1], got {kd_weight}")
    if chunk < 1:
        raise UsageError(f"--chunk must be at least 1, got {chunk}")


def check_compression(tau_rank: float, tau_drop: float, tau_svd: float, k_max: int) -> None:
    """--tau-rank, --tau-drop, --tau-svd, --k-max (docs/method.md §5)."""
    if not 0.0 <= tau_rank <= 1.0:
        raise UsageError(f"--tau-rank must be in [0, 1], got {tau_rank}")
    if not 0.0 <= tau_drop < tau_svd <= 1.0:
        raise UsageError(f"--tau-drop must be below --tau-svd, both in [0, 1]; got {tau_drop} and {tau_svd}")
    if k_max < 1:
        raise UsageError(f"--k-max must be at least 1, got {k_max}")
