"""Progress without a terminal: plain lines every N seconds, never carriage-return updates."""

from __future__ import annotations

import io

from binsparse_kernels.progress import LineProgress, progress_bar


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_line_progress_writes_a_line_every_n_seconds():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(100, desc="train", unit="step", every=10, stream=out, clock=clock)
    for _ in range(100):
        clock.t += 0.5  # 2 steps per second: a line every 20 steps
        bar.update(1)
        bar.set_postfix(fvu="0.500")
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(":")[1].split()[0] for line in lines] == ["20/100", "40/100", "60/100", "80/100", "100/100"]
    assert lines[0] == "train: 20/100 step (20%), 0:10 elapsed, 2.0 step/s, about 0:40 left; fvu=0.500"
    assert lines[-1].startswith("train: 100/100 step (100%), 0:50 elapsed, 2.0 step/s; fvu")


def test_resumed_progress_counts_its_own_rate_and_close_writes_the_end():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(10, desc="cache", unit="tok", initial=4, every=100, stream=out, clock=clock)
    clock.t = 3.0
    bar.update(3)
    assert out.getvalue() == ""
    bar.close()
    assert out.getvalue() == "cache: 7/10 tok (70%), 0:03 elapsed, 1.0 tok/s, about 0:03 left\n"


def test_slow_progress_says_seconds_per_step():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(10, desc="train", unit="step", every=30, stream=out, clock=clock)
    clock.t = 80.0
    bar.update(1)
    assert out.getvalue() == "train: 1/10 step (10%), 1:20 elapsed, 80.0 s/step, about 12:00 left\n"


def test_progress_bar_picks_lines_without_a_terminal(monkeypatch):
    monkeypatch.setenv("BINSPARSE_PROGRESS_SECONDS", "7")
    bar = progress_bar(5, desc="x", unit="step", stream=io.StringIO())
    assert isinstance(bar, LineProgress) and bar.every == 7.0

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert not isinstance(progress_bar(5, desc="x", unit="step", stream=Tty()), LineProgress)
