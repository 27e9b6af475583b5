"""A terminal progress bar for local computations.

State kept: the number of finished and total tasks of the computation in flight, and a
ticker thread that redraws the bar at a fixed interval (so the cost per task is one
counter increment, whatever the task rate). Nothing is drawn for computations that
finish within ``minimum`` seconds, so quick calls stay quiet.

Use it as a context manager around ``compute`` calls, or ``register()`` it for the
whole session::

    with ProgressBar():
        total.compute()
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

from runtime.local import Callback
from runtime.units import format_time

__all__ = ["ProgressBar"]


class ProgressBar(Callback):
    """Show a progress bar on a terminal while a local scheduler runs a graph.

    Parameters
    ----------
    minimum
        Seconds to wait before drawing anything; quicker computations stay silent.
    width
        Width of the bar in characters.
    dt
        Seconds between redraws.
    out
        Stream to draw on (default ``sys.stdout``).
    """

    def __init__(
        self,
        minimum: float = 0.0,
        width: int = 40,
        dt: float = 0.1,
        out: TextIO | None = None,
    ) -> None:
        super().__init__()
        self.minimum = minimum
        self.width = width
        self.dt = dt
        self._out = out
        self._done = 0
        self._total = 0
        self._start = 0.0
        self._drawn = False
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self.last_duration = 0.0

    @property
    def out(self) -> TextIO:
        return self._out if self._out is not None else sys.stdout

    # Callback hooks ------------------------------------------------------------------
    def start(self, dsk: Mapping[Any, Any]) -> None:
        self._done = 0
        self._total = len(dsk)
        self._drawn = False
        self._start = time.perf_counter()
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick, name="hpc-progress", daemon=True)
        self._ticker.start()

    def posttask(
        self, key: Any, result: Any, dsk: Mapping[Any, Any], state: Any, worker_id: Any
    ) -> None:
        self._done += 1

    def finish(self, dsk: Mapping[Any, Any], state: Any, errored: bool) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        self.last_duration = time.perf_counter() - self._start
        if self._drawn or self.last_duration >= self.minimum:
            if not errored:
                self._done = self._total
            self._draw(final=True)

    # Drawing -------------------------------------------------------------------------
    def _tick(self) -> None:
        while not self._stop.wait(self.dt):
            if time.perf_counter() - self._start >= self.minimum:
                self._draw()

    def render(self, done: int, total: int, elapsed: float) -> str:
        """Return the text of the bar for ``done`` of ``total`` tasks."""
        frac = done / total if total else 1.0
        filled = int(self.width * frac)
        bar = "#" * filled + " " * (self.width - filled)
        return f"[{bar}] | {frac * 100:3.0f}% Completed | {format_time(elapsed)}"

    def _draw(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self._start
        text = self.render(min(self._done, self._total), self._total, elapsed)
        self._drawn = True
        out = self.out
        out.write("\r" + text + ("\n" if final else ""))
        out.flush()
