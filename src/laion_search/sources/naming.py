"""Shard numbers: ``"0-9"``, ``"3,7,12-15"`` — parsed without numpy or pyarrow, so a command can
read its arguments before the heavy imports (re-exported by :mod:`laion_search.sources.shards`)."""

from __future__ import annotations

import re

from laion_search.errors import UsageError
from laion_search.schema import MAX_SHARD



def parse_shard_spec(spec: str | None) -> list[int] | None:
    """Parse ``"0-9"``, ``"3,7,12-15"`` or ``"5"`` into a sorted list of shard numbers.

    ``None`` or ``""`` means "all shards found".
    """
    if spec is None or not str(spec).strip():
        return None
    out: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise UsageError(f"shard range {part!r} runs backwards")
            if hi - lo > 1_000_000:
                raise UsageError(f"shard range {part!r} is too large")
            out.update(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", part):
            out.add(int(part))
        else:
            raise UsageError(f"invalid shard list {spec!r}: expected e.g. 0-9 or 3,7,12-15")
    if any(n > MAX_SHARD for n in out):
        raise UsageError(f"shard numbers must be at most {MAX_SHARD}")
    return sorted(out)
