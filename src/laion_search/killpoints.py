"""Kill points: named moments where a crash test may SIGKILL a ``laion`` process.

When ``LAION_KILLPOINT_FDS=W:R`` is set (two pipe ends a test harness passed to the process),
every :func:`reached` call writes one JSON line describing the moment to ``W`` and then waits
for one byte on ``R`` before going on. The harness therefore knows the process is alive and
exactly where it is: it can acknowledge and let it run on, or SIGKILL it while it waits, or
acknowledge and kill it a moment later, mid-way to the next point. Every progress event is a
kill point (see :class:`laion_search.cli.output.Progress`), and so is opening the store.

A kill mid-way between two points is measured in events too, so a seed replays: the harness may
answer a point with ``STEP_BASE + n`` instead of ``1``, and the process then SIGKILLs itself at
its ``n``-th :func:`step` from there, unless it reaches the next point first (then it waits there
as usual). The embedded backend calls :func:`step` before and after every statement, so such a
kill lands between two statements of the work between two points (after an insert batch, after
``REPLACE PARTITION`` and before the shard's record, ...), at the same statement on every run.

Unset (always, outside tests), :func:`reached` costs one dictionary lookup and :func:`step` one
global read. When the harness closes its end, the process runs on without waiting.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

_ENV = "LAION_KILLPOINT_FDS"
_lock = threading.Lock()
_fds: tuple[int, int] | None | bool = False  # False: not read yet; None: off
#: An acknowledgement byte of ``STEP_BASE + n`` (n in 1..127) arms a self-SIGKILL at the n-th step.
STEP_BASE = 0x80
_steps_left = 0  # 0: no self-kill armed


def _channel() -> tuple[int, int] | None:
    global _fds
    if _fds is False:
        spec = os.environ.get(_ENV, "")
        try:
            w, r = (int(x) for x in spec.split(":"))
            _fds = (w, r)
        except ValueError:
            _fds = None
    return _fds  # type: ignore[return-value]


def reached(event: str, **info: Any) -> None:
    """Report ``event`` to the harness and wait for its go-ahead (no-op unless under a harness)."""
    fds = _channel()
    if fds is None:
        return
    global _fds, _steps_left
    line = (json.dumps({"event": event, **info}, default=str) + "\n").encode()
    with _lock:  # one point at a time, whatever thread reaches it
        try:
            os.write(fds[0], line)
            ack = os.read(fds[1], 1)
            if ack == b"":  # harness gone: stop waiting
                _fds = None
            elif ack[0] > STEP_BASE:
                _steps_left = ack[0] - STEP_BASE
        except OSError:
            _fds = None


def step() -> None:
    """A moment between two kill points (a statement's start or end): the harness may have asked
    for a SIGKILL at the n-th one after a point (see the module docstring)."""
    global _steps_left
    if not _steps_left:
        return
    with _lock:
        if _steps_left:
            _steps_left -= 1
            if not _steps_left:
                os.kill(os.getpid(), signal.SIGKILL)
