"""report: the results of any set of runs in the paper's Table 2 shape, with figures.

`bltool report RUN_DIR...` finds every bltool artifact under the given directories, links results to
models by content hash (`bltool.results.runs`), and writes `report.md`, `report.csv`, `report.arrow` and four
PNG figures (`frontier.png`, `icl.png`, `dense_fraction.png`, `learning_curves.png`: held-out perplexity
during training, from `distill --eval-every`). With `--readme FILE` it also replaces the
part of FILE between `<!-- bltool-report:start -->` and `<!-- bltool-report:end -->` with the table and
the figures, so a README's results are generated from the runs, never typed by hand.

Beside quality and speed, each row's serving cost: the maximum stable requests/s per server and the servers
for a rate, from the `capacity` plan of its model (linked by content, through the `bench-serving` artifact
it measured, whose engine and machine the note names), and bench-serving's measured decode tokens/s.

Rows are compared only if they were evaluated the same way: the same held-out data (by content) and
token budget for perplexity, the same `--n`, `--shots`, `--seeds` and probe set for ICL, the same engine,
machine and load for bench-serving, the same workload, memory and rate for capacity, read from each run's
evaluation manifests. Otherwise `report` refuses, naming the setting and the runs, or with
`--allow-mixed` marks the column (†) and says under the table what differs. A row that mixes the
distilled and the compressed form of a student (one evaluated, the other benched, say), or that has two
evaluations of one model by the same stage, is refused the same way, or marked (†) on its name.

The claim sentences judge differences by their paired standard errors (docs/method.md §6, `bltool.eval.stats`;
NOISE_Z standard errors, and PPL_NEAR for "lands near"). Two ICL runs both at or below their baseline, or
answering every query alike, are "not informative", never "within noise". Results without the per-unit
files (written before bltool recorded them) get no verdict: re-run the evaluation.
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

from bltool import ui
from bltool.artifacts import Stage, atomic_output, check_output_dir, now_iso, write_arrow, write_json, write_manifest
from bltool.configs import ReportConfig
from bltool.errors import UsageError
from bltool.eval import stats
from bltool.results import figures
from bltool.results.runs import (
    COLUMNS,
    Artifact,
    Row,
    build_rows,
    describe_difference,
    evaluation_differences,
    find_artifacts,
    rows_table,
)
from bltool.train import methods
from bltool.units import format_bytes

START, END = "<!-- bltool-report:start -->", "<!-- bltool-report:end -->"
NOISE_Z = 2.0  # a difference is "higher" / "lower" (above / below) beyond this many paired standard errors
PPL_NEAR = 1.10  # "lands near" kd-lora's perplexity: the ratio at most this, even NOISE_Z paired SEs up
MIXED = "†"  # marks a column whose rows were not evaluated the same way (--allow-mixed)
FIGURES = ("frontier.png", "icl.png", "dense_fraction.png", "learning_curves.png")
HEADERS = {
    "name": "run", "method": "method", "budget": "F", "tokens": "tokens", "perplexity": "ppl",
    "bits_per_byte": "bits/byte", "icl_composite": "ICL", "icl_baseline": "ICL baseline",
    "compute_proxy": "train compute (proxy)",
    "compute_realised": "train compute (realised)", "mac_speedup": "MAC speedup",
    "module_speedup": "module speedup (measured)", "prefill_speedup": "prefill speedup (e2e)",
    "decode_speedup": "decode speedup (e2e)", "param_reduction": "param reduction",
    "serving_decode_tps": "decode tok/s (served)", "serving_rate": "req/s per server", "servers": "servers for λ",
    "missing": "missing",
}

# The artifacts a report cites as its inputs.
REPORTED = (Stage.DISTILL, Stage.COMPRESS, Stage.EVAL_PPL, Stage.EVAL_ICL, Stage.BENCH, Stage.BENCH_SERVING,
            Stage.CAPACITY)


def _measured_clause(r) -> str:
    """What `bench` measured for the run, in parentheses; that it was not measured when it was not."""
    parts = [f"{_fmt(column, value(r, column))} {what}" for column, what in
             (("module_speedup", "measured"), ("prefill_speedup", "end to end at prefill"))
             if value(r, column) is not None]
    return f" ({', '.join(parts)})" if parts else " (speed not measured: no `bench` run)"


def _fmt(column: str, value) -> str:
    if value is None or value == "":
        return "—"
    if column in ("perplexity",):
        return f"{value:,.2f}" if value < 1e5 else f"{value:.3g}"
    if column in ("bits_per_byte", "icl_composite", "icl_baseline", "compute_proxy", "compute_realised"):
        return f"{value:.3f}"
    if column.endswith("speedup"):
        return f"{value:.2f}×"
    if column == "param_reduction":
        return f"{value:.1%}"
    if column in ("tokens", "servers"):
        return f"{value:,}"
    if column in ("serving_decode_tps", "serving_rate"):
        return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    if column == "budget":
        return f"{value:g}"
    return str(value)


# The columns each evaluation fills, marked when its rows were evaluated differently.
EVALUATED_COLUMNS = {Stage.EVAL_PPL: ("perplexity", "bits_per_byte"), Stage.EVAL_ICL: ("icl_composite", "icl_baseline"),
                     Stage.BENCH_SERVING: ("serving_decode_tps", "serving_rate", "servers"),
                     Stage.CAPACITY: ("serving_rate", "servers")}


def mixed_columns(mixed: dict) -> set[str]:
    return {c for stage in mixed for c in EVALUATED_COLUMNS[stage]}


def mixed_notes(mixed: dict) -> list[str]:
    return [f"{stage} {describe_difference(setting, values)}" for stage, diffs in mixed.items()
            for setting, values in diffs]


def stages_line(artifacts: list[Artifact]) -> str:
    """Which stages' artifacts the report found, in pipeline order with their counts: what ran."""
    counts: dict[str, int] = {}
    for a in artifacts:
        if a.stage != Stage.DISTILL_CHECKPOINT:  # a resumable checkpoint, not a stage's output
            counts[a.stage] = counts.get(a.stage, 0) + 1
    order = [v for k, v in vars(Stage).items() if not k.startswith("_") and isinstance(v, str)]
    found = sorted(counts, key=lambda s: order.index(s) if s in order else len(order))
    return "Artifacts found under the RUN_DIRs: " + ", ".join(f"{s} × {counts[s]}" for s in found) + "."


