"""Batch-iteration time as a function of what the iteration processed: b(p, d, k) of docs/method.md §8,
fitted by least squares, no coefficient negative (`fit` → `IterationModel`), to the iterations
`bench-serving` recorded; the fit's error is kept beside it, so a plan can say how well the form
describes the server. A constant b̄ is the special case c_p = c_d = c_a = 0.

The attention term c_a · (p + d) · k: transformers' paged attention on CPU packs the batch into one query ×
key product, (p + d) queries against all k keys (masked), so on this CPU an iteration carrying a 256-token
chunk beside 8 long decodes costs far more than either alone; kernels that attend per request cost less,
and the fit then gives the term a small coefficient.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class IterationModel:
    """`b(p, d, k) = intercept_s + prefill_token_s · p + decode_seq_s · d + attention_s · (p + d) · k` s."""

    intercept_s: float
    prefill_token_s: float = 0.0
    decode_seq_s: float = 0.0
    attention_s: float = 0.0  # per query token × KV token of the batch
    # the fit's quality on its own records (absent for a constant)
    records: int = 0
    rmse_s: float | None = None
    mean_abs_rel_error: float | None = None  # mean |b − fit| / b over the records
    r2: float | None = None

    def seconds(self, prefill_tokens, decode_seqs, kv_tokens=0):
        """Iteration time; scalars or arrays."""
        p, d = np.asarray(prefill_tokens), np.asarray(decode_seqs)
        return (self.intercept_s + self.prefill_token_s * p + self.decode_seq_s * d
                + self.attention_s * (p + d) * np.asarray(kv_tokens))

    @classmethod
    def constant(cls, seconds: float) -> IterationModel:
        return cls(intercept_s=float(seconds))

    def scaled(self, factor: float) -> IterationModel:
        """Every iteration `factor` times as long (the same machine, busier or idler); no fit quality."""
        return IterationModel(intercept_s=self.intercept_s * factor, prefill_token_s=self.prefill_token_s * factor,
                              decode_seq_s=self.decode_seq_s * factor, attention_s=self.attention_s * factor)

    @property
    def is_constant(self) -> bool:
        return self.prefill_token_s == 0.0 and self.decode_seq_s == 0.0 and self.attention_s == 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IterationModel:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def fit(prefill_tokens, decode_seqs, seconds, kv_tokens=None) -> IterationModel:
    """Least-squares fit of the iteration times (without `kv_tokens`, no attention term). Coefficients
    are kept non-negative: an iteration does not get faster with more work, so a negative slope (noise,
    or a feature that never varied) is set to zero and the rest refitted; so is a negative intercept (an
    iteration takes no less than nothing), which a noisy run whose iterations all did much work can give.
    Where that leaves an iteration of one prompt token or one decoding request costing nothing, the fit
    is the constant mean instead."""
    p = np.asarray(prefill_tokens, dtype=np.float64)
    d = np.asarray(decode_seqs, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    k = np.zeros_like(y) if kv_tokens is None else np.asarray(kv_tokens, dtype=np.float64)
    if not (len(p) == len(d) == len(y) == len(k)) or len(y) < 3:
        raise ValueError("an iteration-time fit needs at least 3 records of equal length")
    columns = {"prefill_token_s": p, "decode_seq_s": d, "attention_s": (p + d) * k}
    intercept = True
    while True:
        names = [n for n, c in columns.items() if c.std() > 0]
        design = np.column_stack([np.ones_like(y)] * intercept + [columns[n] for n in names])
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        if not intercept:
            coef = np.concatenate([[0.0], coef[:len(names)]])
        negative = [n for n, c in zip(names, coef[1:]) if c < 0]
        if not negative and coef[0] >= 0:
            break
        for n in negative:
            columns[n] = np.zeros_like(y)
        if not negative:  # only the intercept: through the origin
            intercept = False
    slopes = dict(zip(names, (float(c) for c in coef[1:])))
    model = IterationModel(intercept_s=float(coef[0]), **slopes)
    if not (float(model.seconds(1, 0)) > 0 and float(model.seconds(0, 1)) > 0):
        # through the origin with a slope at zero: an iteration of that kind would take no time, which no
        # server does; the data cannot tell the overhead from the work, so b is their mean, a constant
        model = IterationModel.constant(float(y.mean()))
    predicted = model.seconds(p, d, k)
    residual = y - predicted
    total = float(((y - y.mean()) ** 2).sum())
    return IterationModel(
        intercept_s=model.intercept_s, prefill_token_s=model.prefill_token_s, decode_seq_s=model.decode_seq_s,
        attention_s=model.attention_s, records=len(y),
        rmse_s=float(math.sqrt((residual ** 2).mean())),
        mean_abs_rel_error=float((np.abs(residual) / np.maximum(y, 1e-12)).mean()),
        r2=1.0 - float((residual ** 2).sum()) / total if total > 0 else None,
    )
