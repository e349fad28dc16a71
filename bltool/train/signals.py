"""Graceful stops for long runs: SIGTERM (cluster preemption) and SIGINT (Ctrl-C) set a flag that the
training loop reads between steps, so it can write a checkpoint and exit cleanly. A second SIGINT
stops at once (KeyboardInterrupt)."""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """Context manager: while active, SIGTERM and SIGINT are recorded in `received` instead of killing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""
