"""Where the ``laion`` table's rows live, and the statements that follow from it.

A store has one of two layouts; everything that writes DDL or moves partitions (store, ingest,
index) asks the layout for its statements, so the same code runs on both:

* :class:`SingleNode` — embedded chDB or one ClickHouse server: ``laion`` is a MergeTree table.
  Its statements are exactly the ones the embedded store has always run.
* :class:`ClusterLayout` — a ClickHouse cluster (``remote_servers`` + Keeper), set up once with
  ``laion init --cluster NAME``:

  - ``laion_local`` on every node (``ON CLUSTER``), MergeTree or, with ``--replicated``,
    ``ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/laion_local', '{replica}')``;
  - ``laion`` = ``Distributed(NAME, db, laion_local, <key>)``: the guide's SQL and our searches
    read through it, and each node answers from its own part of the data (with its own HNSW
    index: the ``ORDER BY distance LIMIT k`` is pushed to every shard, which runs it like a
    single server, and the initiator merges k × shards candidates);
  - ``laion_shards_local`` / ``laion_shards`` the same way, with the same key, so a LAION shard's
    bookkeeping row lives on the node that holds its rows.

  The sharding key is the ``shard`` column: ``--shards-by modulo`` (default) puts LAION shard
  ``s`` on cluster shard ``s % N`` (weights 1), ``--shards-by hash`` uses ``cityHash64(shard)``.
  Either way all rows of one LAION shard sit on one cluster shard, so loading a LAION shard
  touches one node, and a failed load is retried for that shard alone.

  Ingest of one LAION shard on a cluster (atomic per node, retryable):

  1. ``CREATE TABLE laion_stage_S_T_local ON CLUSTER`` (a private staging table on every node,
     replicated when ``laion_local`` is) and ``laion_stage_S_T`` = Distributed over it, same key;
  2. insert the shard's Arrow batches into the Distributed stage with
     ``insert_distributed_sync = 1``: the insert returns once the rows are written on the
     target node (no asynchronous queue to lose on a crash);
  3. count the stage through the Distributed table; on a mismatch nothing has changed;
  4. ``ALTER TABLE laion_local ON CLUSTER … REPLACE PARTITION S FROM laion_stage_S_T_local``:
     on the target node the shard appears whole in one step; on the other nodes the stage's
     partition is empty, which removes any stray copy (e.g. after the cluster was resharded);
  5. record the shard in ``laion_shards`` and drop the stage ``ON CLUSTER``.

Needs ClickHouse ≥ 25.8 (``vector_similarity`` indexes are GA there; before that they need
``allow_experimental_vector_similarity_index = 1``), a cluster in ``remote_servers`` and Keeper
(for ``ON CLUSTER`` DDL; also for ``--replicated``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from laion_search.schema import TABLE_SETTINGS

LOCAL_SUFFIX = "_local"
SHARDS_BY = {"modulo": "shard", "hash": "cityHash64(shard)"}
#: Sent with every insert into a Distributed table: write synchronously to the target shard.
DISTRIBUTED_INSERT_SETTINGS = {"insert_distributed_sync": 1}

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def check_name(kind: str, name: str) -> str:
    from laion_search.errors import UsageError

    if not name or not _NAME_RE.match(name):
        raise UsageError(f"{kind} must be letters, digits, '_' or '-', got {name!r}")
    return name


class SingleNode:
    """``laion`` is a MergeTree table on the one engine we talk to."""

    cluster: str | None = None
    replicated = False
    on_cluster = ""

    def local(self, table: str) -> str:
        """The table that holds the rows (``laion`` itself here)."""
        return table

    def system(self, name: str) -> str:
        return f"system.{name}"

    def create_stage(self, stage: str, table: str) -> list[str]:
        return [f"CREATE TABLE {stage} AS {table}",
                f"SYSTEM STOP MERGES {stage}"]  # it lives for seconds: merging it is wasted work

    def insert_settings(self) -> dict:
        return {}

    def replace_partition(self, table: str, shard: int, stage: str) -> str:
        return f"ALTER TABLE {table} REPLACE PARTITION {int(shard)} FROM {stage}"

    def drop_partition(self, table: str, shard: int) -> str:
        return f"ALTER TABLE {table} DROP PARTITION {int(shard)}"

    def drop_stage(self, stage: str) -> list[str]:
        return [f"DROP TABLE IF EXISTS {stage}"]

    def stage_base(self, name: str) -> str:
        return name

    def create_table(self, ddl: str, name: str, key: str = "") -> list[str]:
        """``ddl`` (``CREATE TABLE IF NOT EXISTS {name} … ENGINE = …``) as it runs here: unchanged."""
        return [ddl]

    def drop_table(self, name: str) -> list[str]:
        return [f"DROP TABLE IF EXISTS {name}"]

    def delete(self, table: str, where: str) -> str:
        """A lightweight delete of ``table``'s rows matching ``where``."""
        return f"DELETE FROM {table} WHERE {where}"

    def optimize(self, table: str, settings: str = "") -> str:
        return f"OPTIMIZE TABLE {table} FINAL" + (f" SETTINGS {settings}" if settings else "")


