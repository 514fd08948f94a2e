"""``laion bench data sisap``: a SISAP-LAION2B-layout set generated here — the database ``.h5``,
held-out queries from the same distribution, and their gold standard computed by numpy — so that
recall is measured against an oracle independent of the engine, at any size the disk allows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np


def build(out: str | os.PathLike[str], rows: int, *, queries: int = 1000, dim: int = 768, k: int = 100,
          seed: int = 0, log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Write ``laion2B-en-clip768v2-n=<rows>.h5`` (``emb``, float16), ``public-queries-n=<queries>.h5``
    (``emb``) and ``gold-standard-dbsize=<rows>--public-queries-n=<queries>.h5`` (``knns`` 1-based,
    ``dists`` dot products) into ``out``. Queries are drawn after the database rows, from the same
    generator (never in the table). The gold standard is exact: the database is streamed through
    numpy in chunks against every query (memory bounded by the chunk)."""
    import h5py

    from laion_search.sources.synth import synth_sisap_h5

    say = log or (lambda m: None)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"laion2B-en-clip768v2-n={rows}.h5"
    qfile = root / f"public-queries-n={queries}.h5"
    gold = root / f"gold-standard-dbsize={rows}--public-queries-n={queries}.h5"
    if not data.exists() or not qfile.exists():
        say(f"database: {rows:,} × {dim} → {data}")
        # rows + queries drawn in one stream; the queries are its tail, written to their own file
        synth_sisap_h5(data, rows, dim=dim, seed=seed, tail=(qfile, queries))
    if not gold.exists():
        with h5py.File(qfile, "r") as f:
            q = np.asarray(f["emb"][:], dtype=np.float32)
        say(f"gold standard: {queries:,} queries × {rows:,} rows, numpy")
        best_d = np.full((len(q), k), -np.inf, dtype=np.float32)
        best_i = np.zeros((len(q), k), dtype=np.int64)
        with h5py.File(data, "r") as f:
            emb = f["emb"]
            for start in range(0, rows, 262_144):
                block = np.asarray(emb[start:start + 262_144], dtype=np.float32)
                s = q @ block.T
                d = np.concatenate([best_d, s], axis=1)
                i = np.concatenate([best_i, np.arange(start, start + len(block))[None, :].repeat(len(q), 0)], axis=1)
                top = np.argpartition(-d, k - 1, axis=1)[:, :k]
                best_d = np.take_along_axis(d, top, 1)
                best_i = np.take_along_axis(i, top, 1)
        order = np.argsort(-best_d, axis=1)
        tmp = gold.with_name(gold.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("knns", data=(np.take_along_axis(best_i, order, 1) + 1).astype(np.int32))
            f.create_dataset("dists", data=np.take_along_axis(best_d, order, 1))
        os.replace(tmp, gold)
    return {"data": str(data), "queries": str(qfile), "gold": str(gold), "rows": rows, "dim": dim}
