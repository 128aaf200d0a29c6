"""Progress of long work: done/total, rate and ETA. A bar on a terminal (tqdm); in a task log (Airflow
captures stderr and logging into a file) periodic log lines instead, because a bar redrawn into a file is
one unreadable line per refresh.

Backends report work as it finishes (`Progress.advance`); the runner names what is running with
`label("recaption shard 3")`, so a backend's line says which stage and shard it belongs to without knowing.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO

log = logging.getLogger(__name__)
INTERVAL_ENV = "BABELSYNTH_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0
_LABEL: ContextVar[str] = ContextVar("babelsynth_progress_label", default="")


@contextmanager
def label(text: str) -> Iterator[None]:
    """Name the work that runs inside (a stage and shard); progress lines start with it."""
    token = _LABEL.set(text)
    try:
        yield
    finally:
        _LABEL.reset(token)


def current_label() -> str:
    return _LABEL.get()


def duration(seconds: float) -> str:
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def line(desc: str, done: int, total: int, elapsed: float, unit: str) -> str:
    """'recaption shard 3: 120/512 requests (23%), 4.1 requests/s, ETA 1m35s'."""
    rate = done / elapsed if elapsed > 0 else 0.0
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    speed = (
        f"{rate:.1f} {unit}/s" if rate >= 1 or not done else f"{elapsed / done:.1f} s per {unit.rstrip('s')}"
    )
    eta = f", ETA {duration((total - done) / rate)}" if rate > 0 and done < total else ""
    took = f", {duration(elapsed)}" if done >= total else ""
    return f"{desc}: {done}/{total} {unit}{pct}, {speed}{eta}{took}"


class Progress:
    """One piece of work of known size. Thread-safe: chat backends deliver answers from worker threads."""

    def __init__(
        self,
        total: int,
        unit: str,
        desc: str | None = None,
        stream: IO[str] | None = None,
        interval_s: float | None = None,
    ):
        self.total, self.unit = total, unit
        self.desc = desc or current_label() or "work"
        self.stream = stream if stream is not None else sys.stderr
        env = os.environ.get(INTERVAL_ENV)
        self.interval = interval_s if interval_s is not None else float(env) if env else DEFAULT_INTERVAL_S
        self.done = 0
        self.lines = 0  # log lines written (non-terminal)
        self.t0 = self.last = time.monotonic()
        self.lock = threading.Lock()
        self.bar = None
        if total > 0 and _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=f" {unit}", desc=self.desc, file=self.stream, leave=False)

    def advance(self, n: int = 1) -> None:
        with self.lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
                return
            now = time.monotonic()
            if now - self.last >= self.interval and self.done < self.total:
                self.last = now
                self._log()

    def _log(self) -> None:
        self.lines += 1
        log.info("%s", line(self.desc, self.done, self.total, time.monotonic() - self.t0, self.unit))

    def close(self) -> None:
        """The bar goes away; in a log, a last line when the work outlasted one interval."""
        with self.lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            elif self.total > 0 and time.monotonic() - self.t0 >= self.interval:
                self._log()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or fake stream
        return False
