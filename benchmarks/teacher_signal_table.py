"""The table and figure of benchmarks/teacher_signal.sh: per teacher signal, bytes per token, the final
held-out perplexity of each seed's student (± its standard error over the held-out documents), the seed
spread, and the paired log-ratio against the live-teacher student of the same seed (± its paired standard
error over the same documents); the learning curves of every run on one figure.

    python benchmarks/teacher_signal_table.py runs/signal        # prints Markdown, writes runs/signal/signal.png
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path

import pyarrow as pa

from bltool.eval.stats import paired_log_ratio, read_pieces

NAME = re.compile(r"^(?P<signal>live|top-k-\d+|sample-\d+)-s(?P<seed>\d+)$")


def _log(path: Path) -> dict[str, list]:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pydict()


def runs(root: Path) -> dict[str, dict[int, Path]]:
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(root.iterdir()):
        match = NAME.match(path.name)
        if match and (path / "manifest.json").is_file():
            found.setdefault(match["signal"], {})[int(match["seed"])] = path
    return found


def bytes_per_token(root: Path, signal: str, seed: int) -> float | None:
    if signal == "live":
        return None
    manifest = json.loads((root / f"cache-{signal}-s{seed}" / "manifest.json").read_text())
    return manifest.get("cache", {}).get("bytes_per_token")


def table(root: Path) -> str:
    found = runs(root)
    teacher = read_pieces(root / "teacher-ppl")
    lines = ["| signal | bytes/token | held-out ppl per seed (± SE) | mean | seed spread "
             "| log(ppl / live ppl) per seed (± paired SE) |", "|---|---:|---|---:|---:|---|"]
    order = sorted(found, key=lambda s: (s != "live", s.split("-")[0], -int(s.split("-")[-1]) if s != "live" else 0))
    for signal in order:
        seeds = found[signal]
        ppls, cells, paired = [], [], []
        for seed, path in sorted(seeds.items()):
            pieces = read_pieces(root / "ppl" / path.name)
            if pieces is None:
                continue
            summary = pieces.summary()
            ppls.append(summary["perplexity"])
            cells.append(f"s{seed}: {summary['perplexity']:.1f} ± {summary['perplexity_se'] or 0:.1f}")
            live = found.get("live", {}).get(seed)
            live_pieces = read_pieces(root / "ppl" / live.name) if live is not None else None
            if signal != "live" and live_pieces is not None:
                result = paired_log_ratio(pieces, live_pieces)
                paired.append(f"s{seed}: {result.estimate:+.3f} ± {result.se or 0:.3f}" if not isinstance(result, str)
                              else f"s{seed}: {result}")
        size = bytes_per_token(root, signal, min(seeds))
        mean = statistics.fmean(ppls) if ppls else math.nan
        spread = (max(ppls) - min(ppls)) / mean if len(ppls) > 1 else math.nan
        lines.append(f"| {signal} | {'—' if size is None else f'{size:.0f}'} | {'; '.join(cells)} | {mean:.1f} | "
                     f"{'—' if math.isnan(spread) else f'{spread:.0%}'} | {'; '.join(paired) or '—'} |")
    if teacher is not None:
        t = teacher.summary()
        lines.append(f"\nTeacher on the same held-out split: {t['perplexity']:.2f} ± {t['perplexity_se'] or 0:.2f}.")
    return "\n".join(lines)


def figure(root: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = runs(root)
    colors = dict(zip(sorted(found), plt.get_cmap("tab10").colors))
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for signal, seeds in sorted(found.items()):
        for k, (seed, path) in enumerate(sorted(seeds.items())):
            log = _log(path / "log.arrow")
            points = [(t, p) for t, p in zip(log["tokens"], log["eval_ppl"]) if p is not None]
            ax.plot([t for t, _ in points], [p for _, p in points], color=colors[signal], linestyle=styles[k % 4],
                    marker="o", markersize=3, label=f"{signal} (seed {seed})")
    teacher = read_pieces(root / "teacher-ppl")
    if teacher is not None:
        ax.axhline(teacher.summary()["perplexity"], color="black", linewidth=1, linestyle="--", label="teacher")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity (whole split)")
    ax.set_title("one student, one token budget: which teacher signal")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = root / "signal.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/signal")
    print(table(root))
    print(f"\n![teacher signal]({figure(root)})")
