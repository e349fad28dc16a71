"""The standard errors `report` decides with (docs/method.md §6), free of torch: a perplexity's over units
(`ratio_se`), two perplexities' paired log ratio over the same windows (`paired_log_ratio`) and two ICL runs'
paired difference over the same queries (`paired_icl`).

Perplexity's input is `eval-ppl`'s `windows.arrow` (`read_pieces`): one row per piece of a scored window that
belongs to one document (`window`, `document`, `tokens` scored, their `bytes`, `nll` = Σ NLL in nats), in
scoring order; a window holding the end of one document and the start of the next has two rows. `document`
is null when the prepared data does not mark its documents exactly (`bltool.eval.nll.document_separator`).
ICL's is `eval-icl`'s `predictions.arrow` (`read_predictions`), matched by task, seed and query index, with
the same input and target; per task the SE is `probes.standard_error`'s, combined over tasks as
`probes.composite_se` combines a composite's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from bltool.eval.probes import composite_se, standard_error

WINDOWS = "windows.arrow"  # eval-ppl's per-piece NLL sums
PREDICTIONS = "predictions.arrow"  # eval-icl's per-query answers
SCHEMA = pa.schema([("window", pa.int64()), ("document", pa.int64()), ("tokens", pa.int64()),
                    ("bytes", pa.int64()), ("nll", pa.float64())])


def ratio_se(num: np.ndarray, den: np.ndarray) -> float | None:
    """Standard error of Σ num / Σ den over len(num) independent units, by the delta method; None for
    fewer than two units or nothing in the denominator."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    k, total = len(num), float(den.sum())
    if k < 2 or total <= 0:
        return None
    residual = num - float(num.sum()) / total * den
    return math.sqrt(k / (k - 1) * float(np.square(residual).sum())) / total


