"""Parsers for the quantities users type on the command line: counts, byte sizes and integer lists.

Each returns a plain number (configs hold parsed values) and raises a UsageError naming the flag.
"""

from __future__ import annotations

import math
import re

from bltool.errors import UsageError

COUNT_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "ki": 2**10, "mi": 2**20, "gi": 2**30,
              "ti": 2**40}


def parse_count(text: str, flag: str) -> int:
    """A count such as 2000000, 2_000_000, 500k, 2M or 1.5B."""
    value = str(text).strip().replace("_", "").lower()
    factor = COUNT_SUFFIXES.get(value[-1:], 1)
    number = value[:-1] if factor > 1 else value
    try:
        count = float(number) * factor
    except ValueError:
        raise UsageError(f"{flag} must be a count like 2000000, 500k or 2M, got {text!r}") from None
    if not math.isfinite(count) or not count.is_integer():
        raise UsageError(f"{flag} must be a whole count, got {text!r}")
    return int(count)


def parse_bytes(text: str, flag: str) -> int:
    """`80GiB`, `80Gi`, `80GB` (10^9), `1.5e9` or a plain byte count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in BYTE_UNITS:
        raise UsageError(f"{flag} expects a size such as 80GiB, 80GB or a byte count, got {text!r}")
    return int(float(match.group(1)) * BYTE_UNITS[unit])


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """'1,8,32' → (1, 8, 32)."""
    try:
        return tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers like 1,8,32, got {text!r}") from None


def parse_names(text: str) -> tuple[str, ...]:
    """'q_proj, k_proj,' → ('q_proj', 'k_proj'): a comma-separated list, blanks dropped."""
    return tuple(part.strip() for part in str(text).split(",") if part.strip())


def format_bytes(count: int) -> str:
    """A byte count for people: 85899345920 → '80 GiB', 1536 → '1.5 KiB', 512 → '512 B'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if value.is_integer() else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} TiB"  # pragma: no cover (the loop returns at TiB)