@dataclass(frozen=True)
class ClusterLayout:
    """``laion`` is a Distributed table over ``laion_local`` on every node of ``cluster``."""

    cluster: str
    database: str = "default"
    shards_by: str = "modulo"
    replicated: bool = False

    def __post_init__(self) -> None:
        from laion_search.errors import UsageError

        check_name("cluster name", self.cluster)
        check_name("database name", self.database)
        if self.shards_by not in SHARDS_BY:
            raise UsageError(f"--shards-by must be one of {', '.join(SHARDS_BY)}, got {self.shards_by!r}")

    @property
    def on_cluster(self) -> str:
        return f" ON CLUSTER `{self.cluster}`"

    @property
    def sharding_key(self) -> str:
        return SHARDS_BY[self.shards_by]

    def local(self, table: str) -> str:
        return table + LOCAL_SUFFIX

    def system(self, name: str) -> str:
        """``system.X`` of every shard (one replica each), read through the initiator."""
        return f"cluster('{self.cluster}', system.{name})"

    def engine(self, local_table: str, merge_tree: str = "MergeTree", args: str = "") -> str:
        if not self.replicated:
            return f"{merge_tree}({args})" if args else merge_tree
        zk = f"'/clickhouse/tables/{{shard}}/{{database}}/{local_table}', '{{replica}}'"
        return f"Replicated{merge_tree}({zk}{', ' + args if args else ''})"

    def distributed(self, local_table: str, key: str = "") -> str:
        return f"Distributed('{self.cluster}', '{self.database}', '{local_table}', {key or self.sharding_key})"

    def create_table(self, ddl: str, name: str, key: str = "") -> list[str]:
        """A table of ours on the cluster: ``name_local`` on every node (replicated with
        ``--replicated``) and ``name``, a Distributed table over them whose sharding ``key``
        (default: the ``laion`` table's) decides where inserted rows go."""
        local = self.local(name)
        head = f"CREATE TABLE IF NOT EXISTS {name}"
        if head not in ddl:
            raise ValueError(f"not a CREATE TABLE IF NOT EXISTS {name} statement")
        text = ddl.replace(head, f"CREATE TABLE IF NOT EXISTS {local}{self.on_cluster}", 1)
        m = re.search(r"ENGINE = (\w+)(?:\(([^)]*)\))?", text)
        if m is None or not m.group(1).endswith("MergeTree"):
            raise ValueError(f"{name}: expected a MergeTree engine")
        text = text[:m.start()] + f"ENGINE = {self.engine(local, m.group(1), m.group(2) or '')}" + text[m.end():]
        return [text.strip(), f"CREATE TABLE IF NOT EXISTS {name}{self.on_cluster} AS {local} "
                              f"ENGINE = {self.distributed(local, key)}"]

    def drop_table(self, name: str) -> list[str]:
        return self.drop_stage(name)

    def delete(self, table: str, where: str) -> str:
        """A lightweight delete on every node (a Distributed table takes none)."""
        return f"DELETE FROM {self.local(table)}{self.on_cluster} WHERE {where}"

    def optimize(self, table: str, settings: str = "") -> str:
        return f"OPTIMIZE TABLE {self.local(table)}{self.on_cluster} FINAL" + (f" SETTINGS {settings}" if settings else "")

    def init_statements(self, table_ddl: str, shards_ddl: str, table: str, shards_table: str) -> list[str]:
        """``laion_local`` + ``laion``, ``laion_shards_local`` + ``laion_shards``, all ``ON CLUSTER``."""
        out = []
        for ddl, name, merge_tree, args in ((table_ddl, table, "MergeTree", ""),
                                            (shards_ddl, shards_table, "ReplacingMergeTree", "loaded_at")):
            local = self.local(name)
            plain = "ReplacingMergeTree(loaded_at)" if args else "MergeTree"
            text = ddl.format(table=local).replace(f"CREATE TABLE IF NOT EXISTS {local}",
                                                   f"CREATE TABLE IF NOT EXISTS {local}{self.on_cluster}", 1)
            text = text.replace(f"ENGINE = {plain}", f"ENGINE = {self.engine(local, merge_tree, args)}", 1)
            out.append(text.strip())
            out.append(f"CREATE TABLE IF NOT EXISTS {name}{self.on_cluster} AS {local} "
                       f"ENGINE = {self.distributed(local)}")
        return out

    def create_stage(self, stage: str, table: str) -> list[str]:

        local = self.local(stage)
        return [f"CREATE TABLE {local}{self.on_cluster} AS {self.local(table)} ENGINE = {self.engine(local)} "
                f"PARTITION BY shard ORDER BY id SETTINGS {TABLE_SETTINGS}",
                f"CREATE TABLE {stage}{self.on_cluster} AS {local} ENGINE = {self.distributed(local)}"]

    def insert_settings(self) -> dict:
        return dict(DISTRIBUTED_INSERT_SETTINGS)

    def replace_partition(self, table: str, shard: int, stage: str) -> str:
        return f"ALTER TABLE {self.local(table)}{self.on_cluster} REPLACE PARTITION {int(shard)} FROM {self.local(stage)}"

    def drop_partition(self, table: str, shard: int) -> str:
        return f"ALTER TABLE {self.local(table)}{self.on_cluster} DROP PARTITION {int(shard)}"

    def stage_base(self, name: str) -> str:
        """A staging table's name without the ``_local`` suffix (its Distributed table's name)."""
        return name[: -len(LOCAL_SUFFIX)] if name.endswith(LOCAL_SUFFIX) else name

    def drop_stage(self, stage: str) -> list[str]:
        return [f"DROP TABLE IF EXISTS {stage}{self.on_cluster} SYNC",
                f"DROP TABLE IF EXISTS {self.local(stage)}{self.on_cluster} SYNC"]