def serving_note(rows: list[Row]) -> str:
    """What the serving columns are: the workload, accelerator memory, dtype and rate `capacity` planned for,
    and which engine and machine measured the iteration costs (bench-serving); "" when no row has a plan.
    Settings that differ between the rows (`--allow-mixed`) are listed per value."""
    planned = [r for r in rows if r.capacity is not None]
    if not planned:
        return ""

    def values(get) -> str:
        return " / ".join(dict.fromkeys(str(get(r)) for r in planned))

    settings = [r.settings[Stage.CAPACITY] for r in planned]
    rates = dict.fromkeys(s["--rate"] for s in settings)
    rate = ("; servers for λ: no --rate given" if rates == {None: None} else
            "; servers for λ = " + " / ".join(f"{x:g}" for x in rates if x is not None) + " req/s at utilisation "
            + " / ".join(dict.fromkeys(f"{s['--target-util']:g}" for s in settings)))
    memory = " / ".join(dict.fromkeys(f"{format_bytes(s['--gpu-mem'])} × {s['--mem-util']:g}" for s in settings))
    by_machine: dict[str, list[str]] = {}
    for r in planned:
        by_machine.setdefault(r.serving_machine or "", []).append(r.name)
    unmeasured = "given by capacity --iteration-time, not measured"
    machines = "; ".join((f"measured by `bench-serving` with {machine}" if machine else unmeasured)
                         + f" ({', '.join(names)})" for machine, names in by_machine.items())
    return (f"Serving cost (`capacity`): workload {values(lambda r: r.settings[Stage.CAPACITY]['workload'])}; "
            f"accelerator memory --gpu-mem {memory}, {values(lambda r: r.settings[Stage.CAPACITY]['--dtype'])}"
            f"{rate}; req/s per server is the maximum stable rate (in brackets the bound that binds); iteration "
            f"costs {machines}. Decode tok/s (served) is bench-serving's "
            "measured decode throughput.")


