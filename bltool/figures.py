"""The report's figures (matplotlib, Agg backend, PNG): the quality / inference-cost frontier, ICL
against budget, and the dense fraction along training. Each takes report rows and returns nothing but
the file it wrote; a figure with nothing to plot says so in its title rather than being skipped."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from bltool.runs import Row

COLORS = {"kd-full": "tab:red", "kd-lora": "tab:orange", "budgeted-lora": "tab:blue", "teacher": "black",
          "student (untrained)": "tab:gray"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, path: Path, legend_size: int = 8) -> Path:
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label(row: Row) -> str:
    return f"{row.method} F={row.budget:g}" if row.budget is not None else row.method


def frontier(rows: list[Row], path: Path) -> Path:
    """Perplexity (log scale) against relative inference cost of the adapted modules (1 / MAC speedup):
    the lower-left points are the better trade-offs; the frontier joins those no other point beats."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    points = [(1.0 / r.values["mac_speedup"], r.values["perplexity"], r) for r in rows
              if r.values.get("mac_speedup") and r.values.get("perplexity")]
    for i, (cost, ppl, row) in enumerate(sorted(points, key=lambda p: (p[0], p[1]))):
        ax.scatter(cost, ppl, color=COLORS.get(row.method, "tab:green"), zorder=3)
        # alternate labels above and below so that neighbours at similar cost stay readable
        ax.annotate(_label(row), (cost, ppl), textcoords="offset points", xytext=(5, 5 if i % 2 else -12),
                    fontsize=8)
    best, front = float("inf"), []
    for cost, ppl, _ in sorted(points, key=lambda p: (p[0], p[1])):
        if ppl < best:
            best = ppl
            front.append((cost, ppl))
    if len(front) > 1:
        ax.plot(*zip(*front), color="tab:blue", alpha=0.4, zorder=2, label="frontier")
    for row in rows:
        if row.method == "teacher" and row.values.get("perplexity"):
            ax.axhline(row.values["perplexity"], color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_yscale("log")
    ax.set_xlabel("inference cost of adapted modules (compressed MACs / dense MACs)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("quality against inference cost" if points else "no run has both perplexity and compression")
    return _save(plt, fig, ax, path)


def icl_by_budget(rows: list[Row], path: Path) -> Path:
    """ICL composite (± std over seeds) against the budget F; methods without a budget as lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    budgeted = sorted((r for r in rows if r.budget is not None and r.values.get("icl_composite") is not None),
                      key=lambda r: r.budget)
    if budgeted:
        ax.errorbar([r.budget for r in budgeted], [r.values["icl_composite"] for r in budgeted],
                    yerr=[r.values.get("icl_std") or 0.0 for r in budgeted], marker="o", capsize=3,
                    color=COLORS["budgeted-lora"], label="budgeted-lora")
    for row in rows:
        if row.budget is None and row.values.get("icl_composite") is not None:
            ax.axhline(row.values["icl_composite"], color=COLORS.get(row.method, "tab:green"), linestyle="--",
                       linewidth=1, label=row.method)
    ax.set_xlabel("dense budget F")
    ax.set_ylabel("ICL composite (exact match)")
    ax.set_xlim(-0.05, 1.05)
    has = budgeted or any(r.values.get("icl_composite") is not None for r in rows)
    ax.set_title("ICL probes against budget" if has else "no run has ICL results")
    return _save(plt, fig, ax, path)


def dense_fraction(rows: list[Row], path: Path) -> Path:
    """Per distilled run (from log.arrow) against training step: the scheduled target, the retained dense
    fraction Σρc/Σc, and the fraction whose dense matmuls still run (modules with ρ > 0): the saving
    only becomes real compute when a module reaches ρ = 0."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    plotted = 0
    for row in rows:
        if row.log is None:
            continue
        with pa.memory_map(str(row.log)) as source:
            log = pa.ipc.open_stream(source).read_all().to_pydict()
        line = ax.plot(log["step"], log["actual_fraction"], label=f"{_label(row)} Σρc/Σc")[0]
        if row.budget is not None:
            ax.plot(log["step"], log["target_fraction"], linestyle=":", color=line.get_color(),
                    label=f"{_label(row)} target")
            ax.plot(log["step"], log["computed_fraction"], linestyle="--", alpha=0.6, color=line.get_color(),
                    label=f"{_label(row)} computed (ρ > 0)")
        plotted += 1
    ax.set_xlabel("training step")
    ax.set_ylabel("dense fraction")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("dense fraction during training" if plotted else "no distill log found")
    return _save(plt, fig, ax, path, legend_size=7)
