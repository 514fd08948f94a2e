"""The store: the ``laion`` table and its bookkeeping, over one :class:`~laion_search.backends.base.Backend`.

Open one with :func:`laion_search.connect` (a directory → embedded chDB; a ``clickhouse://`` URL →
server), which returns a :class:`~laion_search.api.Database`: this Store plus the library's operations.

The table's columns, DDL and layout choices live in :mod:`laion_search.schema`.

``laion_shards`` records what was loaded (row count, file fingerprint, repairs);
``laion_index_tuning`` (created by the first ``laion index tune``) the ef_search default of each
tuned index, with the recall and latency measured for it (on a cluster: on the node connected to).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import pyarrow as pa

from laion_search import killpoints
from laion_search.backends import Backend, ChdbBackend, ClickHouseBackend, Params, is_url
from laion_search.backends.cluster import ClusterLayout, SingleNode, detect_layout
from laion_search.errors import ModalityError, QueryError, StoreError, UsageError
from laion_search.schema import (INDEX_NAMES, SHARDS_DDL, SHARDS_TABLE, STAGE_PREFIX, TABLE, TABLE_DDL, TUNING_DDL, TUNING_TABLE,
                                 index_memory_estimate, model_for_dim, parse_index_type, scan_column)

T = TypeVar("T")
_Self = TypeVar("_Self", bound="Store")
SCHEMA_TTL = 30.0  # seconds a store trusts its cached column / index list
UDF_DIR = "udf"  # <store>/udf: executable UDFs the embedded engine loads at open


_READ_ONLY_RE = re.compile(r"^\s*(\(\s*)*(SELECT|WITH|EXPLAIN|SHOW|DESC|DESCRIBE|EXISTS)\b", re.I)


def init_statements() -> list[str]:
    """What :meth:`Store.init` runs (and ``laion init --dry-run`` prints): the ``laion`` table, the
    ``laion_shards`` registry, and the columns registries made before them lacked."""
    return [TABLE_DDL.format(table=TABLE).strip(), SHARDS_DDL.format(table=SHARDS_TABLE).strip(),
            # stores made before these columns existed
            f"ALTER TABLE {SHARDS_TABLE} ADD COLUMN IF NOT EXISTS `dropped` UInt64 DEFAULT 0, "
            "ADD COLUMN IF NOT EXISTS `text_repaired` UInt64 DEFAULT 0, "
            "ADD COLUMN IF NOT EXISTS `format` String DEFAULT 'laion', "
            "ADD COLUMN IF NOT EXISTS `modalities` String DEFAULT 'image,text', "
            "ADD COLUMN IF NOT EXISTS `model` String DEFAULT '', "
            "ADD COLUMN IF NOT EXISTS `name` String DEFAULT ''"]


def default_db_path() -> Path:
    """``$LAION_DB``, else ``$XDG_DATA_HOME/laion-search/db`` (``~/.local/share/laion-search/db``)."""
    env = os.environ.get("LAION_DB")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "laion-search" / "db"


@dataclass
class ShardRecord:
    shard: int
    rows: int
    dim: int
    source: str
    fingerprint: str
    renormalised: int
    loaded_at: Any
    dropped: int = 0         # rows left out by --skip-bad-rows
    text_repaired: int = 0   # rows whose invalid UTF-8 was replaced with U+FFFD
    format: str = "laion"    # laion | clickhouse-parquet | sisap-h5 (laion_search.sources.formats)
    modalities: str = "image,text"  # the embedding columns the source filled
    model: str = ""          # the CLIP model that made its vectors ("" when unknown)
    name: str = ""           # a single-file source's file name: the key of its partition


class Store:
    """A handle on one laion-search store. Thread-safe; close it (or use ``with``) when done."""

    def __init__(self, backend: Backend, *, create: bool = True, upgrade: bool = True):
        """``create``: make the tables when they are missing. Without it, a database that has them
        is still brought up to date (:meth:`init` only adds missing bookkeeping columns then), and
        one without them is left untouched (:func:`open_backend` refuses a directory without a
        store before the engine starts). ``upgrade=False`` leaves a database's tables as they are."""
        self.backend = backend
        self._dim: int | None = None
        self._modalities: tuple[list[str], float] | None = None
        self._schema_cache: tuple[frozenset[str], frozenset[tuple[str, str]], float] | None = None
        self._tuning_cache: tuple[dict[str, dict[str, Any]], float] | None = None
        self._cached: dict[str, tuple[Any, float]] = {}  # see cached()
        #: where rows live: one node (``laion`` is MergeTree) or a cluster (``laion`` is Distributed)
        self.layout: SingleNode | ClusterLayout = detect_layout(backend, TABLE)
        if self.layout.cluster is None and (create or (upgrade and self.has_table())):
            self.init()

    @property
    def data_table(self) -> str:
        """The MergeTree table that holds the rows: ``laion``, or ``laion_local`` on a cluster."""
        return self.layout.local(TABLE)

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def location(self) -> str:
        return self.backend.location

    @property
    def embedded(self) -> bool:
        """Whether the engine runs in this process (chDB): one process owns the store, so e.g.
        any staging table found is a dead run's, and its background merges can be paused."""
        return self.backend.embedded

    @property
    def engine(self) -> str:
        """Which engine this is: ``chdb`` (embedded) or ``clickhouse`` (a server or cluster)."""
        return self.backend.name

    def init_cluster(self, layout: ClusterLayout) -> list[str]:
        """Create ``laion_local`` / ``laion`` (Distributed) and the shard registry ``ON CLUSTER``
        (idempotent); returns the statements run. See :mod:`laion_search.backends.cluster`."""
        statements = layout.init_statements(TABLE_DDL, SHARDS_DDL, TABLE, SHARDS_TABLE)
        for stmt in statements:
            self.run_ddl(stmt)
        self.layout = layout
        return statements

    def has_table(self) -> bool:
        """Whether the database holds the ``laion`` table (a store: see :func:`missing_store_message`)."""
        return bool(self.backend.query_arrow(
            "SELECT count() AS n FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
            {"t": TABLE}).column(0)[0].as_py())

    def init(self) -> None:
        """Create the tables if they do not exist (idempotent): :func:`init_statements`."""
        for stmt in init_statements():
            self.run_ddl(stmt)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- SQL ------------------------------------------------------------------------------------
    def sql(self, query: str, params: Params | None = None) -> pa.Table:
        """Run any statement; returns its result as an Arrow table (empty for DDL/DML)."""
        if not query or not query.strip():
            raise UsageError("empty SQL statement")
        if not _READ_ONLY_RE.match(query):
            self.clear_caches()  # a statement that may change the table
        return self.backend.query_arrow(query, params)

    def run_ddl(self, statement: str, params: Params | None = None) -> None:
        """Run a statement that changes tables (DDL, INSERT … SELECT, DELETE, OPTIMIZE) and drop
        every cache that depends on them."""
        self.backend.command(statement, params)
        self.clear_caches()

    def set_session(self, name: str, value: str | int | float) -> None:
        """``SET name = value`` for every later statement of this store (``name`` is ours, never a
        user's; the value is a literal the engine parses)."""
        if not re.fullmatch(r"[a-z_]+", name):
            raise UsageError(f"not a setting name: {name!r}")
        literal = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'" if isinstance(value, str) else repr(value)
        self.backend.command(f"SET {name} = {literal}")

    def query_text(self, query: str, params: Params | None = None, fmt: str = "CSV") -> str:
        """A read-only query's result as the engine formats it (no Arrow decoding): what the
        benchmarks time as the engine's floor."""
        if not _READ_ONLY_RE.match(query):
            raise UsageError("query_text runs read-only queries only")
        return self.backend.query_text(query, params, fmt)

    def query_raw(self, query: str, params: Params | None = None, *, fmt: str = "JSONCompact",
                  settings: Mapping[str, Any] | None = None, readonly: bool = False) -> bytes:
        """A statement's result as the engine writes it in output format ``fmt`` (``laion sql``'s
        FORMAT clause, the SQL endpoint's JSON), with ``settings`` for it; ``readonly``: in a
        read-only session, so that it can neither write nor change a setting (:mod:`laion_search.sql`)."""
        if not readonly:
            self.clear_caches()  # it may change a table
        return self.backend.query_raw(query, params, fmt=fmt, settings=settings, readonly=readonly)

    def rows_read(self, query: str, params: Params | None = None) -> int | None:
        """Run a read-only query for its cost: the rows the engine read (None where it does not say)."""
        if not _READ_ONLY_RE.match(query):
            raise UsageError("rows_read runs read-only queries only")
        return self.backend.rows_read(query, params)

    def insert(self, table: str, data: pa.Table, settings: Mapping[str, Any] | None = None) -> None:
        """Insert an Arrow table into ``table`` (a name from our fixed set, never a user's). On a
        cluster, an insert into a Distributed table returns once the rows are on their node."""
        self.backend.insert_arrow(table, data, {**self.layout.insert_settings(), **(settings or {})} or None)
        self.clear_caches()

    def cached(self, key: str, load: Callable[[], T]) -> T:
        """``load()``, kept for :data:`SCHEMA_TTL` seconds under ``key`` and dropped with the other
        caches by any change this store makes (:meth:`clear_caches`): modules above the store keep their
        derived state here (e.g. the IVF index's centroids) without the store importing them."""
        hit = self._cached.get(key)
        if hit is None or time.monotonic() - hit[1] > SCHEMA_TTL:
            hit = self._cached[key] = (load(), time.monotonic())
        return hit[0]

    def rows(self, query: str, params: Params | None = None) -> list[dict[str, Any]]:
        """Run a query and return its rows as dicts."""
        return self.sql(query, params).to_pylist()

    def scalar(self, query: str, params: Params | None = None) -> Any:
        t = self.sql(query, params)
        if t.num_rows == 0 or t.num_columns == 0:
            return None
        return t.column(0)[0].as_py()

    # -- shards -------------------------------------------------------------------------------
    def shard_records(self) -> dict[int, ShardRecord]:
        rows = self.rows(f"SELECT shard, rows, dim, source, fingerprint, renormalised, loaded_at, dropped, "
                         f"text_repaired, format, modalities, model, name FROM {SHARDS_TABLE} FINAL ORDER BY shard")
        return {r["shard"]: ShardRecord(**r) for r in rows}

    def partition_rows(self) -> dict[int, int]:
        """Rows per shard as the ``laion`` table holds them now."""
        rows = self.rows(f"SELECT shard, count() AS n FROM {TABLE} GROUP BY shard")
        return {r["shard"]: r["n"] for r in rows}

    def clear_caches(self) -> None:
        """Drop every cached view of the tables (dimension, columns and indexes, tuning,
        modalities, :meth:`cached` entries). The store calls it after each statement it runs that
        may change a table (:meth:`run_ddl`, :meth:`insert`, :meth:`sql`); call it only when
        another client may have changed the tables (e.g. a rebuild switched generations)."""
        self._dim = None
        self._schema_cache = None
        self._tuning_cache = None
        self._modalities = None
        self._cached.clear()

    def columns(self) -> frozenset[str]:
        """Names of the ``laion`` table's columns (searches ask whether the bf16 scan copies of
        :mod:`laion_search.index` exist). Cached; see :meth:`_schema`."""
        return self._schema()[0]

    def vector_indexes(self) -> frozenset[tuple[str, str]]:
        """``(column, distance function)`` of each vector index, e.g. ``("image_embedding",
        "cosineDistance")``: a search goes through the engine's index only where one serves it."""
        return self._schema()[1]

    def _schema(self) -> tuple[frozenset[str], frozenset[tuple[str, str]]]:
        """Columns and vector indexes, cached for :data:`SCHEMA_TTL` seconds (another client of
        a server may change them) and dropped by :meth:`clear_caches`."""
        cached = self._schema_cache
        if cached is None or time.monotonic() - cached[2] > SCHEMA_TTL:
            cols = frozenset(r["name"] for r in self.rows(
                "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String}",
                {"t": TABLE}))
            idx = frozenset((r["expr"], r["type_full"].split(",")[1].strip(" '"))
                            for r in self.rows(
                "SELECT expr, type_full FROM " + self.layout.system("data_skipping_indices") + " WHERE "
                "database = currentDatabase() AND table = {t:String} AND type = 'vector_similarity'",
                {"t": self.data_table}) if r["type_full"].count(",") >= 1)
            cached = self._schema_cache = (cols, idx, time.monotonic())
        return cached[0], cached[1]

    def ensure_tuning_table(self) -> None:
        self.run_ddl(TUNING_DDL.format(table=TUNING_TABLE))

    def tuning_table_exists(self) -> bool:
        return bool(self.scalar("SELECT count() FROM system.tables WHERE database = currentDatabase() "
                                "AND name = {t:String}", {"t": TUNING_TABLE}))

    def tuning(self) -> dict[str, dict[str, Any]]:
        """``image`` / ``text`` → the ef_search default stored by ``laion index tune`` (with its
        measured recall and p50), for indexes whose type is still the one tuned. Cached like
        :meth:`columns`."""
        cached = self._tuning_cache
        if cached is None or time.monotonic() - cached[1] > SCHEMA_TTL:
            out: dict[str, dict[str, Any]] = {}
            if self.tuning_table_exists():
                types = {r["name"]: r["type_full"] for r in self.rows(
                    "SELECT name, type_full FROM " + self.layout.system("data_skipping_indices") + " WHERE "
                    "database = currentDatabase() AND table = {t:String} AND type = 'vector_similarity'",
                    {"t": self.data_table})}
                for r in self.rows(f"SELECT column, index_type, ef_search, recall, target, k, queries, p50_ms, "
                                   f"toString(tuned_at) AS tuned_at FROM {TUNING_TABLE} FINAL"):
                    if types.get(f"{r['column']}_index", "").replace(" ", "") == r["index_type"].replace(" ", ""):
                        out[r["column"]] = r
            cached = self._tuning_cache = (out, time.monotonic())
        return cached[0]

    def modalities(self) -> list[str]:
        """The embedding columns every loaded row has: ``["image", "text"]`` for LAION shards,
        ``["image"]`` once an image-only source (ClickHouse's LAION-5B, SISAP) is in the table;
        ``[]`` while it is empty. Read from ``laion_shards``; a shard without a record counts as
        having both (the only kind that existed before records said otherwise)."""
        cached = self._modalities
        if cached is None or time.monotonic() - cached[1] > SCHEMA_TTL:
            counts = self.partition_rows()
            records = self.shard_records()
            have: set[str] | None = None
            for shard, n in counts.items():
                if not n:
                    continue
                rec = records.get(shard)
                mine = set((rec.modalities if rec else "image,text").split(","))
                have = mine if have is None else have & mine
            cached = self._modalities = ([m for m in ("image", "text") if have and m in have], time.monotonic())
        return list(cached[0])

    def require_modality(self, modality: str) -> None:
        """Raise :class:`~laion_search.errors.ModalityError` when the table has rows but no
        ``modality`` embeddings (e.g. ``text`` on an image-only table)."""
        have = self.modalities()
        if have and modality not in have:
            counts = self.partition_rows()
            only = [f"{r.shard} ({r.name or r.source})" for r in self.shard_records().values()
                    if counts.get(r.shard) and modality not in r.modalities.split(",")][:3]
            raise ModalityError(f"the table has no {modality} embeddings (it holds {', '.join(have)} only; "
                                f"image-only source(s): {', '.join(only)}): use the "
                                f"{'image' if modality == 'text' else 'text'} embeddings (--modality / --column "
                                f"{'image' if modality == 'text' else 'text'})")

    def model(self) -> str | None:
        """The CLIP model the loaded rows were embedded with, as their shards record it (the
        model LAION used for their dimension when unrecorded); None for an empty table or when
        shards disagree."""
        counts = self.partition_rows()
        found = {(rec.model or model_for_dim(rec.dim)) for s, rec in self.shard_records().items() if counts.get(s)}
        if not found:
            dim = self.dim()
            return model_for_dim(dim) or None if dim else None
        return found.pop() if len(found) == 1 and "" not in found else None

    def dim(self) -> int | None:
        """Embedding dimension of the loaded rows, or None while the table is empty.

        Cached once known (every search needs it); reset by any statement that is not a read."""
        if self._dim is None:
            # .size0 reads the array sizes only, not the vectors
            self._dim = self.scalar(f"SELECT image_embedding.size0 FROM {TABLE} LIMIT 1")
        return self._dim

    # -- indexes (introspection; building them is laion_search.index's job) ----------------------
    def list_indexes(self) -> list[dict[str, Any]]:
        """The table's ``vector_similarity`` indexes as the engine lists them."""
        return self.rows(
            "SELECT name, expr, type_full, data_compressed_bytes AS bytes_on_disk, "
            "data_uncompressed_bytes AS bytes_uncompressed FROM " + self.layout.system("data_skipping_indices") + " "
            "WHERE database = currentDatabase() AND table = {t:String} AND type = 'vector_similarity' ORDER BY name",
            {"t": self.data_table})

    def index_status(self) -> list[dict[str, Any]]:
        """Each vector index and bf16 scan copy: its parameters, how many parts carry it, size on disk."""
        out = []
        # rows > 0: a dropped or replaced partition leaves an empty covering part for a while
        parts = self.rows(
            "SELECT name, rows FROM " + self.layout.system("parts") + " WHERE database = currentDatabase() "
            "AND table = {t:String} AND active AND rows > 0", {"t": self.data_table})
        rows = sum(int(p["rows"]) for p in parts)
        indexes = self.list_indexes()
        # system.parts reports secondary-index bytes per part, not per index, so "covered" is
        # approximate: a part counts once it carries any skip index (one query serves all indexes).
        covered = self.rows(
            "SELECT count() AS parts, sum(rows) AS rows FROM " + self.layout.system("parts") + " WHERE "
            "database = currentDatabase() AND table = {t:String} AND active AND secondary_indices_compressed_bytes > 0",
            {"t": self.data_table})[0] if indexes else {}
        tuned = self.tuning() if indexes else {}
        for idx in indexes:
            info = parse_index_type(idx["type_full"])
            t = tuned.get(idx["name"].removesuffix("_index"), {})
            out.append({
                "name": idx["name"], "column": idx["expr"], **info,
                "parts": len(parts), "parts_covered": int(covered["parts"] or 0),
                "rows": rows, "rows_covered": int(covered["rows"] or 0),
                "bytes_on_disk": int(idx["bytes_on_disk"] or 0),
                "memory_bytes_estimate": index_memory_estimate(info, rows),
                "type": idx["type_full"],
                # set by `laion index tune`: the default ef_search, its measured recall@k and p50
                "ef_search": t.get("ef_search"), "tuned_recall": t.get("recall"), "tuned_k": t.get("k"),
                "tuned_p50_ms": t.get("p50_ms"),
            })
        for column in INDEX_NAMES:
            name = scan_column(column)
            if name not in self.columns():
                continue
            size = self.scalar("SELECT data_compressed_bytes FROM system.columns WHERE database = currentDatabase() "
                               "AND table = {t:String} AND name = {c:String}", {"t": self.data_table, "c": name})
            out.append({"name": name, "column": INDEX_NAMES[column][1], "method": "scan", "quantization": "bf16",
                        "parts": len(parts), "parts_covered": len(parts) - self.parts_missing(name),
                        "bytes_on_disk": int(size or 0), "memory_bytes_estimate": 0,
                        "type": "Array(BFloat16) copy for exact search"})
        return out

    def parts_missing(self, column: str) -> int:
        """Active parts whose files lack ``column`` (written before it was added)."""
        return int(self.scalar(
            "SELECT count() FROM system.parts AS p WHERE database = currentDatabase() AND table = {t:String} AND active "
            "AND rows > 0 AND name NOT IN (SELECT part_name FROM system.parts_columns WHERE database = currentDatabase() "
            "AND table = {t:String} AND active AND column = {c:String})", {"t": self.data_table, "c": column}) or 0)

    def version(self) -> str:
        """A token that changes whenever the rows or the indexes change: every insert, merge,
        mutation (``MATERIALIZE INDEX``), drop and index add/drop makes new active parts or a new
        index list. Cheap (two system-table reads); caches key on it so they are never stale,
        also when another client of a server writes."""
        import hashlib

        if self.embedded and not Path(self.location).is_dir():
            # the engine still lists the parts it had: a cached answer must not outlive the files
            raise QueryError(f"{self.location}: No such file or directory")
        parts = self.rows(
            f"SELECT name, rows, modification_time FROM {self.layout.system('parts')} "
            "WHERE database = currentDatabase() AND table = {t:String} AND active ORDER BY name",
            {"t": self.data_table})
        indexes = self.rows(
            f"SELECT name, type_full, expr FROM {self.layout.system('data_skipping_indices')} "
            "WHERE database = currentDatabase() AND table = {t:String} ORDER BY name", {"t": self.data_table})
        h = hashlib.blake2b(digest_size=12)
        for r in (*parts, *indexes):
            h.update(repr(sorted(r.items())).encode())
            h.update(b"\0")
        return h.hexdigest()

    def cancel_queries(self, tag: str) -> int:
        """Cancel the running queries whose ``log_comment`` setting is ``tag`` (a server tags
        its own queries so that shutting down ends them, and nobody else's); returns how many."""
        # KILL QUERY finds its victims with a SELECT on system.processes that carries the tag
        # too and is not a KILL: without `query_id != queryID()` it counts itself, and every
        # shutdown, idle or not, reported "cancelled 1 running query"
        return len(self.cancel_query_ids(tag))

    def cancel_query_ids(self, tag: str) -> set[str]:
        """:meth:`cancel_queries`, as the ids of the queries cancelled (a SYNC kill may report one
        query on several rows, as it waits for it to end)."""
        got = self.rows("KILL QUERY WHERE Settings['log_comment'] = {tag:String} AND query_id != queryID() "
                        "AND NOT startsWith(query, 'KILL') SYNC", {"tag": tag})
        return {str(r["query_id"]) for r in got}

    def status(self) -> StoreStatus:
        """Rows, shards, size on disk and vector indexes (``.as_dict()`` for plain data)."""
        records = self.shard_records()
        counts = self.partition_rows()
        parts = self.rows(
            "SELECT count() AS parts, sum(rows) AS rows, sum(bytes_on_disk) AS bytes_on_disk, "
            "sum(data_uncompressed_bytes) AS bytes_uncompressed "
            f"FROM {self.layout.system('parts')} "
            "WHERE database = currentDatabase() AND table = {t:String} AND active", {"t": self.data_table})[0]
        indexes = [IndexInfo(name=i["name"], column=i["column"], type=i["type"], parts_covered=i["parts_covered"],
                             parts=i["parts"], bytes_on_disk=i["bytes_on_disk"]) for i in self.index_status()]
        shards = []
        for n in sorted(set(records) | set(counts)):
            rec = records.get(n)
            loaded = counts.get(n, 0)
            if rec and not rec.fingerprint and rec.name and not loaded:
                continue  # a partition claimed for a file whose load failed or has not started: nothing to show
            state = "loaded" if rec and rec.rows == loaded else ("untracked" if not rec else "mismatch")
            if rec and not rec.fingerprint and rec.name:
                state = "pending"  # a single-file source's partition, claimed; its load has not finished
            shards.append(ShardStatus(shard=n, rows=loaded, expected_rows=rec.rows if rec else None, state=state,
                                      renormalised=rec.renormalised if rec else 0, dropped=rec.dropped if rec else 0,
                                      format=rec.format if rec else "laion",
                                      modalities=(rec.modalities if rec else "image,text").split(","),
                                      model=(rec.model or model_for_dim(rec.dim)) if rec else None,
                                      source=rec.source if rec else None,
                                      loaded_at=str(rec.loaded_at) if rec else None))
        return StoreStatus(
            store=self.location, backend=self.backend.name, cluster=self.layout.cluster, table=TABLE,
            rows=int(parts["rows"] or 0), parts=int(parts["parts"] or 0),
            bytes_on_disk=int(parts["bytes_on_disk"] or 0), bytes_uncompressed=int(parts["bytes_uncompressed"] or 0),
            dim=self.dim(), modalities=self.modalities(), model=self.model(), shards=shards, indexes=indexes)


