"""Crash safety, proven: `laion ingest`, `laion index create` and `laion download --ingest` are
SIGKILLed at seeded random moments, then rerun to completion; nothing acknowledged is lost or
duplicated, no shard is ever partly visible, embeddings stay bit-identical to the source files,
url and caption equal to the source Parquet, and searches agree with numpy over the source
vectors afterwards (exact: the same ids; indexed: recall@10).

Each kill lands on a kill point the process reports (laion_search.killpoints), drawn at random
from a whole run's points, so every attempt kills a process that is mid-work, however busy the
machine. Default run: 25 kills (10 ingest, 5 index create — both indexes built together —,
5 ingest --index both — each shard's graphs built as it lands —, 5 download --ingest).
``LAION_SLOW_TESTS=1``: 40 + 15 + 15 + 15.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from laion_search import connect
from laion_search.sources.synth import synth

from .crash_harness import (
    CrashLog,
    KillPoint,
    count_points,
    kill_when,
    laion_cmd,
    record_figures,
    run_and_kill,
    run_to_completion,
    slow,
    source_checksums,
    summary_line,
    verify_store,
)
from .oracle import Source

SEED = 20261125
KILLS = {"ingest": 40 if slow() else 10, "index": 15 if slow() else 5, "ingest_index": 15 if slow() else 5,
         "download": 15 if slow() else 5}


def test_ingest_sigkill_then_rerun(tmp_path):
    src = tmp_path / "shards"
    shards = list(range(6))
    synth(src, shards, 1500, dim=64, seed=21)
    expected = source_checksums(src, shards)
    db = tmp_path / "db"
    rng = random.Random(SEED)
    log = CrashLog()

    def cmd(*extra: str) -> list[str]:
        return laion_cmd("ingest", str(src), "--db", str(db), "--batch-rows", "200", "--json", *extra)

    # a whole run's kill points, counted on a scratch store: store open, start, then per shard
    # shard_start, batches, shard_done, and done
    points = len(count_points(laion_cmd("ingest", str(src), "--db", str(tmp_path / "scratch"),
                                        "--batch-rows", "200", "--json")))
    for attempt in range(KILLS["ingest"]):
        # every other run reloads everything (--force), so each run has work left to interrupt
        force = ["--force"] if attempt % 2 else []
        point = run_and_kill(cmd(*force), rng, points=points, last=("done",), label="ingest")
        log.points.append(point)
        assert point.killed, point
        log.checks += verify_store(db, expected, complete=False)
    assert log.kills >= KILLS["ingest"], log.points
    run_to_completion(laion_cmd("ingest", str(src), "--db", str(db), "--json"))
    log.checks += verify_store(db, expected, complete=True)
    again = run_to_completion(laion_cmd("ingest", str(src), "--db", str(db), "--json"))
    assert '"skipped": [0, 1, 2, 3, 4, 5]' in again.stdout  # acknowledged shards are not loaded twice
    print(summary_line("ingest", log))
    record_figures("ingest", kills=log.kills, checks=log.checks, phases=log.phases(),
                   points=[p.__dict__ for p in log.points])


def _search_works(store, src: Source, *, indexed: bool):
    """Exact search equals numpy over the source files; indexed search reaches recall@10 against
    the same numpy truth (tests/oracle.py), not against the product's own exact path."""
    from laion_search.search import explain, search

    found = 0
    for rid in (5, 1_000_000_007, 2_000_000_100):
        want, dist = src.like(rid, 10)
        exact = search(store, like=rid, k=10, exact=True)
        assert [r["id"] for r in exact.rows] == want
        assert np.allclose([r["distance"] for r in exact.rows], dist, atol=1e-5)
        if indexed:
            res = search(store, like=rid, k=10)
            assert len(res.rows) == 10
            assert "image_index" in explain(store, res)
            found += len({r["id"] for r in res.rows} & set(want))
    # recall@10 over the three queries: the rebuilt graphs gave 30/30 in every probe on this data
    assert not indexed or found >= 29, found


