"""One entry for every index kind (``hnsw``, ``ivf``, ``scan``, ``text``): which module builds or drops an index of a given ``kind``,
and the defaults each kind takes (the guide's HNSW parameters included). The CLI, the Python API
and the web app call these, so the dispatch and the defaults live in one place."""

from __future__ import annotations

from typing import Any, Callable

from laion_search.errors import UsageError
from laion_search.index import hnsw, ivf, scan, text
from laion_search.schema import DEFAULT_IVF_CODES, INDEX_NAMES, scan_column

KINDS = ("hnsw", "ivf", "scan", "text")
ProgressFn = Callable[[dict[str, Any]], None]


def check_kind(kind: str, kinds: tuple[str, ...] = KINDS) -> str:
    if kind not in kinds:
        raise UsageError(f"--kind must be {', '.join(kinds[:-1])} or {kinds[-1]}, got {kind!r}")
    return kind


def hnsw_parameters(*, guide: bool = False, m: int | None = None,
                    ef_construction: int | None = None) -> tuple[int, int]:
    """(M, ef_construction): what was given, else the guide's (``guide=True``: 64, 256), else ours (32, 64)."""
    m_val = m if m is not None else (hnsw.GUIDE_M if guide else hnsw.DEFAULT_M)
    ef_val = ef_construction if ef_construction is not None else (
        hnsw.GUIDE_EF_CONSTRUCTION if guide else hnsw.DEFAULT_EF_CONSTRUCTION)
    return m_val, ef_val


def build(store: Any, column: str = "image", *, kind: str = "hnsw", guide: bool = False, metric: str = "cosine",
          quantization: str = "bf16", m: int | None = None, ef_construction: int | None = None,
          replace: bool = False, lists: int | None = None, codes: str = DEFAULT_IVF_CODES,
          progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Build ``kind`` on ``column`` (image, text or both); one result per index built (``index``,
    ``type``, ``seconds``, ``rows``, ``vectors_per_second``). Idempotent: rerun to resume.
    With both columns, the HNSW graphs are queued together after one compaction and the IVF
    columns are trained and assigned in one pass over the table."""
    if check_kind(kind) == "text":  # over the captions: --column does not apply
        return [text.create_text_index(store, progress=progress)]
    columns = hnsw.columns_for(column)
    if kind == "ivf":
        return ivf.create_ivf(store, columns, lists=lists, codes=codes, replace=replace, progress=progress)
    if kind == "scan":
        return [scan.create_scan_copy(store, c, progress=progress) for c in columns]
    m_val, ef_val = hnsw_parameters(guide=guide, m=m, ef_construction=ef_construction)
    specs = [hnsw.IndexSpec(c, metric, quantization, m_val, ef_val).check() for c in columns]
    return hnsw.create_indexes(store, specs, replace=replace, progress=progress)


def drop(store: Any, column: str = "image", *, kind: str = "hnsw") -> dict[str, bool]:
    """Drop ``kind`` on ``column`` (image, text or both): each index's name → whether it existed."""
    if check_kind(kind) == "text":
        return {text.TEXT_INDEX: text.drop_text_index(store)}
    out = {}
    for c in hnsw.columns_for(column):
        if kind == "ivf":
            out[f"ivf on {INDEX_NAMES[c][1]}"] = ivf.drop_ivf(store, c)
        elif kind == "scan":
            out[scan_column(c)] = scan.drop_scan_copy(store, c)
        else:
            out[INDEX_NAMES[c][0]] = hnsw.drop_index(store, c)
    return out
