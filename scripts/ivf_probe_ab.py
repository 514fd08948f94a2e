"""IVF probes now against the probes of 87b5ca8, side by side in one process (docs/indexes.md
§ "Every core reads a probe").

87b5ca8 read a probe's lists on one thread (the engine's defaults give a reading thread at least
163,840 rows) and chose the lists with a BLAS matrix-vector product, whose worker threads then spin
on the cores the statement needs. This script swaps those two back in for the "old" blocks.

The blocks run ABBA (old, new, new, old, …) over disjoint queries: interleaving query by query would
charge the old blocks' spinning BLAS threads to the new ones too.

    python scripts/ivf_probe_ab.py --db DIR --shards DIR --nprobe 22

DIR: a store built by ``laion bench ivf --dir D`` (D/db-synth-1000000, D/shards-1000000).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from laion_search.api import connect
from laion_search.index import ivf
from laion_search.search import search


def old_nearest_lists(query: np.ndarray, centroids: np.ndarray, nprobe: int) -> np.ndarray:
    scores = centroids @ np.asarray(query, dtype=np.float32)
    n = min(int(nprobe), len(centroids))
    top = np.argpartition(-scores, n - 1)[:n]
    return top[np.argsort(-scores[top])].astype(np.uint32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--nprobe", type=int, default=22)
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args()
    db = connect(a.db)
    base = np.load(f"{a.shards}/img_emb_0.npy", mmap_mode="r")
    texts = np.load(f"{a.shards}/text_emb_0.npy", mmap_mode="r")
    pick = np.random.default_rng(a.seed).choice(len(texts), size=8 * a.block, replace=False)

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    new_lists = ivf.nearest_lists
    new_read = dict(ivf.state(db).read_settings)
    old_read = {k: v for k, v in new_read.items() if "concurrent_read" not in k}

    def use(name: str) -> None:
        ivf.state(db).read_settings = new_read if name == "new" else old_read
        ivf.nearest_lists = new_lists if name == "new" else old_nearest_lists

    for kind, queries in (("text→image", unit(texts[pick])), ("image→image", unit(base[pick]))):
        search(db, vector=queries[-1], k=10, nprobe=a.nprobe)
        lat: dict[str, list[float]] = {"old": [], "new": []}
        for b, name in enumerate(("old", "new", "new", "old", "old", "new", "new", "old")):
            use(name)
            for q in queries[b * a.block:(b + 1) * a.block]:
                t = time.perf_counter()
                search(db, vector=q, k=10, nprobe=a.nprobe)
                lat[name].append(time.perf_counter() - t)
        old, new = (statistics.median(lat[x]) * 1000 for x in ("old", "new"))
        print(f"nprobe {a.nprobe} {kind}: p50 old {old:.1f} ms, new {new:.1f} ms: {old / new:.2f}× faster", flush=True)
    use("new")


if __name__ == "__main__":
    main()
