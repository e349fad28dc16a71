"""Devices and dtypes: what `--device` and `--dtype` accept and what they resolve to."""

from __future__ import annotations

from bltool.errors import UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_dtype(dtype: str, flag: str = "--dtype") -> None:
    if dtype not in DTYPES:
        raise UsageError(f"{flag} must be one of {', '.join(DTYPES)}, got {dtype!r}")


def resolve_dtype(dtype: str, device: str):
    """`auto` is bfloat16 on CUDA and float32 on CPU."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_device(device: str, flag: str = "--device") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"{flag} {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"{flag} must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device
