"""laion-search: LAION embedding shards in a ClickHouse table, searchable by text, image, vector or row.

>>> import laion_search
>>> store = laion_search.connect("./my-laion")          # doctest: +SKIP
>>> laion_search.ingest(store, "./shards")               # doctest: +SKIP
"""

import sys as _sys
import types as _types
from typing import Any as _Any

from laion_search.errors import (EncoderError, LaionError, QueryError, ShardError, ShardValidationError, StoreBusyError, StoreError,
                     UsageError)

__version__ = "0.1.0"

__all__ = [
    "connect", "Store", "default_db_path", "ingest", "IngestReport",
    "EncoderError", "LaionError", "UsageError", "ShardError", "ShardValidationError", "StoreError", "StoreBusyError",
    "QueryError", "__version__",
]

# The store and ingest API (chDB, pyarrow, numpy) is imported on first use, not with the package:
# ``laion download``, ``laion plan`` and ``--help`` start without them.
_LAZY = {"connect": ".store", "Store": ".store", "default_db_path": ".store",
         "ingest": ".ingest", "IngestReport": ".ingest"}


def __getattr__(name: str) -> _Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))


class _Package(_types.ModuleType):
    """``laion_search.ingest`` is the function, as it was when the package imported it eagerly:
    importing the submodule ``laion_search.ingest`` must not rebind the name to the module."""

    def __setattr__(self, name: str, value: _Any) -> None:
        if name == "ingest" and isinstance(value, _types.ModuleType):
            value = value.ingest
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
