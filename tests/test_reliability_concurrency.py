"""Concurrency: searches while a shard is being ingested and while an index is being built, in
one process (library threads and the HTTP API), and two processes on one store.

What is guaranteed (README, "Reliability"): with embedded chDB one process owns a store. Inside
it, statements are serialised one at a time by the backend, and ingest holds that lock per
statement (one insert batch), not per shard, so searches keep running between batches. A
search sees a snapshot with whole shards only: a shard appears in one step (REPLACE PARTITION).
Another process that opens the store — a second `laion ingest`, a `laion search` — is refused
with a message naming the owner's pid and command; it never touches the files.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from laion_search import connect
from laion_search.ingest import ingest
from laion_search.search import search
from laion_search.sources.synth import synth

from .conftest import run_cli
from .crash_harness import laion_cmd, record_figures, source_checksums, verify_store

ROWS, DIM = 1500, 64


def _vectors(d, shards):
    return {n: np.load(d / f"img_emb_{n}.npy").astype(np.float32) for n in shards}


def _snapshots(vecs, q, k):
    """Exact top-k cosine distances for every table state a search may see: shards 0..i loaded."""
    out = {}
    order = sorted(vecs)
    for i in range(len(order)):
        allv = np.concatenate([vecs[n] for n in order[: i + 1]])
        d = 1 - (allv @ q) / (np.linalg.norm(allv, axis=1) * np.linalg.norm(q))
        out[tuple(order[: i + 1])] = np.sort(d)[:k]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("conc")
    synth(root / "s", [0, 1, 2, 3], ROWS, dim=DIM, seed=31)
    return root


def test_searches_in_threads_and_http_while_ingesting(data, tmp_path):
    pytest.importorskip("fastapi")
    import httpx

    from laion_search.web.app import create_app

    src = data / "s"
    vecs = _vectors(src, [0, 1, 2, 3])
    queries = [vecs[0][i] for i in (3, 400, 1200)]
    snaps = [_snapshots(vecs, q, 5) for q in queries]
    totals = {ROWS * i for i in range(1, 5)}
    store = connect(tmp_path / "db")
    errors: list[str] = []
    seen = {"search": 0, "http": 0, "count": 0, "states": set()}
    done = threading.Event()
    try:
        ingest(store, src, [0])
        app = create_app(store)

        def searcher(which: int) -> None:
            while not done.is_set():
                try:
                    qi = seen["search"] % len(queries)
                    res = search(store, queries[qi], k=5, exact=True)
                    got = np.array([r["distance"] for r in res.rows])
                    if not any(np.allclose(got, want, atol=2e-4) for want in snaps[qi].values()):
                        errors.append(f"search {qi}: {got} matches no snapshot")
                    seen["search"] += 1
                except Exception as exc:  # noqa: BLE001 - collected and reported
                    errors.append(f"search: {type(exc).__name__}: {exc}")

        def counter() -> None:
            last = 0
            while not done.is_set():
                try:
                    per = store.partition_rows()
                    total = sum(per.values())
                    if any(n != ROWS for n in per.values()) or total not in totals or total < last:
                        errors.append(f"partial or shrinking table: {per}")
                    seen["states"].add(total)
                    last = total
                    seen["count"] += 1
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"count: {type(exc).__name__}: {exc}")

        def http() -> None:
            async def go():
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                    while not done.is_set():
                        r = await c.post("/api/search", json={"like": 7, "k": 5, "exact": True})
                        if r.status_code != 200 or len(r.json()["results"]) != 5:
                            errors.append(f"http {r.status_code}: {r.text[:200]}")
                        s = await c.get("/api/status")
                        if s.status_code != 200 or s.json()["rows"] not in totals:
                            errors.append(f"status {s.status_code}: {s.text[:200]}")
                        seen["http"] += 1
            asyncio.run(go())

        threads = [threading.Thread(target=f, daemon=True) for f in (lambda: searcher(0), lambda: searcher(1), counter,
                                                                      http)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        report = ingest(store, src, [1, 2, 3], batch_rows=100)  # 45 insert statements to interleave with
        time.sleep(0.3)
        done.set()
        for t in threads:
            t.join(timeout=30)
        assert report.loaded == [1, 2, 3]
        assert errors == [], errors[:5]
        assert seen["search"] >= 10 and seen["http"] >= 3 and seen["count"] >= 10, seen
        assert len(seen["states"]) >= 2, seen  # the searches really ran during the load
    finally:
        done.set()
        store.close()
    verify_store(tmp_path / "db", source_checksums(src, [0, 1, 2, 3]), complete=True)
    record_figures("concurrent ingest", searches=seen["search"], http=seen["http"], counts=seen["count"],
                   states=sorted(seen["states"]), errors=len(errors))


def test_searches_while_index_is_materialised(data, tmp_path):
    from laion_search.index import IndexSpec, create_index

    src = data / "s"
    vecs = _vectors(src, [0, 1, 2, 3])
    q = vecs[2][10]
    want = _snapshots(vecs, q, 10)[(0, 1, 2, 3)]
    store = connect(tmp_path / "db")
    errors: list[str] = []
    counts = {"exact": 0, "indexed": 0}
    done = threading.Event()
    try:
        ingest(store, src)

        def searcher() -> None:
            while not done.is_set():
                try:
                    ex = search(store, q, k=10, exact=True)
                    if not np.allclose([r["distance"] for r in ex.rows], want, atol=2e-4):
                        errors.append("exact search changed while indexing")
                    counts["exact"] += 1
                    ix = search(store, q, k=10)
                    if len(ix.rows) != 10 or ix.rows[0]["id"] != 2_000_000_010:
                        errors.append(f"indexed search: {[r['id'] for r in ix.rows]}")
                    counts["indexed"] += 1
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=searcher, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        create_index(store, IndexSpec(column="image"), poll_seconds=0.05)
        time.sleep(0.2)
        done.set()
        for t in threads:
            t.join(timeout=30)
        assert errors == [], errors[:5]
        assert counts["exact"] >= 2 and counts["indexed"] >= 2, counts
        assert all(i["parts_covered"] == i["parts"] for i in store.index_status())
    finally:
        done.set()
        store.close()
    record_figures("concurrent index build", **counts, errors=len(errors))


def test_second_process_is_refused_while_ingest_runs(data, tmp_path):
    """Two `laion ingest` on one store: the second refuses, naming the first; so does a CLI
    search. The first finishes untouched."""
    src = data / "s"
    db = tmp_path / "db"
    first = subprocess.Popen(laion_cmd("ingest", str(src), "--db", str(db), "--batch-rows", "50", "--json"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(first.stdout.readline())["event"] == "start"
        second = run_cli("ingest", str(src), "--db", str(db))
        assert second.returncode == 1, second.stderr
        msg = second.stderr.strip()
        assert f"is in use by process {first.pid}" in msg and "ingest" in msg and "Traceback" not in msg, msg
        busy_search = run_cli("search", "--like", "5", "--db", str(db))
        assert busy_search.returncode == 1 and f"in use by process {first.pid}" in busy_search.stderr
        assert first.poll() is None, "the first ingest should still be running"
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    verify_store(db, source_checksums(src, [0, 1, 2, 3]), complete=True)


def test_two_ingests_started_together(data, tmp_path):
    """Race the two from the start: exactly one loads, the other is refused, the store is whole."""
    src = data / "s"
    db = tmp_path / "db"
    procs = [subprocess.Popen(laion_cmd("ingest", str(src), "--db", str(db)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 1], results
    refused = [err for rc, err in results if rc == 1][0]
    assert "is in use" in refused and "Traceback" not in refused, refused
    verify_store(db, source_checksums(src, [0, 1, 2, 3]), complete=True)
    assert sys.executable
