"""The ClickHouse server code path (clickhouse-connect over HTTP), run against the chDB HTTP test
fixture (``laion_search.testing.chdb_http``: the real engine behind ClickHouse's HTTP interface),
plus the cluster DDL and the capacity plan, which need no server."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from laion_search import connect
from laion_search.backends import ClickHouseBackend, parse_url, redact_url
from laion_search.backends.cluster import ClusterLayout, SingleNode, parse_distributed
from laion_search.errors import QueryError, StoreError, UsageError
from laion_search.index import DEFAULT_EF_CONSTRUCTION, DEFAULT_M, IndexSpec, create_index, drop_index
from laion_search.ingest import ingest
from laion_search.plan import PlanInputs, parse_count, plan
from laion_search.search import Filters, explain, search
from laion_search.schema import SHARDS_DDL, SHARDS_TABLE, TABLE, TABLE_DDL

from .conftest import run_cli
from .oracle import Source, recall

NASTY = "tab\there, newline\nthere, 'single' \"double\" back\\slash \\n \\t, CR\r, NUL\0, é漢🙂 %s {q:String} ?"


# -- URL → client options -----------------------------------------------------------------------------
def test_parse_url_schemes_ports_and_credentials():
    u = parse_url("clickhouse://laion:p%40ss%3Aw%2Frd@ch.example.org/laion_db")
    assert (u["interface"], u["host"], u["port"], u["database"]) == ("http", "ch.example.org", 8123, "laion_db")
    assert (u["username"], u["password"]) == ("laion", "p@ss:w/rd")
    assert parse_url("clickhouses://h/db")["interface"] == "https" and parse_url("clickhouses://h/db")["port"] == 8443
    assert parse_url("https://h:9443")["port"] == 9443 and parse_url("https://h")["database"] == "default"
    assert parse_url("http://h:8123/?secure=1")["interface"] == "https"
    assert parse_url("clickhouse://h/db?verify=0&cluster=c")["verify"] is False
    assert parse_url("clickhouse://h/db?cluster=c")["cluster"] == "c"
    assert parse_url("http://h")["username"] == "default"
    with pytest.raises(StoreError, match="database name"):
        parse_url("clickhouse://h/bad-db;DROP")
    assert redact_url("clickhouse://u:secret@h:8123/db") == "clickhouse://u:***@h:8123/db"


def test_connection_errors_are_one_line(chdb_http):
    base, user, _ = chdb_http
    host = base.split("://", 1)[1]
    with pytest.raises(StoreError) as e:
        connect(f"clickhouse://{user}:wrong@{host}/default")
    msg = str(e.value)
    assert "Authentication failed" in msg and "\n" not in msg and "wrong" not in msg  # password never echoed
    with pytest.raises(StoreError, match="cannot connect"):
        connect("clickhouse://u:p@127.0.0.1:9/default")  # nothing listens on port 9


@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")  # verify=0 is the point of the first half
def test_https_url_over_tls(tmp_path):
    """``clickhouses://`` speaks HTTPS: against the fixture serving TLS with a self-signed certificate."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "laion_search.testing.chdb_http", "--path", str(tmp_path / "db"),
                             "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        from .crash_harness import readable

        assert readable(proc.stdout, 60), "TLS fixture did not start"
        line = proc.stdout.readline()
        assert line.startswith("LISTENING https://"), line
        port = line.rsplit(":", 1)[1].strip()
        with connect(f"clickhouses://default:@127.0.0.1:{port}/default?verify=0") as s:
            assert s.backend._client.url.startswith("https://")
            s.backend.insert_arrow("laion_shards", pa.table({"shard": pa.array([1], pa.uint32())}))
            assert s.scalar("SELECT count() FROM laion_shards") == 1
        with pytest.raises(StoreError, match="cannot connect") as e:  # certificate checked by default
            connect(f"clickhouses://default:@127.0.0.1:{port}/default")
        assert "\n" not in str(e.value)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- the library on a server -------------------------------------------------------------------------
