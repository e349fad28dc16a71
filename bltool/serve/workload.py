"""Workloads for capacity planning: the joint distribution of prompt and output lengths.

A workload is a sample of (prompt tokens, output tokens) pairs, read from a trace (CSV, JSON Lines,
Arrow or Parquet with one row per request) or drawn from simple distributions given on the command
line. Capacity takes expectations over the rows, so a trace keeps the correlation between prompt and
output lengths that the quadratic lifetime memory g(s, o) is sensitive to. Bad input raises
`UsageError` with one line naming the flag, the file and the first offending row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bltool.errors import UsageError

TRACE_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json", ".arrow": "arrow",
                  ".feather": "arrow", ".ipc": "arrow", ".parquet": "parquet"}
DISTRIBUTIONS = "N (fixed), uniform:LOW:HIGH, lognormal:MEDIAN:SIGMA or geometric:MEAN"


@dataclass(frozen=True)
class Workload:
    """Prompt and output lengths of a sample of requests (one entry per request, int64, all ≥ 1)."""

    prompt: np.ndarray
    output: np.ndarray
    source: str  # the trace path, or the distribution flags

    def __len__(self) -> int:
        return len(self.prompt)

    def summary(self) -> dict:
        s, o = self.prompt.astype(np.float64), self.output.astype(np.float64)
        corr = float(np.corrcoef(s, o)[0, 1]) if len(s) > 1 and s.std() > 0 and o.std() > 0 else None
        return {
            "source": self.source,
            "requests": len(self),
            "mean_prompt": float(s.mean()),
            "mean_output": float(o.mean()),
            "max_prompt": int(self.prompt.max()),
            "max_output": int(self.output.max()),
            "max_request_tokens": int((self.prompt + self.output).max()),
            "prompt_output_correlation": corr,
        }


def _read_table(path: Path, flag: str):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    kind = TRACE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UsageError(f"{flag} {path}: unknown trace format {path.suffix!r}; use .csv, .jsonl, .arrow or .parquet")
    try:
        if kind == "csv":
            return pa.csv.read_csv(path)
        if kind == "json":
            return pa.json.read_json(path)
        if kind == "parquet":
            return pa.parquet.read_table(path)
        try:
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"{flag} {path}: cannot read it as {kind} ({first})") from None


def _lengths(table, column: str, path: Path, flag: str, column_flag: str) -> np.ndarray:
    import pyarrow as pa

    if column not in table.column_names:
        raise UsageError(
            f"{flag} {path}: no column {column!r} (columns: {', '.join(table.column_names) or 'none'}; "
            f"choose one with {column_flag})"
        )
    data = table.column(column)
    if not (pa.types.is_integer(data.type) or pa.types.is_floating(data.type)):
        raise UsageError(f"{flag} {path}: column {column!r} holds {data.type}, expected integer token counts")
    if data.null_count:
        row = int(np.flatnonzero(np.asarray(data.is_null()))[0]) + 1
        raise UsageError(f"{flag} {path}: column {column!r} is empty in row {row}")
    values = data.to_numpy()
    if pa.types.is_floating(data.type):
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise UsageError(
                f"{flag} {path}: column {column!r} row {row + 1} is {values[row]!r}, expected a whole number of tokens"
            )
    values = values.astype(np.int64)
    if (values < 1).any():
        row = int(np.flatnonzero(values < 1)[0])
        raise UsageError(
            f"{flag} {path}: column {column!r} row {row + 1} is {values[row]}, expected a length of at least 1 token"
        )
    return values


def read_trace(path: str | Path, prompt_column: str = "prompt_tokens", output_column: str = "output_tokens",
               flag: str = "--workload") -> Workload:
    """A trace file with one row per request and integer prompt / output token counts."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    table = _read_table(path, flag)
    if table.num_rows == 0:
        raise UsageError(f"{flag} {path}: the trace has no requests")
    prompt = _lengths(table, prompt_column, path, flag, "--prompt-column")
    output = _lengths(table, output_column, path, flag, "--output-column")
    return Workload(prompt, output, str(path))


def sample_lengths(spec: str, n: int, rng: np.random.Generator, flag: str) -> np.ndarray:
    """`n` lengths from a distribution spec: N, uniform:LOW:HIGH (inclusive), lognormal:MEDIAN:SIGMA
    (rounded, at least 1) or geometric:MEAN (support 1, 2, …)."""
    name, *args = spec.strip().split(":")
    try:
        numbers = [float(a) for a in args]
        if not args:
            fixed = float(name)
            if fixed != round(fixed) or fixed < 1:
                raise UsageError(f"{flag} {spec!r}: a fixed length must be a whole number ≥ 1")
            return np.full(n, int(fixed), dtype=np.int64)
    except ValueError:
        raise UsageError(f"{flag} {spec!r}: expected {DISTRIBUTIONS}") from None
    if name == "uniform" and len(numbers) == 2:
        low, high = numbers
        if low != round(low) or high != round(high) or not 1 <= low <= high:
            raise UsageError(f"{flag} {spec!r}: uniform needs whole numbers 1 ≤ LOW ≤ HIGH")
        return rng.integers(int(low), int(high), size=n, endpoint=True)
    if name == "lognormal" and len(numbers) == 2:
        median, sigma = numbers
        if median < 1 or sigma < 0:
            raise UsageError(f"{flag} {spec!r}: lognormal needs MEDIAN ≥ 1 and SIGMA ≥ 0")
        return np.maximum(1, np.rint(rng.lognormal(np.log(median), sigma, size=n))).astype(np.int64)
    if name == "geometric" and len(numbers) == 1:
        (mean,) = numbers
        if mean < 1:
            raise UsageError(f"{flag} {spec!r}: geometric needs MEAN ≥ 1")
        return rng.geometric(1.0 / mean, size=n).astype(np.int64)
    raise UsageError(f"{flag} {spec!r}: expected {DISTRIBUTIONS}")


def synthetic(prompt_spec: str, output_spec: str, samples: int, seed: int) -> Workload:
    """Independent prompt and output lengths drawn from the two specs (seeded)."""
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    rng = np.random.default_rng(seed)
    prompt = sample_lengths(prompt_spec, samples, rng, "--prompt-len")
    output = sample_lengths(output_spec, samples, rng, "--output-len")
    return Workload(prompt, output, f"--prompt-len {prompt_spec} --output-len {output_spec} "
                                    f"(samples {samples}, seed {seed})")


def check_fits(workload: Workload, m_tokens: int, what: str, flag: str = "--workload") -> None:
    """Every request must fit in the KV memory on its own (its peak is s + o tokens), or it can never run."""
    total = workload.prompt + workload.output
    if int(total.max()) > m_tokens:
        row = int(np.argmax(total > m_tokens))
        raise UsageError(
            f"{flag} {workload.source}: request {row + 1} needs {int(total[row]):,} KV tokens "
            f"(prompt {int(workload.prompt[row]):,} + output {int(workload.output[row]):,}), more than "
            f"M = {m_tokens:,} for {what}; give more --gpu-mem or a smaller model"
        )
