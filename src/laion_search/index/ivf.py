"""A partitioned (IVF) index made of ClickHouse's own parts (``laion index create --kind ivf``).

Why: the engine's HNSW graph costs ~1.3 KB of RAM per 512-d vector and builds at ~2,400
vectors/s per column on 2 cores. An inverted-file index needs neither: k-means centroids (a few
MB) route each query to the ``nprobe`` nearest lists, and the rows of those lists are read from
disk in one contiguous range each.

How, with the engine's parts only:

* **centroids** — spherical k-means on a sample of the column (``lists`` centroids, ~√rows by
  default) in ``laion_ivf_centroids``;
* **a companion table per column and generation** (``laion_ivf_image_g1``): ``(list, id, shard,
  vec)`` in ``ORDER BY (list, id)``, so the primary key prunes a search to the probed lists
  (``WHERE list IN {lists}``); ``vec`` is the row's float32 vector, optionally with the engine's
  ``Quantized`` codec (``--codes int8|rabitq``: the scan reads compact codes and rescores the best
  candidates on the full vectors). The ``laion`` table itself keeps the guide's layout (ordered by
  id, one partition per shard): it can be sorted one way only, and each column needs its own order;
* **bookkeeping** — ``laion_ivf`` (one row per column and generation: ``building`` → ``ready``; the
  served generation is the newest ``ready`` one, so a rebuild fills a new generation while the old
  one serves, and switches with one insert) and ``laion_ivf_shards`` (which load of each shard a
  generation holds: a shard is *covered* when that matches ``laion_shards``).

A search (:func:`candidates`) picks the ``nprobe`` nearest centroids in numpy, reads the best
candidates with their exact distances from the companion table, then the result rows from
``laion`` by id. Shards a generation does not cover (loaded after a crash, or mid-rebuild) are
searched exactly, so results never miss rows. Shards loaded while an index exists are assigned as
they land (:class:`Feeder`, used by :func:`laion_search.ingest.load_shard`).

On a cluster store every one of these tables is a table on each node behind a Distributed table
(``store.layout.create_table``): a companion table shards its rows as ``laion`` does, so each node
holds and scans the lists of its own shards; shards are assigned after their load (no feeder).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa

from laion_search.backends import settings_sql
from laion_search.errors import QueryError, StoreError, UsageError
from laion_search.schema import (DEFAULT_IVF_CODES, INDEX_NAMES, IVF_CENTROIDS_DDL, IVF_CENTROIDS_TABLE, IVF_CODES, IVF_META_DDL,
                                 IVF_GRANULARITY, IVF_META_TABLE, IVF_ROW_COLUMNS, IVF_SHARDS_DDL, IVF_SHARDS_TABLE, OPTIMIZE_SETTINGS,
                                 STAGE_PREFIX, TABLE, distance_sql, ivf_table, ivf_table_ddl)
from laion_search.store import Store

ProgressFn = Callable[[dict[str, Any]], None]

#: Probes per query when ``laion index tune`` has stored none. Measured at 1M realistic rows: with
#: 1,024 lists image → image recall@10 ≥ 0.98 at 16, text → image ≥ 0.95 at 32; with 2,048 lists (the
#: default there now) 0.99 / 0.98 at 32 (numpy, 100 queries), so 32 keeps a margin either way.
DEFAULT_NPROBE = 32
#: k-means: sample rows per list (faiss warns below 39; 64 keeps the clusters stable) and rounds.
SAMPLE_PER_LIST = 64
MIN_SAMPLE_PER_LIST = 40
MAX_SAMPLE = 524_288
KMEANS_ROUNDS = 10
#: Above this many rows a build leaves merging its companion table to the engine's background merges.
MAX_FINAL_MERGE_ROWS = 50_000_000
#: Batches waiting for the feeder's thread at most (each holds the reader's buffers).
FEED_DEPTH = 1
#: Rows read back per statement when a generation is filled from the ``laion`` table.
FILL_BATCH_ROWS = 65_536
#: A shard whose lists outgrow SPLIT_BYTES is not merged into one part where it lies: a merge needs
#: the part's size again in free disk (31 GB more for 10M × 768-d rows, on top of the table's own
#: 31 GB). Its rows land in a stage partitioned by list bucket (BUCKET_BYTES each); each bucket then
#: moves into the companion sorted by (list, id) and its stage partition is dropped at once, so the
#: disk holds about one bucket more than the shard. The moved parts cover disjoint list ranges: a
#: probe still reads each list from one part, as from one merged part.
SPLIT_BYTES = 4 << 30
BUCKET_BYTES = 1 << 30
#: Candidates read per wanted row when the search is filtered (the rest may fail the filter).
FILTER_FETCH = 4.0
#: A generation whose rows outgrew its lists this much (rows per list vs at training), or whose
#: largest list holds this many times the mean, is worth retraining (``laion index status``).
RETRAIN_GROWTH = 4.0
RETRAIN_IMBALANCE = 8.0
#: Active generations of one column at most: the served one and one being built.
STATES = ("building", "declared", "ready", "dropped")


#: Rows per list the default aims at: ~√rows / 2 (faiss's guideline range is 4–16·√rows lists), at
#: least one granule of the companion (a probe reads whole granules) and at most ROWS_PER_LIST, so the
#: rows a query reads stay ~nprobe × 1,000 as the table grows past 4M rows (√rows alone would give
#: 10,000 rows per list at LAION-400M, 10× the bytes per probe). At 1M rows: 2,048 lists of ~490 rows
#: reach recall@10 0.95 reading ~30% fewer rows than 1,024 lists (text → image: nprobe 20, 10.9K
#: rows, against nprobe 14, 15.3K rows), for ~2 s more k-means per column; 4,096 lists read fewer
#: still (nprobe 28, 7.7K rows) but k-means took 22 s per column (docs/indexes.md).
ROWS_PER_LIST = 1_000
#: Capped where choosing the probed lists still costs a query ~3 ms of numpy (65,536 × 512 products).
MAX_DEFAULT_LISTS = 65_536


def default_lists(rows: int) -> int:
    """Lists of ~√rows / 2 rows, at least IVF_GRANULARITY (256) and at most ROWS_PER_LIST (1,000),
    rounded to a power of two, between 16 and 65,536 (1M rows: 2,048 lists; 10M: 8,192; LAION-400M:
    65,536)."""
    if rows <= 0:
        return 16
    per_list = min(ROWS_PER_LIST, max(IVF_GRANULARITY, math.sqrt(rows) / 2))
    return int(min(MAX_DEFAULT_LISTS, max(16, 2 ** round(math.log2(max(1.0, rows / per_list))))))


# -- the math: spherical k-means and assignment (torch's bf16 matmul when present, else numpy) ----
def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    n[n == 0] = 1.0
    return x / n


def _torch() -> Any:
    try:
        import torch
    except ImportError:  # the clip extra brings it; numpy does the same work ~4× slower
        return None
    return torch


def assign(vectors: np.ndarray, centroids: np.ndarray, *, chunk: int = 4096) -> np.ndarray:
    """Each row's nearest centroid by cosine (``uint32``). With torch, in bfloat16 (the CPU's
    matrix units: ~5× float32 here); a near-tie may then go to the second-nearest centroid, which
    costs an IVF nothing (both lists are equally close to the row)."""
    torch = _torch()
    if torch is not None:
        x = torch.tensor(np.asarray(vectors, dtype=np.float32), dtype=torch.bfloat16)
        return _assign_bf16(torch, x, centroids, chunk)
    out = np.empty(len(vectors), dtype=np.uint32)
    c32 = np.ascontiguousarray(centroids, dtype=np.float32)
    for i in range(0, len(vectors), chunk):
        out[i:i + chunk] = np.argmax(np.asarray(vectors[i:i + chunk], dtype=np.float32) @ c32.T, axis=1)
    return out


def _assign_bf16(torch: Any, x: Any, centroids: np.ndarray, chunk: int) -> np.ndarray:
    c = torch.tensor(np.asarray(centroids, dtype=np.float32), dtype=torch.bfloat16).T.contiguous()
    out = np.empty(x.shape[0], dtype=np.uint32)
    for i in range(0, x.shape[0], chunk):
        # chunks of 4K rows keep the scores in cache; max() on bf16 is ~2.5× argmax() (measured)
        out[i:i + chunk] = (x[i:i + chunk] @ c).max(dim=1).indices.numpy()
    return out


def train(sample: np.ndarray, lists: int, *, rounds: int = KMEANS_ROUNDS, seed: int = 0) -> np.ndarray:
    """Spherical k-means (Lloyd rounds on unit vectors, centroids renormalised): ``lists`` unit
    centroids. Empty lists are reseeded from the rows least like their centroid."""
    x = _unit(np.asarray(sample, dtype=np.float32))
    if len(x) < lists:
        raise UsageError(f"{lists} lists need at least {lists} rows to train on, the table has {len(x)}; "
                         f"use --lists {max(1, len(x) // SAMPLE_PER_LIST)} or load more rows")
    rng = np.random.default_rng(seed)
    cent = x[rng.choice(len(x), size=lists, replace=False)].copy()
    torch = _torch()
    xb = torch.tensor(x, dtype=torch.bfloat16) if torch is not None else None  # converted once, not per round
    for _ in range(rounds):
        lab = _assign_bf16(torch, xb, cent, 4096) if xb is not None else assign(x, cent)
        sums = _sums(x, lab, lists, torch)
        empty = np.flatnonzero(~sums.any(axis=1))
        if len(empty):
            sim = np.einsum("ij,ij->i", x, cent[lab])
            sums[empty] = x[np.argsort(sim)[:len(empty)]]
        cent = _unit(sums)
    return cent.astype(np.float32)


def _sums(x: np.ndarray, lab: np.ndarray, k: int, torch: Any = None) -> np.ndarray:
    """Per-list sums of the rows: torch's scatter-add, else one sort and one reduceat (~10× slower)."""
    if torch is not None:
        out = torch.zeros((k, x.shape[1]), dtype=torch.float32)
        out.index_add_(0, torch.from_numpy(lab.astype(np.int64)), torch.from_numpy(x))
        return out.numpy()
    order = np.argsort(lab, kind="stable")
    sl = lab[order]
    starts = np.flatnonzero(np.r_[True, sl[1:] != sl[:-1]])
    sums = np.zeros((k, x.shape[1]), dtype=np.float32)
    sums[sl[starts]] = np.add.reduceat(x[order], starts, axis=0)
    return sums


