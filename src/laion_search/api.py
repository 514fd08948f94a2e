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

from laion_search import ingest as _ingest
from laion_search import search as _search
from laion_search.index import ivf as _ivf
from laion_search.index import kinds as _kinds
from laion_search.index import text as _text
from laion_search.errors import UsageError
from laion_search.ingest import IngestReport
from laion_search.schema import DEFAULT_IVF_CODES
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
                     quantization: str = "bf16", m: int | None = None, ef_construction: int | None = None,
                     guide: bool = False, replace: bool = False, lists: int | None = None, codes: str = DEFAULT_IVF_CODES,
                     progress: ProgressFn | None = None) -> IndexBuild:
        """Add and build an index on ``column`` (image or text): ``kind="hnsw"`` (the engine's
        graph; ``m``/``ef_construction`` default to 32/64, or to the guide's 64/256 with
        ``guide=True``), ``"ivf"`` (the partitioned index: ``lists``, ``codes``; see
        :mod:`laion_search.index.ivf`), ``"scan"`` (the bf16 copy exact searches read) or ``"text"``
        (the caption text index keyword searches use; ``column`` does not apply: :mod:`laion_search.index.text`).
        Idempotent: rerun to finish an interrupted build. :meth:`create_indexes` builds both columns."""
        if column == "both" and kind != "text":
            raise UsageError("create_index builds one column (image or text); use create_indexes('both')")
        return self.create_indexes(column, kind=kind, metric=metric, quantization=quantization, m=m,
                                   ef_construction=ef_construction, guide=guide, replace=replace, lists=lists,
                                   codes=codes, progress=progress)[0]

    def create_indexes(self, column: str = "both", *, kind: str = "hnsw", metric: str = "cosine",
                       quantization: str = "bf16", m: int | None = None, ef_construction: int | None = None,
                       guide: bool = False, replace: bool = False, lists: int | None = None, codes: str = DEFAULT_IVF_CODES,
                       progress: ProgressFn | None = None) -> list[IndexBuild]:
        """:meth:`create_index` for ``column`` image, text or both (both: the HNSW graphs queued
        together after one compaction, the IVF columns assigned in one pass), one result each."""
        built = _kinds.build(self, column, kind=kind, guide=guide, metric=metric, quantization=quantization, m=m,
                             ef_construction=ef_construction, replace=replace, lists=lists, codes=codes,
                             progress=progress)
        return [IndexBuild(index=out["index"], type=out["type"], seconds=out["seconds"], rows=out["rows"],
                           vectors_per_second=out["vectors_per_second"]) for out in built]

    def drop_index(self, column: str = "image", *, kind: str = "hnsw") -> bool:
        """Drop ``column``'s index of ``kind`` (hnsw, ivf or scan; ``column`` may be both);
        returns whether one existed."""
        return any(_kinds.drop(self, column, kind=kind).values())

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
