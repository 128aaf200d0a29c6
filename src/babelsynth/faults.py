"""Fault injection for the reliability tests: named points where this process kills itself with SIGKILL.

A no-op unless $BABELSYNTH_FAULT names the point: `name` (the first time it is reached) or `name@N` (the
N-th time). The kill is a real SIGKILL of the real process (no cleanup, no finally, no atexit), the way an
OOM killer or a preempted node ends a task; tests then resume and compare. Points: the runner's
`stage.<stage>.before_persist` (the stage's work is done and cached, its result not yet written),
`write.after_first_file`, `commit.before_manifest`.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "BABELSYNTH_FAULT"
_reached: Counter = Counter()


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