def test_ingest_search_index_on_server(server_url, shards_flat):
    with connect(server_url) as s:
        assert isinstance(s.backend, ClickHouseBackend) and isinstance(s.layout, SingleNode)
        inserts = []
        real = s.backend._client.insert_arrow

        def spy(table, data, **kw):
            inserts.append((table, type(data)))
            return real(table, data, **kw)

        s.backend._client.insert_arrow = spy
        report = ingest(s, shards_flat)
        assert report.loaded == [0, 1, 2] and report.rows == 1800
        # every bulk insert went over Arrow (clickhouse-connect's insert_arrow → INSERT … FORMAT Arrow)
        assert inserts and all(t is pa.Table for _, t in inserts)
        assert ingest(s, shards_flat).skipped == [0, 1, 2]          # rerun = no-op, as embedded
        st = s.status().as_dict()
        assert st["backend"] == "clickhouse" and st["rows"] == 1800 and st["dim"] == 512 and st["cluster"] is None
        assert [x["state"] for x in st["shards"]] == ["loaded"] * 3 and "***" in st["store"]
        assert s.scalar("SELECT uniqExact(id) FROM laion") == 1800

        src = Source.load(shards_flat, [0, 1, 2])  # the oracle: numpy over the source files
        exact = search(s, like=1_000_000_042, k=10, exact=True)
        want, dist = src.like(1_000_000_042, 10)
        assert [r["id"] for r in exact.rows] == want
        assert np.allclose([r["distance"] for r in exact.rows], dist, atol=1e-5)
        create_index(s, IndexSpec("image", m=16, ef_construction=128))
        info = s.index_status()
        assert info[0]["name"] == "image_index" and info[0]["parts_covered"] == info[0]["parts"] > 0
        indexed = search(s, like=1_000_000_042, k=10)
        assert "vector_similarity" in explain(s, indexed) or "image_index" in explain(s, indexed)
        rec = [recall([r["id"] for r in indexed.rows], want)]
        f = Filters(nsfw="exclude", where=["width>=300"])
        for rid in (1_000_000_042, 7, 2_000_000_500):
            filt = search(s, like=rid, k=5, filters=f, columns=["NSFW", "width"])
            allowed = src.filters_mask(f)
            assert len(filt.rows) == 5 and all(allowed[src.row(r["id"])] for r in filt.rows)
            assert all(r["NSFW"] not in ("NSFW", "UNSURE") and r["width"] >= 300 for r in filt.rows)
            rec.append(recall([r["id"] for r in filt.rows], src.like(rid, 5, mask=allowed)[0]))
            rec.append(recall([r["id"] for r in search(s, like=rid, k=10).rows], src.like(rid, 10)[0]))
        assert np.mean(rec) >= 0.9, rec  # recall@k against numpy (1.0 in every run here)
        assert drop_index(s, "image") is True and s.index_status() == []


def test_parameters_arrive_byte_exact(server_url):
    with connect(server_url) as s:
        got = s.rows("SELECT {s:String} AS s, {a:Array(String)} AS a, {v:Array(Float32)} AS v, {i:Int64} AS i",
                     {"s": NASTY, "a": [NASTY, "x"], "v": np.array([0.1, -2.5e-8, 3.0], dtype=np.float32),
                      "i": np.int64(-(2**63))})[0]
        assert got["s"] == NASTY and got["a"] == [NASTY, "x"] and got["i"] == -(2**63)
        assert np.array_equal(np.array(got["v"], dtype=np.float32), np.array([0.1, -2.5e-8, 3.0], dtype=np.float32))
        # a long vector parameter (clickhouse-connect switches to a multipart form body)
        v = np.random.default_rng(0).standard_normal(768).astype(np.float32)
        back = s.scalar("SELECT {v:Array(Float32)}", {"v": v})
        assert np.array_equal(np.array(back, dtype=np.float32), v)


def test_captions_with_control_characters_round_trip_and_filter(server_url, tmp_path):
    from laion_search.sources.synth import synth

    synth(tmp_path, [5], 50, seed=3)
    import pyarrow.parquet as pq

    meta = pq.read_table(tmp_path / "metadata_5.parquet")
    captions = meta.column("caption").to_pylist()
    captions[7] = NASTY
    meta = meta.set_column(meta.column_names.index("caption"), "caption", pa.array(captions))
    pq.write_table(meta, tmp_path / "metadata_5.parquet")
    with connect(server_url) as s:
        ingest(s, tmp_path)
        assert s.scalar("SELECT caption FROM laion WHERE id = 5000000007") == NASTY
        hits = search(s, like=5_000_000_001, k=10, exact=True, filters=Filters(caption_contains="\"DOUBLE\" BACK\\SLASH"))
        assert [r["id"] for r in hits.rows] == [5_000_000_007]


