"""laion-search: LAION embedding shards in a ClickHouse table, searchable by text, image, vector or row.

>>> import laion_search
>>> with laion_search.connect("./my-laion") as db:             # doctest: +SKIP
...     db.ingest("./shards")
...     db.create_index("image")
...     for row in db.search(text="a red car", k=5):
...         print(row["rank"], row["caption"])

Everything here is imported on first use: ``laion download``, ``laion plan`` and ``--help``
start without chDB, pyarrow or numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from laion_search.errors import (DownloadError, EncoderError, EncoderUnavailable, LaionError, ModalityError, Overloaded,
                                 QueryError, ServeError, ShardError, ShardValidationError, ShuttingDown, StoreBusyError,
                                 StoreError, UsageError)

if TYPE_CHECKING:
    from laion_search.api import Database, IndexBuild, connect
    from laion_search.ingest import IngestReport
    from laion_search.search import Filters, SearchOptions, SearchQuery, SearchResult
    from laion_search.store import IndexInfo, ShardStatus, StoreStatus

__version__ = "0.1.0"

__all__ = [
    "connect", "Database", "SearchQuery", "SearchResult", "Filters", "SearchOptions", "IngestReport",
    "IndexBuild", "StoreStatus", "ShardStatus", "IndexInfo",
    "LaionError", "UsageError", "ShardError", "ShardValidationError", "StoreError", "StoreBusyError",
    "QueryError", "EncoderError", "ModalityError", "EncoderUnavailable", "DownloadError", "Overloaded",
    "ShuttingDown", "ServeError", "__version__",
]

_LAZY = {"connect": "laion_search.api", "Database": "laion_search.api", "IndexBuild": "laion_search.api",
         "SearchQuery": "laion_search.search", "SearchResult": "laion_search.search",
         "Filters": "laion_search.search", "SearchOptions": "laion_search.search",
         "IngestReport": "laion_search.ingest", "StoreStatus": "laion_search.store",
         "ShardStatus": "laion_search.store", "IndexInfo": "laion_search.store"}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
