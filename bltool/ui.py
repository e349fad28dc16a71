"""Terminal output: messages and progress go to stderr so stdout carries only result paths."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True, highlight=False)


def info(message: str) -> None:
    console.print(message, soft_wrap=True)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)


class TokenRateColumn(ProgressColumn):
    """Tokens processed so far and tokens per second, from the task's `tokens` field."""

    def render(self, task) -> Text:
        tokens = task.fields.get("tokens", 0)
        elapsed = task.elapsed or 0.0
        rate = tokens / elapsed if elapsed > 0 else 0.0
        return Text(f"{tokens:,} tok  {rate:,.0f} tok/s", style="progress.data.speed")


def byte_progress() -> Progress:
    """A progress bar over input bytes that also shows tokens and tokens/s."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TokenRateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,  # the stage prints a summary line instead; errors stay one line
    )


def token_progress() -> Progress:
    """A progress bar over a token count (total known up front)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} tok"),
        TokenRateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,  # the stage prints a summary line instead; errors stay one line
    )


class Stopwatch:
    """Wall-clock seconds since construction (time.perf_counter)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
