"""core.progress.ProgressBar: text, rate, ETA, terminal vs plain output."""
import io

from core import progress
from core.progress import ProgressBar, format_count, format_duration


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def with_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    return clock


def test_format_helpers():
    assert format_duration(0) == "0:00"
    assert format_duration(75) == "1:15"
    assert format_duration(3723) == "1:02:03"
    assert format_duration(None) == "?"
    assert format_count(999, "B") == "999 B"
    assert format_count(9_719_438, "B") == "9.7 MB"
    assert format_count(47_040_016_000, "B") == "47.0 GB"
    assert format_count(12, "step") == "12 step"
    assert format_count(85.34, "step") == "85.3 step"
    assert format_count(4321.7, "img") == "4322 img"


def test_line_has_percent_count_rate_eta_and_postfix(monkeypatch):
    clock = with_clock(monkeypatch)
    bar = ProgressBar(total=200, desc="epoch 1", unit="step", file=io.StringIO(), width=10)
    clock.now += 10.0
    bar.update(50, loss=0.25, accuracy=0.875)
    line = bar.line()
    assert line.startswith("epoch 1  [##--------]")  # 25% of 10 characters rounds to 2
    assert " 25%" in line and "50/200 step" in line
    assert "5.0 step/s" in line
    assert "ETA 0:30" in line  # 150 steps left at 5 steps/s
    assert line.endswith("loss=0.25 accuracy=0.875")
    assert bar.rate() == 5.0 and bar.eta() == 30.0


def test_terminal_redraws_in_place_and_close_ends_line(monkeypatch):
    clock = with_clock(monkeypatch)
    out = Terminal()
    bar = ProgressBar(total=3, desc="d", unit="it", file=out, min_interval=0.5)
    for _ in range(3):
        clock.now += 1.0
        bar.update()
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert "3/3 it" in text.split("\r")[-1] and "in 0:03" in text.split("\r")[-1]
    bar.close()
    assert out.getvalue() == text  # closing twice draws nothing more


def test_terminal_throttles_redraws(monkeypatch):
    clock = with_clock(monkeypatch)
    out = Terminal()
    bar = ProgressBar(total=1000, file=out, min_interval=1.0)
    for _ in range(1000):
        clock.now += 0.01  # 10 s in all: about one redraw per second
        bar.update()
    assert 9 <= out.getvalue().count("\r") <= 11


def test_plain_stream_prints_occasional_lines(monkeypatch):
    clock = with_clock(monkeypatch)
    out = io.StringIO()  # not a TTY: no carriage returns, a line every plain_interval seconds
    bar = ProgressBar(total=100, desc="download", unit="B", file=out, plain_interval=10.0)
    for _ in range(100):
        clock.now += 1.0
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert 9 <= len(lines) <= 11
    assert "100%" in lines[-1] and "100 B/100 B" in lines[-1]


def test_unknown_total_and_disabled(monkeypatch):
    clock = with_clock(monkeypatch)
    out = io.StringIO()
    bar = ProgressBar(total=None, desc="x", unit="B", file=out)
    clock.now += 2.0
    bar.update(4000)
    bar.close()
    assert "4.0 KB" in out.getvalue() and "2.0 KB/s" in out.getvalue()
    assert "[" not in out.getvalue() and "ETA" not in out.getvalue()

    quiet = io.StringIO()
    with ProgressBar(total=5, file=quiet, enabled=False) as bar:
        bar.update(5, loss=1.0)
    assert quiet.getvalue() == "" and bar.count == 5