def _group(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sums of `values` per distinct key, in the order of first appearance."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(first))
    return sums[np.argsort(first)]


@dataclass(frozen=True)
class Pieces:
    """An evaluation's NLL sums per (window, document) piece, in scoring order: what windows.arrow holds."""

    window: np.ndarray  # int64: the window's index among the held-out split's windows, in file order
    document: np.ndarray | None  # int64: the document's index in the held-out split; None: not known
    tokens: np.ndarray  # int64: tokens scored (a window's first token is not)
    bytes: np.ndarray  # int64: their UTF-8 bytes
    nll: np.ndarray  # float64: Σ NLL in nats

    @classmethod
    def from_rows(cls, rows: list[dict]) -> Pieces:
        column = {k: [r[k] for r in rows] for k in SCHEMA.names}
        known = bool(rows) and all(d is not None for d in column["document"])
        return cls(np.asarray(column["window"], dtype=np.int64),
                   np.asarray(column["document"], dtype=np.int64) if known else None,
                   np.asarray(column["tokens"], dtype=np.int64), np.asarray(column["bytes"], dtype=np.int64),
                   np.asarray(column["nll"], dtype=np.float64))

    def table(self) -> pa.Table:
        document = [None] * len(self.window) if self.document is None else self.document
        return pa.Table.from_arrays([pa.array(self.window, pa.int64()), pa.array(document, pa.int64()),
                                     pa.array(self.tokens, pa.int64()), pa.array(self.bytes, pa.int64()),
                                     pa.array(self.nll, pa.float64())], schema=SCHEMA)

    def per_window(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(window ids, tokens scored, bytes, Σ NLL) per window, in order."""
        ids = self.window[np.sort(np.unique(self.window, return_index=True)[1])]
        tokens, nbytes = (_group(self.window, column).astype(np.int64) for column in (self.tokens, self.bytes))
        return ids, tokens, nbytes, _group(self.window, self.nll)

    def units(self, by_documents: bool = True) -> tuple[str, np.ndarray, np.ndarray]:
        """("documents" | "windows", Σ NLL per unit, tokens per unit): documents when known, asked for and
        at least two, else windows."""
        if by_documents and self.document is not None and len(np.unique(self.document)) >= 2:
            return "documents", _group(self.document, self.nll), _group(self.document, self.tokens)
        _, tokens, _, nll = self.per_window()
        return "windows", nll, tokens.astype(np.float64)

    def summary(self) -> dict:
        """Mean NLL, perplexity and their standard errors, and what the SE was taken over."""
        unit, nll, tokens = self.units()
        mean = float(self.nll.sum()) / float(self.tokens.sum())
        se = ratio_se(nll, tokens)
        return {"mean_nll": mean, "mean_nll_se": se, "perplexity": math.exp(mean),
                "perplexity_se": None if se is None else math.exp(mean) * se, "se_unit": unit, "se_units": len(tokens)}

    def first_tokens(self, budget: int, max_tokens: int) -> Pieces | None:
        """The pieces of the windows `budget` tokens of held-out windows hold (`nll.heldout_windows`' rule:
        windows in file order, the last one cut to what is left), taken from an evaluation that scored
        `max_tokens`; None when that evaluation did not score exactly those windows (one of them cut
        elsewhere, or the budget reaches past what it scored)."""
        ids, tokens, _, _ = self.per_window()
        lengths = tokens + 1  # a window's first token is in it, not scored
        complete = int(lengths.sum()) < max_tokens - 1  # it stopped at the split's end, not its budget
        if budget > max_tokens and not complete:
            return None
        left, keep = budget, []
        for window, length in zip(ids, lengths):
            if left < 2:
                break
            if length > left:  # the slice cuts this window shorter than the evaluation scored it
                return None
            keep.append(window)
            left -= int(length)
        else:
            if left >= 2 and not complete:
                return None
        mask = np.isin(self.window, keep)
        return Pieces(self.window[mask], None if self.document is None else self.document[mask], self.tokens[mask],
                      self.bytes[mask], self.nll[mask])


def read_pieces(directory: Path | None) -> Pieces | None:
    """An eval-ppl run's windows.arrow, or None where it has none (written before bltool recorded it)."""
    path = Path(directory) / WINDOWS if directory is not None else None
    if path is None or not path.is_file():
        return None
    with pa.memory_map(str(path)) as source:
        return Pieces.from_rows(pa.ipc.open_stream(source).read_all().to_pylist())


@dataclass(frozen=True)
class Paired:
    """A paired comparison of two evaluations on the same units."""

    estimate: float  # log(ppl_a / ppl_b), or composite_a − composite_b
    se: float | None  # its paired standard error (None: too few units)
    unit: str  # what it was paired over: "documents", "windows" or "queries"
    units: int
    identical: bool  # every paired difference is 0


def paired_log_ratio(a: Pieces, b: Pieces) -> Paired | str:
    """log(ppl_a / ppl_b) with its paired standard error over the units both were scored on; a reason
    (str) when they were not scored on the same windows."""
    wa, wb = a.per_window(), b.per_window()
    if not all(np.array_equal(x, y) for x, y in zip(wa[:3], wb[:3])):
        return "not scored on the same windows"
    same_documents = (a.document is not None and b.document is not None and np.array_equal(a.window, b.window)
                      and np.array_equal(a.document, b.document) and np.array_equal(a.tokens, b.tokens))
    unit, nll_a, tokens = a.units(by_documents=same_documents)
    _, nll_b, _ = b.units(by_documents=same_documents)
    difference = nll_a - nll_b
    return Paired(float(difference.sum()) / float(tokens.sum()), ratio_se(difference, tokens), unit, len(tokens),
                  bool(np.all(difference == 0)))


def read_predictions(directory: Path | None) -> dict[tuple[str, int, int], tuple[str, str, bool]] | None:
    """An eval-icl run's answers: {(task, seed, query): (input, target, correct)}; None without them."""
    path = Path(directory) / PREDICTIONS if directory is not None else None
    if path is None or not path.is_file():
        return None
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    columns = ("task", "seed", "query", "input", "target", "correct")
    if not set(columns) <= set(table.column_names):
        return None
    return {(r["task"], int(r["seed"]), int(r["query"])): (r["input"], r["target"], bool(r["correct"]))
            for r in table.select(list(columns)).to_pylist()}


def paired_icl(a: dict, b: dict) -> Paired | str:
    """The difference of two ICL composites (macro averages over tasks of the mean correctness) with its
    paired standard error over the queries both asked (`read_predictions`' form); a reason (str) when they
    did not ask the same queries."""
    if a.keys() != b.keys() or any(a[k][:2] != b[k][:2] for k in a):
        return "not asked the same queries"
    if not a:
        return "no queries"
    grids: dict[str, dict[int, dict[int, float]]] = {}
    for (task, seed, query), (_, _, correct) in a.items():
        grids.setdefault(task, {}).setdefault(seed, {})[query] = float(correct) - float(b[task, seed, query][2])
    differences, ses = [], []
    for by_seed in grids.values():
        seeds = sorted(by_seed)
        queries = sorted(by_seed[seeds[0]])
        if any(sorted(by_seed[s]) != queries for s in seeds):
            return "not asked the same queries under every seed"
        grid = [[by_seed[s][q] for q in queries] for s in seeds]
        differences.append(sum(map(sum, grid)) / (len(seeds) * len(queries)))
        ses.append(standard_error(grid))
    identical = all(a[k][2] == b[k][2] for k in a)
    return Paired(sum(differences) / len(differences), composite_se(ses), "queries",
                  len({(t, q) for t, _, q in a}), identical)
