"""Kill points: named moments where a crash test may SIGKILL a ``laion`` process.

When ``LAION_KILLPOINT_FDS=W:R`` is set (two pipe ends a test harness passed to the process),
every :func:`reached` call writes one JSON line describing the moment to ``W`` and then waits
for one byte on ``R`` before going on. The harness therefore knows the process is alive and
exactly where it is: it can acknowledge and let it run on, or SIGKILL it while it waits, or
acknowledge and kill it a moment later, mid-way to the next point. Every progress event is a
kill point (see :class:`laion_search.cli.output.Progress`), and so is opening the store.

Unset (always, outside tests), :func:`reached` costs one dictionary lookup. When the harness
closes its end, the process runs on without waiting.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

_ENV = "LAION_KILLPOINT_FDS"
_lock = threading.Lock()
_fds: tuple[int, int] | None | bool = False  # False: not read yet; None: off


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
    global _fds
    line = (json.dumps({"event": event, **info}, default=str) + "\n").encode()
    with _lock:  # one point at a time, whatever thread reaches it
        try:
            os.write(fds[0], line)
            if os.read(fds[1], 1) == b"":  # harness gone: stop waiting
                _fds = None
        except OSError:
            _fds = None
