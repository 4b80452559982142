"""Progress of long loops (training epochs, the mixed protocol) through tqdm.

A thin wrapper so callers set a status text (the running loss) the same way on a terminal and
in a log file: redrawn in place on a terminal, at most every 30 seconds in a log.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    """Counts steps of a named task and shows rate, time left and a short status text."""

    def __init__(self, total: int, description: str, *, enabled: bool = True, stream=None):
        stream = stream or sys.stderr
        interactive = bool(getattr(stream, "isatty", lambda: False)())
        self.bar = tqdm(total=max(int(total), 1), desc=description, disable=not enabled,
                        file=stream, leave=True, dynamic_ncols=interactive,
                        mininterval=0.2 if interactive else 30.0, ascii=not interactive)

    def update(self, steps: int = 1, status: str | None = None) -> None:
        if status is not None:
            self.bar.set_postfix_str(status, refresh=False)
        if steps:
            self.bar.update(steps)

    def close(self, status: str | None = None) -> None:
        if status is not None:
            self.bar.set_postfix_str(status, refresh=False)
        self.bar.close()
