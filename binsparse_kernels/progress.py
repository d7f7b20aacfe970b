"""Progress that reads well in a terminal and in a log file.

On a terminal, a tqdm bar. When stderr is not a terminal (a log file, CI, ``nohup``), a bar would
write one carriage-return line per update; instead a plain line is written every
``BINSPARSE_PROGRESS_SECONDS`` seconds (default 30) and at the end.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional, TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close``, written as one plain line every ``every`` seconds."""

    def __init__(self, total: int, *, desc: str, unit: str, initial: int = 0, every: float = 30.0,
                 stream: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every, self.stream, self.clock = every, stream or sys.stderr, clock
        self.start = self.last = clock()
        self.initial = initial
        self.postfix = ""
        self.closed = False
        self._written_at = None

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every:
            self._write(now)

    def _write(self, now: float) -> None:
        elapsed = now - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        speed = f"{1 / rate:,.1f} s/{self.unit}" if 0 < rate < 1 else f"{rate:,.1f} {self.unit}/s"
        line = f"{self.desc}: {self.n:,}/{self.total:,} {self.unit} ({100 * self.n / max(self.total, 1):.0f}%), " \
               f"{_duration(elapsed)} elapsed, {speed}"
        if rate > 0 and self.n < self.total:
            line += f", about {_duration((self.total - self.n) / rate)} left"
        if self.postfix:
            line += f"; {self.postfix}"
        print(line, file=self.stream, flush=True)
        self.last, self._written_at = now, self.n

    def close(self) -> None:
        if not self.closed and self._written_at != self.n:
            self._write(self.clock())
        self.closed = True


def progress_bar(total: int, *, desc: str, unit: str, initial: int = 0, disable: bool = False,
                 stream: Optional[TextIO] = None):
    """A tqdm bar on a terminal, a ``LineProgress`` otherwise (see the module docstring)."""
    from tqdm.auto import tqdm

    stream = stream or sys.stderr
    if disable:
        return tqdm(total=total, disable=True)
    if stream.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream)
    every = float(os.environ.get("BINSPARSE_PROGRESS_SECONDS", "30"))
    return LineProgress(total, desc=desc, unit=unit, initial=initial, every=every, stream=stream)