def markdown(rows: list[Row], title: str, note: str, figure_dir: str = ".", mixed: dict | None = None,
             stages: str = "") -> str:
    mixed = mixed or {}
    marked = mixed_columns(mixed)
    columns = [c for c in HEADERS if c != "missing"] + ["missing"]
    lines = [f"## {title}", ""]
    if note:
        lines += [note, ""]
    if stages:
        lines += [stages, ""]
    lines += ["| " + " | ".join(HEADERS[c] + (f" {MIXED}" if c in marked else "") for c in columns) + " |",
              "|" + "---|" * len(columns)]
    for row in rows:
        d = row.as_dict()
        icl = _fmt("icl_composite", d["icl_composite"])
        if d["icl_se"] is not None and d["icl_composite"] is not None:
            icl += f" ± {d['icl_se']:.3f}"
        ppl = _fmt("perplexity", d["perplexity"])
        if d["perplexity_se"] is not None and d["perplexity"] is not None:
            ppl += f" ± {_fmt('perplexity', d['perplexity_se'])}"
        rate = _fmt("serving_rate", d["serving_rate"])
        if d["serving_binding"] and d["serving_rate"] is not None:
            rate += f" ({d['serving_binding']})"
        special = {"icl_composite": icl, "perplexity": ppl, "serving_rate": rate}
        cells = [special[c] if c in special else _fmt(c, d[c]) for c in columns]
        if row.conflicts:
            cells[columns.index("name")] += f" {MIXED}"
        lines.append("| " + " | ".join(cells) + " |")
    if mixed:
        lines += ["", f"{MIXED} Not evaluated the same way (`--allow-mixed`), so these columns do not compare "
                  "like with like: " + "; ".join(mixed_notes(mixed)) + "."]
    conflicts = [note for row in rows for note in row.conflicts]
    if conflicts:
        lines += ["", f"{MIXED} Rows marked on their name mix measurements (`--allow-mixed`): "
                  + "; ".join(conflicts) + "."]
    lines += ["", "Perplexity (± its standard error over the held-out documents) and bits/byte on the held-out "
              "split; ICL is the macro composite of the probes "
              "(± its standard error, which counts both query and demonstration sampling; ICL baseline is the "
              "better of the best constant answer and copying a random list item, averaged over the probes); "
              "training compute is docs/method.md §7's proxy and the dense MACs "
              "actually executed, both relative to kd-full; MAC speedup is over the adapted modules after "
              "`compress`; measured speedups come from `bench` (module: prefill shape; end to end: prefill "
              "and batch-1 decode). A dash is a value the runs do not have; `missing` names the stage that "
              "would produce it.", ""]
    serving = serving_note(rows)
    if serving:
        lines += [serving, ""]
    claims = comparison(rows, mixed)
    if claims:
        lines += ["### Against the paper's claims", "", *claims, ""]
    lines += [f"![{name}]({figure_dir}/{name})" for name in FIGURES]
    return "\n".join(lines) + "\n"


def value(row: Row | None, key: str):
    return row.values.get(key) if row is not None else None


def _noise(estimate: float, se: float, above: str, below: str) -> str:
    """`above` / `below` beyond NOISE_Z paired standard errors, "within noise of" otherwise."""
    return above if estimate > NOISE_Z * se else below if estimate < -NOISE_Z * se else "within noise of"


def paired_ppl(row: Row, base: Row) -> stats.Paired | str:
    """log(ppl_row / ppl_base) with its paired standard error over the documents (or windows) both were
    scored on, from their windows.arrow; why there is none (str) otherwise."""
    a, b = (stats.read_pieces(r.sources.get(Stage.EVAL_PPL)) for r in (row, base))
    if a is None or b is None:
        return "no standard error recorded; re-run eval-ppl"
    data = [r.settings.get(Stage.EVAL_PPL, {}).get("held-out data") for r in (row, base)]
    if data[0] != data[1]:
        return "not comparable: scored on other held-out data"
    paired = stats.paired_log_ratio(a, b)
    if isinstance(paired, str):
        return f"not comparable: {paired}"
    if paired.se is None:
        return f"no standard error: a single {paired.unit.rstrip('s')} scored"
    return paired


