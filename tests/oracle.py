"""An oracle independent of the product: search ground truth computed with numpy and pyarrow from
the *source* files (``img_emb_N.npy``, ``text_emb_N.npy``, ``metadata_N.parquet``), never from
the table. Tests check exact, indexed and filtered results against it (ids, distances, recall),
so a product that agrees with itself but not with the data fails.

Filter semantics are written out here from the documented rules (docs/search.md): ``nsfw`` exclude
drops NSFW and UNSURE, only keeps NSFW; ``min_similarity`` is ``similarity >= v`` in Float32;
``caption_contains`` / ``col~text`` a case-insensitive substring; ``col OP number`` a comparison.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq

STRIDE = 1_000_000_000  # id = shard × 10⁹ + row (docs/ingest.md)


def _find(root: Path, kind: str, name: str, ext: str) -> Path:
    for p in (root / f"{kind}_{name}.{ext}", root / kind / f"{kind}_{name}.{ext}"):
        if p.exists():
            return p
    raise FileNotFoundError(root / f"{kind}_{name}.{ext}")


@dataclass
class Source:
    ids: np.ndarray
    image: np.ndarray
    text: np.ndarray
    meta: dict[str, np.ndarray]

    @classmethod
    def load(cls, root: Path | str, shards: Sequence[int], pad: int = 0) -> "Source":
        root = Path(root)
        ids, img, txt, meta = [], [], [], []
        for n in shards:
            name = f"{n:0{pad}d}" if pad else str(n)
            a = np.load(_find(root, "img_emb", name, "npy")).astype(np.float32)
            img.append(a)
            txt.append(np.load(_find(root, "text_emb", name, "npy")).astype(np.float32))
            ids.append(np.int64(n) * STRIDE + np.arange(a.shape[0], dtype=np.int64))
            meta.append(pq.read_table(_find(root, "metadata", name, "parquet")))
        cols = meta[0].column_names
        return cls(np.concatenate(ids), np.concatenate(img), np.concatenate(txt),
                   {c: np.concatenate([np.asarray(m.column(c).to_pylist(), dtype=object) for m in meta])
                    for c in cols})

    def row(self, rid: int) -> int:
        return int(np.flatnonzero(self.ids == rid)[0])

    def vector(self, rid: int, modality: str = "image") -> np.ndarray:
        return (self.image if modality == "image" else self.text)[self.row(rid)]

    # -- filters ------------------------------------------------------------------------------------
    def mask(self, nsfw: str = "any", min_similarity: float | None = None, caption_contains: str | None = None,
             where: Iterable[str] = ()) -> np.ndarray:
        m = np.ones(len(self.ids), bool)
        if nsfw == "exclude":
            m &= ~np.isin(self.meta["NSFW"], ["NSFW", "UNSURE"])
        elif nsfw == "only":
            m &= self.meta["NSFW"] == "NSFW"
        if min_similarity is not None:
            m &= self.meta["similarity"].astype(np.float32) >= np.float32(min_similarity)
        if caption_contains:
            m &= _contains(self.meta["caption"], caption_contains)
        for expr in where:
            col, op, raw = re.match(r"^\s*(\w+)\s*(>=|<=|!=|=|<|>|~)\s*(.*?)\s*$", expr).groups()
            values = self.ids if col == "id" else self.meta[col]
            if op == "~":
                m &= _contains(values, raw)
                continue
            if isinstance(values[0], str):
                v: object = raw
            else:
                values = values.astype(np.float64)
                v = float(raw)
            m &= {"=": values == v, "!=": values != v, "<": values < v, "<=": values <= v, ">": values > v,
                  ">=": values >= v}[op]
        return m

    def filters_mask(self, f) -> np.ndarray:
        """The mask of a ``laion_search.search.Filters`` (its fields read, nothing of its SQL)."""
        return self.mask(f.nsfw, f.min_similarity, f.caption_contains, f.where)

    # -- search -------------------------------------------------------------------------------------
    def distances(self, q: np.ndarray, modality: str = "image") -> np.ndarray:
        v = self.image if modality == "image" else self.text
        q = np.asarray(q, np.float64)
        return 1.0 - (v.astype(np.float64) @ q) / (np.linalg.norm(v.astype(np.float64), axis=1) * np.linalg.norm(q))

    def topk(self, q: np.ndarray, k: int, *, modality: str = "image", mask: np.ndarray | None = None,
             exclude: Iterable[int] = ()) -> tuple[list[int], np.ndarray]:
        """Exact cosine top-k ids and distances among the rows ``mask`` allows, ``exclude`` left out."""
        d = self.distances(q, modality)
        allowed = np.ones(len(self.ids), bool) if mask is None else mask.copy()
        ex = list(exclude)
        if ex:
            allowed &= ~np.isin(self.ids, ex)
        idx = np.flatnonzero(allowed)
        order = idx[np.argsort(d[idx], kind="stable")][:k]
        return self.ids[order].tolist(), d[order]

    def like(self, rid: int, k: int, *, modality: str = "image", mask: np.ndarray | None = None
             ) -> tuple[list[int], np.ndarray]:
        """"More like this row": its stored vector, the row itself left out."""
        return self.topk(self.vector(rid, modality), k, modality=modality, mask=mask, exclude=[rid])


def _contains(values: np.ndarray, needle: str) -> np.ndarray:
    n = needle.lower()
    return np.array([v is not None and n in v.lower() for v in values], bool)


def recall(got: Iterable[int], truth: Iterable[int]) -> float:
    truth = list(truth)
    return len(set(got) & set(truth)) / max(1, len(truth))
