"""Choosing which teacher layers a student keeps (docs/method.md §1)."""

from __future__ import annotations

import numpy as np

from bltool.errors import UsageError

MODES = ("first", "middle", "last", "mixed")
MODE_ALIASES = {"truncated": "first"}


def canonical_mode(mode: str) -> str:
    mode = MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)} (or 'truncated' for 'first'), got {mode!r}")
    return mode


def select_layers(n_teacher: int, n_student: int, mode: str) -> list[int]:
    """Teacher layer indices, ascending, that become student layers 0..n-1.

    first: 0..n-1 · last: N-n..N-1 · middle: the block of n centred in the teacher, start (N-n)//2 ·
    mixed: round(linspace(0, N-1, n)) — the first and last layers plus evenly spaced ones between
    (numpy rounding, half to even). N=12, n=6 → [0, 2, 4, 7, 9, 11].
    """
    mode = canonical_mode(mode)
    if not 1 <= n_student <= n_teacher:
        raise UsageError(f"--layers must be between 1 and {n_teacher} (the teacher's depth), got {n_student}")
    if mode == "first":
        return list(range(n_student))
    if mode == "last":
        return list(range(n_teacher - n_student, n_teacher))
    if mode == "middle":
        start = (n_teacher - n_student) // 2
        return list(range(start, start + n_student))
    indices = [int(i) for i in np.round(np.linspace(0, n_teacher - 1, n_student))]
    assert len(set(indices)) == n_student, indices  # spacing ≥ 1 keeps rounded values distinct
    return indices
