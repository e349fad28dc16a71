"""Terminal output: messages and progress go to stderr so stdout carries only result paths.

On a terminal, progress is a live bar. In a log (stderr redirected: cluster jobs, `make demo > log`)
rich would draw tables 80 columns wide and a bar nobody sees, so there tables get the width they need
and progress is a plain line every `$BLTOOL_PROGRESS_SECONDS` seconds (default 30) and at the end.
"""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

LOG_WIDTH = 400  # columns for tables written to a log, wide enough that no column is cut



def make_console(stderr: bool = True) -> Console:
    """A rich console on stderr (or stdout), as wide as a table needs when the stream is not a terminal
    ($COLUMNS still wins)."""
    made = Console(stderr=stderr, highlight=False)
    if not made.is_terminal and "COLUMNS" not in os.environ:
        made.width = LOG_WIDTH
    return made


console = make_console()


def info(message: str) -> None:
    console.print(message, soft_wrap=True)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)


class LogProgress(Progress):
    """rich's Progress for a log: no live display, and each task's line printed every `interval`
    seconds. Like the transient bar, it leaves the summary to the stage (and an error stays one line)."""

    def __init__(self, *columns: ProgressColumn | str, interval: float, **kwargs) -> None:
        kwargs.pop("transient", None)
        super().__init__(*(c for c in columns if not isinstance(c, BarColumn)), auto_refresh=False, **kwargs)
        self.interval = interval
        self._printed: dict[TaskID, float] = {}

    def start(self) -> None:
        """No live display in a log: `update` and `advance` print the lines."""

    def stop(self) -> None:
        """Nothing to tear down, and no last line: the stage prints its own summary."""

    def refresh(self) -> None:
        """Nothing is redrawn in a log."""

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._maybe_print(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_print(task_id)

    def _maybe_print(self, task_id: TaskID) -> None:
        now = time.monotonic()
        if self.disable or now - self._printed.setdefault(task_id, now) < self.interval:
            return
        self._printed[task_id] = now
        task = self._tasks[task_id]
        cells = (Text(column.format(task=task)) if isinstance(column, str) else column(task) for column in self.columns)
        line = Text(" ").join(cell if isinstance(cell, Text) else Text(str(cell)) for cell in cells)
        self.console.print(line, soft_wrap=True)


def progress(*columns: ProgressColumn | str, transient: bool = True, disable: bool = False) -> Progress:
    """A live bar on a terminal; periodic lines in a log (LogProgress)."""
    if console.is_terminal:
        return Progress(*columns, console=console, transient=transient, disable=disable)
    interval = float(os.environ.get("BLTOOL_PROGRESS_SECONDS", "30"))
    return LogProgress(*columns, console=console, disable=disable, interval=interval)


class TokenRateColumn(ProgressColumn):
    """Tokens processed so far and tokens per second, from the task's `tokens` field."""

    def render(self, task) -> Text:
        tokens = task.fields.get("tokens", 0)
        elapsed = task.elapsed or 0.0
        rate = tokens / elapsed if elapsed > 0 else 0.0
        return Text(f"{tokens:,} tok  {rate:,.0f} tok/s", style="progress.data.speed")


def byte_progress() -> Progress:
    """Progress over input bytes that also shows tokens and tokens/s."""
    return progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TokenRateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )  # transient: the stage prints a summary line instead; errors stay one line


def token_progress() -> Progress:
    """Progress over a token count (total known up front)."""
    return progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} tok"),
        TokenRateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


class Stopwatch:
    """Wall-clock seconds since construction (time.perf_counter)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