_DISTRIBUTED_RE = re.compile(r"Distributed\(\s*'?([^',\s]+)'?\s*,\s*'?([^',\s]*)'?\s*,\s*'?([^',\s]+)'?\s*"
                             r"(?:,\s*(.+?))?\)\s*(?:SETTINGS\b.*)?$", re.S)


def parse_distributed(engine_full: str) -> tuple[str, str, str, str | None] | None:
    """``Distributed('c', 'db', 'laion_local', shard)`` → (cluster, database, table, key)."""
    m = _DISTRIBUTED_RE.search(engine_full or "")
    if not m:
        return None
    return m.group(1), m.group(2), m.group(3), m.group(4)


def detect_layout(backend, table: str) -> SingleNode | ClusterLayout:
    """A server store is a cluster store when its ``laion`` is a Distributed table."""
    if backend.embedded:
        return SingleNode()
    t = backend.query_arrow("SELECT engine, engine_full FROM system.tables WHERE database = currentDatabase() "
                            "AND name = {t:String}", {"t": table}).to_pylist()
    if not t or t[0]["engine"] != "Distributed":
        return SingleNode()
    parsed = parse_distributed(t[0]["engine_full"])
    if parsed is None:
        return SingleNode()
    cluster, database, _local, key = parsed
    local_engine = backend.query_arrow("SELECT engine FROM system.tables WHERE database = currentDatabase() "
                                       "AND name = {t:String}", {"t": table + LOCAL_SUFFIX}).to_pylist()
    replicated = bool(local_engine) and local_engine[0]["engine"].startswith("Replicated")
    shards_by = "hash" if key and "cityHash64" in key else "modulo"
    return ClusterLayout(cluster, database or "default", shards_by, replicated)
