"""Shard numbers: ``"0-9"``, ``"3,7,12-15"`` — parsed without numpy or pyarrow, so a command can
read its arguments before the heavy imports (re-exported by :mod:`laion_search.sources.shards`)."""

from __future__ import annotations

import re

from laion_search.errors import UsageError

#: ``id = shard * ID_STRIDE + row``: unique, stable, and readable (id 3000000042 is shard 3, row 42).
ID_STRIDE = 1_000_000_000
MAX_SHARD = (2**63 - 1) // ID_STRIDE - 1

#: The CLIP model behind LAION's published embeddings, by dimension: LAION-400M (the guide's
#: shards) is OpenAI ViT-B/32; LAION-5B, ClickHouse's LAION-5B subset and SISAP's LAION2B-en
#: are OpenAI ViT-L/14. A search by text or image encodes with the model the table records.
MODELS_BY_DIM = {512: "openai/clip-vit-base-patch32", 768: "openai/clip-vit-large-patch14"}


def model_for_dim(dim: int | None) -> str:
    """The model LAION used for ``dim``-d embeddings, or "" when none is known."""
    return MODELS_BY_DIM.get(int(dim), "") if dim else ""


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
