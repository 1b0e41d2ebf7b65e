"""A small text progress bar, dependency-free, for downloads and training loops.

    bar = ProgressBar(total=469, desc="epoch 1", unit="step")
    for step in range(469):
        bar.update(1, loss=0.31, accuracy=0.91)
    bar.close()

On a terminal the bar redraws one line in place (at most every `min_interval` seconds):

    epoch 1  [########------------]  42%  197/469 step  85.3 step/s  ETA 0:03  loss=0.31 accuracy=0.91

When the stream is not a TTY (a log file, CI, a pipe) it prints a plain line only every
`plain_interval` seconds and once at the end, so logs stay short. `unit="B"` shows sizes as
KB/MB/GB. `total=None` (unknown) shows the count and rate without a bar or ETA.
"""
import sys
import time

__all__ = ["ProgressBar", "format_duration", "format_count"]


def format_duration(seconds):
    """1:02:03 / 3:07 style; '?' for an unknown duration."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{seconds:02d}"
    return f"{minutes}:{seconds:02d}"


def format_count(value, unit):
    """A count with its unit; bytes (unit 'B') scaled to KB/MB/GB (powers of 1000)."""
    if unit == "B":
        for prefix in ("", "K", "M", "G"):
            if abs(value) < 1000 or prefix == "G":
                return f"{value:.0f} B" if prefix == "" else f"{value:.1f} {prefix}B"
            value /= 1000.0
    if isinstance(value, float) and abs(value) < 100:
        return f"{value:.1f} {unit}".rstrip()
    if isinstance(value, float):
        value = round(value)
    return f"{int(value)} {unit}".rstrip()


def _format_value(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ProgressBar:
    """Progress of `total` units of work: count, percent, rate, ETA, and free key=value postfix.

    Args:
      total: the number of units expected, or None if unknown.
      desc: a short label printed first.
      unit: the name of one unit ("B" for bytes gets KB/MB formatting).
      file: the stream to write to (default sys.stdout, looked up at each write).
      width: the number of characters of the bar itself.
      min_interval: seconds between redraws on a terminal.
      plain_interval: seconds between plain lines when the stream is not a terminal.
      enabled: False makes every method a no-op (for a `--no_progress` flag).
    """

    def __init__(self, total=None, desc="", unit="it", file=None, width=20,
                 min_interval=0.1, plain_interval=10.0, enabled=True):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.width = width
        self.min_interval = min_interval
        self.plain_interval = plain_interval
        self.enabled = enabled
        self.count = 0
        self.postfix = {}
        self.closed = False
        self._file = file
        self._start = time.monotonic()
        self._last_draw = None
        self._last_length = 0

    @property
    def file(self):
        return self._file if self._file is not None else sys.stdout

    @property
    def interactive(self):
        isatty = getattr(self.file, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False

    def elapsed(self):
        return time.monotonic() - self._start

    def rate(self):
        """Units per second since the bar was created (None before any time has passed)."""
        elapsed = self.elapsed()
        return self.count / elapsed if elapsed > 0 else None

    def eta(self):
        """Seconds left at the average rate so far (None if unknown)."""
        rate = self.rate()
        if self.total is None or not rate:
            return None
        return max(self.total - self.count, 0) / rate

    def update(self, n=1, **postfix):
        """Adds `n` done units; keyword arguments replace the postfix shown after the bar."""
        self.count += n
        if postfix:
            self.postfix = postfix
        if not self.enabled or self.closed:
            return
        now = time.monotonic()
        interactive = self.interactive
        interval = self.min_interval if interactive else self.plain_interval
        if self._last_draw is None and not interactive:
            self._last_draw = now  # plain mode: the first line comes after one interval, or at close
            return
        if self._last_draw is None or now - self._last_draw >= interval:
            self._draw(now)

    def close(self, **postfix):
        """Draws the final state and ends the line. Safe to call twice."""
        if postfix:
            self.postfix = postfix
        if self.closed:
            return
        self.closed = True
        if not self.enabled:
            return
        self._draw(time.monotonic(), final=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    def line(self):
        """The current progress as one line of text (no carriage return)."""
        parts = [self.desc] if self.desc else []
        rate = self.rate()
        if self.total:
            fraction = min(max(self.count / self.total, 0.0), 1.0)
            filled = int(round(fraction * self.width))
            parts.append("[" + "#" * filled + "-" * (self.width - filled) + "]")
            parts.append(f"{fraction * 100:3.0f}%")
            if self.unit == "B":
                parts.append(f"{format_count(self.count, 'B')}/{format_count(self.total, 'B')}")
            else:
                parts.append(f"{self.count}/{self.total} {self.unit}".rstrip())
        else:
            parts.append(format_count(self.count, self.unit))
        if rate is not None:
            parts.append(f"{format_count(rate, self.unit)}/s")
        if self.closed:
            parts.append(f"in {format_duration(self.elapsed())}")
        elif self.total:
            parts.append(f"ETA {format_duration(self.eta())}")
        if self.postfix:
            parts.append(" ".join(f"{key}={_format_value(value)}" for key, value in self.postfix.items()))
        return "  ".join(parts)

    def _draw(self, now, final=False):
        self._last_draw = now
        text = self.line()
        stream = self.file
        if self.interactive:
            padding = " " * max(self._last_length - len(text), 0)
            stream.write("\r" + text + padding + ("\n" if final else ""))
            self._last_length = len(text)
        else:
            stream.write(text + "\n")
        stream.flush()
