"""The object API: open a database, then ingest, search, index and inspect it.

>>> import laion_search
>>> with laion_search.connect("./my-laion") as db:                  # doctest: +SKIP
...     db.ingest("./shards")
...     db.create_index("image")
...     for row in db.search(text="a red car", k=5, nsfw="exclude"):
...         print(row["rank"], row["distance"], row["caption"])
...     print(db.status().rows)

A :class:`Database` is a :class:`~laion_search.store.Store` (so ``db.sql(...)``, ``db.rows(...)``
work too) with the library's operations as methods; each returns a typed dataclass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from laion_search import index as _index
from laion_search import ingest as _ingest
from laion_search import search as _search
from laion_search.index import ivf as _ivf
from laion_search.index import text as _text
from laion_search.errors import UsageError
from laion_search.ingest import IngestReport
from laion_search.search import SearchQuery, SearchResult
from laion_search.store import Store, open_backend

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class IndexBuild:
    """What :meth:`Database.create_index` built."""

    index: str
    type: str
    seconds: float
    rows: int
    vectors_per_second: float | None


class Database(Store):
    """A laion-search database: the ``laion`` table on embedded chDB or a ClickHouse server.
    Open one with :func:`connect`; close it (or use ``with``) when done."""

    def ingest(self, source: str | os.PathLike[str], shards: list[int] | None = None, **options: Any) -> IngestReport:
        """Load shards from ``source`` (see :func:`laion_search.ingest.ingest` for the options:
        ``force``, ``batch_rows``, ``skip_bad_rows``, ``progress``)."""
        return _ingest.ingest(self, source, shards, **options)  # index=, index_kind="ivf" declare indexes first

    def search(self, query: SearchQuery | None = None, /, **fields: Any) -> SearchResult:
        """Nearest neighbours for a :class:`SearchQuery`, or for its fields given as keywords:
        ``db.search(text="a dog", k=5)``, ``db.search(like=1000000042)``, ``db.search(vector=v)``."""
        if query is not None and fields:
            raise UsageError("give a SearchQuery or keyword arguments, not both")
        return _search.search(self, query=query) if query is not None else _search.search(self, **fields)

    def create_index(self, column: str = "image", *, kind: str = "hnsw", metric: str = "cosine",
                     quantization: str = "bf16", m: int = _index.DEFAULT_M,
                     ef_construction: int = _index.DEFAULT_EF_CONSTRUCTION, replace: bool = False,
                     lists: int | None = None, codes: str = "none",
                     progress: ProgressFn | None = None) -> IndexBuild:
        """Add and build an HNSW index on ``column`` (image or text); with ``kind="ivf"`` the
        partitioned index (``lists``, ``codes``: see :mod:`laion_search.index.ivf`); with
        ``kind="scan"`` the bf16 copy exact searches read; with ``kind="text"`` the caption text
        index keyword searches use (``column`` does not apply; :mod:`laion_search.index.text`).
        Idempotent: rerun to finish an interrupted build."""
        if kind == "text":
            out = _text.create_text_index(self, progress=progress)
        elif kind == "ivf":
            out = _ivf.create_ivf(self, [column], lists=lists, codes=codes, replace=replace, progress=progress)[0]
        elif kind == "scan":
            out = _index.create_scan_copy(self, column, progress=progress)
        elif kind == "hnsw":
            spec = _index.IndexSpec(column=column, metric=metric, quantization=quantization, m=m,
                                    ef_construction=ef_construction)
            out = _index.create_index(self, spec, replace=replace, progress=progress)
        else:
            raise UsageError(f"kind must be hnsw, ivf, scan or text, got {kind!r}")
        return IndexBuild(index=out["index"], type=out["type"], seconds=out["seconds"], rows=out["rows"],
                          vectors_per_second=out["vectors_per_second"])

    def drop_index(self, column: str = "image", *, kind: str = "hnsw") -> bool:
        """Drop ``column``'s HNSW index (its IVF index, its bf16 scan copy; ``kind="text"``: the caption
        text index); returns whether it existed."""
        if kind == "text":
            return _text.drop_text_index(self)
        if kind == "scan":
            return _index.drop_scan_copy(self, column)
        if kind == "ivf":
            return _ivf.drop_ivf(self, column)
        if kind != "hnsw":
            raise UsageError(f"kind must be hnsw, ivf, scan or text, got {kind!r}")
        return _index.drop_index(self, column)

    def text_index_status(self) -> list[dict[str, Any]]:
        """The caption text index: parts covered, bytes on disk and per row (empty without one)."""
        return _text.text_index_status(self)

    def ivf_status(self) -> list[dict[str, Any]]:
        """Each IVF generation: lists, codes, rows covered, list balance, size, whether a retrain
        would pay (:meth:`index_status` lists the HNSW graphs and scan copies)."""
        return _ivf.status(self)

    def tune_index(self, column: str = "image", *, recall: float = 0.95, kind: str = "auto", **options: Any) -> Any:
        """Tune ef_search (HNSW) or nprobe (IVF) for a recall target; see :func:`laion_search.tune.tune`."""
        from laion_search.tune import tune

        return tune(self, column, recall=recall, kind=kind, **options)


def connect(target: str | os.PathLike[str] | None = None, *, create: bool = True,
            udf_path: str | None = None) -> Database:
    """Open a database: a directory (embedded chDB, created if needed) or a ClickHouse server URL
    (``clickhouse://user:password@host:8123/db``, ``clickhouses://…`` for TLS). ``None`` uses
    ``$LAION_URL``, else ``$LAION_DB`` or the per-user data directory."""
    return open_backend(Database, target, create=create, udf_path=udf_path)