def ppl_evidence(row: Row, base: Row) -> tuple[stats.Paired | None, str]:
    """The ratio of `row`'s perplexity to `base`'s with its paired SE (delta method: ratio · se of the log
    ratio) and whether it stands out of the noise, as a phrase: "ratio 1.040 ± 0.012 (paired SE, 57
    documents), above kd-lora's by more than 2 paired SEs"; with the paired comparison, or with None and
    the reason there is no verdict as the phrase."""
    ratio = value(row, "perplexity") / value(base, "perplexity")
    name = base.method
    paired = paired_ppl(row, base)
    if isinstance(paired, str):
        return None, paired
    if paired.identical:
        return paired, f"ratio {ratio:.3f}, equal to {name}'s on every one of the {paired.units} {paired.unit}"
    word = _noise(paired.estimate, paired.se, "above", "below")
    where = (f"within noise of {name}'s" if word == "within noise of"
             else f"{word} {name}'s by more than {NOISE_Z:g} paired SEs")
    return paired, f"ratio {ratio:.3f} ± {ratio * paired.se:.3f} (paired SE, {paired.units} {paired.unit}), {where}"


def icl_verdict(row: Row, base: Row) -> tuple[str, str]:
    """How `row`'s ICL composite compares with `base`'s, judged against the paired standard error of their
    difference over the queries both asked: ("higher than" | "lower than" | "within noise of" |
    "not informative" | "not comparable with", the evidence)."""
    a, b = (stats.read_predictions(r.sources.get(Stage.EVAL_ICL)) for r in (row, base))
    if a is None or b is None:
        return "not comparable with", "no paired standard error recorded (predictions.arrow); re-run eval-icl"
    paired = stats.paired_icl(a, b)
    if isinstance(paired, str):
        return "not comparable with", paired
    floors = [(value(r, "icl_composite"), value(r, "icl_baseline")) for r in (row, base)]
    if all(floor is not None and score <= floor for score, floor in floors):
        return "not informative", (f"both at or below their ICL baseline, {floors[0][1]:.3f} and {floors[1][1]:.3f}; "
                                   "a difference there says nothing about in-context learning")
    if paired.identical:
        return "not informative", f"the two answer all {paired.units} queries alike under every seed"
    if paired.se is None:
        return "not comparable with", "no paired standard error: a task has a single query"
    word = _noise(paired.estimate, paired.se, "higher than", "lower than")
    return word, (f"paired difference {paired.estimate:+.3f} ± {paired.se:.3f} over {paired.units} queries, "
                  f"{NOISE_Z:g} paired SEs = {NOISE_Z * paired.se:.3f}")


def _icl_clause(row: Row, lora: Row | None, marker: str) -> str:
    """", ICL 0.420 ± 0.030, higher than kd-lora's 0.300 ± 0.020 (difference …)" or "" without both."""
    if lora is None or value(row, "icl_composite") is None or value(lora, "icl_composite") is None:
        return ""
    word, evidence = icl_verdict(row, lora)
    if word == "not informative":
        return (f"; its ICL composite {_icl(row)} and {lora.method}'s {_icl(lora)} are not informative "
                f"({evidence}){marker}")
    return (f"; its ICL composite {_icl(row)} is {word} {lora.method}'s {_icl(lora)} ({evidence}){marker}")


def _icl(row: Row) -> str:
    se = value(row, "icl_se")
    return f"{value(row, 'icl_composite'):.3f}" + ("" if se is None else f" ± {se:.3f}")


