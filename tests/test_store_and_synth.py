"""Store lifecycle (locking, reopen, SQL with parameters), synth properties, and the ingest bench."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from laion_search import QueryError, StoreError, UsageError, connect
from laion_search.backends import format_param
from laion_search.sources.synth import synth
from laion_search.vectors import parse_params

from .conftest import run_cli


def test_second_process_gets_a_clear_busy_error(tmp_path):
    db = tmp_path / "db"
    with connect(db):
        proc = run_cli("status", "--db", str(db))
        assert proc.returncode == 1
        assert f"is in use by process {os.getpid()}" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert run_cli("status", "--db", str(db), "--json", check=True).returncode == 0


def test_one_store_per_process_is_explained(tmp_path):
    with connect(tmp_path / "a"):
        with pytest.raises(StoreError, match="one store per process"):
            connect(tmp_path / "b")
    with connect(tmp_path / "b") as store:  # after closing, another store opens fine
        assert store.scalar("SELECT count() FROM laion") == 0


def test_sql_parameters_and_errors(store):
    t = store.sql("SELECT {s:String} AS s, {v:Array(Float32)} AS v, {n:Int64} AS n",
                  {"s": "it's \"quoted\"\t\n", "v": [0.5, -1.25], "n": 7})
    assert t.to_pylist() == [{"s": "it's \"quoted\"\t\n", "v": [0.5, -1.25], "n": 7}]
    with pytest.raises(QueryError, match="UNKNOWN_TABLE"):
        store.sql("SELECT * FROM nope")
    with pytest.raises(UsageError):
        store.sql("  ")
    assert format_param(np.float32(0.1)) == repr(float(np.float32(0.1)))
    tricky = ["a'b", "tab\there", "back\\slash", "new\nline", "nul\0", "\u4e50 \U0001f431", "]", "',"]
    assert store.scalar("SELECT {a:Array(String)}", {"a": tricky}) == tricky
    for text in tricky:
        assert store.scalar("SELECT {s:String}", {"s": text}) == text
    # float32 query vectors take the short "%.9g" path and still arrive bit for bit
    v = np.random.default_rng(1).standard_normal(512).astype(np.float32) * np.float32(1e-3)
    v[:4] = [np.float32(1e-38), np.float32(3.4e38), np.float32(-0.0), np.float32(1 / 3)]
    back = np.asarray(store.scalar("SELECT {q:Array(Float32)}", {"q": v}), dtype=np.float32)
    assert back.tobytes() == v.tobytes()


def test_parse_params(tmp_path):
    (tmp_path / "v.json").write_text("[1, 2.5]")
    np.save(tmp_path / "v.npy", np.array([[0.5, 0.25]], np.float32))
    (tmp_path / "t.txt").write_text("hello\n")
    p = parse_params(["a=1", f"b=@{tmp_path / 'v.json'}", f"c=@{tmp_path / 'v.npy'}", f"d=@{tmp_path / 't.txt'}"])
    assert p == {"a": "1", "b": [1, 2.5], "c": [0.5, 0.25], "d": "hello"}
    for bad in ("novalue", "1x=2", f"e=@{tmp_path / 'missing.json'}"):
        with pytest.raises(UsageError):
            parse_params([bad])


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_synth_is_deterministic_and_laion_shaped(tmp_path):
    synth(tmp_path / "a", [0, 1], 300, seed=5)
    synth(tmp_path / "b", [0, 1], 300, seed=5)
    synth(tmp_path / "c", [0, 1], 300, seed=6)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    img = np.load(tmp_path / "a" / "img_emb_0.npy")
    txt = np.load(tmp_path / "a" / "text_emb_0.npy")
    assert img.dtype == np.float16 and img.shape == (300, 512) and txt.shape == (300, 512)
    assert np.allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=2e-3)
    meta = pq.read_table(tmp_path / "a" / "metadata_0.parquet")
    assert meta.column_names == ["image_path", "caption", "NSFW", "similarity", "LICENSE", "url", "key", "status",
                                 "error_message", "width", "height", "original_width", "original_height", "exif"]
    assert set(meta.column("NSFW").to_pylist()) <= {"UNLIKELY", "UNSURE", "NSFW"}
    sim = np.einsum("ij,ij->i", img.astype(np.float32), txt.astype(np.float32))
    assert np.allclose(meta.column("similarity").to_numpy(), sim, atol=1e-5)


def test_synth_has_structure(tmp_path):
    """Clustered and image/text correlated: a row's nearest image neighbours share its topic far
    more often than chance, and its own text vector is closer than random texts."""
    synth(tmp_path, [0], 2000, seed=1, topics=20)
    img = np.load(tmp_path / "img_emb_0.npy").astype(np.float32)
    txt = np.load(tmp_path / "text_emb_0.npy").astype(np.float32)
    topic = [int(c.split("#")[1].split()[0]) for c in pq.read_table(tmp_path / "metadata_0.parquet")
             .column("caption").to_pylist()]
    topic = np.array(topic)
    sims = img[:200] @ img.T
    np.fill_diagonal(sims[:, :200], -1)
    nn = np.argsort(-sims, axis=1)[:, :10]
    same = (topic[nn] == topic[:200, None]).mean()
    assert same > 0.8
    paired = np.einsum("ij,ij->i", img, txt).mean()
    shuffled = np.einsum("ij,ij->i", img, txt[np.random.default_rng(0).permutation(2000)]).mean()
    assert paired > 0.2 and paired > shuffled + 0.15
    text_to_image = txt[:200] @ img.T
    assert (topic[np.argmax(text_to_image, axis=1)] == topic[:200]).mean() > 0.8


def test_cli_synth_layouts(tmp_path):
    run_cli("synth", str(tmp_path / "f"), "--shards", "2,5", "--rows", "20", "--layout", "folders", "--pad", "4",
            check=True)
    assert (tmp_path / "f" / "img_emb" / "img_emb_0005.npy").exists()
    assert (tmp_path / "f" / "metadata" / "metadata_0002.parquet").exists()
    bad = run_cli("synth", str(tmp_path / "g"), "--layout", "zigzag")
    assert bad.returncode == 2 and "--layout" in bad.stderr


def test_bench_ingest_runs_end_to_end(tmp_path):
    from laion_search.bench.ingest import run

    result = run(rows=3000, guide_rows=300, workdir=tmp_path)
    by = {r["method"]: r for r in result["results"]}
    assert by["ours"]["rows"] == 3000 and by["native"]["rows"] == 3000 and by["guide"]["rows"] == 300
    assert all(r["peak_rss"] > 10 * 2**20 and r["seconds"] > 0 for r in result["results"])
    assert result["ratios"]["ours_vs_guide"] > 0
    assert "| pipeline |" in result["markdown"]
    json.dumps(result)  # serialisable for --json


def test_concurrent_queries_use_separate_sessions(tmp_path, shards_flat):
    """Threads query one embedded store in parallel (a pool of chDB sessions): every search
    returns what it returns alone, parameters never cross between queries, and a SET applies to
    every session, including ones opened after it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from laion_search.ingest import ingest
    from laion_search.backends import MAX_SESSIONS
    from laion_search.search import search

    with connect(tmp_path / "db") as store:
        ingest(store, shards_flat)
        store.backend.command("SET max_execution_time = 17")
        rng = np.random.default_rng(3)
        queries = [rng.standard_normal(512).astype(np.float32) for _ in range(24)]
        alone = [[r["id"] for r in search(store, q, k=5, exact=True).rows] for q in queries]
        barrier = threading.Barrier(4)

        def run(i: int) -> tuple[list[int], float]:
            if i < 4:
                barrier.wait(timeout=30)  # make the first four really overlap
            ids = [r["id"] for r in search(store, queries[i], k=5, exact=True).rows]
            return ids, float(store.scalar("SELECT getSetting('max_execution_time')"))

        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(run, range(len(queries))))
        assert [ids for ids, _ in together] == alone
        assert {setting for _, setting in together} == {17.0}
        assert 2 <= len(store.backend._all) <= MAX_SESSIONS
    with pytest.raises(StoreError, match="closed"):
        store.scalar("SELECT 1")
