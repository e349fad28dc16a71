"""Terminal output: a live bar on a terminal; in a log, progress as plain periodic lines and tables at
the width they need."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from bltool import ui


def _log_console() -> Console:
    return Console(file=io.StringIO(), width=ui.LOG_WIDTH)  # a file: not a terminal


def _columns():
    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.2f}"))


def test_log_progress_prints_a_plain_line_per_interval():
    console = _log_console()
    with ui.LogProgress(*_columns(), console=console, interval=0.0) as progress:
        task = progress.add_task("distill", total=3, loss=9.0)
        for loss in (3.0, 2.0, 1.0):
            progress.update(task, advance=1, loss=loss)
    assert console.file.getvalue().splitlines() == ["distill 1/3 loss 3.00", "distill 2/3 loss 2.00",
                                                    "distill 3/3 loss 1.00"]


def test_log_progress_stays_quiet_within_the_interval():
    console = _log_console()
    with ui.LogProgress(*_columns(), console=console, interval=3600.0) as progress:
        task = progress.add_task("distill", total=100, loss=1.0)
        for _ in range(100):
            progress.advance(task)
    assert console.file.getvalue() == ""  # the stage prints its own summary; an error stays one line


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log(monkeypatch):
    monkeypatch.setattr(ui, "console", Console(file=io.StringIO(), force_terminal=True))
    assert type(ui.progress(*_columns())) is Progress
    monkeypatch.setattr(ui, "console", _log_console())
    assert isinstance(ui.progress(*_columns()), ui.LogProgress)


def test_a_log_console_is_wide_enough_for_a_table(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # what a cluster job's stderr is: not a terminal
    console = ui.make_console()
    table = Table()
    for name in ("run", "method", "F", "train compute (realised)", "module speedup (measured)", "missing"):
        table.add_column(name)
    table.add_row("budgeted-lora-0.4-compressed", "budgeted-lora", "0.4", "0.841", "1.48×", "-")
    with console.capture() as captured:
        console.print(table)
    assert "…" not in captured.get() and "module speedup (measured)" in captured.get()
