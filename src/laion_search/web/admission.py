"""Admission control for a server's costly query classes.

``laion serve`` classes each query: **indexed** (walks a vector index: milliseconds, admitted
at once), **exact scan** (reads every row: hundreds of milliseconds per million rows) and
**encoding** (a CLIP forward pass). Scans and encodings each pass an :class:`AdmissionGate`:
at most ``running`` at a time, at most ``queue`` more waiting; beyond that a query is shed at
once with :class:`~laion_search.errors.Overloaded` (HTTP 429 + ``Retry-After``). Indexed
searches never pass a gate, so they never wait behind scans; scans also run with capped
engine threads (``scan_threads``) so that cores stay free for them.

A server shutting down closes its gates (:meth:`AdmissionGate.close`): every query still waiting
is refused at once with :class:`~laion_search.errors.ShuttingDown` (HTTP 503) instead of
starting after the running ones were cancelled.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from laion_search.errors import Overloaded, ShuttingDown


class AdmissionGate:
    """At most ``running`` holders, at most ``queue`` waiters; the rest are shed."""

    def __init__(self, name: str, running: int, queue: int, max_wait: float = 30.0):
        if running < 1 or queue < 0:
            raise ValueError("running must be >= 1 and queue >= 0")
        self.name, self.running, self.queue, self.max_wait = name, int(running), int(queue), float(max_wait)
        # one condition for the counts and the waiting (a semaphore cannot be woken by close())
        self._cond = threading.Condition(threading.Lock())
        self._closed: str | None = None
        self.active = self.waiting = 0
        self.admitted = self.shed = 0
        self._seconds = 0.0  # total time held, for the mean service time behind Retry-After

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the mean service time × the queue ahead
        per running slot (at least 1)."""
        mean = self._seconds / self.admitted if self.admitted else 1.0
        return max(1, math.ceil(mean * (self.waiting + 1) / self.running))

    def close(self, reason: str = "the server is shutting down") -> None:
        """Admit nothing more: every waiting query and every later one gets
        :class:`ShuttingDown` at once (the running ones keep their slots until they end)."""
        with self._cond:
            self._closed = reason
            self._cond.notify_all()

    @contextmanager
    def admit(self) -> Iterator[None]:
        with self._cond:
            if self._closed is not None:
                raise ShuttingDown(self._closed)
            if self.active + self.waiting >= self.running + self.queue:
                self.shed += 1
                raise Overloaded(f"too many {self.name} queries in flight ({self.running} running, {self.queue} "
                                 "queued); retry later", retry_after=self.retry_after())
            self.waiting += 1
            deadline = time.monotonic() + self.max_wait
            try:
                while self.active >= self.running and self._closed is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                self.waiting -= 1
            if self._closed is not None:
                raise ShuttingDown(self._closed)
            if self.active >= self.running:
                self.shed += 1
                raise Overloaded(f"{self.name} queue wait over {self.max_wait:g} s; retry later",
                                 retry_after=self.retry_after())
            self.active += 1
            self.admitted += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._cond:
                self.active -= 1
                self._seconds += time.perf_counter() - t0
                self._cond.notify()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"running": self.active, "waiting": self.waiting, "max_running": self.running,
                    "max_queue": self.queue, "admitted": self.admitted, "shed": self.shed}