def nearest_lists(query: np.ndarray, centroids: np.ndarray, nprobe: int) -> np.ndarray:
    """The ``nprobe`` lists whose centroids are nearest to ``query`` (cosine), nearest first.

    ``einsum``, not ``@``: a matrix-vector product in OpenBLAS wakes its worker threads, which then
    spin for a while on the cores the probe's statement needs right after (1M rows, 2,048 lists,
    nprobe 22, 2 cores: ``search()`` 18.0 → 14.4 ms). einsum's loop stays on the calling thread
    (2,048 × 512: 0.25 ms against 0.09 ms; 65,536 × 768: 15 ms against 7 ms)."""
    scores = np.einsum("ij,j->i", centroids, np.asarray(query, dtype=np.float32))
    n = min(int(nprobe), len(centroids))
    top = np.argpartition(-scores, n - 1)[:n]
    return top[np.argsort(-scores[top])].astype(np.uint32)


# -- state ---------------------------------------------------------------------------------------
@dataclass
class IvfInfo:
    """One generation of a column's IVF index, as ``laion_ivf`` records it."""

    column: str
    gen: int
    state: str
    lists: int
    codes: str
    dim: int
    sample_rows: int = 0             # rows the centroids were trained on (0: not trained yet)
    trained_rows: int = 0            # rows in the table when they were
    train_seconds: float = 0.0
    nprobe: int = 0                  # stored by `laion index tune` (0: none, DEFAULT_NPROBE applies)
    fetch_multiplier: float = 0.0    # quantized codes: candidates rescored per result (tuned)
    tuned_recall: float = 0.0
    tuned_k: int = 0
    tuned_p50_ms: float = 0.0
    tuned_queries: str = ""

    @property
    def table(self) -> str:
        return ivf_table(self.column, self.gen)

    @property
    def embedding_column(self) -> str:
        return INDEX_NAMES[self.column][1]

    @property
    def trained(self) -> bool:
        """Centroids exist. Until then ``lists`` is the count asked for (0: the default)."""
        return self.sample_rows > 0


@dataclass
class IvfState:
    """What searches need, cached by the store: the served generation of each column, its
    centroids, and the shards it does not cover (searched exactly)."""

    served: dict[str, IvfInfo] = field(default_factory=dict)
    active: dict[str, list[IvfInfo]] = field(default_factory=dict)   # served + building, per column
    centroids: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    uncovered: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    companion_bytes: dict[tuple[str, int], int] = field(default_factory=dict)   # served generations, on disk
    read_settings: dict[str, Any] = field(default_factory=dict)                 # how a probe reads (read_settings())
    with_rows: set[tuple[str, int]] = field(default_factory=set)                # served ones keeping IVF_ROW_COLUMNS
    stale: dict[tuple[str, int], list[int]] = field(default_factory=dict)       # shards held that laion no longer has


def state(store: Store) -> IvfState:
    """The IVF state searches and ingest use, cached by the store (dropped by every statement the
    store runs that changes tables, and after ``SCHEMA_TTL`` for other clients' changes)."""
    return store.cached("ivf", lambda: load_state(store))


#: On a cluster, the rows of the generations and centroids tables all go to the first shard (a
#: constant sharding key): they are read whole by every search's initiator, and ``FINAL`` needs a
#: generation's rows on one node. A shard's coverage rows follow the shard, as ``laion_shards``'s do.
SINGLE_SHARD_KEY = "0"


def ensure_tables(store: Store) -> None:
    for ddl, table, key in ((IVF_META_DDL, IVF_META_TABLE, SINGLE_SHARD_KEY),
                            (IVF_CENTROIDS_DDL, IVF_CENTROIDS_TABLE, SINGLE_SHARD_KEY),
                            (IVF_SHARDS_DDL, IVF_SHARDS_TABLE, "")):
        for stmt in store.layout.create_table(ddl.format(table=table), table, key):
            store.run_ddl(stmt)


def tables_exist(store: Store) -> bool:
    return bool(store.scalar("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
                             {"t": IVF_META_TABLE}))


def generations(store: Store, column: str | None = None) -> list[IvfInfo]:
    """Every generation not dropped, oldest first."""
    if not tables_exist(store):
        return []
    names = [f.name for f in fields(IvfInfo)]
    rows = store.rows(f"SELECT {', '.join(f'`{n}`' for n in names)} FROM {IVF_META_TABLE} FINAL "
                      "WHERE state != 'dropped' ORDER BY column, gen")
    out = [IvfInfo(**r) for r in rows]
    return [g for g in out if column is None or g.column == column]


