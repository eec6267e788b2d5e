"""Progress lines with an estimate of the time left, on stderr.

On a terminal, one line rewritten in place (``\\r``) and erased when the work is done; elsewhere (a log
file, CI), a plain line at most every ``interval`` seconds, so logs stay short. The estimate is the
mean time per unit so far times the units left: crude, but honest about what it assumes.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    """``75`` -> ``'1m15s'``; ``3725`` -> ``'1h02m'``; ``9.4`` -> ``'9s'``."""
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def eta(done: int, total: int, elapsed: float) -> float | None:
    """Seconds left at the mean pace so far; None before the first unit is done."""
    if done <= 0:
        return None
    return elapsed / done * max(total - done, 0)


class Progress:
    """``done/total`` of one piece of work (``label``), with the elapsed time and the time left.

    Parameters
    ----------
    label : str
        What is counted, e.g. ``'round 2/4 adapters'``.
    total : int
        Units of work.
    enabled : bool (default: True)
        False prints nothing (``--quiet``).
    stream : text stream (default: sys.stderr)
    interval : float (default: 30 on a non-terminal, 0.2 on a terminal)
        Least seconds between two lines.
    """

    def __init__(self, label: str, total: int, enabled: bool = True, stream: TextIO | None = None,
                 interval: float | None = None):
        self.label = label
        self.total = total
        self.enabled = enabled and total > 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.2 if self.tty else 30.0)
        self.done = 0
        self.start = time.perf_counter()
        self._last_print = self.start
        self._width = 0

    def line(self, note: str = "") -> str:
        elapsed = time.perf_counter() - self.start
        left = eta(self.done, self.total, elapsed)
        text = f"[fltac] {self.label} {self.done}/{self.total}, {format_seconds(elapsed)} elapsed"
        text += f", ETA {format_seconds(left)}" if left is not None else ""
        return text + (f" ({note})" if note else "")

    def step(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last_print < self.interval and self.done < self.total:
            return
        if not self.tty and self.done >= self.total:
            return  # a plain log gets the caller's summary line instead
        self._last_print = now
        text = self.line(note)
        if self.tty:
            pad = " " * max(self._width - len(text), 0)
            self.stream.write("\r" + text + pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Erase the in-place line (terminal only), so the next message starts clean."""
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