def test_index_create_sigkill_then_rerun(tmp_path):
    src = tmp_path / "shards"
    shards = [0, 1, 2]
    synth(src, shards, 1500, dim=64, seed=22)
    expected = source_checksums(src, shards)
    truth = Source.load(src, shards)
    db = tmp_path / "db"
    run_to_completion(laion_cmd("ingest", str(src), "--db", str(db), "--batch-rows", "300"))
    from laion_search.index import drop_index

    rng = random.Random(SEED + 1)
    log = CrashLog()
    cmd = laion_cmd("index", "create", "--column", "both", "--db", str(db))
    points = len(count_points(cmd))
    for _ in range(KILLS["index"]):
        with connect(db) as store:
            drop_index(store, "image")
            drop_index(store, "text")
        # kill points: store open, compaction, each index's start, parts built, done
        point = run_and_kill(cmd, rng, points=points, last=("index_done index text_index",), label="index create")
        log.points.append(point)
        assert point.killed, point
        log.checks += verify_store(db, expected, complete=True, extra=lambda s: _search_works(s, truth, indexed=False))
    assert log.kills >= KILLS["index"], log.points
    run_to_completion(laion_cmd("index", "create", "--column", "both", "--db", str(db), "--json"))

    def index_ok(store):
        _all_parts_indexed(store)
        _search_works(store, truth, indexed=True)

    log.checks += verify_store(db, expected, complete=True, extra=index_ok)
    print(summary_line("index create", log))
    record_figures("index create", kills=log.kills, checks=log.checks, points=[p.__dict__ for p in log.points])


def _all_parts_indexed(store) -> None:
    info = {i["name"]: i for i in store.index_status()}
    assert set(info) == {"image_index", "text_index"}, info
    assert all(i["parts_covered"] == i["parts"] for i in info.values()), info


def test_ingest_with_index_sigkill_then_rerun(tmp_path):
    """`laion ingest --index both`: a shard is only ever visible indexed, whatever the kill hit
    (batches, the stage's merge that builds both graphs, the swap)."""
    src = tmp_path / "shards"
    shards = [0, 1, 2]
    synth(src, shards, 1500, dim=64, seed=23)
    expected = source_checksums(src, shards)
    truth = Source.load(src, shards)
    db = tmp_path / "db"
    rng = random.Random(SEED + 2)
    log = CrashLog()

    def cmd(*extra: str) -> list[str]:
        return laion_cmd("ingest", str(src), "--index", "both", "--db", str(db), "--batch-rows", "300", "--json", *extra)

    # kill points per shard: shard_start, batches, shard_index (then the merge), shard_indexed, shard_done
    points = count_points(laion_cmd("ingest", str(src), "--index", "both", "--db", str(tmp_path / "scratch"),
                                    "--batch-rows", "300", "--json"))
    assert sum(p.startswith("shard_index ") for p in points) == len(shards), points

    def visible_parts_indexed(store):
        if store.index_status():  # declared on the first run's opening: every part shown carries both
            assert all(i["parts_covered"] == i["parts"] for i in store.index_status()), store.index_status()

    # first, the two moments new to this path, on shard 1: its stage full and about to be merged
    # (graphs not built), and merged with its graphs but not swapped in
    for moment in ("shard_index", "shard_indexed"):
        kill_when(cmd("--force"), lambda seen, moment=moment: seen[-1].get("event") == moment and seen[-1]["shard"] == 1)
        log.points.append(KillPoint("ingest --index both", 0, f"{moment} shard 1", True))
        log.checks += verify_store(db, expected, complete=False, extra=visible_parts_indexed)
    for attempt in range(KILLS["ingest_index"]):
        force = ["--force"] if attempt % 2 else []
        point = run_and_kill(cmd(*force), rng, points=len(points), last=("done",), label="ingest --index both")
        log.points.append(point)
        assert point.killed, point
        log.checks += verify_store(db, expected, complete=False, extra=visible_parts_indexed)
    assert log.kills >= KILLS["ingest_index"] + 2, log.points
    run_to_completion(cmd())

    def indexed_and_searchable(store):
        _all_parts_indexed(store)
        _search_works(store, truth, indexed=True)

    log.checks += verify_store(db, expected, complete=True, extra=indexed_and_searchable)
    print(summary_line("ingest --index both", log))
    record_figures("ingest --index both", kills=log.kills, checks=log.checks, phases=log.phases(),
                   points=[p.__dict__ for p in log.points])


def _files_identical(src: Path, dest: Path) -> int:
    """Every file that has its final name in ``dest`` is byte-identical to the mirror's."""
    n = 0
    for p in dest.rglob("*"):
        if not p.is_file() or p.name.endswith((".part", ".json")) or p.name.startswith("."):
            continue
        kind = p.name.rsplit("_", 1)[0]
        original = src / kind / p.name
        assert hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256(original.read_bytes()).digest(), p
        n += 1
    return n


