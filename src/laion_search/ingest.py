"""Streaming, idempotent, atomic-per-shard ingest of LAION shards into the ``laion`` table.

A "shard" is one unit of ingest: a LAION shard (three files), a ClickHouse LAION-5B Parquet
part, or a SISAP ``.h5`` file (see :mod:`laion_search.sources.formats` for the formats, their
ids and how single files get their partition). For each shard:

1. check the three files against each other (headers only: dtype, dimension, row counts,
   required metadata columns) — for *all* requested shards before loading any;
2. skip it if ``laion_shards`` says it is loaded from the same files and the table agrees;
3. stream it in bounded batches into a private staging table (a copy of ``laion``'s
   structure, indexes included), validating every batch (NaN/Inf, zero vectors);
4. swap it in with ``ALTER TABLE laion REPLACE PARTITION <shard> FROM <staging>``: the shard
   appears whole, in one step, and replaces any earlier copy of itself;
5. record it in ``laion_shards`` and drop the staging table.

A process killed anywhere leaves at most a staging table behind, which the next run drops;
the table itself never shows part of a shard, and a rerun ends with exactly the source rows.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from laion_search.errors import LaionError, QueryError, ShardValidationError, StoreError, UsageError
from laion_search.index.hnsw import IndexSpec, columns_for, create_indexes
from laion_search.index.ivf import FEED_DEPTH, Feeder, cover, declare_ivf
from laion_search.index.ivf import state as ivf_state
from laion_search.index.text import declare_text_index
from laion_search.schema import OPTIMIZE_SETTINGS, SHARDS_TABLE, TABLE
from laion_search.sources.formats import Reader, assign_partitions, open_readers
from laion_search.sources.shards import ShardFiles, open_shard
from laion_search.store import Store, list_stage_tables, stage_table_name

ProgressFn = Callable[[dict[str, Any]], None]

DEFAULT_BATCH_ROWS = 32768
INSERT_SETTINGS = {"max_insert_threads": 2}
PREFETCH_DEPTH = 1


@dataclass
class IngestReport:
    loaded: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    rows: int = 0
    renormalised: int = 0
    seconds: float = 0.0
    #: Rows left out by ``skip_bad_rows``, per reason (``"img_emb: NaN or Inf"`` …).
    dropped: dict[str, int] = field(default_factory=dict)
    #: Rows whose text held invalid UTF-8 (stored with U+FFFD replacement characters).
    text_repaired: int = 0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "skipped": self.skipped, "rows": self.rows,
                "renormalised": self.renormalised, "dropped": dict(self.dropped),
                "dropped_rows": sum(self.dropped.values()), "text_repaired": self.text_repaired,
                "seconds": round(self.seconds, 3),
                "rows_per_second": round(self.rows_per_second, 1)}


def ingest(store: Store, directory: str | os.PathLike[str] | Any, shards: list[int] | None = None, *,
           batch_rows: int = DEFAULT_BATCH_ROWS, force: bool = False,
           progress: ProgressFn | None = None, skip_bad_rows: bool = False, format: str = "auto",
           model: str | None = None, index: str | None = None, index_kind: str = "hnsw",
           text_index: bool = False) -> IngestReport:
    """Load the shards found in ``directory`` (all, or those listed) into ``store`` — or any
    other source :func:`ingest_source` takes (a ClickHouse LAION-5B Parquet part, a SISAP
    ``.h5`` file, a folder of those, a URL).

    Returns what was loaded and skipped. Raises :class:`~laion_search.errors.ShardError`
    naming the file and the problem; shards loaded before the error stay loaded, the failing
    shard leaves the table exactly as it was.

    ``skip_bad_rows`` drops rows with NaN/Inf or all-zero vectors (counted per reason in
    ``IngestReport.dropped`` and in ``laion_shards.dropped``) instead of failing their shard.

    ``index`` (``image``, ``text`` or ``both``) declares those indexes first (``index_kind``: ``hnsw``
    or ``ivf``; default parameters; an index that exists keeps its own), so every shard lands indexed.
    ``text_index`` declares the caption text index (:mod:`laion_search.index.text`) the same way.
    """
    return ingest_source(store, directory, format=format, shards=shards, batch_rows=batch_rows, force=force,
                         progress=progress, skip_bad_rows=skip_bad_rows, model=model, index=index,
                         index_kind=index_kind, text_index=text_index)


def ingest_source(store: Store, source: str | os.PathLike[str] | Any, *, format: str = "auto",
                  shards: list[int] | None = None, batch_rows: int = DEFAULT_BATCH_ROWS, force: bool = False,
                  progress: ProgressFn | None = None, skip_bad_rows: bool = False,
                  model: str | None = None, index: str | None = None, index_kind: str = "hnsw",
                  text_index: bool = False) -> IngestReport:
    """Load any source :mod:`laion_search.sources.formats` reads: a folder of LAION shards
    (``shards`` picks some), a ClickHouse LAION-5B Parquet part, a SISAP ``.h5`` file, a folder
    of such files, a URL, or an open seekable binary file. ``format`` is ``auto`` (detected from
    the content) or one of ``laion``, ``clickhouse-parquet``, ``sisap-h5``.

    Every file is checked before any is loaded; each file (or shard) is then staged and swapped
    in whole, and loading it again replaces it. Errors name the file and the problem, and leave
    the table as it was for the unit that failed.

    ``model`` records the CLIP model that made the vectors (text and image searches then encode
    with it); by default, the model LAION used for their dimension."""
    readers = open_readers(source, fmt=format, shards=shards, dim=store.dim(), skip_bad_rows=skip_bad_rows)
    try:
        if model:
            for r in readers:
                r.model_override = str(model)
        records = store.shard_records()
        assign_partitions(readers, {r.name: n for n, r in records.items() if r.name},
                          set(records) | set(store.partition_rows()))
        for r in readers:
            if r.ids_from_source and r.shard not in records:
                record_shard(store, r, claim=True)
        return ingest_readers(store, readers, batch_rows=batch_rows, force=force, progress=progress, index=index,
                              index_kind=index_kind, text_index=text_index)
    finally:
        for r in readers:
            r.close()


def ingest_files(store: Store, files: Iterable[ShardFiles], *, batch_rows: int = DEFAULT_BATCH_ROWS,
                 force: bool = False, progress: ProgressFn | None = None,
                 skip_bad_rows: bool = False, index: str | None = None, index_kind: str = "hnsw",
                 text_index: bool = False) -> IngestReport:
    files = list(files)
    dim = store.dim()
    readers: list[Reader] = []
    for f in files:  # check every shard's headers before loading anything
        reader = open_shard(f, dim=dim, skip_bad_rows=skip_bad_rows)
        if dim is None:
            dim = reader.dim
        readers.append(reader)  # type: ignore[arg-type]  # its shard number is read-only
    return ingest_readers(store, readers, batch_rows=batch_rows, force=force, progress=progress, index=index,
                          index_kind=index_kind, text_index=text_index)


def ingest_readers(store: Store, readers: list[Reader], *, batch_rows: int = DEFAULT_BATCH_ROWS,
                   force: bool = False, progress: ProgressFn | None = None, index: str | None = None,
                   index_kind: str = "hnsw", text_index: bool = False) -> IngestReport:
    """Load checked readers (shards, parts, files), each atomically; see the module docstring."""
    emit = progress or (lambda event: None)
    _drop_orphan_stages(store)
    if index:
        declare_indexes(store, index, readers, kind=index_kind)
    if text_index:
        # each shard's staging table is made AS laion, so it inherits the index: parts land indexed
        declare_text_index(store)
    # Background merges of freshly loaded parts compete with the next shard's insert for the two
    # cores (measured: half the throughput). Pause them while loading; they resume afterwards
    # (and `laion index create` compacts each shard before building its index).
    pause_merges = store.embedded
    if pause_merges:
        store.run_ddl(f"SYSTEM STOP MERGES {TABLE}")
    try:
        report = _ingest_readers(store, readers, batch_rows, force, emit)
        if index and index_kind == "ivf":
            # shards loaded before the index was declared (skipped now) are assigned from the table
            cover(store, columns_for(index), progress=emit)
        else:
            # a shard an interrupted run left out of an IVF index (killed between its lists' swap and its
            # record) is skipped now, being loaded: assign it from the table. On a cluster every shard
            # loaded while an IVF index exists is assigned so, after the load (no feeder there)
            lacking = [c for (c, _), shards in ivf_state(store).uncovered.items() if shards]
            if lacking:
                cover(store, lacking, progress=emit)
        return report
    finally:
        if pause_merges:
            try:
                store.run_ddl(f"SYSTEM START MERGES {TABLE}")
            except LaionError:
                pass


def _ingest_readers(store: Store, readers: list[Reader], batch_rows: int, force: bool,
                    emit: ProgressFn) -> IngestReport:
    report = IngestReport()
    started = time.perf_counter()
    records = store.shard_records()
    counts = store.partition_rows()
    emit({"event": "start", "shards": [r.shard for r in readers], "rows": sum(r.rows for r in readers)})
    for reader in readers:
        rec = records.get(reader.shard)
        if (not force and rec is not None and rec.fingerprint == reader.fingerprint()
                and counts.get(reader.shard, 0) == rec.rows and rec.rows + rec.dropped == reader.rows):
            report.skipped.append(reader.shard)
            emit({"event": "shard_skipped", "shard": reader.shard, "rows": reader.rows, **_named(reader),
                  "reason": "already loaded from the same files"})
            continue
        t0 = time.perf_counter()
        try:
            load_shard(store, reader, batch_rows=batch_rows, progress=emit)
        except QueryError as exc:  # the engine failed (disk full, files gone …): say which shard, and what holds
            raise QueryError(f"loading shard {reader.shard} into {store.location} failed: {exc} — the table shows "
                             f"shard {reader.shard} whole or not at all; fix the cause and rerun to finish") from exc
        report.loaded.append(reader.shard)
        report.rows += reader.rows_loaded
        report.renormalised += reader.renormalised
        report.text_repaired += reader.text_repaired
        for why, n in reader.dropped.items():
            report.dropped[why] = report.dropped.get(why, 0) + n
        done = {"event": "shard_done", "shard": reader.shard, **_named(reader), "rows": reader.rows_loaded,
                "seconds": round(time.perf_counter() - t0, 3), "renormalised": reader.renormalised}
        if reader.dropped:
            done.update(dropped=dict(reader.dropped), dropped_first_rows=list(reader.dropped_rows))
        if reader.text_repaired:
            done["text_repaired"] = reader.text_repaired
        emit(done)
    report.seconds = time.perf_counter() - started
    emit({"event": "done", **report.as_dict()})
    return report


def load_shard(store: Store, reader: Reader, *, batch_rows: int = DEFAULT_BATCH_ROWS,
               progress: ProgressFn | None = None) -> None:
    """Stream one checked shard into a staging table and swap it into ``laion`` atomically."""
    emit = progress or (lambda event: None)
    shard = reader.shard
    layout = store.layout  # one node, or a cluster (statements ON CLUSTER, stage behind a Distributed table)
    for name in sorted({layout.stage_base(n) for n in list_stage_tables(store)}):
        if name.startswith(stage_table_name(shard, "x")[:-1]):
            for stmt in layout.drop_stage(name):
                store.run_ddl(stmt)
    stage = stage_table_name(shard, uuid.uuid4().hex[:12])
    # With vector indexes declared, the shard lands indexed: its batches go in without graphs
    # (one per 32K-row batch would be thrown away), then one merge of the stage into a single part
    # builds each index once, over the whole shard, before the swap. (A cluster's stage is
    # spread over nodes behind a Distributed table: there, each batch's part is indexed on insert.)
    indexes = [i["name"] for i in store.list_indexes()] if layout.cluster is None else []
    settings = {**INSERT_SETTINGS, **layout.insert_settings()}
    if indexes:
        settings["materialize_skip_indexes_on_insert"] = 0
    feeder: Feeder | None = None
    try:
        for stmt in layout.create_stage(stage, TABLE):  # CREATE … AS laion; SYSTEM STOP MERGES (it lives for seconds)
            store.run_ddl(stmt)
        if layout.cluster is None:
            # IVF indexes (laion_search.index.ivf): the shard's rows are assigned to their lists as they stream
            feeder = Feeder(store, shard, stage, reader.rows, emit) or None
        emit({"event": "shard_start", "shard": shard, **_named(reader), "rows": reader.rows})
        done = 0
        # ring: one batch being inserted + PREFETCH_DEPTH queued + one being filled, per vector column.
        # The IVF feeder's thread holds a batch longer: one waiting for it and one it works on.
        ring = len(reader.modalities) * (PREFETCH_DEPTH + 2 + (FEED_DEPTH + 1 if feeder else 0))
        if feeder:
            feeder.start()
        for batch in _prefetch(reader.batches(batch_rows, ring=ring), PREFETCH_DEPTH):
            store.insert(stage, batch, settings)
            if feeder:
                feeder.put(batch)
            done += batch.num_rows
            emit({"event": "batch", "shard": shard, "rows_done": done, "rows": reader.rows,
                  "batch_rows": batch.num_rows})
        staged = store.scalar(f"SELECT count() FROM {stage}")
        if staged != reader.rows_loaded:
            raise StoreError(f"shard {shard}: staged {staged} rows, expected {reader.rows_loaded}; nothing was changed")
        if reader.ids_from_source and staged:
            _check_source_ids(store, stage, reader)
        if indexes and staged:
            t0 = time.perf_counter()
            emit({"event": "shard_index", "shard": shard, **_named(reader), "rows": staged, "indexes": indexes})
            # Background merges would start on the stage's batch parts the moment merges resume
            # (each building graphs only to throw them away), and OPTIMIZE FINAL waits for them —
            # 120 s at most, then it silently does nothing (measured on a 1M-row shard). With no
            # part small enough to pick (max_bytes… = 1) the one merge is ours, and a merge that
            # does not happen is an error, never an unindexed shard swapped in.
            store.run_ddl(f"ALTER TABLE {stage} MODIFY SETTING max_bytes_to_merge_at_max_space_in_pool = 1")
            store.run_ddl(f"SYSTEM START MERGES {stage}")
            store.run_ddl(f"OPTIMIZE TABLE {stage} FINAL SETTINGS {OPTIMIZE_SETTINGS}")
            merged = store.scalar("SELECT count() FROM system.parts WHERE database = currentDatabase() AND "
                                  "table = {t:String} AND active AND rows > 0", {"t": stage})
            if merged != 1:
                raise StoreError(f"shard {shard}: merging its staged parts into one indexed part left {merged} "
                                 "parts; nothing was changed — rerun to retry")
            emit({"event": "shard_indexed", "shard": shard, **_named(reader), "rows": staged, "indexes": indexes,
                  "seconds": round(time.perf_counter() - t0, 3)})
        if feeder:
            feeder.finish()
        if reader.rows_loaded:
            store.run_ddl(layout.replace_partition(TABLE, shard, stage))
        else:
            store.run_ddl(layout.drop_partition(TABLE, shard))
        if feeder:
            # before the shard's record: a crash in between makes the rerun load the shard again, IVF included
            feeder.land(reader.fingerprint(), reader.rows_loaded)
        record_shard(store, reader)
    finally:
        try:
            for stmt in layout.drop_stage(stage):
                store.run_ddl(stmt)
            if feeder:
                feeder.stop()
                feeder.drop()
        except LaionError:
            pass  # the next run drops it


def declare_indexes(store: Store, which: str, readers: list[Reader], *, kind: str = "hnsw") -> list[str]:
    """Declare the indexes ``which`` names (``image``, ``text``, ``both``; ``kind`` ``hnsw`` or ``ivf``)
    before loading, with the default parameters, so each shard is indexed as it lands. Indexes that
    exist are kept as they are. Returns the names declared now."""
    if which not in ("image", "text", "both"):
        raise UsageError(f"index must be image, text or both, got {which!r}")
    if kind not in ("hnsw", "ivf"):
        raise UsageError(f"index kind must be hnsw or ivf, got {kind!r}")
    if kind == "ivf":
        for column in columns_for(which):
            lacking = [r for r in readers if column not in r.modalities]
            if lacking:
                raise UsageError(f"--index {which}: {lacking[0].source} has no {column} embeddings to index")
        if not readers:
            return []
        rows = sum(store.partition_rows().values()) + sum(r.rows for r in readers)
        return declare_ivf(store, columns_for(which), dim=store.dim() or readers[0].dim, rows=rows)
    have = {i["name"] for i in store.list_indexes()}
    specs = [IndexSpec(c) for c in columns_for(which)]
    specs = [s for s in specs if s.name not in have]
    for spec in specs:
        lacking = [r for r in readers if spec.column not in r.modalities]
        if lacking:
            raise UsageError(f"--index {which}: {lacking[0].source} has no {spec.column} embeddings to index")
    if not specs or not readers:
        return []
    create_indexes(store, specs, materialize=False, dim=store.dim() or readers[0].dim)
    return [s.name for s in specs]


def record_shard(store: Store, reader: Reader, *, claim: bool = False) -> None:
    """Write ``reader``'s row in ``laion_shards`` (the latest row per shard wins).

    ``claim=True`` writes a placeholder (0 rows, no fingerprint) that reserves a new single-file
    source's partition *before* it is loaded: a crash between the swap and the final record then
    leaves the name → partition mapping behind, so the rerun reuses the partition instead of
    taking a new one (and finding its own ids in the old one)."""
    store.insert(SHARDS_TABLE, pa.table({
        "shard": pa.array([reader.shard], pa.uint32()),
        "rows": pa.array([0 if claim else reader.rows_loaded], pa.uint64()),
        "dim": pa.array([reader.dim], pa.uint32()),
        "source": [reader.source],
        "fingerprint": ["" if claim else reader.fingerprint()],
        "renormalised": pa.array([0 if claim else reader.renormalised], pa.uint64()),
        "dropped": pa.array([0 if claim else reader.dropped_total], pa.uint64()),
        "text_repaired": pa.array([0 if claim else reader.text_repaired], pa.uint64()),
        "loaded_at": pa.array([time.time_ns() // 1_000_000], pa.timestamp("ms")),
        "format": [reader.format],
        "modalities": [",".join(reader.modalities)],
        "model": [reader.model],
        "name": [reader.name or ""],
    }), store.layout.insert_settings() or None)


def _named(reader: Reader) -> dict[str, str]:
    """A single-file source's events carry its file name (its shard number is only a partition)."""
    return {"name": reader.name} if reader.name else {}


