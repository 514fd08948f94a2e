"""Streaming, idempotent, atomic-per-shard ingest of LAION shards into the ``laion`` table.

For each shard:

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

from laion_search.errors import LaionError, QueryError, StoreError
from laion_search.sources.shards import ShardFiles, ShardReader, discover, open_shard
from laion_search.schema import SHARDS_TABLE, TABLE
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


def ingest(store: Store, directory: str | os.PathLike[str], shards: list[int] | None = None, *,
           batch_rows: int = DEFAULT_BATCH_ROWS, force: bool = False,
           progress: ProgressFn | None = None, skip_bad_rows: bool = False) -> IngestReport:
    """Load the shards found in ``directory`` (all, or those listed) into ``store``.

    Returns what was loaded and skipped. Raises :class:`~laion_search.errors.ShardError`
    naming the file and the problem; shards loaded before the error stay loaded, the failing
    shard leaves the table exactly as it was.

    ``skip_bad_rows`` drops rows with NaN/Inf or all-zero vectors (counted per reason in
    ``IngestReport.dropped`` and in ``laion_shards.dropped``) instead of failing their shard.
    """
    return ingest_files(store, discover(directory, shards), batch_rows=batch_rows, force=force,
                        progress=progress, skip_bad_rows=skip_bad_rows)


def ingest_files(store: Store, files: Iterable[ShardFiles], *, batch_rows: int = DEFAULT_BATCH_ROWS,
                 force: bool = False, progress: ProgressFn | None = None,
                 skip_bad_rows: bool = False) -> IngestReport:
    emit = progress or (lambda event: None)
    files = list(files)
    dim = store.dim()
    readers = []
    for f in files:  # check every shard's headers before loading anything
        reader = open_shard(f, dim=dim, skip_bad_rows=skip_bad_rows)
        if dim is None:
            dim = reader.dim
        readers.append(reader)
    _drop_orphan_stages(store)
    # Background merges of freshly loaded parts compete with the next shard's insert for the two
    # cores (measured: half the throughput). Pause them while loading; they resume afterwards
    # (and `laion index create` compacts each shard before building its index).
    pause_merges = store.backend.name == "chdb"
    if pause_merges:
        store.backend.command(f"SYSTEM STOP MERGES {TABLE}")
    try:
        return _ingest_readers(store, readers, batch_rows, force, emit)
    finally:
        if pause_merges:
            try:
                store.backend.command(f"SYSTEM START MERGES {TABLE}")
            except LaionError:
                pass


def _ingest_readers(store: Store, readers: list[ShardReader], batch_rows: int, force: bool,
                    emit: ProgressFn) -> IngestReport:
    report = IngestReport()
    started = time.perf_counter()
    records = store.shard_records()
    counts = store.partition_rows()
    emit({"event": "start", "shards": [r.shard for r in readers], "rows": sum(r.rows for r in readers)})
    for reader in readers:
        rec = records.get(reader.shard)
        if (not force and rec is not None and rec.fingerprint == reader.files.fingerprint()
                and counts.get(reader.shard, 0) == rec.rows and rec.rows + rec.dropped == reader.rows):
            report.skipped.append(reader.shard)
            emit({"event": "shard_skipped", "shard": reader.shard, "rows": reader.rows,
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
        done = {"event": "shard_done", "shard": reader.shard, "rows": reader.rows_loaded,
                "seconds": round(time.perf_counter() - t0, 3), "renormalised": reader.renormalised}
        if reader.dropped:
            done.update(dropped=dict(reader.dropped), dropped_first_rows=list(reader.dropped_rows))
        if reader.text_repaired:
            done["text_repaired"] = reader.text_repaired
        emit(done)
    report.seconds = time.perf_counter() - started
    emit({"event": "done", **report.as_dict()})
    return report


def load_shard(store: Store, reader: ShardReader, *, batch_rows: int = DEFAULT_BATCH_ROWS,
               progress: ProgressFn | None = None) -> None:
    """Stream one checked shard into a staging table and swap it into ``laion`` atomically."""
    emit = progress or (lambda event: None)
    shard = reader.shard
    layout = store.layout  # one node, or a cluster (statements ON CLUSTER, stage behind a Distributed table)
    for name in sorted({layout.stage_base(n) for n in list_stage_tables(store)}):
        if name.startswith(stage_table_name(shard, "x")[:-1]):
            for stmt in layout.drop_stage(name):
                store.backend.command(stmt)
    stage = stage_table_name(shard, uuid.uuid4().hex[:12])
    try:
        for stmt in layout.create_stage(stage, TABLE):  # CREATE … AS laion; SYSTEM STOP MERGES (it lives for seconds)
            store.backend.command(stmt)
        emit({"event": "shard_start", "shard": shard, "rows": reader.rows})
        done = 0
        # ring: one batch being inserted + PREFETCH_DEPTH queued + one being filled, per column
        for batch in _prefetch(reader.batches(batch_rows, ring=2 * (PREFETCH_DEPTH + 2)), PREFETCH_DEPTH):
            store.backend.insert_arrow(stage, batch, {**INSERT_SETTINGS, **layout.insert_settings()})
            done += batch.num_rows
            emit({"event": "batch", "shard": shard, "rows_done": done, "rows": reader.rows,
                  "batch_rows": batch.num_rows})
        staged = store.scalar(f"SELECT count() FROM {stage}")
        if staged != reader.rows_loaded:
            raise StoreError(f"shard {shard}: staged {staged} rows, expected {reader.rows_loaded}; nothing was changed")
        if reader.rows_loaded:
            store.backend.command(layout.replace_partition(TABLE, shard, stage))
        else:
            store.backend.command(layout.drop_partition(TABLE, shard))
        store.forget_dim()
        store.backend.insert_arrow(SHARDS_TABLE, pa.table({
            "shard": pa.array([shard], pa.uint32()),
            "rows": pa.array([reader.rows_loaded], pa.uint64()),
            "dim": pa.array([reader.dim], pa.uint32()),
            "source": [str(reader.files.img_emb.parent)],
            "fingerprint": [reader.files.fingerprint()],
            "renormalised": pa.array([reader.renormalised], pa.uint64()),
            "dropped": pa.array([reader.dropped_total], pa.uint64()),
            "text_repaired": pa.array([reader.text_repaired], pa.uint64()),
            "loaded_at": pa.array([time.time_ns() // 1_000_000], pa.timestamp("ms")),
        }), layout.insert_settings() or None)
    finally:
        try:
            for stmt in layout.drop_stage(stage):
                store.backend.command(stmt)
        except LaionError:
            pass  # the next run drops it


def _drop_orphan_stages(store: Store) -> None:
    """The embedded store is single-process, so any staging table found is from a dead run."""
    if store.backend.name != "chdb":
        return
    for name in list_stage_tables(store):
        store.backend.command(f"DROP TABLE IF EXISTS {name}")


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


__all__ = ["IngestReport", "ingest", "ingest_files", "load_shard"]
