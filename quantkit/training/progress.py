"""Progress of a long stage: a bar on a terminal, a few plain lines in a log.

    bar = Progress(total=600, desc="train-tokenizer")
    for step in range(600):
        ...
        bar.update(1, loss=0.123)
    bar.close()

On a TTY this is a tqdm bar. Anywhere else (CI, ``make demo > log 2>&1``, a cluster job) a carriage-return bar
would become hundreds of lines, so it prints one line per ``every_percent`` of the stage or per ``every_seconds``,
whichever comes first: ``[quantkit] train-tokenizer 300/600 (50%) 12.3 it/s ETA 0:24 loss=0.1230``.
``enabled=False`` (the ``--no-progress`` flags) or ``QUANTKIT_PROGRESS=0`` in the environment silences it.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO


def progress_enabled(requested: bool = True) -> bool:
    """``requested`` unless the environment says ``QUANTKIT_PROGRESS=0`` (or false / off / no)."""
    env = os.environ.get("QUANTKIT_PROGRESS", "").strip().lower()
    return requested and env not in ("0", "false", "off", "no")


def _clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _value_text(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
    """Counts ``total`` units from ``initial``; ``update(n, **postfix)`` advances and shows the latest postfix."""

    def __init__(self, total: int, desc: str, initial: int = 0, enabled: bool = True, stream: TextIO | None = None,
                 every_percent: float = 10.0, every_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.n = int(total), desc, int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = progress_enabled(enabled)
        self.every_percent, self.every_seconds, self.clock = every_percent, every_seconds, clock
        self.postfix: dict[str, object] = {}
        self._bar = None
        self._start_n, self._t0 = self.n, clock()
        self._last_t, self._last_n = self._t0, self.n
        self.lines_written = 0
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if postfix:
            self.postfix.update(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _value_text(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n)
            return
        now = self.clock()
        step = max(1, int(self.total * self.every_percent / 100))
        crossed = self.n // step > self._last_n // step
        if crossed or now - self._last_t >= self.every_seconds or self.n == self.total:
            self._write_line(now)

    def set_postfix(self, **postfix) -> None:
        self.update(0, **postfix)

    def _write_line(self, now: float) -> None:
        if self.n == self._last_n and self.lines_written:
            return
        elapsed = max(now - self._t0, 1e-9)
        done = self.n - self._start_n
        rate = done / elapsed
        parts = [f"[quantkit] {self.desc} {self.n}/{self.total}"]
        if self.total:
            parts.append(f"({100 * self.n / self.total:.0f}%)")
        parts.append(f"{rate:.3g} it/s" if rate >= 0.1 else f"{1 / rate:.3g} s/it" if rate > 0 else "")
        if 0 < rate and self.n < self.total:
            parts.append(f"ETA {_clock_text((self.total - self.n) / rate)}")
        parts += [f"{k}={_value_text(v)}" for k, v in self.postfix.items()]
        print(" ".join(p for p in parts if p), file=self.stream, flush=True)
        self.lines_written += 1
        self._last_t, self._last_n = now, self.n

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n != self._last_n:
            self._write_line(self.clock())
        self.enabled = False
