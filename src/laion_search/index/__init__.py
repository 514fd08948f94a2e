"""Index kinds of the ``laion`` table, one module each:

* :mod:`~laion_search.index.hnsw` — the engine's ``vector_similarity`` HNSW graphs (lowest latency;
  ~1.3 KB of RAM per vector and minutes per million rows to build);
* :mod:`~laion_search.index.ivf` — a partitioned (IVF) index made of ClickHouse parts: a companion
  table per embedding column ordered by each row's nearest centroid, so the primary key prunes a
  search to the probed lists (a few bytes of RAM per vector; seconds per million rows to build);
* :mod:`~laion_search.index.scan` — bf16 copies of the embedding columns that exact scans read.

The names below are re-exported so ``from laion_search.index import create_index`` keeps working.
"""

from laion_search.index.hnsw import (DEFAULT_EF_CONSTRUCTION, DEFAULT_M, GUIDE_EF_CONSTRUCTION, GUIDE_M, QUANTIZATIONS,
                                     IndexSpec, ProgressFn, _pending_build, _run_mutation, columns_for, compact,
                                     create_index, create_indexes, drop_index)
from laion_search.index.scan import create_scan_copy, drop_scan_copy

__all__ = ["DEFAULT_EF_CONSTRUCTION", "DEFAULT_M", "GUIDE_EF_CONSTRUCTION", "GUIDE_M", "QUANTIZATIONS", "IndexSpec",
           "ProgressFn", "_pending_build", "_run_mutation", "columns_for", "compact", "create_index", "create_indexes",
           "create_scan_copy", "drop_index", "drop_scan_copy"]