@dataclass
class ShardStatus:
    """One shard as the table holds it: ``state`` is loaded, mismatch (rows differ from the
    record) or untracked (rows without a record)."""

    shard: int
    rows: int
    expected_rows: int | None
    state: str
    renormalised: int = 0
    dropped: int = 0
    format: str = "laion"                 # laion | clickhouse-parquet | sisap-h5
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])
    model: str | None = None              # the CLIP model its vectors come from
    source: str | None = None
    loaded_at: str | None = None


@dataclass
class IndexInfo:
    """A vector index or bf16 scan copy, and how many of the table's parts carry it."""

    name: str
    column: str
    type: str
    parts_covered: int
    parts: int
    bytes_on_disk: int


@dataclass
class StoreStatus:
    store: str
    backend: str
    cluster: str | None
    table: str
    rows: int
    parts: int
    bytes_on_disk: int
    bytes_uncompressed: int
    dim: int | None
    modalities: list[str] = field(default_factory=list)  # embeddings every row has: image, text
    model: str | None = None                              # the CLIP model of the rows (None: mixed or empty)
    shards: list[ShardStatus] = field(default_factory=list)
    indexes: list[IndexInfo] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


S = TypeVar("S", bound=Store)


def guide_store(path: str | os.PathLike[str]) -> Store:
    """An embedded store for the guide's own ``laion`` table (the benchmarks replay the guide's
    statements verbatim): our tables are neither created nor upgraded in it."""
    backend = ChdbBackend(str(path))
    try:
        return Store(backend, create=False, upgrade=False)
    except Exception:
        backend.close()
        raise



