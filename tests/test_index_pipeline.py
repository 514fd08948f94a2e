"""Index build paths: both indexes built together, indexes declared before the data so each shard
lands indexed (`laion ingest --index both`), and the engine's index-build thread pool."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from laion_search import connect
from laion_search.cli.main import app
from laion_search.errors import StoreError, UsageError
from laion_search.index import IndexSpec, create_indexes
from laion_search.ingest import ingest
from laion_search.search import explain, search
from laion_search.sources.synth import synth, synth_sisap_h5


def _parts(store) -> list[dict]:
    return store.rows("SELECT partition_id, name, rows, secondary_indices_compressed_bytes AS b FROM system.parts "
                      "WHERE database = currentDatabase() AND table = 'laion' AND active AND rows > 0 ORDER BY name")


def _covered(store) -> dict[str, tuple[int, int]]:
    return {i["name"]: (i["parts_covered"], i["parts"]) for i in store.index_status()}


def test_ingest_with_index_lands_every_shard_indexed_in_one_part(tmp_path):
    synth(tmp_path / "s", [0, 1, 2], 2000, dim=32, seed=7)
    events: list[dict] = []
    with connect(tmp_path / "db") as db:
        report = ingest(db, tmp_path / "s", shards=[0, 1], index="both", batch_rows=300, progress=events.append)
        assert report.loaded == [0, 1] and report.rows == 4000
        built = [e for e in events if e["event"] == "shard_indexed"]
        assert [e["shard"] for e in built] == [0, 1]
        assert all(e["indexes"] == ["image_index", "text_index"] for e in built)
        # one part per shard (its 7 batches merged once, the graphs built in that merge), each indexed
        parts = _parts(db)
        assert [p["partition_id"] for p in parts] == ["0", "1"] and all(p["b"] > 0 for p in parts), parts
        assert _covered(db) == {"image_index": (2, 2), "text_index": (2, 2)}
        # the indexes exist now: a later ingest, asked for nothing, lands indexed too
        ingest(db, tmp_path / "s", shards=[2], progress=events.append)
        assert [e["shard"] for e in events if e["event"] == "shard_indexed"] == [0, 1, 2]
        assert _covered(db) == {"image_index": (3, 3), "text_index": (3, 3)}
        # searches go through the index and find what the exact scan finds
        hits = 0
        for rid in (5, 1_000_000_017, 2_000_001_500):
            approx = search(db, like=rid, k=10)
            assert "image_index" in explain(db, approx)
            exact = search(db, like=rid, k=10, exact=True)
            hits += len({r["id"] for r in approx} & {r["id"] for r in exact})
        assert hits >= 29, hits  # 2,000 rows per graph: the graphs give 30/30 in every probe of this data
        for column in ("image", "text"):
            res = search(db, like=1_000_000_017, k=5, modality=column)
            assert len(res) == 5 and f"{column}_index" in explain(db, res)


def test_declared_later_earlier_parts_get_a_hint_then_index_create_builds_them(tmp_path):
    synth(tmp_path / "s", [0, 1], 500, dim=16, seed=8)
    db = str(tmp_path / "db")
    runner = CliRunner()
    assert runner.invoke(app, ["ingest", str(tmp_path / "s"), "--shards", "0", "--db", db]).exit_code == 0
    r = runner.invoke(app, ["ingest", str(tmp_path / "s"), "--shards", "1", "--index", "both", "--db", db])
    assert r.exit_code == 0, r.output
    assert "image_index, text_index: parts loaded before the index was declared" in r.stderr
    assert "shard 1: image_index, text_index built in" in r.stderr
    with connect(db) as store:
        assert _covered(store) == {"image_index": (1, 2), "text_index": (1, 2)}
    r = runner.invoke(app, ["index", "create", "--column", "both", "--db", db, "--json"])
    assert r.exit_code == 0, r.output
    with connect(db) as store:
        assert _covered(store) == {"image_index": (2, 2), "text_index": (2, 2)}
    # nothing left to say once every part is indexed
    r = runner.invoke(app, ["ingest", str(tmp_path / "s"), "--index", "both", "--db", db])
    assert r.exit_code == 0 and "hint" not in r.stderr, r.output


def test_text_index_on_an_image_only_source_is_refused_before_anything_changes(tmp_path):
    h5 = synth_sisap_h5(tmp_path / "laion2B-en-clip768v2-n=300.h5", 300, dim=16, seed=1)
    with connect(tmp_path / "db") as db:
        with pytest.raises(UsageError, match=r"--index both: .*laion2B-en-clip768v2-n=300\.h5 has no text embeddings"):
            ingest(db, h5, index="both")
        assert db.list_indexes() == [] and db.dim() is None  # nothing declared, nothing loaded
        ingest(db, h5, index="image")
        assert _covered(db) == {"image_index": (1, 1)}
        assert len(search(db, like=int(db.scalar("SELECT min(id) FROM laion")), k=3)) == 3


def test_create_indexes_builds_both_in_one_go_and_reports_each(tmp_path):
    synth(tmp_path / "s", [0, 1], 800, dim=16, seed=9)
    events: list[dict] = []
    with connect(tmp_path / "db") as db:
        ingest(db, tmp_path / "s", batch_rows=200)
        assert len(_parts(db)) > 2  # several parts per shard before the build
        out = create_indexes(db, [IndexSpec("image", m=8, ef_construction=32), IndexSpec("text", m=8, ef_construction=32)],
                             progress=events.append)
        assert [o["index"] for o in out] == ["image_index", "text_index"]
        assert all(o["rows"] == 1600 and "8, 32)" in o["type"] for o in out)
        starts = [e for e in events if e["event"] == "index_start"]
        assert [e["index"] for e in starts] == ["image_index, text_index"]  # one build step for both
        last = [e for e in events if e["event"] == "index_progress"][-1]
        assert last["parts_done"] == last["parts"] > 0
        assert [e["index"] for e in events if e["event"] == "index_done"] == ["image_index", "text_index"]
        assert len(_parts(db)) == 2  # compacted once: one part (one graph per index) per shard
        assert _covered(db) == {"image_index": (2, 2), "text_index": (2, 2)}
        # declaring an index that exists with other parameters is refused, not silently kept
        with pytest.raises(UsageError, match="exists with different parameters"):
            create_indexes(db, [IndexSpec("image")], materialize=False)


def test_index_build_threads_come_from_the_environment_else_the_engine(tmp_path, monkeypatch):
    from laion_search.backends.chdb import ENGINE_BUILD_THREADS, index_build_threads

    pool = ("SELECT value FROM system.server_settings "
            "WHERE name = 'max_build_vector_similarity_index_thread_pool_size'")
    monkeypatch.setenv("LAION_INDEX_BUILD_THREADS", "3")
    assert index_build_threads() == 3
    with connect(tmp_path / "db") as db:  # the engine's pool is sized from it when the store opens
        assert db.scalar(pool) == "3"
    for bad in ("many", "0"):
        monkeypatch.setenv("LAION_INDEX_BUILD_THREADS", bad)
        with pytest.raises(StoreError, match="LAION_INDEX_BUILD_THREADS"):
            index_build_threads()
    monkeypatch.delenv("LAION_INDEX_BUILD_THREADS")
    assert index_build_threads() is None
    with connect(tmp_path / "db") as db:
        assert db.scalar(pool) == str(ENGINE_BUILD_THREADS)


def test_bench_pipeline_measures_each_step_and_recall(tmp_path):
    from laion_search.bench.pipeline import run

    result = run(rows=1500, modes=("after", "on-ingest"), build_threads=(1,), m=8, ef_construction=32, queries=10,
                 guide_rows=300, workdir=tmp_path)
    by = {r["method"]: r for r in result["results"]}
    assert set(by) == {"after", "on-ingest", "usearch", "guide"}
    for method in ("after", "on-ingest"):
        r = by[method]
        assert r["rows"] == 1500 and r["build_threads"] == 1
        assert set(r["phases"]) == {"ingest", "index", "first_query"} and all(v > 0 for v in r["phases"].values())
        assert r["strategy"] == "index" and r["parts"] == 1  # one part for the shard: one graph per index
        assert min(r["recall"].values()) >= 0.9, r["recall"]  # M=8, ef_c=32 over 1,500 rows gives ≥ 0.97 here
        assert r["peak_rss"] > 50 * 2**20
    assert min(by["usearch"]["recall"].values()) >= 0.9
    assert by["guide"]["measured_rows"] == 300 and by["guide"]["rows"] == 1500
    lat = by["after"]["latency"]  # measured once, on the first of our pipelines
    assert lat["floor_ms"] > 0 and lat["library_ms"] > 0 and lat["http_ms"] > 0 and "latency" not in by["on-ingest"]
    md = result["markdown"]
    assert "fastest:" in md and "engine floor" in md and "build rate vs raw usearch, 1 thread(s) each" in md and "vs the guide" in md
    assert np.isfinite([r["vectors_per_second"] for r in result["results"]]).all()


_DROP_WHILE_BUILDING = r'''
import sys
from laion_search import connect
from laion_search.index import drop_index
from laion_search.sources.synth import synth

synth(sys.argv[1] + "/s", [0, 1], 3000, dim=64, seed=1)
db = connect(sys.argv[1] + "/db")
db.ingest(sys.argv[1] + "/s")
db.run_ddl("ALTER TABLE laion ADD INDEX image_index image_embedding TYPE vector_similarity('hnsw', 'cosineDistance', "
           "64, 'bf16', 64, 256) GRANULARITY 100000000")
# a build left queued, as a killed `index create` leaves it (the engine resumes it on reopening)
db.run_ddl("SYSTEM STOP MERGES laion")
db.run_ddl("ALTER TABLE laion MATERIALIZE INDEX image_index SETTINGS mutations_sync = 0")
pending = db.scalar("SELECT count() FROM system.mutations WHERE table = 'laion' AND NOT is_done")
db.run_ddl("SYSTEM START MERGES laion")
print(pending, drop_index(db, "image"), len(db.list_indexes()),
      db.scalar("SELECT count() FROM system.mutations WHERE table = 'laion' AND NOT is_done"), db.scalar("SELECT count() FROM laion"))
'''


def test_drop_an_index_whose_build_is_still_queued(tmp_path):
    """`laion index drop` after a build was cut short: the engine refuses to drop an index a pending
    mutation builds ("affected by mutation … not finished"), so the drop cancels that build first —
    the index is gone, no mutation is left, the rows are untouched."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _DROP_WHILE_BUILDING, str(tmp_path)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "True", "0", "0", "6000"], out.stdout