def test_engine_errors_are_clean(server_url):
    with connect(server_url) as s:
        with pytest.raises(QueryError) as e:
            s.sql("SELEC 1")
        assert str(e.value).startswith("Code: 62") and "\n" not in str(e.value) and "for url" not in str(e.value)
        with pytest.raises(QueryError, match="Unknown table|UNKNOWN_TABLE|does not exist"):
            s.sql("SELECT * FROM no_such_table")
        # DDL/DML through sql() and SET kept client-side for later statements
        s.sql("CREATE TABLE scratch (a Int64) ENGINE = Memory")
        s.sql("INSERT INTO scratch VALUES (1), (2)")
        assert s.scalar("SELECT sum(a) FROM scratch") == 3
        s.backend.command("SET max_result_rows = 1")
        s.backend.command("SET result_overflow_mode = 'throw'")
        with pytest.raises(QueryError, match="Limit for result exceeded|TOO_MANY_ROWS"):
            s.sql("SELECT number FROM numbers(5)")


def cli(*args: str, env: dict[str, str] | None = None):
    """The `laion` app in-process (a server URL opens no chDB here, so this is safe and fast)."""
    from typer.testing import CliRunner

    from laion_search.cli.main import app

    return CliRunner().invoke(app, list(args), env=env)


def test_cli_commands_on_a_server(server_url, shards_flat, tmp_path):
    # the real entry point once, with the URL from the environment
    r = run_cli("ingest", str(shards_flat), "--shards", "0", "--json", env={"LAION_URL": server_url})
    assert r.returncode == 0, r.stderr
    env = {"LAION_URL": server_url}
    st = json.loads(cli("status", "--json", env=env).stdout)
    assert st["backend"] == "clickhouse" and st["rows"] == 600
    text = cli("status", env=env).stdout
    assert "(clickhouse)" in text and ":***@" in text and "p@ss" not in text
    out = json.loads(cli("search", "--like", "42", "--k", "3", "--exact", "--json", "--db", server_url).stdout)
    assert len(out["results"]) == 3
    sql = cli("sql", "SELECT count() AS n FROM laion WHERE caption != {c:String}", "--param", "c=x",
              "--format", "json", "--url", server_url)
    assert json.loads(sql.stdout) == [{"n": 600}]
    bad = cli("sql", "SELEC 1", env=env)
    assert bad.exit_code == 1 and bad.stderr.startswith("error: Code: 62") and "Traceback" not in bad.stderr
    idx = cli("index", "create", "--column", "text", "--json", env=env)
    assert idx.exit_code == 0 and json.loads(idx.stdout)[0]["index"] == "text_index"
    assert json.loads(cli("index", "status", "--json", env=env).stdout)[0]["name"] == "text_index"
    assert json.loads(cli("index", "drop", "--json", env=env).stdout) == {"image_index": False, "text_index": True}
    udf = cli("udf", "install", "--dir", str(tmp_path / "udf"), "--url", server_url)
    assert udf.exit_code == 0, udf.stderr
    assert (tmp_path / "udf" / "encode_text_function.xml").exists() and (tmp_path / "udf" / "encode_text.py").exists()
    assert "user_scripts" in udf.stdout and "SYSTEM RELOAD FUNCTIONS" in udf.stdout and "none yet" in udf.stdout
    nodir = cli("udf", "install", "--url", server_url)
    assert nodir.exit_code == 2 and "--dir" in nodir.stderr


def test_http_api_over_a_server_store(server_url, shards_flat):
    pytest.importorskip("fastapi")
    import asyncio

    import httpx

    from laion_search.web.app import create_app

    with connect(server_url) as s:
        ingest(s, shards_flat, [1])
        app = create_app(s, allow_sql=True)

        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return (await c.get("/api/status"),
                        await c.post("/api/search", json={"like": 1_000_000_010, "k": 4, "exact": True}),
                        await c.post("/api/sql", json={"query": "SELECT count() AS n FROM laion"}),
                        await c.post("/api/sql", json={"query": "SELECT count() FROM zeros(10)"}))

        status, found, sql, zeros = asyncio.run(go())
        # the server runs the endpoint's statements read-only too (readonly = 1 with the statement)
        assert zeros.status_code == 400 and "the SQL endpoint is read-only" in zeros.json()["error"]
        assert status.json()["rows"] == 600 and status.json()["backend"] == "clickhouse"
        assert len(found.json()["results"]) == 4
        assert sql.status_code == 200 and sql.json()["rows"] == [{"n": 600}]
        # query_timeout became a per-statement setting, not a server-wide SET
        assert s.backend._settings.get("max_execution_time")