def open_backend(cls: type[S], target: str | os.PathLike[str] | None = None, *, create: bool = True,
                 udf_path: str | None = None) -> S:
    """``cls`` (a Store or a subclass) over the backend ``target`` names; see :func:`laion_search.connect`
    (``None`` uses ``$LAION_URL``, else :func:`default_db_path`; ``create=False`` creates nothing:
    a directory that holds no store raises :class:`~laion_search.errors.StoreError` naming the path
    and how to create one, and leaves no directory behind)."""
    default = target is None
    if target is None:
        target = os.environ.get("LAION_URL") or default_db_path()
    text = str(target)
    if is_url(text):
        server = ClickHouseBackend(text)
        try:
            return cls(server, create=create)
        except Exception:
            server.close()
            raise
    if udf_path is None:
        # UDFs installed into the store by `laion udf install` (encode_text / encode_image)
        candidate = Path(text).expanduser() / UDF_DIR
        if any(candidate.glob("*_function.xml")):
            udf_path = str(candidate.resolve())
    if not create and not holds_store(text):
        # before the engine starts: it would make the directory and its own files in it
        raise StoreError(missing_store_message(text, default=default and not os.environ.get("LAION_DB")))
    check_store_dir(text)
    killpoints.reached("store_open")
    backend = ChdbBackend(text, udf_path=udf_path)
    try:
        return cls(backend, create=create)
    except Exception:
        backend.close()
        raise


