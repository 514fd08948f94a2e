"""laion-search: LAION embedding shards in a ClickHouse table, searchable by text, image, vector or row.

>>> import laion_search
>>> store = laion_search.connect("./my-laion")          # doctest: +SKIP
>>> laion_search.ingest(store, "./shards")               # doctest: +SKIP
"""

from .errors import (EncoderError, LaionError, QueryError, ShardError, ShardValidationError, StoreBusyError, StoreError,
                     UsageError)
from .ingest import IngestReport, ingest
from .store import Store, connect, default_db_path

__version__ = "0.1.0"

__all__ = [
    "connect", "Store", "default_db_path", "ingest", "IngestReport",
    "EncoderError", "LaionError", "UsageError", "ShardError", "ShardValidationError", "StoreError", "StoreBusyError",
    "QueryError", "__version__",
]