def load_state(store: Store) -> IvfState:
    """Read the served and active generations, their centroids and coverage (the store caches it)."""
    state = IvfState()
    gens = generations(store)
    if not gens:
        return state
    for g in gens:
        if g.state == "ready":
            state.served[g.column] = g  # newest ready wins (ordered by gen)
    for g in gens:
        served = state.served.get(g.column)
        if g.state in ("building", "declared") or (served is not None and g.gen == served.gen):
            if served is None or g.gen >= served.gen:
                state.active.setdefault(g.column, []).append(g)
    rows_now, records = store.partition_rows(), store.shard_records()  # once for every generation
    for g in state.served.values():
        state.centroids[(g.column, g.gen)] = read_centroids(store, g)
        state.uncovered[(g.column, g.gen)], state.stale[(g.column, g.gen)] = _coverage(store, g, rows_now, records)
        state.companion_bytes[(g.column, g.gen)] = _parts(store, g.table)["bytes"]
        if has_rows(store, g.table):
            state.with_rows.add((g.column, g.gen))
    state.read_settings = read_settings(store.embedded, sum(state.companion_bytes.values()))
    return state


def read_centroids(store: Store, info: IvfInfo) -> np.ndarray:
    try:
        t = store.sql(f"SELECT centroid FROM {IVF_CENTROIDS_TABLE} WHERE column = {{c:String}} AND gen = {{g:UInt32}} "
                      "ORDER BY list", {"c": info.column, "g": info.gen})
    except QueryError as exc:
        raise damaged(info, f"its centroids cannot be read ({exc})") from exc
    if t.num_rows != info.lists:
        raise damaged(info, f"it has {t.num_rows} of its {info.lists} centroids in {IVF_CENTROIDS_TABLE}")
    return _vectors(t.column(0), info.dim)


def damaged(info: IvfInfo, why: str) -> StoreError:
    """The error for an IVF index whose tables were changed by hand (dropped, truncated)."""
    return StoreError(f"the IVF index on {info.embedding_column} (generation {info.gen}) is damaged: {why}; rebuild it: "
                      f"laion index create --kind ivf --column {info.column} --replace (or drop it: laion index drop "
                      f"--kind ivf --column {info.column})")


