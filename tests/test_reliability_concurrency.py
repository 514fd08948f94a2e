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
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from laion_search import connect
from laion_search.ingest import ingest
from laion_search.search import search
from laion_search.sources.synth import synth

from .conftest import run_cli
from .crash_harness import _start_gated, laion_cmd, record_figures, source_checksums, verify_store

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


class Rendezvous:
    """Events the workers and the main thread meet at, instead of sleeps: every worker has run
    once; every worker has run once *while* the main thread holds the work mid-way."""

    def __init__(self, names: list[str]) -> None:
        self.names = set(names)
        self.cond = threading.Condition()
        self.ran: set[str] = set()
        self.ran_mid: set[str] = set()
        self.mid = False

    def started(self) -> bool:
        """Call at the start of an iteration: whether it starts while the work is held mid-way."""
        with self.cond:
            return self.mid

    def ran_once(self, name: str, began_mid: bool) -> bool:
        """Call at the end of an iteration; returns whether it ran wholly while the work was held
        (only then must what it saw be the held state: a worker that already counted may start
        another iteration that the release overtakes)."""
        with self.cond:
            self.ran.add(name)
            held = began_mid and self.mid
            if held:
                self.ran_mid.add(name)
            self.cond.notify_all()
            return held

    def wait(self, which: set[str], what: str) -> None:
        with self.cond:  # a failure deadline only: the wait ends when the workers have run
            assert self.cond.wait_for(lambda: which >= self.names, timeout=300), f"{what}: only {sorted(which)} ran"

    def hold_mid(self) -> None:
        """From the main thread (a progress callback): hold the work here until every worker has
        run one whole iteration that began after this point."""
        with self.cond:
            self.mid = True
        self.wait(self.ran_mid, "while the work was held mid-way")
        with self.cond:
            self.mid = False


def test_searches_in_threads_and_http_while_ingesting(data, tmp_path):
    pytest.importorskip("fastapi")
    import httpx

    from laion_search.web.app import create_app

    src = data / "s"
    vecs = _vectors(src, [0, 1, 2, 3])
    queries = [vecs[0][i] for i in (3, 400, 1200)]
    snaps = [_snapshots(vecs, q, 5) for q in queries]
    like7 = _snapshots({n: v for n, v in vecs.items()}, vecs[0][7], 6)  # "like 7": itself, then 5 others
    totals = {ROWS * i for i in range(1, 5)}
    store = connect(tmp_path / "db")
    errors: list[str] = []
    seen = {"search": 0, "http": 0, "count": 0, "states": set(), "mid_states": set()}
    done = threading.Event()
    meet = Rendezvous(["search0", "search1", "count", "http"])
    mid_state = (0, 1)  # held after shard 1's shard_done: the table shows shards 0 and 1, whole

    try:
        ingest(store, src, [0])
        app = create_app(store)

        def searcher(which: int) -> None:
            while not done.is_set():
                try:
                    mid = meet.started()
                    qi = (seen["search"] + which) % len(queries)
                    res = search(store, queries[qi], k=5, exact=True)
                    got = np.array([r["distance"] for r in res.rows])
                    states = [st for st, want in snaps[qi].items() if np.allclose(got, want, atol=2e-4)]
                    if not states:
                        errors.append(f"search {qi}: {got} matches no snapshot")
                    seen["search"] += 1
                    if meet.ran_once(f"search{which}", mid) and mid_state not in states:
                        errors.append(f"search {qi} while held after shard 1: {got} is not the snapshot of shards 0, 1")
                except Exception as exc:  # noqa: BLE001 - collected and reported
                    errors.append(f"search: {type(exc).__name__}: {exc}")
                    return

        def counter() -> None:
            last = 0
            while not done.is_set():
                try:
                    mid = meet.started()
                    per = store.partition_rows()
                    total = sum(per.values())
                    if any(n != ROWS for n in per.values()) or total not in totals or total < last:
                        errors.append(f"partial or shrinking table: {per}")
                    seen["states"].add(total)
                    last = total
                    seen["count"] += 1
                    if meet.ran_once("count", mid) and sorted(per) != list(mid_state):
                        errors.append(f"while held after shard 1 the table shows shards {sorted(per)}")
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"count: {type(exc).__name__}: {exc}")
                    return

        def http() -> None:
            async def go():
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                    while not done.is_set():
                        mid = meet.started()
                        r = await c.post("/api/search", json={"like": 7, "k": 5, "exact": True})
                        if r.status_code != 200:
                            errors.append(f"http {r.status_code}: {r.text[:200]}")
                            return
                        got = np.array([x["distance"] for x in r.json()["results"]])
                        states = [st for st, want in like7.items() if np.allclose(got, want[1:], atol=2e-4)]
                        s = await c.get("/api/status")
                        if s.status_code != 200 or s.json()["rows"] not in totals:
                            errors.append(f"status {s.status_code}: {s.text[:200]}")
                        seen["http"] += 1
                        held = meet.ran_once("http", mid)
                        if not states or (held and mid_state not in states):
                            errors.append(f"http like 7 (held: {held}): {got} matches no snapshot")
                        if held and s.json()["rows"] != 2 * ROWS:
                            errors.append(f"status while held after shard 1: {s.text[:200]}")
            asyncio.run(go())

        threads = [threading.Thread(target=f, daemon=True) for f in (lambda: searcher(0), lambda: searcher(1), counter,
                                                                      http)]
        for t in threads:
            t.start()
        meet.wait(meet.ran, "before the load")  # every worker has run once

        def progress(event: dict) -> None:
            if event["event"] == "shard_done" and event["shard"] == 1:
                meet.hold_mid()  # every worker runs once more while the load is held between shards

        report = ingest(store, src, [1, 2, 3], batch_rows=100, progress=progress)  # 45 insert statements
        done.set()
        for t in threads:
            t.join(timeout=60)
        assert report.loaded == [1, 2, 3]
        assert errors == [], errors[:5]
        assert meet.ran_mid == meet.names  # proven: searches ran with the load mid-way, and saw shards 0, 1
        assert {ROWS, 2 * ROWS} <= seen["states"], seen
    finally:
        done.set()
        store.close()
    verify_store(tmp_path / "db", source_checksums(src, [0, 1, 2, 3]), complete=True)
    record_figures("concurrent ingest", searches=seen["search"], http=seen["http"], counts=seen["count"],
                   states=sorted(seen["states"]), errors=len(errors))


