"""The store: the ``laion`` table and its bookkeeping, over one :class:`~laion_search.backends.base.Backend`.

Open one with :func:`connect` (a directory → embedded chDB; a ``clickhouse://`` URL → server).

The ``laion`` table keeps the guide's columns and types exactly, so the guide's SQL runs
verbatim, and adds LAION metadata columns plus the shard bookkeeping:

* ``id = shard * 1_000_000_000 + row`` (unique, stable, readable);
* ``PARTITION BY shard`` so that a shard becomes visible in one atomic step
  (``REPLACE PARTITION`` from a staging table) and re-ingesting it replaces it;
* embeddings stored with ``CODEC(NONE)``: CLIP vectors do not compress, and skipping the
  codec makes both inserts and exact scans faster (see the benchmarks in the README);
* ``index_granularity = 1024`` instead of the guide's 8192: a vector search fetches caption and
  url for its k hits only, and smaller granules make that read ~40 % cheaper (13 → 8 ms for 10
  rows), which is most of an indexed query's cost;
* compressed blocks of 4–16 KiB instead of 64 KiB–1 MiB: reading one row decompresses the block
  that holds it, so small blocks make the k-row reads of a search cheaper again (an indexed
  query returning id, caption and url: 17.5 → 13.7 ms at 100K rows) at ~15 % more bytes for the
  text columns; scans are not slower (the embeddings are stored uncompressed anyway).

``laion_shards`` records what was loaded (row count, file fingerprint, repairs).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from laion_search import killpoints
from laion_search.backends import Backend, ChdbBackend, ClickHouseBackend, Params, is_url
from laion_search.backends.cluster import ClusterLayout, SingleNode, detect_layout
from laion_search.errors import ModalityError, StoreError, UsageError
from laion_search.sources.naming import model_for_dim

TABLE = "laion"
SHARDS_TABLE = "laion_shards"
STAGE_PREFIX = "laion_stage_"
SCHEMA_TTL = 30.0  # seconds a store trusts its cached column / index list
UDF_DIR = "udf"  # <store>/udf: executable UDFs the embedded engine loads at open

#: MergeTree settings of the ``laion`` table (and of its staging and cluster-local tables)
TABLE_SETTINGS = "index_granularity = 1024, min_compress_block_size = 4096, max_compress_block_size = 16384"

TABLE_DDL = """
CREATE TABLE IF NOT EXISTS {table}
(
    `id` Int64,
    `url` String,
    `caption` String,
    `NSFW` String,
    `similarity` Float32,
    `image_embedding` Array(Float32) CODEC(NONE),
    `text_embedding` Array(Float32) CODEC(NONE),
    `shard` UInt32,
    `shard_row` UInt32,
    `key` String,
    `width` Int32,
    `height` Int32,
    `original_width` Int32,
    `original_height` Int32,
    `LICENSE` String
)
ENGINE = MergeTree
PARTITION BY shard
ORDER BY id
SETTINGS """ + TABLE_SETTINGS + "\n"

SHARDS_DDL = """
CREATE TABLE IF NOT EXISTS {table}
(
    `shard` UInt32,
    `rows` UInt64,
    `dim` UInt32,
    `source` String,
    `fingerprint` String,
    `renormalised` UInt64,
    `loaded_at` DateTime64(3),
    `dropped` UInt64 DEFAULT 0,
    `text_repaired` UInt64 DEFAULT 0,
    `format` String DEFAULT 'laion',
    `modalities` String DEFAULT 'image,text',
    `model` String DEFAULT '',
    `name` String DEFAULT ''
)
ENGINE = ReplacingMergeTree(loaded_at)
ORDER BY shard
"""

#: Columns that searches and ``--where`` may name; everything else is refused.
COLUMNS = ("id", "url", "caption", "NSFW", "similarity", "shard", "shard_row", "key", "width", "height",
           "original_width", "original_height", "LICENSE")


_READ_ONLY_RE = re.compile(r"^\s*(\(\s*)*(SELECT|WITH|EXPLAIN|SHOW|DESC|DESCRIBE|EXISTS)\b", re.I)


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

    def __init__(self, backend: Backend, *, create: bool = True):
        self.backend = backend
        self._dim: int | None = None
        self._modalities: tuple[list[str], float] | None = None
        self._schema_cache: tuple[frozenset[str], frozenset[tuple[str, str]], float] | None = None
        #: where rows live: one node (``laion`` is MergeTree) or a cluster (``laion`` is Distributed)
        self.layout: SingleNode | ClusterLayout = detect_layout(backend, TABLE)
        if create and self.layout.cluster is None:
            self.init()

    @property
    def data_table(self) -> str:
        """The MergeTree table that holds the rows: ``laion``, or ``laion_local`` on a cluster."""
        return self.layout.local(TABLE)

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def location(self) -> str:
        return self.backend.location

    def init_cluster(self, layout: ClusterLayout) -> list[str]:
        """Create ``laion_local`` / ``laion`` (Distributed) and the shard registry ``ON CLUSTER``
        (idempotent); returns the statements run. See :mod:`laion_search.backends.cluster`."""
        statements = layout.init_statements(TABLE_DDL, SHARDS_DDL, TABLE, SHARDS_TABLE)
        for stmt in statements:
            self.backend.command(stmt)
        self.layout = layout
        return statements

    def init(self) -> None:
        """Create the tables if they do not exist (idempotent)."""
        self.backend.command(TABLE_DDL.format(table=TABLE))
        self.backend.command(SHARDS_DDL.format(table=SHARDS_TABLE))
        # stores made before these columns existed
        self.backend.command(f"ALTER TABLE {SHARDS_TABLE} ADD COLUMN IF NOT EXISTS `dropped` UInt64 DEFAULT 0, "
                             "ADD COLUMN IF NOT EXISTS `text_repaired` UInt64 DEFAULT 0, "
                             "ADD COLUMN IF NOT EXISTS `format` String DEFAULT 'laion', "
                             "ADD COLUMN IF NOT EXISTS `modalities` String DEFAULT 'image,text', "
                             "ADD COLUMN IF NOT EXISTS `model` String DEFAULT '', "
                             "ADD COLUMN IF NOT EXISTS `name` String DEFAULT ''")

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- SQL ------------------------------------------------------------------------------------
    def sql(self, query: str, params: Params | None = None) -> pa.Table:
        """Run any statement; returns its result as an Arrow table (empty for DDL/DML)."""
        if not query or not query.strip():
            raise UsageError("empty SQL statement")
        if not _READ_ONLY_RE.match(query):
            self.forget_dim()  # a statement that may change the table
        return self.backend.query_arrow(query, params)

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

    def forget_dim(self) -> None:
        """Re-read the dimension (and the column list) next time: call after anything that
        changes the table's rows or columns."""
        self._dim = None
        self._schema_cache = None
        self._modalities = None

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
        a server may change them) and dropped by :meth:`forget_dim`."""
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

    def status(self) -> dict[str, Any]:
        """Rows, shards, size on disk and vector indexes, as plain data."""
        records = self.shard_records()
        counts = self.partition_rows()
        parts = self.rows(
            "SELECT count() AS parts, sum(rows) AS rows, sum(bytes_on_disk) AS bytes_on_disk, "
            "sum(data_uncompressed_bytes) AS bytes_uncompressed "
            f"FROM {self.layout.system('parts')} "
            "WHERE database = currentDatabase() AND table = {t:String} AND active", {"t": self.data_table})[0]
        from laion_search.index import index_status  # index builds on store: import here, not at module level

        indexes = [{k: i[k] for k in ("name", "column", "type", "parts_covered", "parts", "bytes_on_disk")}
                   for i in index_status(self)]
        shards = []
        for n in sorted(set(records) | set(counts)):
            rec = records.get(n)
            loaded = counts.get(n, 0)
            if rec and not rec.fingerprint and rec.name and not loaded:
                continue  # a partition claimed for a file whose load failed or has not started: nothing to show
            state = "loaded" if rec and rec.rows == loaded else ("untracked" if not rec else "mismatch")
            if rec and not rec.fingerprint and rec.name:
                state = "pending"  # a single-file source's partition, claimed; its load has not finished
            shards.append({"shard": n, "rows": loaded, "expected_rows": rec.rows if rec else None,
                           "state": state, "renormalised": rec.renormalised if rec else 0,
                           "dropped": rec.dropped if rec else 0,
                           "format": rec.format if rec else "laion",
                           "modalities": (rec.modalities if rec else "image,text").split(","),
                           "model": (rec.model or model_for_dim(rec.dim)) if rec else None,
                           "source": rec.source if rec else None,
                           "loaded_at": str(rec.loaded_at) if rec else None})
        return {
            "store": self.location,
            "backend": self.backend.name,
            "cluster": self.layout.cluster,
            "table": TABLE,
            "rows": int(parts["rows"] or 0),
            "parts": int(parts["parts"] or 0),
            "bytes_on_disk": int(parts["bytes_on_disk"] or 0),
            "bytes_uncompressed": int(parts["bytes_uncompressed"] or 0),
            "dim": self.dim(),
            "modalities": self.modalities(),
            "model": self.model(),
            "shards": shards,
            "indexes": indexes,
        }


def connect(target: str | os.PathLike[str] | None = None, *, create: bool = True,
            udf_path: str | None = None) -> Store:
    """Open a store: a directory (embedded chDB, created if needed) or a ClickHouse server URL
    (``clickhouse://user:password@host:8123/db``, ``clickhouses://…:8443/db`` for TLS; see
    :func:`laion_search.backends.server.parse_url`). Both run the same statements and give the same results.

    ``None`` uses ``$LAION_URL``, else :func:`default_db_path` (``$LAION_DB`` or the per-user data directory).

    >>> import laion_search
    >>> store = laion_search.connect("./my-laion")          # doctest: +SKIP
    >>> store.rows("SELECT count() AS n FROM laion")         # doctest: +SKIP
    [{'n': 0}]
    """
    if target is None:
        target = os.environ.get("LAION_URL") or default_db_path()
    text = str(target)
    if is_url(text):
        server = ClickHouseBackend(text)
        try:
            return Store(server, create=create)
        except Exception:
            server.close()
            raise
    if udf_path is None:
        # UDFs installed into the store by `laion udf install` (encode_text / encode_image)
        candidate = Path(text).expanduser() / UDF_DIR
        if any(candidate.glob("*_function.xml")):
            udf_path = str(candidate.resolve())
    check_store_dir(text)
    killpoints.reached("store_open")
    backend = ChdbBackend(text, udf_path=udf_path)
    try:
        return Store(backend, create=create)
    except Exception:
        backend.close()
        raise


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

