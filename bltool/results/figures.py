"""The report's figures (matplotlib, Agg backend, PNG): the quality / inference-cost frontier, ICL
against budget, the dense fraction along training, and the learning curves (held-out perplexity during
training, `distill --eval-every`, with their standard errors as bands and the teacher scored on the same
held-out slice). Each run has its own colour (`run_colors`), the same in every figure, and the legends sit
beside the axes. Each takes report rows and returns nothing but the file it wrote; a figure with nothing
to plot says so in its title rather than being skipped. Beside them, capacity --validate's two figures:
the simulated queues and the measured server against the formula and the simulator."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa

from bltool.artifacts import Stage
from bltool.eval.stats import read_pieces
from bltool.results.runs import Row
from bltool.train import methods

# Run colours: tab10 without its grey (the untrained student's), then tab20's lighter shades.
PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
           "#9edae5")


def run_colors(rows: list[Row]) -> dict[str, str]:
    """Each run's own colour, by its name, the same in every figure of a report: the teacher black, the
    untrained student grey; a run of a registered method its method's colour (`methods.Method.color`), the
    method's further runs shades of it (in the order of their sorted names, so the colours do not depend on
    the order the runs were found in); other models the palette, in sorted-name order."""
    fixed = {"teacher": "black", "student (untrained)": "tab:gray"}
    colors = {r.name: fixed[r.method] for r in rows if r.method in fixed}
    by_method: dict[str, list[str]] = {}
    for r in rows:
        if r.method not in fixed and methods.find(r.method) is not None:
            by_method.setdefault(r.method, []).append(r.name)
    for method, names in by_method.items():
        base = methods.find(method).color
        colors.update({name: _shade(base, k) for k, name in enumerate(sorted(set(names)))})
    others = sorted({r.name for r in rows if r.name not in colors})
    colors.update({name: PALETTE[i % len(PALETTE)] for i, name in enumerate(others)})
    return colors


def _shade(color: str, k: int) -> str:
    """The k-th shade of `color`: itself for k = 0, then alternately darker and lighter, further each pair."""
    from matplotlib.colors import to_hex, to_rgb

    if k == 0:
        return color
    toward = (0.0, 0.0, 0.0) if k % 2 else (1.0, 1.0, 1.0)
    amount = min(0.7, 0.3 * ((k + 1) // 2))
    return to_hex(tuple(c + (t - c) * amount for c, t in zip(to_rgb(color), toward)))


def _method_markers(rows: list[Row]) -> dict[str, str]:
    """A marker per method (the colour tells the runs apart, the marker what each is)."""
    return {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(sorted({r.method for r in rows}))}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def place_legend(ax, size: int = 8) -> None:
    """The legend beside the axes, on the right, never over the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _write_grid(plt, fig, path: Path) -> Path:
    """A figure of several panels (each with its own legend), laid out and written to `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _save(plt, fig, ax, path: Path, legend_size: int = 8) -> Path:
    ax.grid(True, alpha=0.3)
    fig.tight_layout()  # the axes keep their size; the saved image widens to take the legend beside them
    place_legend(ax, legend_size)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _method_label(name: str) -> str:
    """A method's label (bltool.train.methods); other rows (the teacher, say) by their name."""
    method = methods.find(name)
    return method.label if method else name


def _label(row: Row) -> str:
    return f"{_method_label(row.method)} F={row.budget:g}" if row.budget is not None else _method_label(row.method)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def _run_label(row: Row) -> str:
    """A legend entry: the run's name and what it is (two runs of one method stay apart)."""
    return f"{row.name} ({_label(row)})"


def _teacher_line(ax, rows: list[Row], label: str) -> None:
    """The teacher's held-out perplexity as a dashed horizontal line, where a teacher row has one."""
    for row in rows:
        if row.method == "teacher" and row.values.get("perplexity"):
            ax.axhline(row.values["perplexity"], color="black", linestyle="--", linewidth=1, label=label)


