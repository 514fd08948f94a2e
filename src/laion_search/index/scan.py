"""bf16 scan copies of the embedding columns: exact search at half the bytes (``--kind scan``)."""

from __future__ import annotations

import time
from typing import Any

from laion_search.errors import UsageError
from laion_search.index.hnsw import ProgressFn, _run_mutation
from laion_search.schema import INDEX_NAMES, TABLE, scan_column
from laion_search.store import Store

#: An exact search reads every vector, so its speed is the speed of reading them. A bfloat16 copy
#: of an embedding column (a MATERIALIZED column, filled by the engine on every insert) halves
#: the bytes read. :func:`laion_search.search.search` ranks by the copy, keeps a margin of
#: candidates and re-ranks those with the float32 vectors: results and distances are the
#: full-precision ones (bf16 keeps 8 bits of mantissa: a dot product moves by ~1e-4, far less
#: than the gap between the k-th and the last candidate).
def create_scan_copy(store: Store, column: str, *, progress: ProgressFn | None = None,
                     poll_seconds: float = 0.2) -> dict[str, Any]:
    """Add the bf16 copy of one embedding column and fill it on every part. Idempotent: parts
    that already carry it are not rewritten, so a rerun after a crash only finishes the job."""
    name = scan_column(column)
    if store.layout.cluster is not None:
        raise UsageError("bf16 scan copies are for single-node stores; on a cluster, use HNSW indexes")
    emit = progress or (lambda e: None)
    if store.dim() is None:
        raise UsageError("the table is empty: ingest shards before creating a scan copy")
    if column != "image":
        store.require_modality(column)
    t0 = time.perf_counter()
    emb = INDEX_NAMES[column][1]
    # unit length: the dot product of the copy is then the cosine (bf16 × bf16 dot products are
    # the fastest scan the engine has; cosineDistance costs ~2.5× more per row)
    store.run_ddl(f"ALTER TABLE {store.data_table} ADD COLUMN IF NOT EXISTS `{name}` Array(BFloat16) "
                          f"MATERIALIZED CAST(arrayMap(x -> x / L2Norm(`{emb}`), `{emb}`), 'Array(BFloat16)') "
                          "CODEC(NONE)")
    if store.parts_missing(name):
        _run_mutation(store, name, f"MATERIALIZE COLUMN `{name}`", emit, poll_seconds)
    seconds = time.perf_counter() - t0
    rows = store.scalar(f"SELECT count() FROM {TABLE}") or 0
    emit({"event": "index_done", "index": name, "seconds": round(seconds, 3), "rows": rows})
    return {"index": name, "type": "bf16 scan copy", "seconds": seconds, "rows": rows,
            "vectors_per_second": rows / seconds if seconds > 0 else None}


def drop_scan_copy(store: Store, column: str) -> bool:
    name = scan_column(column)
    existed = name in store.columns()
    store.run_ddl(f"ALTER TABLE {store.data_table}{store.layout.on_cluster} DROP COLUMN IF EXISTS `{name}`")
    return existed
