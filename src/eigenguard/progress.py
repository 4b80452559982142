"""A dependency-free progress bar for long loops: redrawn in place on a terminal, a few lines in logs."""
from __future__ import annotations

import sys
import time


class Progress:
    """Counts steps of a named task and shows rate, time left and a short status text."""

    def __init__(self, total: int, description: str, *, enabled: bool = True, stream=None):
        self.total = max(int(total), 1)
        self.description = description
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.count = 0
        self.status = ""
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1

    def update(self, steps: int = 1, status: str | None = None) -> None:
        self.count += steps
        if status is not None:
            self.status = status
        if not self.enabled:
            return
        now = time.monotonic()
        if self.interactive:
            if now - self._last_draw > 0.2 or self.count >= self.total:
                self._last_draw = now
                self.stream.write("\r" + self._line(now) + "\033[K")
                self.stream.flush()
        else:  # logs: a line at the start, half way and the end
            decile = min(10, self.count * 10 // self.total)
            if decile % 5 == 0 and decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(self._line(now) + "\n")
                self.stream.flush()

    def close(self, status: str | None = None) -> None:
        if status is not None:
            self.status = status
        if self.enabled and self.interactive:
            self.stream.write("\r" + self._line(time.monotonic()) + "\033[K\n")
            self.stream.flush()

    def _line(self, now: float) -> str:
        elapsed = now - self.start
        fraction = min(self.count / self.total, 1.0)
        width = 24
        filled = int(width * fraction)
        left = elapsed / fraction - elapsed if fraction > 0 else 0.0
        bar = "#" * filled + "." * (width - filled)
        text = (f"{self.description} [{bar}] {self.count}/{self.total} "
                f"{elapsed:5.0f}s elapsed, {left:4.0f}s left")
        return f"{text}  {self.status}" if self.status else text
