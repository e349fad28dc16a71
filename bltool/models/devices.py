"""Devices and dtypes: what `--device` and `--dtype` accept and what they resolve to."""

from __future__ import annotations

import functools
import os

from bltool.errors import UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_BF16_ENV = "BLTOOL_CPU_BF16"  # "1": `auto` takes bf16 on a CPU with native bf16 (distill, teacher-logits)


def check_dtype(dtype: str, flag: str = "--dtype") -> None:
    if dtype not in DTYPES:
        raise UsageError(f"{flag} must be one of {', '.join(DTYPES)}, got {dtype!r}")


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX, through oneDNN), by torch's own
    checks, or the kernel's CPU flags where this torch lacks them."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(check is not None for check in checks):
        return any(check() for check in checks)
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    return any(line.startswith("flags") and {"avx512_bf16", "amx_bf16"} & set(line.split())
               for line in text.splitlines())


def cpu_bf16() -> bool:
    """Whether `auto` picks bfloat16 for a CPU's frozen weights: only when asked (BLTOOL_CPU_BF16=1) on a CPU
    with native bf16. Not by default: native bf16 by the CPU's flags does not mean faster (on a 2-core Xeon
    with AVX512-BF16 and no AMX, bf16 matmuls ran at half float32's rate and the teacher 1.4× slower, while a
    2-core EPYC's ran 2.5× faster; docs/benchmarks.md), and a dtype picked by a timing would make a run's
    precision depend on the machine's load."""
    return os.environ.get(CPU_BF16_ENV, "0") == "1" and native_bf16()


def resolve_dtype(dtype: str, device: str, cpu_auto_bf16: bool = False):
    """`auto` is bfloat16 on CUDA and float32 on CPU; with `cpu_auto_bf16` (the stages whose frozen weights
    only feed training or a cache: distill, teacher-logits) bfloat16 on a CPU with native bf16 too
    (`cpu_bf16`). Evaluation keeps float32 on every CPU, so that its figures compare across machines."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") or (cpu_auto_bf16 and device == "cpu" and cpu_bf16()):
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def dtype_name(dtype) -> str:
    """`torch.bfloat16` → "bfloat16", as manifests record it."""
    return str(dtype).replace("torch.", "")


def resolve_device(device: str, flag: str = "--device") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"{flag} {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"{flag} must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device
