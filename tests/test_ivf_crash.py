"""Crash safety of the IVF index: `laion index create --kind ivf` and `laion ingest --index-kind ivf`
are SIGKILLed at seeded random kill points (every progress event: training, each shard, each
batch, the merge, the switch), then rerun to completion. Nothing acknowledged is lost or
duplicated: the table stays bit-identical to the source files, every companion table ends holding
each row exactly once in its nearest list, and searches are right after every kill, not only at
the end (shards an interrupted build does not cover are searched exactly)."""

from __future__ import annotations

import random

import numpy as np

from laion_search.index import ivf
from laion_search.search import search
from laion_search.sources.synth import synth

from .crash_harness import (CrashLog, count_points, laion_cmd, record_figures, run_and_kill, run_to_completion, slow,
                            source_checksums, summary_line, verify_store)

SEED = 20261205
KILLS = 10 if slow() else 4


def _ivf_complete(store) -> None:
    rows = store.scalar("SELECT count() FROM laion")
    state = ivf.state(store)
    assert set(state.served) == {"image", "text"}, state.served
    for column, info in state.served.items():
        assert state.uncovered[(column, info.gen)] == [], (column, state.uncovered)
        n, uniq = store.sql(f"SELECT count(), uniqExact(id) FROM {info.table}").to_pylist()[0].values()
        assert n == uniq == rows, (column, n, uniq, rows)
        assert store.scalar(f"SELECT count() FROM {info.table} WHERE id NOT IN (SELECT id FROM laion)") == 0
        emb = {"image": "image_embedding", "text": "text_embedding"}[column]
        assert store.scalar(f"SELECT count() FROM {info.table} AS c INNER JOIN laion AS l ON c.id = l.id "
                            f"WHERE c.vec != l.{emb}") == 0, f"{column}: companion vectors differ from the table's"
    leftovers = store.rows("SELECT name FROM system.tables WHERE database = currentDatabase() AND "
                           "match(name, '^laion_ivf_(image|text)_g[0-9]+$')")
    assert sorted(r["name"] for r in leftovers) == sorted(i.table for i in state.served.values()), leftovers


def _searches_right(store) -> None:
    """Whatever a kill left, a search through the index at all lists equals the exact search."""
    state = ivf.state(store)
    for column, info in state.served.items():
        for rid in (7, 1_000_000_300):
            got = search(store, like=rid, k=5, modality=column, nprobe=info.lists)
            want = search(store, like=rid, k=5, modality=column, exact=True)
            np.testing.assert_allclose([r["distance"] for r in got.rows], [r["distance"] for r in want.rows], atol=1e-5)


def test_index_create_ivf_sigkill_then_rerun(tmp_path):
    src = tmp_path / "shards"
    synth(src, [0, 1, 2], 1200, dim=32, seed=41)
    expected = source_checksums(src, [0, 1, 2])
    db = tmp_path / "db"
    run_to_completion(laion_cmd("ingest", str(src), "--db", str(db)))
    cmd = laion_cmd("index", "create", "--kind", "ivf", "--column", "both", "--lists", "16", "--replace",
                    "--db", str(db), "--json")
    points = len(count_points(cmd))
    rng = random.Random(SEED)
    log = CrashLog()
    for _ in range(KILLS):
        # --replace: every run builds a new generation beside the served one and switches at its end
        point = run_and_kill(cmd, rng, points=points, last=("index_done",), label="index create --kind ivf")
        log.points.append(point)
        assert point.killed, point
        log.checks += verify_store(db, expected, complete=True, extra=_searches_right)
    run_to_completion(laion_cmd("index", "create", "--kind", "ivf", "--column", "both", "--lists", "16",
                                "--db", str(db), "--json"))
    log.checks += verify_store(db, expected, complete=True, extra=lambda s: (_ivf_complete(s), _searches_right(s)))
    print(summary_line("index create --kind ivf", log))
    record_figures("index_create_ivf", kills=log.kills, checks=log.checks, phases=log.phases())


def test_ingest_into_ivf_sigkill_then_rerun(tmp_path):
    src = tmp_path / "shards"
    synth(src, [0, 1, 2], 1200, dim=32, seed=42)
    expected = source_checksums(src, [0, 1, 2])
    db = tmp_path / "db"
    # the index is trained by shard 0; shards 1 and 2 land into it
    run_to_completion(laion_cmd("ingest", str(src), "--shards", "0", "--index", "both", "--index-kind", "ivf",
                                "--db", str(db)))
    cmd = laion_cmd("ingest", str(src), "--db", str(db), "--batch-rows", "300", "--force", "--json")
    points = len(count_points(cmd))
    rng = random.Random(SEED + 1)
    log = CrashLog()
    for _ in range(KILLS):
        point = run_and_kill(cmd, rng, points=points, last=("done",), label="ingest into ivf")
        log.points.append(point)
        assert point.killed, point
        log.checks += verify_store(db, expected, complete=False, extra=_searches_right)
    # the rerun reloads what a kill left unrecorded, and assigns from the table what is recorded but left
    # out of the lists (a kill between the lists' swap and their record)
    run_to_completion(laion_cmd("ingest", str(src), "--db", str(db), "--json"))
    log.checks += verify_store(db, expected, complete=True, extra=lambda s: (_ivf_complete(s), _searches_right(s)))
    print(summary_line("ingest --index-kind ivf", log))
    record_figures("ingest_ivf", kills=log.kills, checks=log.checks, phases=log.phases())
