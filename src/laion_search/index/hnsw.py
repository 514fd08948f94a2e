"""HNSW ``vector_similarity`` indexes on the embedding columns: create, materialise, inspect, drop.

The guide's index, reproducible exactly with ``m=64, ef_construction=256, quantization='bf16'``::

    ALTER TABLE laion ADD INDEX image_index image_embedding
        TYPE vector_similarity('hnsw', 'cosineDistance', 512, 'bf16', 64, 256)

Index names are fixed (``image_index``, ``text_index``, as in the guide). Building is a
ClickHouse mutation (``MATERIALIZE INDEX``) that works part by part; we follow its progress in
``system.mutations``. A build interrupted by a crash is picked up again by the engine when the
store reopens, and ``create_index`` run again finishes it (it is idempotent).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from laion_search.errors import UsageError
from laion_search.schema import INDEX_METRICS, INDEX_NAMES, METRICS, OPTIMIZE_SETTINGS, QUANTIZATIONS, TABLE, TUNING_TABLE
from laion_search.store import Store
#: Chosen at 1M rows on realistic vectors and on real embeddings (docs/realistic-vectors.md §5–7):
#: (32, 64) reaches recall@10 ≥ 0.95 on both columns of 1M realistic rows at the engine's
#: ef_search (256), where (16, 64) fell to 0.93, builds as fast as (16, 64) there and 5× faster
#: than the guide's (64, 256). On real text at 250K rows, text → image, it needs a larger
#: ef_search (`laion index tune --queries cross-modal`: 832 for 0.95). (32, 128) gives more recall
#: at half the build rate (--ef-construction 128); the guide's graph is --guide.
DEFAULT_M = 32
DEFAULT_EF_CONSTRUCTION = 64
DEFAULT_QUANTIZATION = "bf16"
#: ClickHouse's own ef_search (``hnsw_candidate_list_size_for_search``): what a search uses unless
#: it asks for another, or `laion index tune` stored one for the index.
ENGINE_EF_SEARCH = 256
GUIDE_M = 64
GUIDE_EF_CONSTRUCTION = 256

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class IndexSpec:
    column: str = "image"            # image | text
    metric: str = "cosine"           # cosine | l2
    quantization: str = DEFAULT_QUANTIZATION
    m: int = DEFAULT_M
    ef_construction: int = DEFAULT_EF_CONSTRUCTION

    def check(self) -> "IndexSpec":
        if self.column not in INDEX_NAMES:
            raise UsageError(f"column must be image or text, got {self.column!r}")
        if self.metric not in METRICS:
            raise UsageError(f"metric must be one of {', '.join(METRICS)}")
        if self.metric not in INDEX_METRICS:
            raise UsageError(f"metric {self.metric}: ClickHouse's HNSW index (vector_similarity) ranks by "
                             f"{' or '.join(INDEX_METRICS)} only; search with --metric {self.metric} exactly "
                             "(--exact) or through an IVF index (laion index create --kind ivf)")
        if self.quantization not in QUANTIZATIONS:
            raise UsageError(f"quantization must be one of {', '.join(QUANTIZATIONS)}")
        if not 2 <= int(self.m) <= 512:
            raise UsageError("m must be between 2 and 512")
        if not 1 <= int(self.ef_construction) <= 10_000:
            raise UsageError("ef_construction must be between 1 and 10000")
        return self

    @property
    def name(self) -> str:
        return INDEX_NAMES[self.column][0]

    @property
    def embedding_column(self) -> str:
        return INDEX_NAMES[self.column][1]

    def type_sql(self, dim: int) -> str:
        return (f"vector_similarity('hnsw', '{METRICS[self.metric]}', {int(dim)}, '{self.quantization}', "
                f"{int(self.m)}, {int(self.ef_construction)})")


def columns_for(which: str) -> list[str]:
    if which == "both":
        return ["image", "text"]
    if which not in INDEX_NAMES:
        raise UsageError(f"--column must be image, text or both, got {which!r}")
    return [which]


def create_index(store: Store, spec: IndexSpec, *, materialize: bool = True, replace: bool = False,
                 progress: ProgressFn | None = None, poll_seconds: float = 0.2) -> dict[str, Any]:
    """Add the index (if absent) and build it on every part. Rerun after a crash, it waits for the
    build the engine resumed instead of starting over; rerun after a finished build, it rebuilds
    every part (``MATERIALIZE INDEX`` has no per-part "only where missing")."""
    return create_indexes(store, [spec], materialize=materialize, replace=replace, progress=progress,
                          poll_seconds=poll_seconds)[0]


def create_indexes(store: Store, specs: list[IndexSpec], *, materialize: bool = True, replace: bool = False,
                   progress: ProgressFn | None = None, poll_seconds: float = 0.2,
                   dim: int | None = None) -> list[dict[str, Any]]:
    """Add several indexes (image and text) and build them together: one compaction, then the
    builds queued at once (the engine runs them part by part on its index-build thread pool).
    ``materialize=False`` only declares them (``dim`` then stands in for an empty table's): parts
    loaded afterwards arrive indexed (:func:`laion_search.ingest.load_shard` builds each shard's
    graphs as it lands), parts already there wait for ``create_indexes`` to build them."""
    emit = progress or (lambda e: None)
    specs = [s.check() for s in specs]
    dim = store.dim() or dim
    if dim is None:
        raise UsageError("the table is empty: ingest shards before creating an index (its dimension comes from them)")
    existing = {i["name"]: i for i in store.list_indexes()}
    wants = []
    for spec in specs:
        if spec.column != "image" and store.dim() is not None:
            store.require_modality(spec.column)  # no text index over the empty arrays of an image-only source
        want = spec.type_sql(dim)
        if spec.name in existing and _normal(existing[spec.name]["type_full"]) != _normal(want):
            if not replace:
                raise UsageError(f"{spec.name} exists with different parameters ({existing[spec.name]['type_full']}); "
                                 "drop it first or pass replace=True (--replace)")
            drop_index(store, spec.column)
            existing.pop(spec.name)
        wants.append(want)
    t0 = time.perf_counter()
    if materialize:
        compact(store, emit)
    for spec, want in zip(specs, wants):
        if spec.name not in existing:
            store.run_ddl(f"ALTER TABLE {store.data_table}{store.layout.on_cluster} ADD INDEX IF NOT EXISTS "
                                  f"{spec.name} {spec.embedding_column} TYPE {want} GRANULARITY 100000000")
    if materialize:
        label = ", ".join(s.name for s in specs)
        # A build cut short (crash, kill) left its mutation queued, and the engine resumes it on
        # reopening: wait for that one instead of queueing a rebuild of every part.
        queued = {s.name for s in specs if _pending_build(store, s.name)}
        todo = [s for s in specs if s.name not in queued]
        _run_mutation(store, label, ", ".join(f"MATERIALIZE INDEX {s.name}" for s in todo), emit, poll_seconds)
    seconds = time.perf_counter() - t0
    rows = store.scalar(f"SELECT count() FROM {TABLE}") or 0
    out = []
    for spec, want in zip(specs, wants):
        if materialize:
            emit({"event": "index_done", "index": spec.name, "seconds": round(seconds, 3), "rows": rows})
        # vectors indexed per second, every index built in this call counted (they share the time)
        out.append({"index": spec.name, "type": want, "seconds": seconds, "rows": rows,
                    "vectors_per_second": rows * len(specs) / seconds if seconds > 0 and materialize else None})
    return out


def _pending_build(store: Store, name: str) -> bool:
    return bool(store.scalar(
        "SELECT count() FROM " + store.layout.system("mutations") + " WHERE database = currentDatabase() "
        "AND table = {t:String} AND NOT is_done AND position(command, {c:String}) > 0",
        {"t": store.data_table, "c": f"MATERIALIZE INDEX {name}"}))


def _run_mutation(store: Store, label: str, action: str, emit: ProgressFn, poll_seconds: float) -> None:
    """``ALTER TABLE … <action>`` as a background mutation (none when ``action`` is empty: only
    wait for those queued), reporting parts done until they end."""
    total = store.scalar("SELECT count() FROM " + store.layout.system("parts") + " WHERE database = currentDatabase() "
                         "AND table = {t:String} AND active", {"t": store.data_table}) or 0
    emit({"event": "index_start", "index": label, "parts": total})
    # The engine runs the mutation in the background; mutations_sync = 0 lets us watch it.
    if action:
        store.run_ddl(f"ALTER TABLE {store.data_table}{store.layout.on_cluster} {action} SETTINGS mutations_sync = 0")
    last = -1
    while True:
        pending = store.rows(
            "SELECT mutation_id, parts_to_do, latest_fail_reason FROM " + store.layout.system("mutations") + " "
            "WHERE database = currentDatabase() AND table = {t:String} AND NOT is_done", {"t": store.data_table})
        todo = sum(int(p["parts_to_do"]) for p in pending)
        total = max(total, todo)  # several commands may queue as several mutations, each over every part
        done = total - todo
        if done != last:
            emit({"event": "index_progress", "index": label, "parts_done": done, "parts": total})
            last = done
        fails = [p["latest_fail_reason"] for p in pending if p["latest_fail_reason"]]
        if fails:
            from laion_search.errors import StoreError

            raise StoreError(f"building {label} failed: {fails[0]}")
        if not pending:
            return
        time.sleep(poll_seconds)


def compact(store: Store, progress: ProgressFn | None = None) -> int:
    """Merge each shard's parts into one (``OPTIMIZE … PARTITION … FINAL``) before building
    indexes: one HNSW graph per shard instead of one per insert batch (faster queries, and no
    graph is built twice because a later merge would rebuild it). Returns partitions merged."""
    emit = progress or (lambda e: None)
    rows = store.rows("SELECT partition_id, count() AS parts FROM " + store.layout.system("parts") + " WHERE database = currentDatabase() "
                      "AND table = {t:String} AND active GROUP BY partition_id HAVING parts > 1 ORDER BY partition_id",
                      {"t": store.data_table})
    for i, r in enumerate(rows):
        emit({"event": "compact", "partition": r["partition_id"], "done": i, "total": len(rows)})
        store.run_ddl(f"OPTIMIZE TABLE {store.data_table}{store.layout.on_cluster} PARTITION ID {{p:String}} FINAL "
                              f"SETTINGS {OPTIMIZE_SETTINGS}", {"p": r["partition_id"]})
    return len(rows)


def drop_index(store: Store, column: str) -> bool:
    name = INDEX_NAMES[column][0] if column in INDEX_NAMES else None
    if name is None:
        raise UsageError(f"column must be image or text, got {column!r}")
    existed = any(i["name"] == name for i in store.list_indexes())
    if _pending_build(store, name):
        # a build cut short (a crash, a kill) left its mutation queued, and the engine resumed it:
        # it refuses to drop an index a pending mutation builds, so that build is cancelled first
        # (with it, a build of the other column queued in the same mutation: rerun `index create`)
        store.run_ddl(f"KILL MUTATION{store.layout.on_cluster} WHERE database = currentDatabase() AND "
                      "table = {t:String} AND position(command, {c:String}) > 0 SYNC",
                      {"t": store.data_table, "c": f"MATERIALIZE INDEX {name}"})
    store.run_ddl(f"ALTER TABLE {store.data_table}{store.layout.on_cluster} DROP INDEX IF EXISTS {name}")
    if store.tuning_table_exists():  # a new graph deserves a new measurement (laion index tune)
        store.run_ddl(f"DELETE FROM {TUNING_TABLE} WHERE column = {{c:String}}", {"c": column})
    return existed


def _normal(t: str) -> str:
    return re.sub(r"\s+", "", t)