# -- cluster DDL (no cluster here: the statements are checked) ---------------------------------------
def test_cluster_statements():
    lay = ClusterLayout("laion_cluster", "laion_db", "modulo", replicated=True)
    stmts = lay.init_statements(TABLE_DDL, SHARDS_DDL, TABLE, SHARDS_TABLE)
    assert len(stmts) == 4
    assert stmts[0].startswith("CREATE TABLE IF NOT EXISTS laion_local ON CLUSTER `laion_cluster`")
    assert "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/laion_local', '{replica}')" in stmts[0]
    assert "PARTITION BY shard" in stmts[0] and "CODEC(NONE)" in stmts[0]
    assert stmts[1] == ("CREATE TABLE IF NOT EXISTS laion ON CLUSTER `laion_cluster` AS laion_local "
                        "ENGINE = Distributed('laion_cluster', 'laion_db', 'laion_local', shard)")
    assert "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/laion_shards_local', '{replica}', loaded_at)" in stmts[2]
    assert stmts[3].endswith("Distributed('laion_cluster', 'laion_db', 'laion_shards_local', shard)")
    # ingest: a replicated stage on every node behind a Distributed stage, atomic swap per node
    create = lay.create_stage("laion_stage_7_abc", TABLE)
    assert create[0].startswith("CREATE TABLE laion_stage_7_abc_local ON CLUSTER `laion_cluster` AS laion_local "
                                "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/laion_stage_7_abc_local'")
    assert create[1].endswith("Distributed('laion_cluster', 'laion_db', 'laion_stage_7_abc_local', shard)")
    assert lay.replace_partition(TABLE, 7, "laion_stage_7_abc") == \
        "ALTER TABLE laion_local ON CLUSTER `laion_cluster` REPLACE PARTITION 7 FROM laion_stage_7_abc_local"
    assert lay.insert_settings() == {"insert_distributed_sync": 1}
    assert lay.system("parts") == "cluster('laion_cluster', system.parts)"
    assert lay.stage_base("laion_stage_7_abc_local") == "laion_stage_7_abc"
    # the IVF index's tables: one on every node (replicated here) behind a Distributed table, its own key
    ddl = "CREATE TABLE IF NOT EXISTS t_x\n(\n    `a` UInt8\n)\nENGINE = ReplacingMergeTree(a)\nORDER BY a\n"
    made = lay.create_table(ddl, "t_x", "0")
    assert made[0].startswith("CREATE TABLE IF NOT EXISTS t_x_local ON CLUSTER `laion_cluster`")
    assert "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/t_x_local', '{replica}', a)" \
        in made[0] and made[0].endswith("ORDER BY a")
    assert made[1] == ("CREATE TABLE IF NOT EXISTS t_x ON CLUSTER `laion_cluster` AS t_x_local "
                       "ENGINE = Distributed('laion_cluster', 'laion_db', 't_x_local', 0)")
    assert lay.create_table(ddl, "t_x")[1].endswith("'t_x_local', shard)")
    assert lay.delete("t_x", "a = 1") == "DELETE FROM t_x_local ON CLUSTER `laion_cluster` WHERE a = 1"
    assert lay.optimize("t_x", "s = 1") == "OPTIMIZE TABLE t_x_local ON CLUSTER `laion_cluster` FINAL SETTINGS s = 1"
    assert lay.drop_table("t_x") == ["DROP TABLE IF EXISTS t_x ON CLUSTER `laion_cluster` SYNC",
                                     "DROP TABLE IF EXISTS t_x_local ON CLUSTER `laion_cluster` SYNC"]
    with pytest.raises(ValueError):
        lay.create_table(ddl, "other")
    plain = ClusterLayout("c", shards_by="hash")
    assert "ENGINE = MergeTree\n" in plain.init_statements(TABLE_DDL, SHARDS_DDL, TABLE, SHARDS_TABLE)[0]
    assert plain.sharding_key == "cityHash64(shard)"
    assert parse_distributed("Distributed('c', 'db', 'laion_local', cityHash64(shard))") == \
        ("c", "db", "laion_local", "cityHash64(shard)")
    with pytest.raises(UsageError):
        ClusterLayout("bad name;")
    with pytest.raises(UsageError):
        ClusterLayout("c", shards_by="random")
    # the single-node layout keeps the embedded store's statements exactly
    one = SingleNode()
    assert one.create_stage("st", TABLE) == ["CREATE TABLE st AS laion", "SYSTEM STOP MERGES st"]
    assert one.replace_partition(TABLE, 3, "st") == "ALTER TABLE laion REPLACE PARTITION 3 FROM st"
    assert one.system("parts") == "system.parts" and one.on_cluster == ""
    assert one.create_table(ddl, "t_x", "0") == [ddl] and one.drop_table("t_x") == ["DROP TABLE IF EXISTS t_x"]
    assert one.delete("t_x", "a = 1") == "DELETE FROM t_x WHERE a = 1" and one.optimize("t_x") == "OPTIMIZE TABLE t_x FINAL"


