"""Ingest end to end on the real engine: layouts, verbatim captions, unique ids, idempotence,
atomicity under bad input, and a load killed with SIGKILL then rerun."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from laion_search import ShardValidationError
from laion_search.ingest import ingest
from laion_search.schema import ID_STRIDE

from .conftest import run_cli


def _table_snapshot(store):
    return store.rows("SELECT shard, count() AS n, sum(cityHash64(image_embedding, text_embedding, caption)) AS h "
                      "FROM laion GROUP BY shard ORDER BY shard")


def test_ingest_flat_layout(store, shards_flat):
    report = ingest(store, shards_flat, batch_rows=256)
    assert report.loaded == [0, 1, 2] and report.rows == 1800 and report.skipped == []
    assert store.scalar("SELECT count() FROM laion") == 1800
    assert store.scalar("SELECT count(DISTINCT id) FROM laion") == 1800
    assert store.scalar("SELECT countIf(id != shard * 1000000000 + shard_row) FROM laion") == 0
    assert store.scalar("SELECT max(id) FROM laion") == 2 * ID_STRIDE + 599


def test_ingest_folders_layout_with_padding(store, shards_folders):
    report = ingest(store, shards_folders)
    assert report.loaded == [3, 10]
    assert store.rows("SELECT shard, count() AS n FROM laion GROUP BY shard ORDER BY shard") == [
        {"shard": 3, "n": 400}, {"shard": 10, "n": 400}]


def test_values_match_source_exactly(store, shards_flat):
    ingest(store, shards_flat, [1])
    meta = pq.read_table(shards_flat / "metadata_1.parquet").to_pylist()
    img = np.load(shards_flat / "img_emb_1.npy").astype(np.float32)
    txt = np.load(shards_flat / "text_emb_1.npy").astype(np.float32)
    got = store.sql("SELECT * FROM laion ORDER BY id")
    rows = got.to_pylist()
    assert len(rows) == 600
    for i, r in enumerate(rows):
        m = meta[i]
        assert r["caption"] == m["caption"]  # verbatim: quotes, tabs, newlines, unicode
        assert r["url"] == m["url"] and r["NSFW"] == m["NSFW"] and r["key"] == m["key"]
        assert r["width"] == m["width"] and r["LICENSE"] == m["LICENSE"]
        assert r["similarity"] == pytest.approx(m["similarity"], abs=1e-6)
    assert np.array_equal(np.array(got.column("image_embedding").to_pylist(), np.float32), img)
    assert np.array_equal(np.array(got.column("text_embedding").to_pylist(), np.float32), txt)
    odd = [r["caption"] for r in rows if any(ch in r["caption"] for ch in "\"'\t\n\u4e50")]
    assert odd, "synth should produce captions with quotes, tabs, newlines and non-ASCII"


def test_verbatim_hand_written_captions(store, tmp_path):
    from laion_search.sources.synth import synth

    d = tmp_path / "s"
    synth(d, [0], 5, dim=16)
    t = pq.read_table(d / "metadata_0.parquet")
    caps = ['He said "hi" & \'bye\'', "tab\tand\nnewline\r\n", "\u4e50\u9ad8 caf\u00e9 \U0001f431", "back\\slash", ""]
    t = t.set_column(t.schema.get_field_index("caption"), "caption", __import__("pyarrow").array(caps))
    pq.write_table(t, d / "metadata_0.parquet")
    ingest(store, d)
    assert [r["caption"] for r in store.rows("SELECT caption FROM laion ORDER BY id")] == caps


def test_reingest_is_idempotent_and_force_replaces(store, shards_flat):
    ingest(store, shards_flat)
    before = _table_snapshot(store)
    again = ingest(store, shards_flat)
    assert again.loaded == [] and again.skipped == [0, 1, 2]
    assert _table_snapshot(store) == before
    forced = ingest(store, shards_flat, [1], force=True)
    assert forced.loaded == [1]
    assert _table_snapshot(store) == before  # replaced, not appended
    assert store.scalar("SELECT count() FROM laion") == 1800


def test_changed_files_are_reloaded(store, shards_flat, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(shards_flat, d)
    ingest(store, d, [0])
    arr = np.load(d / "img_emb_0.npy")
    np.save(d / "img_emb_0.npy", arr[::-1].copy())
    report = ingest(store, d, [0])
    assert report.loaded == [0]
    first = np.array(store.scalar("SELECT image_embedding FROM laion WHERE id = 0"), np.float32)
    assert np.array_equal(first, arr[-1].astype(np.float32))
    assert store.scalar("SELECT count() FROM laion") == 600


def test_bad_shard_leaves_table_unchanged(store, shards_flat, tmp_path):
    ingest(store, shards_flat, [0])
    before = _table_snapshot(store)
    d = tmp_path / "bad"
    shutil.copytree(shards_flat, d)
    arr = np.load(d / "img_emb_1.npy")
    arr[550, 0] = np.nan  # late in the shard: several batches are staged before the error
    np.save(d / "img_emb_1.npy", arr)
    with pytest.raises(ShardValidationError, match=r"img_emb_1.npy: 1 vector\(s\) contain NaN or Inf"):
        ingest(store, d, [1], batch_rows=100)
    assert _table_snapshot(store) == before
    assert store.rows("SELECT name FROM system.tables WHERE name LIKE 'laion_stage_%'") == []
    # a header problem in any requested shard stops the run before anything is loaded
    np.save(d / "text_emb_2.npy", np.load(d / "text_emb_2.npy")[:10])
    with pytest.raises(ShardValidationError, match="row counts disagree"):
        ingest(store, d, [0, 2])
    assert _table_snapshot(store) == before


def test_dimension_must_match_table(store, shards_flat, tmp_path):
    from laion_search.sources.synth import synth

    ingest(store, shards_flat, [0])
    d = tmp_path / "small"
    synth(d, [5], 10, dim=64)
    with pytest.raises(ShardValidationError, match="64-d vectors, but the table holds 512-d"):
        ingest(store, d)


def test_status(store, shards_flat):
    ingest(store, shards_flat, [0, 2])
    info = store.status().as_dict()
    assert info["rows"] == 1200 and info["dim"] == 512
    assert [(s["shard"], s["rows"], s["state"]) for s in info["shards"]] == [(0, 600, "loaded"), (2, 600, "loaded")]
    assert info["bytes_on_disk"] > 600 * 2 * 512 * 4


# A SIGKILLed `laion ingest` and its rerun: tests/test_reliability_crash.py (test_ingest_sigkill_then_rerun)
# kills it at seeded kill points and statement steps, never on the clock, and checks whole shards, ids,
# embeddings, url and caption against the source after every kill.


def test_cli_ingest_json_and_errors(tmp_path, shards_flat):
    db = str(tmp_path / "db")
    proc = run_cli("ingest", str(shards_flat), "--shards", "0,2", "--db", db, "--json", check=True)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert events[-1]["loaded"] == [0, 2] and events[-1]["rows"] == 1200
    bad = run_cli("ingest", str(tmp_path / "missing"), "--db", db)
    assert bad.returncode == 1 and "no such file or directory" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("ingest", str(shards_flat), "--shards", "x-y", "--db", db)
    assert bad.returncode == 2 and "invalid shard list" in bad.stderr
    st = json.loads(run_cli("status", "--db", db, "--json", check=True).stdout)
    assert st["rows"] == 1200 and [s["shard"] for s in st["shards"]] == [0, 2]