def test_download_ingest_sigkill_then_rerun(tmp_path):
    from laion_search.testing.faulty_http import FaultyServer

    src = tmp_path / "mirror"
    shards = [0, 1, 2, 3]
    synth(src, shards, 800, dim=64, seed=23, layout="folders")
    expected = source_checksums(src, shards)
    dest, db = tmp_path / "out", tmp_path / "db"
    rng = random.Random(SEED + 2)
    log = CrashLog()
    with FaultyServer(src, rate=300_000) as srv:  # transfers last long enough for a kill to land mid-file
        def cmd(to: Path, into: Path) -> list[str]:
            return laion_cmd("download", "0-3", "--to", str(to), "--base-url", srv.url, "-j", "2", "--ingest",
                             "--db", str(into), "--json", "--batch-rows", "200", "--retry-delay", "0.01",
                             "--read-timeout", "5")

        points = len(count_points(cmd(tmp_path / "scratch-out", tmp_path / "scratch-db")))
        for _ in range(KILLS["download"]):
            point = run_and_kill(cmd(dest, db), rng, points=points, last=("summary",), label="download --ingest")
            log.points.append(point)
            assert point.killed, point
            log.checks += verify_store(db, expected, complete=False)
            log.checks += _files_identical(src, dest)
        assert log.kills >= KILLS["download"], log.points
        run_to_completion(cmd(dest, db))
    log.checks += verify_store(db, expected, complete=True)
    assert _files_identical(src, dest) == 12
    print(summary_line("download --ingest", log))
    record_figures("download --ingest", kills=log.kills, checks=log.checks, points=[p.__dict__ for p in log.points])


@pytest.mark.parametrize("n", [0])
def test_harness_detects_a_partial_shard(tmp_path, n):
    """The checks are not vacuous: a table with half a shard, or one changed value, fails them."""
    src = tmp_path / "s"
    synth(src, [0, 1], 100, dim=16, seed=n)
    expected = source_checksums(src, [0, 1])
    db = tmp_path / "db"
    run_to_completion(laion_cmd("ingest", str(src), "--db", str(db)))
    assert verify_store(db, expected, complete=True) > 0
    with connect(db) as store:
        store.sql("ALTER TABLE laion DELETE WHERE shard = 1 AND shard_row >= 50 SETTINGS mutations_sync = 1")
    with pytest.raises(AssertionError, match="shard 1 is partial: 50 of 100 rows"):
        verify_store(db, expected, complete=False)
    run_to_completion(laion_cmd("ingest", str(src), "--db", str(db), "--force"))
    with connect(db) as store:
        store.sql("ALTER TABLE laion UPDATE image_embedding = arrayMap(x -> x * 1.0001, image_embedding) "
                  "WHERE id = 7 SETTINGS mutations_sync = 1")
    with pytest.raises(AssertionError, match="shard 0: embeddings differ from source"):
        verify_store(db, expected, complete=False)
    run_to_completion(laion_cmd("ingest", str(src), "--db", str(db), "--force"))
    with connect(db) as store:  # one caption changed by one character: the Parquet check sees it
        store.sql("ALTER TABLE laion UPDATE caption = concat(caption, '.') WHERE id = 1000000003 "
                  "SETTINGS mutations_sync = 1")
    with pytest.raises(AssertionError, match="shard 1: url or caption differs from the source Parquet"):
        verify_store(db, expected, complete=False)
    assert np.isfinite(expected[0][0])


def test_a_seed_replays_its_kills(tmp_path):
    """Kills are measured in events, not seconds: the same seed on the same data lands every kill
    on the same point and statement step, however busy the machine (a failing seed replays)."""
    src = tmp_path / "shards"
    synth(src, [0, 1], 600, dim=16, seed=24)
    expected = source_checksums(src, [0, 1])
    runs = []
    for attempt in range(2):
        db = tmp_path / f"db{attempt}"
        rng = random.Random(SEED + 7)
        got = []
        for i in range(4):
            cmd = laion_cmd("ingest", str(src), "--db", str(db), "--batch-rows", "200", "--json",
                            *(["--force"] if i % 2 else []))
            point = run_and_kill(cmd, rng, points=12, last=("done",), label="ingest")
            assert point.killed, point
            verify_store(db, expected, complete=False)
            got.append(point)
        runs.append(got)
    assert runs[0] == runs[1]
    # mid-way kills are among them: the process killed itself at its n-th statement step
    assert any(p.last_event.startswith("step ") for p in runs[0]), runs[0]