def test_cluster_local_statements_run_on_the_engine(server_url, shards_flat):
    """What a cluster node runs locally, run for real on one node: laion_local, the explicit-engine
    staging table, the partition swap (with a vector index on laion_local) and the drops. Only
    ``ON CLUSTER`` (needs Keeper) and the Distributed tables (need remote_servers) are left out."""
    from laion_search.sources.shards import discover, open_shard

    lay = ClusterLayout("c", "x")
    local = lambda q: q.replace(lay.on_cluster, "")  # noqa: E731 - this node's share of an ON CLUSTER statement
    with connect(server_url, create=False) as s:
        init = lay.init_statements(TABLE_DDL, SHARDS_DDL, TABLE, SHARDS_TABLE)
        s.backend.command(local(init[0]))
        s.backend.command(local(init[2]))
        s.backend.command("ALTER TABLE laion_local ADD INDEX image_index image_embedding "
                          "TYPE vector_similarity('hnsw', 'cosineDistance', 512, 'bf16', 16, 128) GRANULARITY 100000000")
        stage = "laion_stage_1_abc"
        s.backend.command(local(lay.create_stage(stage, TABLE)[0]))
        reader = open_shard(discover(shards_flat, [1])[0], dim=512)
        for batch in reader.batches(256):
            s.backend.insert_arrow(lay.local(stage), batch)
        s.backend.command(local(lay.replace_partition(TABLE, 1, stage)))
        assert s.scalar("SELECT count() FROM laion_local WHERE shard = 1") == 600
        s.backend.command(local(lay.drop_partition(TABLE, 1)))
        assert s.scalar("SELECT count() FROM laion_local") == 0
        for q in lay.drop_stage(stage):
            s.backend.command(local(q))
        assert s.scalar("SELECT count() FROM system.tables WHERE database = currentDatabase() "
                        "AND name LIKE 'laion_stage%'") == 0


def test_cluster_index_statements_on_a_cluster_layout(server_url):
    """Index DDL goes to laion_local ON CLUSTER: checked by recording what a cluster store sends."""
    with connect(server_url) as s:
        sent, read = [], []
        s.layout = ClusterLayout("laion_cluster", "db")
        s.backend.command = lambda sql, params=None: sent.append(sql)
        s.backend.query_arrow = lambda sql, params=None: read.append((sql, params)) or pa.table({})
        drop_index(s, "image")
        assert sent == ["ALTER TABLE laion_local ON CLUSTER `laion_cluster` DROP INDEX IF EXISTS image_index"]
        from laion_search.search import SearchResult

        explain(s, SearchResult([], 10, "image", "cosine", False, "index", 0.0,
                                sql="SELECT id FROM laion ORDER BY cosineDistance(image_embedding, {q:Array(Float32)}) LIMIT 10"))
        assert read[-1][0] == ("EXPLAIN indexes = 1 SELECT id FROM laion_local ORDER BY "
                               "cosineDistance(image_embedding, {q:Array(Float32)}) LIMIT 10")
        assert "FROM cluster('laion_cluster', system.data_skipping_indices)" in read[0][0]
        assert read[0][1]["t"] == "laion_local"


def test_init_cli_dry_run_and_cluster_needs_a_server():
    r = cli("init", "--cluster", "lc", "--shards-by", "hash", "--dry-run", "--json")
    stmts = json.loads(r.stdout)["statements"]
    assert any("Distributed('lc', 'default', 'laion_local', cityHash64(shard))" in x for x in stmts)
    bad = cli("init", "--cluster", "lc", "--db", "/tmp/not-a-server")
    assert bad.exit_code == 2 and "--url" in bad.stderr