def comparison(rows: list[Row], mixed: dict | None = None) -> list[str]:
    """The paper's three claims checked on these runs, as sentences computed from the table: Budgeted
    LoRA at a moderate budget lands near KD-LoRA's perplexity with a speedup; the most aggressive budget
    gives the largest speedup at a perplexity cost; Budgeted LoRA keeps more ICL behaviour than KD-LoRA.
    Differences are judged against their paired standard errors (`ppl_evidence`, `icl_verdict`); a claim
    that rests on a column whose rows were evaluated differently (`--allow-mixed`) is marked. Only claims
    whose rows exist are stated."""
    mixed = mixed or {}
    ppl_mark = f" {MIXED}" if Stage.EVAL_PPL in mixed else ""
    icl_mark = f" {MIXED}" if Stage.EVAL_ICL in mixed else ""
    base_method, budgeted_methods = methods.baseline(), [m.name for m in methods.budgeted()]
    lora = next((r for r in rows if r.method == base_method.name), None)
    budgeted = sorted((r for r in rows if r.method in budgeted_methods and r.budget is not None),
                      key=lambda r: r.budget)
    lines = []
    base = value(lora, "perplexity")
    moderate = [r for r in budgeted if 0 < r.budget < 1 and value(r, "perplexity")]
    if base and moderate:
        r = min(moderate, key=lambda r: abs(r.budget - 0.4))
        ratio = value(r, "perplexity") / base
        paired, evidence = ppl_evidence(r, lora)
        if paired is None:
            verdict, rule = "is not judged against", f" ({ratio:.2f}×; {evidence})"
        else:
            low, high = (ratio * math.exp(z * NOISE_Z * paired.se) for z in (-1, 1))
            verdict = ("lands near" if high <= PPL_NEAR else "does not land near" if low > PPL_NEAR
                       else "cannot yet be said to land near")
            rule = (f", {evidence}; near means at most {PPL_NEAR:.2f}× even {NOISE_Z:g} paired SEs up "
                    f"({low:.3f} to {high:.3f})")
        lines.append(
            f"- **Moderate budget.** F = {r.budget:g} {verdict} {lora.method}'s perplexity: "
            f"{value(r, 'perplexity'):,.1f} "
            f"against {base:,.1f}{rule}{ppl_mark}, with a "
            f"{_fmt('mac_speedup', value(r, 'mac_speedup'))} MAC "
            f"speedup of the adapted modules{_measured_clause(r)}"
            f"{_icl_clause(r, lora, icl_mark)}. Paper: F = 0.4 matches KD-LoRA at 1.74× on its student.")
    speeds = [r for r in rows if value(r, "mac_speedup")]
    if budgeted and speeds and value(budgeted[0], "mac_speedup") and (len(budgeted) > 1 or budgeted[0].budget == 0):
        low = budgeted[0]
        largest = max(speeds, key=lambda r: value(r, "mac_speedup"))
        cost = ""
        if base and value(low, "perplexity"):
            paired, evidence = ppl_evidence(low, lora)
            cost = (f"; its perplexity is {value(low, 'perplexity') / base:.2f}× {lora.method}'s"
                    + (f": {evidence}" if paired else f" ({evidence})") + ppl_mark)
        lines.append(
            f"- **Aggressive budget.** F = {low.budget:g} gives {_fmt('mac_speedup', value(low, 'mac_speedup'))} "
            f"({'the largest' if largest is low else 'not the largest'} MAC speedup here){cost}"
            f"{_icl_clause(low, lora, icl_mark)}. Paper: F = 0 gives 4.05× on its wider student with moderate "
            "degradation.")
    icl = value(lora, "icl_composite")
    if icl is not None and any(value(r, "icl_composite") is not None for r in budgeted):
        parts = []
        for r in budgeted:
            if value(r, "icl_composite") is None:
                continue
            word, evidence = icl_verdict(r, lora)
            against = "not informative against" if word == "not informative" else word
            parts.append(f"F = {r.budget:g}: {_icl(r)} ({against} {lora.method}; {evidence})")
        named = " and ".join(dict.fromkeys(r.method for r in budgeted))
        lines.append(f"- **ICL probes.** {lora.method} scores {_icl(lora)}; {named} {'; '.join(parts)}{icl_mark}. "
                     f"Higher or lower means by more than {NOISE_Z:g} paired standard errors of the difference "
                     "over the same queries. Paper: Budgeted LoRA retains more probe accuracy than KD-LoRA.")
    return lines


