"""Shard numbers: ``"0-9"``, ``"3,7,12-15"`` — parsed without numpy or pyarrow, so a command can
read its arguments before the heavy imports (re-exported by :mod:`laion_search.sources.shards`)."""

from __future__ import annotations

import re

from laion_search.errors import UsageError
from laion_search.schema import MAX_SHARD

#: The three files of a LAION shard, and their extensions.
KINDS = ("img_emb", "text_emb", "metadata")
EXT = {"img_emb": ".npy", "text_emb": ".npy", "metadata": ".parquet"}
#: ``img_emb_7.npy`` or zero-padded ``img_emb_0007.npy`` → shard 7.
NAME_RE = {kind: re.compile(rf"^{kind}_(\d+){re.escape(EXT[kind])}$") for kind in KINDS}


def shard_file_name(kind: str, shard: int, pad: int = 0) -> str:
    """``shard_file_name("img_emb", 7, pad=4)`` → ``img_emb_0007.npy`` (LAION-5B's zero padding;
    ``pad=0``: ``img_emb_7.npy`` as in ClickHouse's guide)."""
    return f"{kind}_{shard:0{pad}d}{EXT[kind]}" if pad else f"{kind}_{shard}{EXT[kind]}"


def shard_file_relpath(kind: str, shard: int, pad: int = 0, layout: str = "flat") -> str:
    """The file's path under a shard directory: ``flat`` (``img_emb_7.npy``) or ``folders``
    (``img_emb/img_emb_7.npy``, as LAION publishes them)."""
    name = shard_file_name(kind, shard, pad)
    return f"{kind}/{name}" if layout == "folders" else name


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