def _check_source_ids(store: Store, stage: str, reader: Reader) -> None:
    """Ids taken from a source must be unique in it and not held by another partition: the
    table's id is its key. (LAION shards' ids are shard × 10⁹ + row: unique by construction.)"""
    where = reader.source
    dup = store.scalar(f"SELECT count() FROM (SELECT id FROM {stage} GROUP BY id HAVING count() > 1) "
                       # in id order (the stage's sort key): streams, no hash table of every id; small read
                       # buffers, as a 10M-row stage has ~300 parts read side by side
                       "SETTINGS optimize_aggregation_in_order = 1, max_read_buffer_size = 65536")
    if dup:
        first = store.scalar(f"SELECT id FROM {stage} GROUP BY id HAVING count() > 1 ORDER BY id LIMIT 1")
        raise ShardValidationError(f"{dup} id(s) appear more than once (first: {first}); ids must be unique; "
                                   "nothing was changed", path=where)
    lo, hi = store.sql(f"SELECT min(id), max(id) FROM {stage}").to_pylist()[0].values()
    params = {"s": reader.shard, "lo": lo, "hi": hi}
    if not store.scalar(f"SELECT count() FROM {TABLE} WHERE shard != {{s:UInt32}} AND id BETWEEN {{lo:Int64}} "
                        "AND {hi:Int64}", params):
        return
    glob = "GLOBAL IN" if store.layout.cluster is not None else "IN"
    row = store.rows(f"SELECT count() AS n, min(id) AS first, any(shard) AS other FROM {TABLE} "
                     f"WHERE shard != {{s:UInt32}} AND id {glob} (SELECT id FROM {stage})", params)[0]
    if row["n"]:
        rec = store.shard_records().get(row["other"])
        owner = f"shard {row['other']}" + (f" ({rec.name or rec.source})" if rec else "")
        raise ShardValidationError(
            f"{row['n']} of its ids are already in the table from {owner} (first: {row['first']}); ids come "
            f"from the source and must be unique — load this source into its own store (--db); nothing was "
            "changed", path=where)


def _drop_orphan_stages(store: Store) -> None:
    """The embedded store is single-process, so any staging table found is from a dead run."""
    if not store.embedded:
        return
    for name in list_stage_tables(store):
        store.run_ddl(f"DROP TABLE IF EXISTS {name}")


_DONE = object()


def _prefetch(batches: Iterator[pa.Table], depth: int = 1) -> Iterator[pa.Table]:
    """Prepare the next batch (read, convert, validate) while the engine inserts this one.

    numpy and Arrow release the GIL for the heavy parts, so this overlaps on two cores;
    ``depth`` bounds how many batches wait in memory.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            q.put(exc)

    t = threading.Thread(target=produce, name="laion-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.05)


__all__ = ["IngestReport", "declare_indexes", "ingest", "ingest_files", "ingest_readers", "ingest_source", "load_shard", "record_shard"]
