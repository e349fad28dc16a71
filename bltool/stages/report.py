"""report: the results of any set of runs in the paper's Table 2 shape, with figures.

`bltool report RUN_DIR...` finds every bltool artifact under the given directories, links results to
models by content hash (`bltool.runs`), and writes `report.md`, `report.csv`, `report.arrow` and four
PNG figures (`frontier.png`, `icl.png`, `dense_fraction.png`, `learning_curves.png`: held-out perplexity
during training, from `distill --eval-every`). With `--readme FILE` it also replaces the
part of FILE between `<!-- bltool-report:start -->` and `<!-- bltool-report:end -->` with the table and
the figures, so a README's results are generated from the runs, never typed by hand.

Rows are compared only if they were evaluated the same way: the same held-out data (by content) and
token budget for perplexity, the same `--n`, `--shots`, `--seeds` and probe set for ICL, read from each
run's evaluation manifests. Otherwise `report` refuses, naming the setting and the runs, or with
`--allow-mixed` marks the column (†) and says under the table what differs.

The claim sentences judge a difference in ICL composite against its standard error (`se`, which counts
query and demonstration sampling; docs/icl.md): "higher" / "lower" only when the difference exceeds
NOISE_Z standard errors of the difference, √(se₁² + se₂²); "within noise" otherwise.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from bltool import figures, ui
from bltool.artifacts import Stage, atomic_output, check_output_dir, now_iso, write_arrow, write_json, write_manifest
from bltool.errors import UsageError
from bltool.runs import (
    COLUMNS,
    Row,
    build_rows,
    describe_difference,
    evaluation_differences,
    find_artifacts,
    rows_table,
)

START, END = "<!-- bltool-report:start -->", "<!-- bltool-report:end -->"
NOISE_Z = 2.0  # a difference is "higher" / "lower" beyond this many standard errors of the difference
PPL_NEAR = 1.10  # "lands near" kd-lora's perplexity: at most this ratio
MIXED = "†"  # marks a column whose rows were not evaluated the same way (--allow-mixed)
FIGURES = ("frontier.png", "icl.png", "dense_fraction.png", "learning_curves.png")
HEADERS = {
    "name": "run", "method": "method", "budget": "F", "tokens": "tokens", "perplexity": "ppl",
    "bits_per_byte": "bits/byte", "icl_composite": "ICL", "icl_baseline": "ICL baseline",
    "compute_proxy": "train compute (proxy)",
    "compute_realised": "train compute (realised)", "mac_speedup": "MAC speedup",
    "module_speedup": "module speedup (measured)", "prefill_speedup": "prefill speedup (e2e)",
    "decode_speedup": "decode speedup (e2e)", "param_reduction": "param reduction", "missing": "missing",
}

# The artifacts a report cites as its inputs.
REPORTED = (Stage.DISTILL, Stage.COMPRESS, Stage.EVAL_PPL, Stage.EVAL_ICL, Stage.BENCH)


@dataclass(frozen=True)
class ReportConfig:
    runs: tuple[str, ...]  # directories holding run artifacts (searched recursively)
    out: str  # output directory
    title: str = "bltool report"  # heading of report.md
    readme: str | None = None  # a file whose marked section is replaced by the report
    note: str = ""  # a paragraph placed under the heading (setting, machine, date)
    allow_mixed: bool = False  # report rows evaluated differently (column marked) instead of refusing
    overwrite: bool = False  # replace an existing --out

    def __post_init__(self):
        if not self.runs:
            raise UsageError("report needs at least one RUN_DIR")


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
    if column == "tokens":
        return f"{value:,}"
    if column == "budget":
        return f"{value:g}"
    return str(value)


# The columns each evaluation fills, marked when its rows were evaluated differently.
EVALUATED_COLUMNS = {Stage.EVAL_PPL: ("perplexity", "bits_per_byte"), Stage.EVAL_ICL: ("icl_composite", "icl_baseline")}


def mixed_columns(mixed: dict) -> set[str]:
    return {c for stage in mixed for c in EVALUATED_COLUMNS[stage]}


def mixed_notes(mixed: dict) -> list[str]:
    return [f"{stage} {describe_difference(setting, values)}" for stage, diffs in mixed.items()
            for setting, values in diffs]


def markdown(rows: list[Row], title: str, note: str, figure_dir: str = ".", mixed: dict | None = None) -> str:
    mixed = mixed or {}
    marked = mixed_columns(mixed)
    columns = [c for c in HEADERS if c != "missing"] + ["missing"]
    lines = [f"## {title}", ""]
    if note:
        lines += [note, ""]
    lines += ["| " + " | ".join(HEADERS[c] + (f" {MIXED}" if c in marked else "") for c in columns) + " |",
              "|" + "---|" * len(columns)]
    for row in rows:
        d = row.as_dict()
        icl = _fmt("icl_composite", d["icl_composite"])
        if d["icl_se"] is not None and d["icl_composite"] is not None:
            icl += f" ± {d['icl_se']:.3f}"
        cells = [icl if c == "icl_composite" else _fmt(c, d[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    if mixed:
        lines += ["", f"{MIXED} Not evaluated the same way (`--allow-mixed`), so these columns do not compare "
                  "like with like: " + "; ".join(mixed_notes(mixed)) + "."]
    lines += ["", "Perplexity and bits/byte on the held-out split; ICL is the macro composite of the probes "
              "(± its standard error, which counts both query and demonstration sampling; ICL baseline is the "
              "better of the best constant answer and copying a random list item, averaged over the probes); "
              "training compute is docs/method.md §7's proxy and the dense MACs "
              "actually executed, both relative to kd-full; MAC speedup is over the adapted modules after "
              "`compress`; measured speedups come from `bench` (module: prefill shape; end to end: prefill "
              "and batch-1 decode). A dash is a value the runs do not have; `missing` names the stage that "
              "would produce it.", ""]
    claims = comparison(rows, mixed)
    if claims:
        lines += ["### Against the paper's claims", "", *claims, ""]
    lines += [f"![{name}]({figure_dir}/{name})" for name in FIGURES]
    return "\n".join(lines) + "\n"


def value(row: Row | None, key: str):
    return row.values.get(key) if row is not None else None


def icl_verdict(row: Row, base: Row) -> tuple[str, str]:
    """How `row`'s ICL composite compares with `base`'s, judged against the standard error of their
    difference: ("higher" | "lower" | "within noise of" | "not comparable with", the evidence)."""
    a, b = value(row, "icl_composite"), value(base, "icl_composite")
    sa, sb = value(row, "icl_se"), value(base, "icl_se")
    if sa is None or sb is None:
        return "not comparable with", "no standard error recorded; re-run eval-icl"
    se = (sa**2 + sb**2) ** 0.5
    diff = a - b
    word = "higher than" if diff > NOISE_Z * se else "lower than" if diff < -NOISE_Z * se else "within noise of"
    return word, f"difference {diff:+.3f}, {NOISE_Z:g} standard errors = {NOISE_Z * se:.3f}"


def _icl_clause(row: Row, lora: Row | None, marker: str) -> str:
    """", ICL 0.420 ± 0.030, higher than kd-lora's 0.300 ± 0.020 (difference …)" or "" without both."""
    if lora is None or value(row, "icl_composite") is None or value(lora, "icl_composite") is None:
        return ""
    word, evidence = icl_verdict(row, lora)
    return (f"; its ICL composite {_icl(row)} is {word} kd-lora's {_icl(lora)} ({evidence}){marker}")


def _icl(row: Row) -> str:
    se = value(row, "icl_se")
    return f"{value(row, 'icl_composite'):.3f}" + ("" if se is None else f" ± {se:.3f}")


def comparison(rows: list[Row], mixed: dict | None = None) -> list[str]:
    """The paper's three claims checked on these runs, as sentences computed from the table: Budgeted
    LoRA at a moderate budget lands near KD-LoRA's perplexity with a speedup; the most aggressive budget
    gives the largest speedup at a perplexity cost; Budgeted LoRA keeps more ICL behaviour than KD-LoRA.
    ICL differences are judged against their standard error (`icl_verdict`); a claim that rests on a
    column whose rows were evaluated differently (`--allow-mixed`) is marked. Only claims whose rows
    exist are stated."""
    mixed = mixed or {}
    ppl_mark = f" {MIXED}" if Stage.EVAL_PPL in mixed else ""
    icl_mark = f" {MIXED}" if Stage.EVAL_ICL in mixed else ""
    lora = next((r for r in rows if r.method == "kd-lora"), None)
    budgeted = sorted((r for r in rows if r.method == "budgeted-lora" and r.budget is not None),
                      key=lambda r: r.budget)
    lines = []
    base = value(lora, "perplexity")
    moderate = [r for r in budgeted if 0 < r.budget < 1 and value(r, "perplexity")]
    if base and moderate:
        r = min(moderate, key=lambda r: abs(r.budget - 0.4))
        ratio = value(r, "perplexity") / base
        verdict = "lands near" if ratio <= PPL_NEAR else "does not land near"
        lines.append(
            f"- **Moderate budget.** F = {r.budget:g} {verdict} kd-lora's perplexity: {value(r, 'perplexity'):,.1f} "
            f"against {base:,.1f} ({ratio:.2f}×, near means within {PPL_NEAR - 1:.0%}){ppl_mark}, with a "
            f"{_fmt('mac_speedup', value(r, 'mac_speedup'))} MAC "
            f"speedup of the adapted modules{_measured_clause(r)}"
            f"{_icl_clause(r, lora, icl_mark)}. Paper: F = 0.4 matches KD-LoRA at 1.74× on its student.")
    speeds = [r for r in rows if value(r, "mac_speedup")]
    if budgeted and speeds and value(budgeted[0], "mac_speedup") and (len(budgeted) > 1 or budgeted[0].budget == 0):
        low = budgeted[0]
        largest = max(speeds, key=lambda r: value(r, "mac_speedup"))
        cost = (f"; its perplexity is {value(low, 'perplexity') / base:.2f}× kd-lora's{ppl_mark}"
                if base and value(low, "perplexity") else "")
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
            parts.append(f"F = {r.budget:g}: {_icl(r)} ({word} kd-lora; {evidence})")
        lines.append(f"- **ICL probes.** kd-lora scores {_icl(lora)}; budgeted-lora {'; '.join(parts)}{icl_mark}. "
                     f"Higher or lower means by more than {NOISE_Z:g} standard errors of the difference. Paper: "
                     "Budgeted LoRA retains more probe accuracy than KD-LoRA.")
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
    check_output_dir(out, config.overwrite)
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
    note = config.note or f"Generated by `bltool report` on {now_iso()}."
    with atomic_output(out, config.overwrite) as tmp:
        write_arrow(tmp / "report.arrow", rows_table(rows))
        _write_csv(tmp / "report.csv", rows)
        figures.frontier(rows, tmp / FIGURES[0])
        figures.icl_by_budget(rows, tmp / FIGURES[1])
        figures.dense_fraction(rows, tmp / FIGURES[2])
        figures.learning_curves(rows, tmp / FIGURES[3])
        (tmp / "report.md").write_text(markdown(rows, config.title, note, mixed=mixed), encoding="utf-8")
        write_json(tmp / "rows.json", [r.as_dict() for r in rows])
        write_manifest(tmp, Stage.REPORT, config=asdict(config),
                       inputs=[{"role": "run", "path": str(a.path), "stage": a.stage, "hash": a.hash}
                               for a in artifacts if a.stage in REPORTED],
                       rows=len(rows), mixed=mixed_notes(mixed))
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
                                        mixed=mixed))
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