def _vectors(col: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """An Arrow list column of vectors → a (rows, dim) float32 array (no copy when it can)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    values = arr.flatten().to_numpy(zero_copy_only=False)
    if len(values) != len(arr) * dim:
        raise StoreError(f"expected {dim}-d vectors, found {len(values) / max(1, len(arr)):.1f} values per row")
    return values.reshape(len(arr), dim).astype(np.float32, copy=False)


def covered_shards(store: Store, info: IvfInfo) -> dict[int, dict[str, Any]]:
    return {r["shard"]: r for r in store.rows(
        f"SELECT shard, rows, fingerprint FROM {IVF_SHARDS_TABLE} FINAL WHERE column = {{c:String}} AND gen = {{g:UInt32}}",
        {"c": info.column, "g": info.gen})}


def stale_shards(store: Store, info: IvfInfo) -> list[int]:
    """Shards whose rows this generation holds but ``laion`` no longer has (a reload that dropped the
    shard's rows, killed before the index followed): probes skip them."""
    return _coverage(store, info)[1]


def uncovered_shards(store: Store, info: IvfInfo) -> list[int]:
    """Shards with rows in ``laion`` that this generation does not hold as loaded now."""
    return _coverage(store, info)[0]


def _coverage(store: Store, info: IvfInfo, rows_now: dict[int, int] | None = None,
              records: dict[int, Any] | None = None) -> tuple[list[int], list[int]]:
    """(uncovered, stale) shards of a generation, from one read of its coverage records, the table's
    partitions and the shard records (the last two given when several generations share them)."""
    have = covered_shards(store, info)
    rows_now = store.partition_rows() if rows_now is None else rows_now
    records = store.shard_records() if records is None else records
    uncovered = []
    for shard, n in sorted(rows_now.items()):
        rec, mine = records.get(shard), have.get(shard)
        if not n:
            continue
        if rec is None or mine is None or mine["fingerprint"] != rec.fingerprint or int(mine["rows"]) != n:
            uncovered.append(shard)
    stale = sorted(s for s, r in have.items() if int(r["rows"]) and not rows_now.get(s))
    return uncovered, stale


_META_TYPES = {"gen": pa.uint32(), "lists": pa.uint32(), "dim": pa.uint32(), "sample_rows": pa.uint64(),
               "trained_rows": pa.uint64(), "nprobe": pa.uint32(), "tuned_k": pa.uint32()}


def _write_meta(store: Store, info: IvfInfo) -> None:
    ensure_tables(store)
    cols = {k: pa.array([v], _META_TYPES.get(k)) for k, v in asdict(info).items()}
    cols["updated_at"] = pa.array([time.time_ns() // 1_000_000], pa.timestamp("ms"))
    store.insert(IVF_META_TABLE, pa.table(cols))


def _record_shard(store: Store, info: IvfInfo, shard: int, rows: int, fingerprint: str) -> None:
    store.insert(IVF_SHARDS_TABLE, pa.table({
        "column": [info.column], "gen": pa.array([info.gen], pa.uint32()), "shard": pa.array([shard], pa.uint32()),
        "rows": pa.array([rows], pa.uint64()), "fingerprint": [fingerprint],
        "updated_at": pa.array([time.time_ns() // 1_000_000], pa.timestamp("ms")),
    }))


def _store_centroids(store: Store, info: IvfInfo, centroids: np.ndarray) -> None:
    # a crash between this and the meta row leaves centroids a rerun trains again: clear them first
    store.run_ddl(store.layout.delete(IVF_CENTROIDS_TABLE, "column = {c:String} AND gen = {g:UInt32}"),
                  {"c": info.column, "g": info.gen})
    store.insert(IVF_CENTROIDS_TABLE, pa.table({
        "column": [info.column] * len(centroids), "gen": pa.array([info.gen] * len(centroids), pa.uint32()),
        "list": pa.array(np.arange(len(centroids), dtype=np.uint32)), "centroid": _list_column(centroids),
    }))


def _check_codes(codes: str) -> str:
    if codes not in IVF_CODES:
        raise UsageError(f"--codes must be one of {', '.join(IVF_CODES)}, got {codes!r}")
    return codes


def _check_lists(lists: int | None) -> int | None:
    if lists is not None and not 1 <= int(lists) <= 1_048_576:
        raise UsageError(f"--lists must be between 1 and 1048576, got {lists}")
    return None if lists is None else int(lists)


def _companion_ddl(info: IvfInfo, rows: bool = True) -> str:
    return ivf_table_ddl(info.table, info.codes, info.dim, rows=rows)


def has_rows(store: Store, table: str) -> bool:
    """Whether a companion table keeps the result columns (IVF_ROW_COLUMNS) beside the vectors:
    every table created since they were added does (so does one not created yet); older ones are
    filled as they were built, and their searches read those columns from ``laion`` by id."""
    names = {r["name"] for r in store.rows("SELECT name FROM system.columns WHERE database = currentDatabase() "
                                           "AND table = {t:String}", {"t": table})}
    return not names or set(IVF_ROW_COLUMNS) <= names


def row_values(batch: pa.Table) -> dict[str, Any]:
    """A batch's result columns for a companion table (empty strings where a source has none)."""
    return {c: batch.column(c) if c in batch.column_names else pa.array([""] * batch.num_rows, pa.string())
            for c in IVF_ROW_COLUMNS}


def _create_companion(store: Store, info: IvfInfo) -> None:
    """The generation's companion table; on a cluster, one on every node behind a Distributed
    table with the ``laion`` table's sharding key: each node holds the lists of its own shards, and
    a probe runs on every node over its part of the lists."""
    for stmt in store.layout.create_table(_companion_ddl(info), info.table):
        store.run_ddl(stmt)


def _parts(store: Store, table: str) -> dict[str, int]:
    """Active parts, rows and bytes of one of our tables (every node's, on a cluster)."""
    got = store.rows("SELECT count() AS parts, sum(rows) AS row_count, sum(bytes_on_disk) AS bytes, "
                     "countIf(rows > 0) AS filled FROM " + store.layout.system("parts") + " WHERE database = "
                     "currentDatabase() AND table = {t:String} AND active", {"t": store.layout.local(table)})[0]
    return {k: int(v or 0) for k, v in got.items()}


def bucket_lists(info: IvfInfo, rows: int, lists: int) -> int:
    """Lists per bucket for a shard of ``rows`` rows (see SPLIT_BYTES); 0: merge it in one part."""
    size = int(rows) * (int(info.dim) * 4 + 16)
    if size <= SPLIT_BYTES or lists <= 1:
        return 0
    return math.ceil(lists / min(lists, math.ceil(size / BUCKET_BYTES)))


def _bucket_stage(store: Store, info: IvfInfo, stage: str, width: int, rows: bool = True) -> None:
    store.run_ddl(f"DROP TABLE IF EXISTS {stage}")
    store.run_ddl(ivf_table_ddl(stage, info.codes, info.dim, bucket_lists=width, rows=rows))
    store.run_ddl(f"SYSTEM STOP MERGES {stage}")  # its parts only move out, one bucket at a time


def _move_buckets(store: Store, info: IvfInfo, stage: str, dest: str, width: int, emit: ProgressFn) -> None:
    """Move a bucketed stage into ``dest`` one bucket at a time, each sorted by (list, id) into parts
    of disjoint list ranges, dropping each bucket from the stage once it has moved, then the stage."""
    buckets = [int(r["b"]) for r in store.rows(
        "SELECT DISTINCT toUInt32(partition_id) AS b FROM system.parts WHERE database = currentDatabase() "
        "AND table = {t:String} AND active ORDER BY b", {"t": stage})]
    cols = ("list, id, shard, vec" + "".join(f", {c}" for c in IVF_ROW_COLUMNS if has_rows(store, dest))
            + (", scale, code" if info.codes == "sq8" else ""))
    for n, b in enumerate(buckets, 1):
        store.run_ddl(f"INSERT INTO {dest} ({cols}) SELECT {cols} FROM {stage} WHERE list >= {b * width} "
                      f"AND list < {(b + 1) * width} ORDER BY list, id SETTINGS {MOVE_SETTINGS}")
        store.run_ddl(f"ALTER TABLE {stage} DROP PARTITION ID '{b}'")
        emit({"event": "ivf_move", "index": info.table, "bucket": n, "buckets": len(buckets)})
    store.run_ddl(f"DROP TABLE IF EXISTS {stage}")


#: One bucket (≤ BUCKET_BYTES) moves as few parts as the engine allows: sorted, so disjoint.
MOVE_SETTINGS = (f"min_insert_block_size_rows = 0, min_insert_block_size_bytes = {BUCKET_BYTES}, "
                 "max_insert_threads = 1")


# -- building --------------------------------------------------------------------------------------
def sample_vectors(store: Store, column: str, n: int, dim: int, seed: int = 0) -> np.ndarray:
    """About ``n`` rows of the column (at most n), drawn as whole runs of SAMPLE_RUN consecutive ids
    chosen by a seeded hash (the same sample every time). Runs, not single rows: the engine then
    reads only the granules holding them (a 10M × 768-d table: ~1 GB, not the column's 31 GB), and
    nothing is sorted (sorting the vectors by the hash made the engine spill the whole column and
    run out of memory at 10M rows). LAION's and SISAP's row order carries no clustering that a run of
    consecutive rows would over-sample."""
    emb = INDEX_NAMES[column][1]
    rows = int(store.scalar(f"SELECT count() FROM {TABLE}") or 0)
    if rows == 0 or n <= 0:
        return np.zeros((0, dim), dtype=np.float32)
    keep = 1 if n >= rows else max(1, int(rows / (n * 1.25)))  # 1 run in `keep`: more than n rows, cut to n
    got = _sample_rows(store, emb, f"cityHash64(intDiv(id, {SAMPLE_RUN}), {{seed:UInt64}}) % {keep} = 0", n, seed, dim)
    if len(got) < min(n, rows) // 2:  # sparse ids (runs mostly empty): single rows instead, still unsorted
        got = _sample_rows(store, emb, f"cityHash64(id, {{seed:UInt64}}) % {keep} = 0", n, seed, dim)
    return got


def _sample_rows(store: Store, emb: str, where: str, n: int, seed: int, dim: int) -> np.ndarray:
    """The rows ``where`` picks, cut to ``n`` by a hash of their ids and put in id order: the same
    sample whatever order the engine's threads read them in (the filter picks ~1.25 n rows; the cap
    of 4 n only bounds memory, and a pick that large is many standard deviations away)."""
    t = store.sql(f"SELECT id, {emb} FROM {TABLE} WHERE {where} AND length({emb}) > 0 LIMIT {{cap:UInt64}}",
                  {"seed": int(seed), "cap": 4 * int(n)})
    ids = t.column(0).to_numpy().astype(np.uint64)
    mixed = (ids * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(seed)  # wraps: a cheap, fixed shuffle
    keep = np.argsort(mixed, kind="stable")[:n]
    keep = keep[np.argsort(ids[keep], kind="stable")]
    return _vectors(t.column(1), dim)[keep]


#: Consecutive ids a k-means sample takes together (one granule of the laion table).
SAMPLE_RUN = 1024


def sample_size(lists: int) -> int:
    """Rows k-means trains on: 64 per list up to MAX_SAMPLE, never fewer than MIN_SAMPLE_PER_LIST
    per list (below ~39 per list faiss warns the centroids are unstable)."""
    return max(lists * MIN_SAMPLE_PER_LIST, min(MAX_SAMPLE, max(lists * SAMPLE_PER_LIST, 4096)))


def create_ivf(store: Store, columns: Sequence[str], *, lists: int | None = None, codes: str = DEFAULT_IVF_CODES,
               replace: bool = False, seed: int = 0, progress: ProgressFn | None = None,
               batch_rows: int = FILL_BATCH_ROWS) -> list[dict[str, Any]]:
    """Build (or finish building) the IVF index of each column; see the module docstring.

    Idempotent and resumable: a served generation that covers every shard is kept as it is (unless
    ``replace``); a generation left ``building`` by a crash is finished with its own centroids,
    shard by shard; the old generation serves until the new one is complete."""
    emit = progress or (lambda e: None)
    _check_codes(codes)
    lists = _check_lists(lists)
    dim = _check_columns(store, columns)
    rows = int(store.scalar(f"SELECT count() FROM {TABLE}") or 0)
    if lists is not None and lists > rows:
        raise UsageError(f"{lists} lists need at least {lists} rows to train on, the table has {rows}; "
                         f"use --lists {max(1, rows // SAMPLE_PER_LIST)} or load more rows")
    todo: list[IvfInfo] = []
    results: dict[str, dict[str, Any]] = {}
    for column in columns:
        gens = generations(store, column)
        served = next((g for g in reversed(gens) if g.state == "ready"), None)
        pending = next((g for g in reversed(gens) if g.state in ("building", "declared")), None)
        if pending is not None and (pending.codes != codes or (lists and pending.lists and pending.lists != lists)
                                    or pending.dim != dim):
            _drop_generation(store, pending)  # a build with other parameters: start again
            pending = None
        if pending is None and served is not None and not replace:
            same = served.codes == codes and (lists is None or served.lists == lists) and served.dim == dim
            if not same:
                raise UsageError(f"the IVF index on {served.embedding_column} exists with {served.lists} lists and codes "
                                 f"{served.codes}; pass --replace (replace=True) to build a new one beside it")
            if not uncovered_shards(store, served):
                results[column] = _result(served, rows, 0.0, "up to date")
                continue
            pending = served  # finish it: shards loaded without it (or by a crashed ingest)
        if pending is None:
            pending = IvfInfo(column=column, gen=_max_gen(store, column) + 1, state="building", lists=lists or 0,
                              codes=codes, dim=dim)
            _write_meta(store, pending)
        todo.append(pending)
    for r in _complete(store, todo, rows, emit, batch_rows, seed):
        results[r["column"]] = r
    return [results[c] for c in columns]


def cover(store: Store, columns: Sequence[str], *, progress: ProgressFn | None = None,
          batch_rows: int = FILL_BATCH_ROWS) -> list[dict[str, Any]]:
    """Finish the columns' IVF indexes with their own parameters: train one that no shard has
    trained yet, assign the shards it does not hold (``ingest --index-kind ivf`` ends with this,
    for shards that were loaded before and skipped)."""
    dim = _check_columns(store, columns)
    rows = int(store.scalar(f"SELECT count() FROM {TABLE}") or 0)
    todo = []
    for column in columns:
        gens = generations(store, column)
        info = next((g for g in reversed(gens) if g.state in ("building", "declared")), None) or \
            next((g for g in reversed(gens) if g.state == "ready"), None)
        if info is None:
            raise UsageError(f"{INDEX_NAMES[column][1]} has no IVF index: laion index create --kind ivf --column {column}")
        if info.dim != dim:
            raise UsageError(f"the IVF index on {info.embedding_column} is {info.dim}-d but the table holds {dim}-d "
                             "vectors: rebuild it with --replace")
        if not info.trained or info.state != "ready" or uncovered_shards(store, info):
            todo.append(info)
    return _complete(store, todo, rows, progress or (lambda e: None), batch_rows, 0)


def _check_columns(store: Store, columns: Sequence[str]) -> int:
    dim = store.dim()
    if dim is None:
        raise UsageError("the table is empty: ingest shards before creating an index (its dimension comes from them)")
    for c in columns:
        if c not in INDEX_NAMES:
            raise UsageError(f"column must be image, text or both, got {c!r}")
        if c != "image":
            store.require_modality(c)
    ensure_tables(store)
    return dim


def _complete(store: Store, todo: list[IvfInfo], rows: int, emit: ProgressFn, batch_rows: int,
              seed: int) -> list[dict[str, Any]]:
    """Train what is untrained, assign every uncovered shard, switch each to ``ready`` (dropping
    the generations it replaces)."""
    t0 = time.perf_counter()
    for info in todo:
        if not info.trained:
            want = info.lists or default_lists(rows)
            n = sample_size(want)
            emit({"event": "ivf_train", "index": info.table, "lists": want, "sample": n})
            ts = time.perf_counter()
            sample = sample_vectors(store, info.column, n, info.dim, seed)
            cent = train(sample, min(want, len(sample)), seed=seed)
            info.lists, info.sample_rows, info.trained_rows = len(cent), len(sample), rows
            info.train_seconds = time.perf_counter() - ts
            _store_centroids(store, info, cent)
            _write_meta(store, info)
        _create_companion(store, info)
    if todo:
        # the table's own background merges would compete with the fill for the cores and for the disk
        # (a merge of a 10M × 768-d shard's parts may reserve half the free disk): paused meanwhile, as
        # ingest pauses them (embedded only: on a server they are everyone's)
        if store.embedded:
            store.run_ddl(f"SYSTEM STOP MERGES {TABLE}")
        try:
            _fill(store, todo, emit, batch_rows)
        finally:
            if store.embedded:
                store.run_ddl(f"SYSTEM START MERGES {TABLE}")
    for info in todo:
        if info.state != "ready":
            info.state = "ready"
            _write_meta(store, info)  # the switch: searches take this generation from now on
            for old in generations(store, info.column):
                if old.gen < info.gen:
                    _drop_generation(store, old)
    seconds = time.perf_counter() - t0  # the columns are built together: one time for all
    out = []
    for info in todo:
        out.append(_result(info, rows * len(todo), seconds, "built") | {"rows": rows})
        emit({"event": "index_done", "index": info.table, "seconds": round(seconds, 3), "rows": rows})
    return out


def _max_gen(store: Store, column: str) -> int:
    return int(store.scalar(f"SELECT max(gen) FROM {IVF_META_TABLE} WHERE column = {{c:String}}", {"c": column}) or 0)


def _result(info: IvfInfo, rows: int, seconds: float, what: str) -> dict[str, Any]:
    return {"index": info.table, "type": f"ivf(lists={info.lists}, codes={info.codes})", "kind": "ivf",
            "column": info.column, "gen": info.gen, "lists": info.lists, "codes": info.codes, "seconds": seconds,
            "rows": rows, "what": what, "train_seconds": round(info.train_seconds, 3),
            "vectors_per_second": rows / seconds if seconds > 0 else None}


def _fill(store: Store, infos: list[IvfInfo], emit: ProgressFn, batch_rows: int) -> None:
    """Assign every uncovered shard's rows to the lists of each generation in ``infos`` (one read
    of the table per batch for all of them), shard by shard, recording each when done."""
    cents = {i.column: read_centroids(store, i) for i in infos}
    records = store.shard_records()
    todo: dict[int, list[IvfInfo]] = {}
    for info in infos:
        for shard in uncovered_shards(store, info):
            todo.setdefault(shard, []).append(info)
    sizes = store.partition_rows()
    total = sum(sizes.get(s, 0) for s in todo)
    done = 0
    bucketed = False
    for shard, group in sorted(todo.items()):
        # (on a cluster a shard's rows go to its node through the Distributed table, unbucketed)
        widths = {i.table: bucket_lists(i, sizes.get(shard, 0), i.lists) if store.layout.cluster is None else 0
                  for i in group}
        into = {i.table: f"{STAGE_PREFIX}ivf_fill_{i.table}" if widths[i.table] else i.table for i in group}
        with_rows = {i.table: has_rows(store, i.table) for i in group}
        for info in group:
            # rows of an earlier, unfinished try at this shard (or of an older load of it)
            store.run_ddl(store.layout.delete(info.table, "shard = {s:UInt32}"), {"s": shard})
            if widths[info.table]:
                _bucket_stage(store, info, into[info.table], widths[info.table], with_rows[info.table])
                bucketed = True
        emit({"event": "ivf_shard", "shard": shard, "index": ", ".join(i.table for i in group)})
        cols = ", ".join([i.embedding_column for i in group]
                         + (list(IVF_ROW_COLUMNS) if any(with_rows.values()) else []))
        n_rows = 0
        for where, params in _id_ranges(store, shard, batch_rows):
            t = store.sql(f"SELECT id, {cols} FROM {TABLE} WHERE {where}", params)
            if t.num_rows == 0:
                continue
            for info in group:
                vec_col = t.column(info.embedding_column)
                lists = assign(_vectors(vec_col, info.dim), cents[info.column])
                store.insert(into[info.table], _companion_batch(lists, t.column("id"), shard, vec_col, info.codes,
                                                                info.dim, row_values(t) if with_rows[info.table] else None))
            n_rows += t.num_rows
            done += t.num_rows
            emit({"event": "ivf_progress", "shard": shard, "rows_done": done, "rows": total})
        rec = records.get(shard)
        for info in group:
            if widths[info.table]:
                _move_buckets(store, info, into[info.table], info.table, widths[info.table], emit)
            _record_shard(store, info, shard, n_rows, rec.fingerprint if rec else "")
    for info in infos:
        _compact(store, info, emit, bucketed)


def _id_ranges(store: Store, shard: int, batch_rows: int) -> list[tuple[str, dict[str, Any]]]:
    """A shard's rows as id ranges of ``batch_rows`` rows each (WHERE clause, parameters). Not
    ``ORDER BY id LIMIT n`` from the last id: that reads every part of the shard in order at once,
    a block of up to 65,536 rows from each (a 10M × 768-d shard loaded in 305 parts: 21 GiB of
    memory, measured), where a range reads only the parts it overlaps."""
    ids = store.sql(f"SELECT id FROM {TABLE} WHERE shard = {{s:UInt32}} ORDER BY id SETTINGS max_block_size = 8192",
                    {"s": shard}).column("id").to_numpy()
    starts = ids[::max(1, int(batch_rows))].tolist()
    out = []
    for i, lo in enumerate(starts):
        if i + 1 < len(starts):
            out.append(("shard = {s:UInt32} AND id >= {lo:Int64} AND id < {hi:Int64}",
                        {"s": shard, "lo": int(lo), "hi": int(starts[i + 1])}))
        else:
            out.append(("shard = {s:UInt32} AND id >= {lo:Int64}", {"s": shard, "lo": int(lo)}))
    return out


def _list_column(vectors: np.ndarray) -> pa.Array:
    """(rows, dim) float32 → the ``Array(Float32)`` column the engine takes (a list array)."""
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]).cast(pa.list_(pa.float32()))


def _companion_batch(lists: np.ndarray, ids: Any, shard: int, vectors: Any, codes: str = "none",
                     dim: int = 0, rows: dict[str, Any] | None = None) -> pa.Table:
    """Rows for a companion table, already in its (list, id) order: the engine then finds the block
    sorted and skips its own sort of the vectors. ``rows``: the result columns (:func:`row_values`)
    for a table that keeps them. With ``sq8`` codes, each row's ``scale`` and
    ``code`` come along, computed here in numpy as the table's column defaults would compute them
    in the engine (with the engine's per-element lambdas computing them instead, the 1M-row
    pipeline took 59.0 s against 55.9 s)."""
    n = len(lists)
    ids = pa.chunked_array([ids]) if isinstance(ids, pa.Array) else ids
    id_np = ids.to_numpy()
    order = np.lexsort((id_np, lists))
    take = pa.array(order)
    vec = vectors.combine_chunks() if isinstance(vectors, pa.ChunkedArray) else vectors
    cols = {"list": pa.array(lists[order], pa.uint32()), "id": pa.array(id_np[order], pa.int64()),
            "shard": pa.array(np.full(n, shard, dtype=np.uint32)), "vec": vec.take(take)}
    for name, values in (rows or {}).items():
        cols[name] = values.take(take)
    if codes == "sq8":
        scale, code = sq8(_vectors(vec, dim)[order])
        cols["scale"] = pa.array(scale)
        cols["code"] = pa.FixedSizeListArray.from_arrays(pa.array(code.ravel()), dim).cast(pa.list_(pa.int8()))
    return pa.table(cols)


def sq8(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's scale (its largest absolute value / 127) and int8 code (the values / scale,
    rounded): what the companion's ``scale`` and ``code`` column defaults compute."""
    x = np.asarray(vectors, dtype=np.float32)
    # the engine divides in float64 and rounds half to even: the same here, 8,192 rows at a time
    scale = (np.abs(x).max(axis=1).astype(np.float64) / 127).astype(np.float32) if len(x) else np.zeros(0, np.float32)
    code = np.empty(x.shape, dtype=np.int8)
    for i in range(0, len(x), 8192):
        div = np.maximum(scale[i:i + 8192].astype(np.float64), 1e-30)[:, None]
        code[i:i + 8192] = np.clip(np.rint(x[i:i + 8192] / div), -127, 127)
    return scale, code


def _compact(store: Store, info: IvfInfo, emit: ProgressFn, bucketed: bool = False) -> None:
    """Merge the companion's parts: a probe reads at least one granule per list *per part*, so
    many small parts multiply the rows a search reads (see docs/indexes.md for the measurement).
    Not when a shard was moved in by buckets into a table bigger than SPLIT_BYTES: its parts are
    already disjoint, and the merge would need the table's size again in free disk."""
    got = _parts(store, info.table)
    parts, rows = got["parts"], got["row_count"]
    if rows > MAX_FINAL_MERGE_ROWS or (bucketed and got["bytes"] > SPLIT_BYTES):
        return  # one merge of a LAION-sized table would take hours: the engine's background merges combine its parts
    if parts > 1:
        emit({"event": "ivf_compact", "index": info.table, "parts": parts})
        store.run_ddl(store.layout.optimize(info.table, OPTIMIZE_SETTINGS))


def _drop_generation(store: Store, info: IvfInfo) -> None:
    dropped = IvfInfo(**{**asdict(info), "state": "dropped"})
    _write_meta(store, dropped)
    for stmt in store.layout.drop_table(info.table):
        store.run_ddl(stmt)
    for table in (IVF_CENTROIDS_TABLE, IVF_SHARDS_TABLE):
        store.run_ddl(store.layout.delete(table, "column = {c:String} AND gen = {g:UInt32}"),
                      {"c": info.column, "g": info.gen})


def drop_ivf(store: Store, column: str) -> bool:
    """Drop every generation of the column's IVF index; returns whether one existed."""
    if column not in INDEX_NAMES:
        raise UsageError(f"column must be image or text, got {column!r}")
    gens = generations(store, column)
    for g in gens:
        _drop_generation(store, g)
    return bool(gens)


def declare_ivf(store: Store, columns: Sequence[str], *, codes: str = DEFAULT_IVF_CODES, lists: int | None = None,
                dim: int, rows: int = 0) -> list[str]:
    """Declare IVF indexes before loading (``ingest --index-kind ivf``): the first shard that lands
    trains the centroids on its first rows, and every shard is assigned as it lands. Columns that
    already have one keep it. Returns the companion tables declared now."""
    _check_codes(codes)
    lists = _check_lists(lists)
    ensure_tables(store)
    out = []
    for column in columns:
        if generations(store, column):
            continue
        # sized for the rows there will be once this load is done (``rows``), not the first shard's
        info = IvfInfo(column=column, gen=_max_gen(store, column) + 1, state="declared",
                       lists=int(lists or (default_lists(rows) if rows else 0)), codes=codes, dim=int(dim))
        _write_meta(store, info)
        out.append(info.table)
    return out


# -- landing shards (ingest) -------------------------------------------------------------------------
class Feeder:
    """Assigns one shard's rows to the lists of every active generation as its batches stream in,
    into a stage table per generation; :meth:`land` swaps them in after the shard's own swap.

    A declared (untrained) generation buffers the shard's first rows (bounded: the k-means
    sample), trains on them, then assigns as the others do."""

    def __init__(self, store: Store, shard: int, stage: str, shard_rows: int, emit: ProgressFn):
        self.store, self.shard, self.emit = store, shard, emit
        now = state(store)
        self.infos = [g for gens in now.active.values() for g in gens]
        self.stages = {(i.column, i.gen): f"{stage}_ivf_{i.column}_{i.gen}" for i in self.infos}
        self.cents: dict[tuple[str, int], np.ndarray] = {}
        self.pending: dict[tuple[str, int], list[tuple[Any, Any, dict[str, Any] | None]]] = {}
        self.buffered: dict[tuple[str, int], int] = {}
        self.shard_rows = shard_rows
        # a big shard's rows land in a stage bucketed by list (see SPLIT_BYTES), then move to stages[key]
        self.widths = {(i.column, i.gen): bucket_lists(i, shard_rows, i.lists or default_lists(shard_rows))
                       for i in self.infos}
        self.raw = {key: f"{name}_b" if self.widths[key] else name for key, name in self.stages.items()}
        # the stages take the layout of their generation's table (a declared one's is created with them)
        self.rows = {(i.column, i.gen): has_rows(store, i.table) for i in self.infos}
        for info in self.infos:
            key = (info.column, info.gen)
            store.run_ddl(_companion_ddl(info, self.rows[key]).replace(info.table, self.stages[key], 1))
            store.run_ddl(f"SYSTEM STOP MERGES {self.stages[key]}")
            if self.widths[key]:
                _bucket_stage(store, info, self.raw[key], self.widths[key], self.rows[key])
            if info.trained:
                known = now.centroids.get(key)
                self.cents[key] = known if known is not None else read_centroids(store, info)

    def __bool__(self) -> bool:
        return bool(self.infos)

    # The feeder's work (assignment in torch, its own inserts) runs on a thread of its own, beside the
    # shard's inserts into its stage: on 2 cores the two overlap instead of taking turns.
    def start(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=FEED_DEPTH)
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="laion-ivf-feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            if self._failed is None:
                try:
                    self.add(batch)
                except BaseException as exc:  # noqa: BLE001 - handed to the loading thread
                    self._failed = exc

    def put(self, batch: pa.Table) -> None:
        """Hand a batch over (blocks while FEED_DEPTH batches wait: the reader's buffers are reused)."""
        if self._failed is not None:
            raise self._failed
        self._queue.put(batch)

    def stop(self) -> None:
        """End the thread however the load ended (an error, a kill of the main thread's work)."""
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive():
            self._failed = self._failed or StoreError("the shard's load stopped")
            while thread.is_alive():
                try:
                    self._queue.put(None, timeout=0.1)
                except queue.Full:
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        pass
                thread.join(timeout=0.1)

    def join(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._failed is not None:
            raise self._failed

    def add(self, batch: pa.Table) -> None:
        for info in self.infos:
            key = (info.column, info.gen)
            vec_col = batch.column(info.embedding_column)
            rows = row_values(batch) if self.rows[key] else None
            if key in self.cents:
                self._insert(info, vec_col, batch.column("id"), rows)
                continue
            # a copy: the reader reuses its batches' buffers, and these wait until the sample is complete
            ids = np.array(batch.column("id").to_numpy(), dtype=np.int64, copy=True)
            vectors = np.array(_vectors(vec_col, info.dim), dtype=np.float32, copy=True)
            every = pa.array(np.arange(batch.num_rows))
            kept = {c: v.take(every) for c, v in rows.items()} if rows else None
            self.pending.setdefault(key, []).append((pa.array(ids), _list_column(vectors), kept))
            self.buffered[key] = self.buffered.get(key, 0) + batch.num_rows
            if self.buffered[key] >= sample_size(info.lists or default_lists(self.shard_rows)):
                self._train(info)

    def _insert(self, info: IvfInfo, vec_col: Any, ids: Any, rows: dict[str, Any] | None) -> None:
        key = (info.column, info.gen)
        lists = assign(_vectors(vec_col, info.dim), self.cents[key])
        self.store.insert(self.raw[key], _companion_batch(lists, ids, self.shard, vec_col, info.codes, info.dim, rows))

    def _train(self, info: IvfInfo) -> None:
        key = (info.column, info.gen)
        held = self.pending.pop(key, [])
        sample = np.concatenate([_vectors(v, info.dim) for _, v, _ in held]) if held else np.zeros((0, info.dim), np.float32)
        asked = info.lists or default_lists(self.shard_rows)
        lists = max(1, min(asked, len(sample)))
        self.emit({"event": "ivf_train", "index": info.table, "lists": lists, "sample": len(sample)})
        t0 = time.perf_counter()
        cent = train(sample[:sample_size(asked)], lists)
        info.lists, info.sample_rows = len(cent), min(len(sample), sample_size(asked))
        info.trained_rows, info.train_seconds = self.shard_rows, time.perf_counter() - t0
        _store_centroids(self.store, info, cent)
        _write_meta(self.store, info)
        _create_companion(self.store, info)
        self.cents[key] = cent
        for ids, vec_col, rows in held:
            self._insert(info, vec_col, ids, rows)

    def finish(self) -> None:
        """After the last batch: train what is still untrained, merge each stage into one part (the
        stages side by side: one merge per core)."""
        if getattr(self, "_thread", None) is not None:
            self.join()
        for info in self.infos:
            key = (info.column, info.gen)
            if key not in self.cents and self.pending.get(key):
                self._train(info)

        for info in self.infos:
            key = (info.column, info.gen)
            if self.widths[key]:
                _move_buckets(self.store, info, self.raw[key], self.stages[key], self.widths[key], self.emit)

        def merge(stage: str) -> None:
            self.store.run_ddl(f"ALTER TABLE {stage} MODIFY SETTING max_bytes_to_merge_at_max_space_in_pool = 1")
            self.store.run_ddl(f"SYSTEM START MERGES {stage}")
            parts = int(self.store.scalar("SELECT count() FROM system.parts WHERE database = currentDatabase() AND "
                                          "table = {t:String} AND active", {"t": stage}) or 0)
            if parts > 1:
                self.store.run_ddl(f"OPTIMIZE TABLE {stage} FINAL SETTINGS {OPTIMIZE_SETTINGS}")

        plain = [name for key, name in self.stages.items() if not self.widths[key]]  # bucketed ones are sorted
        with ThreadPoolExecutor(max(1, len(plain))) as pool:
            list(pool.map(merge, plain))

    def land(self, fingerprint: str, rows: int) -> None:
        """Swap each stage into its generation (after the shard's own swap): the shard's old rows
        out, the new ones in, then the record that says this load of the shard is covered."""
        for info in self.infos:
            key = (info.column, info.gen)
            if key not in self.cents:
                continue  # an empty shard never trained a declared index
            # rows of this shard exist only where a record does (it is written first): a new shard needs no
            # DELETE, a mutation that would read the shard column of every part
            had = self.shard in covered_shards(self.store, info)
            _record_shard(self.store, info, self.shard, 0, "pending")
            if had:
                self.store.run_ddl(f"DELETE FROM {info.table} WHERE shard = {{s:UInt32}}", {"s": self.shard})
            self.store.run_ddl(f"ALTER TABLE {info.table} ATTACH PARTITION tuple() FROM {self.stages[key]}")
            _record_shard(self.store, info, self.shard, rows, fingerprint)
            if info.state == "declared":
                info.state = "ready"
                _write_meta(self.store, info)

    def drop(self) -> None:
        for stage in {*self.stages.values(), *self.raw.values()}:
            self.store.run_ddl(f"DROP TABLE IF EXISTS {stage}")


# -- searching ---------------------------------------------------------------------------------------
#: A probe reads whole lists without the per-block checksum (parts are checked when written and
#: merged). Through pread, or mmap while the served lists are small next to the machine's memory:
#: mmap skips a copy through a read buffer per granule (1M rows, sq8, nprobe 16: 17.8 → 13.9 ms for
#: the statement), but every page it touches counts in the process's resident memory until the
#: kernel reclaims it (3M × 768-d: RSS 8.8 GB), so big lists stay on pread (10M × 768-d: 0.5 GB).
#: Every thread reads a share of the probed lists: the engine's defaults give a thread no fewer than
#: 163,840 rows / 24 MB, so a probe (~11,000 rows at 1M rows, nprobe 22) ran on one thread whatever
#: max_threads said (1M × 512-d, 2,048 lists, nprobe 22, one statement: 15.0 → 11.4 ms on 2 cores,
#: at ~5 % more CPU per query).
READ_SETTINGS = {"checksum_on_read": 0, "merge_tree_min_rows_for_concurrent_read": IVF_GRANULARITY,
                 "merge_tree_min_bytes_for_concurrent_read": 1}
MMAP_READ_SETTINGS = {**READ_SETTINGS, "local_filesystem_read_method": "mmap", "min_bytes_to_use_mmap_io": 1}
#: The served companions' bytes on disk, as a share of physical memory, up to which probes use mmap
#: (embedded stores only: a server's memory is its own).
MMAP_MAX_SHARE = 0.25


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def read_settings(embedded: bool, companion_bytes: int, memory: int | None = None) -> dict[str, Any]:
    """How probes read the lists: mmap for an embedded store whose served companions take at most
    MMAP_MAX_SHARE of physical memory, pread otherwise."""
    memory = _physical_memory() if memory is None else memory
    if embedded and 0 < companion_bytes <= MMAP_MAX_SHARE * memory:
        return dict(MMAP_READ_SETTINGS)
    return dict(READ_SETTINGS)


#: Candidates rescored on the float32 vectors per wanted row, by codes, when none is tuned
#: (sq8 at 1M rows, nprobe 16: ×2 kept float32's recall, 0.970, as ×4 did; see docs/indexes.md).
DEFAULT_FETCH = {"none": 1.0, "sq8": 2.0, "int8": 4.0, "rabitq": 4.0}


def candidates(store: Store, info: IvfInfo, centroids: np.ndarray, query: np.ndarray, *, limit: int, nprobe: int,
               func: str, exclude_ids: Sequence[int] = (), skip_shards: Sequence[int] = (),
               fetch_multiplier: float | None = None, rows: bool = False) -> list[dict[str, Any]]:
    """The ``limit`` nearest rows of the probed lists: ``id``, ``shard`` and the exact ``distance``
    (``func`` on the float32 vectors); with ``rows`` (a companion that keeps them, :func:`has_rows`),
    their IVF_ROW_COLUMNS too. With codes, the probed rows are ranked on them first and
    the best ``limit × fetch_multiplier`` rescored: ``sq8`` by ``dotProduct(code, q) * scale`` in
    an inner query (the engine reads ``vec`` for those rows only), ``int8``/``rabitq`` by the
    engine's quantized-codes scan."""
    lists = nearest_lists(query, centroids, nprobe)
    where = ["list IN {lists:Array(UInt32)}"]
    params: dict[str, Any] = {"lists": lists.tolist(), "q": np.asarray(query, dtype=np.float32)}
    if exclude_ids:
        where.append("id NOT IN {exclude_ids:Array(Int64)}")
        params["exclude_ids"] = [int(x) for x in exclude_ids]
    if skip_shards:
        where.append("shard NOT IN {skip:Array(UInt32)}")
        params["skip"] = [int(s) for s in skip_shards]
    return store.rows(candidates_sql(info, func, " AND ".join(where), limit, fetch_multiplier,
                                     read=state(store).read_settings, rows=rows), params)


def candidates_sql(info: IvfInfo, func: str, where: str, limit: int, fetch_multiplier: float | None = None,
                   read: dict[str, Any] | None = None, rows: bool = False) -> str:
    """The statement :func:`candidates` runs (``{lists}`` and ``{q}`` are its parameters). The
    ``rows`` columns are not in the ordering: the engine reads them for the returned rows only
    (lazy materialization; 1M rows, 2,048 lists, nprobe 16: one statement 12 ms against 17 ms for
    the candidates and then their rows from ``laion`` by id)."""
    settings: dict[str, Any] = dict(READ_SETTINGS if read is None else read)
    picked = "id, shard" + "".join(f", `{c}`" for c in IVF_ROW_COLUMNS) if rows else "id, shard"
    multiplier = float(fetch_multiplier or info.fetch_multiplier or DEFAULT_FETCH[info.codes])
    distance = distance_sql(func, "vec", "{q:Array(Float32)}")
    if info.codes == "sq8":
        # every stored vector is unit length (ingest normalises), so the dot product orders the
        # rows as cosine and L2 do; the rescoring puts the true distance on the best ones
        inner = (f"SELECT {picked}, {distance} AS distance FROM {info.table} WHERE {where} "
                 f"ORDER BY dotProduct(code, {{q:Array(Float32)}}) * scale DESC "
                 f"LIMIT {max(int(limit), int(math.ceil(limit * multiplier)))}")
        sql = f"SELECT {picked}, distance FROM ({inner}) ORDER BY distance ASC LIMIT {int(limit)}"
    else:
        if info.codes != "none":
            settings.update(vector_search_use_quantized_codes=1, vector_search_index_fetch_multiplier=multiplier)
        sql = (f"SELECT {picked}, {distance} AS distance FROM {info.table} WHERE {where} "
               f"ORDER BY distance ASC LIMIT {int(limit)}")
    return sql + settings_sql(settings)


def save_tuning(store: Store, info: IvfInfo, result: Any) -> None:
    """Store a tuned nprobe (a :class:`~laion_search.tune.TuneResult`) on the generation it was measured on."""
    tuned = IvfInfo(**{**asdict(info), "nprobe": int(result.nprobe), "tuned_recall": float(result.recall),
                       "tuned_k": int(result.k), "tuned_p50_ms": float(result.p50_ms), "tuned_queries": result.mix})
    _write_meta(store, tuned)


# -- status --------------------------------------------------------------------------------------------
def status(store: Store) -> list[dict[str, Any]]:
    """Each generation: parameters, coverage, size, list balance and whether a retrain would pay."""
    out = []
    rows_now = store.partition_rows()
    total = sum(rows_now.values())
    for info in generations(store):
        exists = store.scalar("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
                              {"t": info.table})
        entry: dict[str, Any] = {"name": info.table, "column": INDEX_NAMES[info.column][1], "method": "ivf",
                                 "generation": info.gen, "state": info.state, "lists": info.lists, "codes": info.codes,
                                 "dim": info.dim, "rows": total, "nprobe": info.nprobe or None,
                                 "tuned_recall": info.tuned_recall or None, "tuned_k": info.tuned_k or None,
                                 "tuned_p50_ms": info.tuned_p50_ms or None, "tuned_queries": info.tuned_queries or None}
        if not exists:
            entry.update(rows_covered=0, bytes_on_disk=0, memory_bytes_estimate=0, retrain=None)
            out.append(entry)
            continue
        uncovered = uncovered_shards(store, info) if info.trained else sorted(rows_now)
        sizes = [int(r["n"]) for r in store.rows(f"SELECT list, count() AS n FROM {info.table} GROUP BY list")]
        got = _parts(store, info.table)
        disk, parts = got["bytes"], got["filled"]
        held = sum(sizes)
        mean = held / info.lists if info.lists else 0.0
        biggest = max(sizes, default=0)
        retrain = None
        if info.trained and total > RETRAIN_GROWTH * max(info.trained_rows, 1) and default_lists(total) > info.lists:
            retrain = (f"the table has {total / max(info.trained_rows, 1):.1f}× the rows the {info.lists} lists were "
                       f"trained for ({mean:,.0f} rows per list): rebuild with --replace (default now "
                       f"{default_lists(total)} lists)")
        elif mean and biggest > RETRAIN_IMBALANCE * mean:
            retrain = (f"the largest list holds {biggest:,} rows, {biggest / mean:.1f}× the mean: the data drifted "
                       "from the centroids; rebuild with --replace")
        kept = list(IVF_ROW_COLUMNS) if has_rows(store, info.table) else []
        entry.update(rows_covered=total - sum(rows_now.get(s, 0) for s in uncovered), shards_uncovered=uncovered,
                     result_columns=kept,
                     parts=int(parts or 0), rows_in_lists=held, list_rows_mean=round(mean, 1), list_rows_max=biggest,
                     lists_empty=info.lists - len(sizes), bytes_on_disk=int(disk or 0),
                     memory_bytes_estimate=info.lists * info.dim * 4, retrain=retrain)
        out.append(entry)
    return out