def holds_store(path: str | os.PathLike[str]) -> bool:
    """Whether the directory holds an embedded store: the engine's definition of the ``laion``
    table (``metadata/default/laion.sql``, ClickHouse's on-disk layout). Read from the disk, so
    asking neither starts the engine nor writes anything."""
    return (Path(path).expanduser() / "metadata" / "default" / f"{TABLE}.sql").is_file()


def missing_store_message(location: str | os.PathLike[str], *, default: bool = False) -> str:
    """One line: no store at ``location``, and the commands that create one."""
    where = str(location)
    opt = "--url" if is_url(where) else "--db"
    arg = f" {opt} {where}" if not default else ""
    hint = (" (the default store; pass --db PATH or set LAION_DB for another)" if default else "")
    return (f"no laion-search store at {where}{hint}: create one with `laion ingest SHARDS{arg}` "
            f"(or an empty one with `laion init{arg}`)")


def check_store_dir(path: str | os.PathLike[str]) -> None:
    """chDB writes into its store even to read it (a lock file, temporary data). Refuse a store
    directory we cannot write to up front, with the reason (read-only file system, permission
    denied), instead of chDB's "Error initializing EmbeddedServer"."""
    import tempfile

    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise StoreError(f"cannot open the store {p}: it is not a directory")
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".laion-write-probe-"):
            pass
    except OSError as exc:
        raise StoreError(f"cannot open the store {p}: cannot write to {probe} ({exc.strerror or exc}); "
                         "the embedded engine needs a writable store directory, even to read") from None


def stage_table_name(shard: int, token: str) -> str:
    if not token.isalnum():
        raise ValueError("stage token must be alphanumeric")
    return f"{STAGE_PREFIX}{int(shard)}_{token}"


def list_stage_tables(store: Store) -> list[str]:
    rows = store.rows("SELECT name FROM system.tables WHERE database = currentDatabase() "
                      "AND startsWith(name, {p:String})", {"p": STAGE_PREFIX})
    return [r["name"] for r in rows]

