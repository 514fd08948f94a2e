"""Small thread-safe LRU caches with hit counters, for a long-running server.

Two are used by ``laion serve``: encoded text queries (the CLIP forward pass is the costly part
of a text search) and whole results of identical requests. Result keys include the store's
:meth:`~laion_search.store.Store.version`, which changes with every ingest and index change,
so a cached result is never stale.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable


class LRUCache:
    """At most ``size`` entries; the least recently used goes first. ``size=0`` disables it."""

    def __init__(self, size: int):
        self.size = max(0, int(size))
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any:
        """The value, or None (counted as a miss)."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        if not self.size:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """``(value, hit)``; computes outside the lock (two racing misses both compute)."""
        value = self.get(key)
        if value is not None:
            return value, True
        value = compute()
        self.put(key, value)
        return value, False

    def stats(self) -> dict[str, Any]:
        with self._lock:
            total = self.hits + self.misses
            return {"size": len(self._data), "max_size": self.size, "hits": self.hits, "misses": self.misses,
                    "hit_rate": round(self.hits / total, 4) if total else None}


def request_key(kind: str, fields: dict[str, Any], blob: bytes | None = None) -> str:
    """A stable key for a normalised request: its fields as canonical JSON (sorted keys, defaults
    filled in by the caller), plus a digest of any binary part (an uploaded image, a vector)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(kind.encode())
    h.update(json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode())
    if blob is not None:
        h.update(b"\0")
        h.update(blob)
    return h.hexdigest()