def _update_readme(path: Path, section: str) -> None:
    if not path.is_file():
        raise UsageError(f"--readme: {path} does not exist")
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise UsageError(f"--readme: {path} has no {START} … {END} section to replace")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(pattern.sub(lambda _: f"{START}\n{section}{END}", text), encoding="utf-8")
    tmp.replace(path)


def run(config: ReportConfig) -> Path:
    out = Path(config.out)
    check_output_dir(out, config.overwrite, stage=Stage.REPORT, holders=[("RUN_DIR", r) for r in config.runs])
    artifacts = find_artifacts([Path(r) for r in config.runs])
    rows = build_rows(artifacts)
    if not rows:
        raise UsageError(f"RUN_DIR: no distilled students or evaluated models under {', '.join(config.runs)}")
    mixed = evaluation_differences(rows)
    if mixed and not config.allow_mixed:
        stage, ((setting, values), *_) = next(iter(mixed.items()))
        raise UsageError(
            f"RUN_DIR: the runs were not evaluated the same way ({stage} {describe_difference(setting, values)}); "
            "evaluate them alike, or pass --allow-mixed to report them with the column marked"
        )
    conflicts = [note for row in rows for note in row.conflicts]
    if conflicts and not config.allow_mixed:
        raise UsageError(f"RUN_DIR: a row mixes measurements ({conflicts[0]}); keep one evaluation per model and "
                         "form, or pass --allow-mixed to report it with the row marked")
    note = config.note or f"Generated by `bltool report` on {now_iso()}."
    stages = stages_line(artifacts)
    with atomic_output(out, config.overwrite) as tmp:
        write_arrow(tmp / "report.arrow", rows_table(rows))
        _write_csv(tmp / "report.csv", rows)
        figures.frontier(rows, tmp / FIGURES[0])
        figures.icl_by_budget(rows, tmp / FIGURES[1])
        figures.dense_fraction(rows, tmp / FIGURES[2])
        figures.learning_curves(rows, tmp / FIGURES[3])
        (tmp / "report.md").write_text(markdown(rows, config.title, note, mixed=mixed, stages=stages),
                                       encoding="utf-8")
        write_json(tmp / "rows.json", [r.as_dict() for r in rows])
        write_manifest(tmp, Stage.REPORT, config=asdict(config),
                       inputs=[{"role": "run", "path": str(a.path), "stage": a.stage, "hash": a.hash}
                               for a in artifacts if a.stage in REPORTED],
                       rows=len(rows), mixed=mixed_notes(mixed) + conflicts)
    if config.readme:
        readme = Path(config.readme)
        figure_dir = readme.parent / "docs" / "results"
        figure_dir.mkdir(parents=True, exist_ok=True)
        for name in FIGURES:
            shutil.copyfile(out / name, figure_dir / name)
        # the table's data committed next to its figures, its run paths relative to the README's directory
        # (a repository names no machine path)
        _write_csv(figure_dir / "report.csv", rows, relative_to=readme.parent)
        _update_readme(readme, markdown(rows, config.title, note, figure_dir.relative_to(readme.parent).as_posix(),
                                        mixed=mixed, stages=stages))
        ui.info(f"updated {readme} and {figure_dir}")
    _print(rows)
    return out


def _write_csv(path: Path, rows: list[Row], relative_to: Path | None = None) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        for r in rows:
            row = r.as_dict()
            if relative_to is not None and row["path"]:
                row["path"] = Path(os.path.relpath(Path(row["path"]).absolute(), relative_to.absolute())).as_posix()
            writer.writerow(row)


def _print(rows: list[Row]) -> None:
    from rich.table import Table

    table = Table(title="bltool report", title_justify="left")
    columns = ("name", "method", "budget", "perplexity", "icl_composite", "compute_realised", "mac_speedup",
               "module_speedup", "missing")
    for c in columns:
        table.add_column(HEADERS[c])
    for row in rows:
        d = row.as_dict()
        table.add_row(*(_fmt(c, d[c]) for c in columns))
    ui.console.print(table)