def frontier_figure(rows: list[Row]):
    """The frontier's (figure, axes): each run one point, named only in the legend, drawn in its run's
    colour (`run_colors`, the same in every figure) with its method's marker, so no label can sit beside
    another run's point and two runs of one method remain distinguishable."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors, markers = run_colors(rows), _method_markers(rows)
    points = [(1.0 / r.values["mac_speedup"], r.values["perplexity"], r) for r in rows
              if r.values.get("mac_speedup") and r.values.get("perplexity")]
    for cost, ppl, row in sorted(points, key=lambda p: (p[0], p[1])):
        ax.scatter(cost, ppl, color=colors[row.name], marker=markers[row.method],
                   s=40, zorder=3, label=_run_label(row))
    best, front = float("inf"), []
    for cost, ppl, _ in sorted(points, key=lambda p: (p[0], p[1])):
        if ppl < best:
            best = ppl
            front.append((cost, ppl))
    if len(front) > 1:
        ax.plot(*zip(*front), color="tab:blue", alpha=0.4, zorder=2, label="frontier")
    _teacher_line(ax, rows, "teacher")
    ax.set_yscale("log")
    ax.set_xlabel("inference cost of adapted modules (compressed MACs / dense MACs)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("quality against inference cost" if points else "no run has both perplexity and compression")
    return fig, ax


def frontier(rows: list[Row], path: Path) -> Path:
    """Perplexity (log scale) against relative inference cost of the adapted modules (1 / MAC speedup):
    the lower-left points are the better trade-offs; the frontier joins those no other point beats.
    Runs are told apart by the legend (colour = run, marker = method), never by text beside a point."""
    fig, ax = frontier_figure(rows)
    return _save(_pyplot(), fig, ax, path)


def icl_by_budget(rows: list[Row], path: Path) -> Path:
    """ICL composite (± its standard error) against the budget F, each run in its own colour; runs without
    a budget as dashed lines; the ICL baseline (the best trivial answer) as a dotted grey line."""
    fig, ax = icl_figure(rows)
    return _save(_pyplot(), fig, ax, path)


def icl_figure(rows: list[Row]):
    """`icl_by_budget`'s (figure, axes)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors, markers = run_colors(rows), _method_markers(rows)
    budgeted = sorted((r for r in rows if r.budget is not None and r.values.get("icl_composite") is not None),
                      key=lambda r: r.budget)
    for name in dict.fromkeys(r.method for r in budgeted):  # one thin line joins a method's budgets
        line = [r for r in budgeted if r.method == name]
        if len(line) > 1:
            ax.plot([r.budget for r in line], [r.values["icl_composite"] for r in line], color="tab:gray",
                    alpha=0.4, linewidth=1, zorder=1)
    for r in budgeted:
        ax.errorbar([r.budget], [r.values["icl_composite"]], yerr=[r.values.get("icl_se") or 0.0],
                    marker=markers[r.method], capsize=3, color=colors[r.name], label=_run_label(r), zorder=3)
    for row in rows:
        if row.budget is None and row.values.get("icl_composite") is not None:
            ax.axhline(row.values["icl_composite"], color=colors[row.name], linestyle="--",
                       linewidth=1, label=_run_label(row))
    for baseline in sorted({r.values["icl_baseline"] for r in rows if r.values.get("icl_baseline") is not None}):
        ax.axhline(baseline, color="tab:gray", linestyle=":", linewidth=1.5,
                   label=f"ICL baseline {baseline:.3f} (best constant or copy)")
    ax.set_xlabel("dense budget F")
    ax.set_ylabel("ICL composite (exact match, ± se)")
    ax.set_xlim(-0.05, 1.05)
    has = budgeted or any(r.values.get("icl_composite") is not None for r in rows)
    ax.set_title("ICL probes against budget" if has else "no run has ICL results")
    return fig, ax


def dense_fraction(rows: list[Row], path: Path) -> Path:
    """Per distilled run (from log.arrow) against training step: the scheduled target, the retained dense
    fraction Σρc/Σc, and the fraction whose dense matmuls still run (modules with ρ > 0): the saving
    only becomes real compute when a module reaches ρ = 0. Each run in its own colour (`run_colors`)."""
    fig, ax = dense_fraction_figure(rows)
    return _save(_pyplot(), fig, ax, path, legend_size=7)