def test_searches_while_index_is_materialised(data, tmp_path):
    from laion_search.index import IndexSpec, create_index

    from .oracle import Source, recall

    src = data / "s"
    truth = Source.load(src, [0, 1, 2, 3])
    q = truth.vector(2_000_000_010)
    want, want_dist = truth.topk(q, 10)  # numpy over the source vectors
    store = connect(tmp_path / "db")
    errors: list[str] = []
    counts = {"exact": 0, "indexed": 0, "during_build": 0}
    done = threading.Event()
    meet = Rendezvous(["a", "b"])
    try:
        ingest(store, src)

        def searcher(name: str) -> None:
            while not done.is_set():
                try:
                    mid = meet.started()
                    before = store.index_status()
                    ex = search(store, q, k=10, exact=True)
                    if [r["id"] for r in ex.rows] != want or not np.allclose([r["distance"] for r in ex.rows], want_dist,
                                                                           atol=2e-5):
                        errors.append("exact search differs from numpy while indexing")
                    counts["exact"] += 1
                    ix = search(store, q, k=10)
                    if len(ix.rows) != 10 or recall([r["id"] for r in ix.rows], want) < 0.9:
                        errors.append(f"indexed search: {[r['id'] for r in ix.rows]} vs numpy {want}")
                    counts["indexed"] += 1
                    after = store.index_status()
                    building = [i for i in before + after if i["parts_covered"] < i["parts"]]
                    if meet.ran_once(name, mid):
                        if len(building) != 2:
                            errors.append(f"held after ADD INDEX, but the index shows {before} / {after}")
                        counts["during_build"] += 1
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return

        threads = [threading.Thread(target=searcher, args=(n,), daemon=True) for n in ("a", "b")]
        for t in threads:
            t.start()
        meet.wait(meet.ran, "before the build")

        def progress(event: dict) -> None:
            if event["event"] == "index_start":  # the index is declared, no part is built yet
                meet.hold_mid()

        create_index(store, IndexSpec(column="image"), poll_seconds=0.05, progress=progress)
        meet.ran = set()
        meet.wait(meet.ran, "after the build")  # and once more, on the built index
        done.set()
        for t in threads:
            t.join(timeout=60)
        assert errors == [], errors[:5]
        assert counts["during_build"] >= 2, counts  # proven: searches ran while parts_covered < parts
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
    # the first ingest is held at a kill point (mid-way: shard 1 started) while the others try, so
    # it is running for certain, however fast or slow the machine; then it is let go on
    first, events, ack = _start_gated(laion_cmd("ingest", str(src), "--db", str(db), "--batch-rows", "50", "--json"),
                                      None)
    try:
        for line in events:
            ev = json.loads(line)
            if ev["event"] == "shard_start" and ev.get("shard") == 1:
                break
            os.write(ack, b"1")
        else:
            raise AssertionError(f"the first ingest ended before shard 1 (exit {first.wait(60)})")
        second = run_cli("ingest", str(src), "--db", str(db))
        assert second.returncode == 1, second.stderr
        msg = second.stderr.strip()
        assert f"is in use by process {first.pid}" in msg and "ingest" in msg and "Traceback" not in msg, msg
        busy_search = run_cli("search", "--like", "5", "--db", str(db))
        assert busy_search.returncode == 1 and f"in use by process {first.pid}" in busy_search.stderr
        assert first.poll() is None, "the first ingest should still be running (held at its kill point)"
        os.write(ack, b"1")
        for _ in events:  # let it pass every later point
            os.write(ack, b"1")
        assert first.wait(timeout=300) == 0
    finally:
        events.close()
        os.close(ack)
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