def test_cluster_init_on_a_server_without_that_cluster_fails_cleanly(server_url):
    with connect(server_url, create=False) as s:
        with pytest.raises(QueryError) as e:
            s.init_cluster(ClusterLayout("no_such_cluster", s.backend.database))
        assert "\n" not in str(e.value) and str(e.value).startswith("Code:")


# -- plan ------------------------------------------------------------------------------------------
def test_plan_arithmetic():
    assert parse_count("400M") == 400_000_000 and parse_count("5.85B") == 5_850_000_000
    assert parse_count("1_000") == 1000 and parse_count(250) == 250
    with pytest.raises(UsageError):
        parse_count("lots")
    p = plan(PlanInputs(rows=1_000_000, dim=512, nodes=1, cores=2, ram_gib=16, disk_tib=1,
                        storage="f32-none", quantization="bf16", m=16, ef_construction=128, indexes=1,
                        meta_bytes=100))
    assert p["per_row"]["row_bytes"] == 2 * 2056 + 100
    assert p["totals"]["table_bytes"] == 1_000_000 * 4212
    assert p["per_row"]["index_bytes_per_vector"] == 512 * 2 + 16 * 8
    assert p["totals"]["index_ram_bytes"] == 1_000_000 * 1152
    # measured 1,536 vectors/s on 2 cores → 1M vectors on 2 cores = 651 s
    assert p["embedded"]["index_build_hours"] == pytest.approx(1_000_000 / 1536 / 3600)
    assert p["embedded"]["ingest_hours"] == pytest.approx(1_000_000 / 69_105 / 3600)
    assert p["embedded"]["fits_ram"] and p["embedded"]["verdict"] == "fits one machine"
    assert p["cluster"]["shards"] == 1 and p["cluster"]["replicas"] == 1


def test_plan_laion_400m_and_5b():
    p = plan(PlanInputs(rows=parse_count("400M"), nodes=6, cores=32, ram_gib=256, disk_tib=8))
    t = p["totals"]
    assert p["inputs"]["m"] == DEFAULT_M and p["inputs"]["ef_construction"] == DEFAULT_EF_CONSTRUCTION
    assert t["index_ram_bytes"] == 400_000_000 * 1280 * 2           # two indexes, bf16, M=32: 1,024 + 256 B
    assert p["embedded"]["verdict"].startswith("outgrows")
    # RAM decides: 1,024 GB of indexes / (256 GiB × 0.6) = 6.2 → 7 shards (more than the 6 nodes given)
    assert p["cluster"]["min_shards_for_ram"] == 7 and p["cluster"]["shards"] == 7
    assert not p["cluster"]["enough_nodes"]
    assert p["cluster"]["index_ram_bytes_per_node"] <= 256 * 2**30 * 0.6
    b = plan(PlanInputs(rows=parse_count("5.85B"), dim=768, nodes=64, ram_gib=512, quantization="i8", m=16))
    assert b["per_row"]["vector_bytes"] == pytest.approx(2056 * 1.5)
    assert b["per_row"]["index_bytes_per_vector"] == 768 + 128
    c = b["cluster"]
    assert c["shards"] * c["replicas"] == c["nodes_needed"] and c["shards"] >= c["min_shards_for_ram"]
    assert c["index_build_hours"] < b["embedded"]["index_build_hours"]
    with pytest.raises(UsageError):
        plan(PlanInputs(rows=10, storage="zip"))


def test_plan_cli_json_and_table():
    r = cli("plan", "--rows", "400M", "--nodes", "7", "--json")
    data = json.loads(r.stdout)
    assert data["cluster"]["shards"] == 7 and data["inputs"]["rows"] == 400_000_000
    assert (data["inputs"]["m"], data["inputs"]["ef_construction"]) == (DEFAULT_M, DEFAULT_EF_CONSTRUCTION)
    t = cli("plan", "--rows", "5.85B", "--dim", "768", "--nodes", "64").stdout
    assert "5,850,000,000 rows × 768-d" in t and "| index build |" in t
    bad = cli("plan", "--rows", "many")
    assert bad.exit_code == 2 and "400M" in bad.stderr