def dense_fraction_figure(rows: list[Row]):
    """`dense_fraction`'s (figure, axes)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = run_colors(rows)
    plotted = 0
    for row in rows:
        if row.log is None:
            continue
        with pa.memory_map(str(row.log)) as source:
            log = pa.ipc.open_stream(source).read_all().to_pydict()
        line = ax.plot(log["step"], log["actual_fraction"], color=colors[row.name],
                       label=f"{row.name} ({_label(row)}) Σρc/Σc")[0]
        if row.budget is not None:
            ax.plot(log["step"], log["target_fraction"], linestyle=":", color=line.get_color(),
                    label=f"{row.name} target")
            ax.plot(log["step"], log["computed_fraction"], linestyle="--", alpha=0.6, color=line.get_color(),
                    label=f"{row.name} computed (ρ > 0)")
        plotted += 1
    ax.set_xlabel("training step")
    ax.set_ylabel("dense fraction")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("dense fraction during training" if plotted else "no distill log found")
    return fig, ax


def _read_log(path: Path) -> dict[str, list]:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pydict()


def teacher_on_slice(teacher: Row, data: str | None, tokens: int | None) -> dict | None:
    """The teacher's perplexity and its standard error (`Pieces.summary`) on the held-out slice a learning
    curve was scored on (`distill --eval-every`: the first `tokens` held-out tokens of `data`), taken from
    the windows its eval-ppl scored; None when that eval-ppl did not score exactly those windows (other
    data, a budget that cuts them elsewhere, or no windows.arrow)."""
    settings = teacher.settings.get(Stage.EVAL_PPL, {})
    if data is None or tokens is None or settings.get("held-out data") != data:
        return None
    pieces = read_pieces(teacher.sources.get(Stage.EVAL_PPL))
    sliced = pieces.first_tokens(tokens, settings["--max-tokens"]) if pieces is not None else None
    return sliced.summary() if sliced is not None else None


def _band(ax, xs, nll, se, color) -> None:
    """± 1 standard error of the mean NLL, drawn on the perplexity scale: exp(nll ± se)."""
    ax.fill_between(xs, [math.exp(n - s) for n, s in zip(nll, se)], [math.exp(n + s) for n, s in zip(nll, se)],
                    color=color, alpha=0.2, linewidth=0)


def learning_curves_figure(rows: list[Row]):
    """The learning curves' (figure, axes): per distilled run whose log has held-out evaluations
    (`distill --eval-every`), held-out perplexity against training tokens, both on log scales, in its
    run's colour (`run_colors`) with its method's marker, a band of ± 1 standard error around it where the log has one;
    the teacher as a line (with its band) scored on the same slice, from its eval-ppl's windows.arrow, or a
    note in the title saying why it is not drawn."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors, markers = run_colors(rows), _method_markers(rows)
    seen: set[str] = set()
    slices: set[tuple] = set()
    for row in rows:
        if row.log is None:
            continue
        log = _read_log(row.log)
        n = len(log["tokens"])
        columns = [log["tokens"], log.get("eval_ppl", [None] * n), log.get("eval_nll", [None] * n),
                   log.get("eval_nll_se", [None] * n)]
        points = [(t, p, nll, se) for t, p, nll, se in zip(*columns) if p is not None]
        if not points:
            continue
        seen.add(row.name)
        color = colors[row.name]
        ax.plot([p[0] for p in points], [p[1] for p in points], color=color, marker=markers[row.method],
                markersize=4, label=_run_label(row))
        banded = [p for p in points if p[3] is not None and p[2] is not None]
        if banded:
            _band(ax, [p[0] for p in banded], [p[2] for p in banded], [p[3] for p in banded], color)
        evaluation = row.settings.get(Stage.DISTILL, {})
        slices.add((evaluation.get("held-out data"), evaluation.get("--eval-tokens")))
    notes = []
    for teacher in (r for r in rows if r.method == "teacher" and r.values.get("perplexity")):
        for data, tokens in sorted(slices, key=str):
            on_slice = teacher_on_slice(teacher, data, tokens)
            if on_slice is None:
                notes.append("teacher not drawn: its eval-ppl did not score the curves' slice"
                             + (f" (eval-ppl --max-tokens {tokens})" if tokens else ""))
                continue
            mean, se = on_slice["mean_nll"], on_slice["mean_nll_se"] or 0.0
            ax.axhline(on_slice["perplexity"], color="black", linestyle="--", linewidth=1,
                       label=f"teacher, same slice (first {tokens:,} held-out tokens)")
            ax.axhspan(math.exp(mean - se), math.exp(mean + se), color="black", alpha=0.1, linewidth=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity (band: ± 1 standard error)")
    title = "learning curves" if seen else "no distill log has held-out evaluations (--eval-every)"
    ax.set_title("\n".join([title, *dict.fromkeys(notes)]), **({"fontsize": 9} if notes else {}))
    return fig, ax


def learning_curves(rows: list[Row], path: Path) -> Path:
    """Held-out perplexity against training tokens for every run (log-log), the teacher as a line."""
    fig, ax = learning_curves_figure(rows)
    return _save(_pyplot(), fig, ax, path)


def capacity_queues(series: list[dict], rows: list[dict], loads: tuple[float, ...], path: Path) -> Path:
    """capacity --validate: queue length over time for each model at each simulated load (multiples of its
    predicted rate; one panel per model)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.6), squeeze=False)
    for ax, row in zip(axes[0], rows):
        target = row["validation"]["target_rate"]
        for load in loads:
            points = [p for p in series if p["label"] == row["label"] and p["load"] == load]
            ax.plot([p["time_s"] for p in points], [p["queue"] for p in points], label=f"λ = {load:g} × {target:.3g}")
        ax.set_title(f"{row['label']}\npredicted {target:.3g} req/s", fontsize=10)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("requests waiting")
        ax.legend(fontsize=8)
    return _write_grid(plt, fig, path)


def capacity_validation(rows: list[dict], served: list[dict], path: Path) -> Path:
    """capacity --validate against the measured server: throughput against offered load for each validated
    model: the measured server, the simulator's replay of the same requests and the formula's min(λ, rate),
    the knees marked; below, p90 latency."""
    plt = _pyplot()

    checked = [r for r in rows if "server_validation" in r]
    fig, axes = plt.subplots(2, len(checked), figsize=(4.8 * len(checked), 6.4), squeeze=False)
    for column, row in enumerate(checked):
        v = row["server_validation"]
        rate = v["prediction"]["max_stable_rate"]
        points = [p for p in served if p["label"] == row["label"]]
        top, bottom = axes[0][column], axes[1][column]
        for source, marker in (("measured", "o"), ("simulator", "x")):
            ps = [p for p in points if p["source"] == source]
            top.plot([p["offered_rate"] for p in ps], [p["throughput"] for p in ps], marker=marker, label=source)
            bottom.plot([p["offered_rate"] for p in ps], [p["latency_p90_s"] for p in ps], marker=marker,
                        label=source)
        offered = sorted(p["offered_rate"] for p in points)
        top.plot(offered, [min(x, rate) for x in offered], linestyle="--", color="grey", label="formula min(λ, rate)")
        top.axvline(rate, color="grey", linestyle=":", label=f"formula knee {rate:.3g}")
        top.axvline(v["measured_knee"], color="C0", linestyle=":", label=f"measured knee {v['measured_knee']:.3g}")
        top.set_title(f"{row['label']}: M = {v['server']['kv_tokens']:,} tokens", fontsize=10)
        top.set_xlabel("offered load (req/s)")
        top.set_ylabel("throughput (req/s)")
        top.legend(fontsize=7)
        bottom.set_xlabel("offered load (req/s)")
        bottom.set_ylabel("p90 latency (s)")
        bottom.legend(fontsize=7)
    return _write_grid(plt, fig, path)
