"""``laion bench serve``: load test of ``laion serve`` on 127.0.0.1.

Starts the server as a subprocess over a synth store (HNSW index on image embeddings), or over
an existing store (``db``), then ``clients`` concurrent clients send a mix of queries for
``seconds``: indexed vector searches, exact searches, filtered indexed searches (safe mode +
width) and "more like this" (``kinds`` picks some: ``indexed`` alone is the indexed-only load).
Reports QPS, p50/p99 latency of answered queries, sheds (429: a client backs off as
``Retry-After`` says), errors (any other non-200 answer or a failed connection) and the
server's RSS before and after. Bounded in time and count; loopback only.

``--mixed`` (:func:`run_mixed`) measures isolation instead: the idle p50 of indexed searches
first, then ``scan_clients`` clients send exact scans back to back while an open-loop stream
sends ``rate`` indexed searches per second (latency counted from each request's scheduled
time, so a stalled server cannot hide its queue). Reported: indexed p50/p99 under load against
the idle p50, every indexed answer accounted for, scans done and shed (429), other errors.
The server runs with its result cache off (``--cache-size 0``) so that every query is real.
``load="sql"`` sends :data:`SQL_LOAD` to ``/api/sql`` (the server started with ``--allow-sql``)
instead of exact scans: a statement that reads every stored vector, as a heavy analytic query does.
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from laion_search.bench.common import scratch_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(root: Path, rows: int, say: Callable[[str], Any]) -> tuple[Path, Path]:
    """A synth store of ``rows`` rows with an HNSW index on image embeddings (reused)."""
    from laion_search.index import IndexSpec, create_index
    from laion_search.ingest import ingest
    from laion_search.sources.synth import synth
    from laion_search.api import connect

    shards, db = root / "shards", root / "db"
    if not (shards / "metadata_0.parquet").exists() or \
            np.load(shards / "img_emb_0.npy", mmap_mode="r").shape[0] != rows:
        say(f"synth {rows:,} rows")
        synth(shards, [0], rows, seed=21)
    with connect(db) as store:
        if store.scalar("SELECT count() FROM laion") != rows:
            ingest(store, shards, force=True)
        if not store.rows("SELECT name FROM system.data_skipping_indices WHERE table = 'laion'"):
            say(f"index (default: M={IndexSpec().m}, ef_construction={IndexSpec().ef_construction})")
            create_index(store, IndexSpec("image"))
    return shards, db


def _existing(db: Path, say: Callable[[str], Any]) -> tuple[np.ndarray, list[int], int]:
    """Query vectors (256 stored rows' caption embeddings, else their image embeddings with a
    little noise, so no query is its own exact match), their ids and the row count of an
    existing store, which must have a vector index on image embeddings."""
    from laion_search.api import connect

    with connect(db, create=False) as store:  # an existing store: a mistyped path must not become a new one
        rows = int(store.scalar("SELECT count() FROM laion") or 0)
        if not rows:
            raise RuntimeError(f"{db}: the store is empty")
        if ("image_embedding", "cosineDistance") not in store.vector_indexes():
            raise RuntimeError(f"{db}: no cosine index on image embeddings (laion index create --db {db})")
        column = "text_embedding" if "text" in store.modalities() else "image_embedding"
        say(f"{rows:,} rows in {db}; queries: 256 stored {column} values")
        picked = store.rows(f"SELECT id, {column} AS v FROM laion WHERE id IN "
                            "(SELECT id FROM laion ORDER BY cityHash64(id) LIMIT 256) ORDER BY id")
    queries = np.array([r["v"] for r in picked], np.float32)
    if column == "image_embedding":
        queries += np.random.default_rng(5).normal(0, 0.02, queries.shape).astype(np.float32)
    return queries, [int(r["id"]) for r in picked], rows


def _client(base: str, **options: Any) -> Any:
    """An httpx client with TCP_NODELAY, as requests/urllib3 (clip-retrieval's client) set it:
    without it each request body waits for the ACK of its headers (Nagle), a client-side stall
    of several ms that no server can remove."""
    import httpx

    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                                    limits=options.pop("limits", httpx.Limits()))
    return httpx.Client(base_url=base, transport=transport, **options)


def _start_server(db: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "laion_search.cli", "serve", "--db", str(db), "--port",
                             str(port), "--cache-size", "0", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # a failure timeout (start-up plus loading large indexes), not a measurement
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited at start-up (status {proc.returncode})")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                # measure once the server has loaded its vector indexes (laion serve preloads them)
                status = httpx.get(base + "/api/status", timeout=30).json()
                if status.get("index_preload", {}).get("state") != "loading":
                    return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] * 1000 if values else float("nan")


#: The query kinds of ``laion bench serve``; ``--kinds`` picks some (``indexed`` alone: the
#: indexed-only load). ``knn`` is the indexed search through clip-retrieval's route
#: (``/knn-service``, ``embedding_input``, ``num_images`` 10; not in the default mix):
#: ``--kinds indexed,knn --clients 1`` compares the two routes on the same queries.
KINDS = ("indexed", "exact", "filtered", "like", "knn")
DEFAULT_KINDS = ("indexed", "exact", "filtered", "like")


def run(rows: int = 100_000, clients: int = 16, seconds: float = 30.0, workdir: Path | None = None,
        log: Callable[[str], Any] | None = None, kinds: tuple[str, ...] = DEFAULT_KINDS,
        db: Path | None = None, requests: int | None = None) -> dict[str, Any]:
    """The load for ``seconds``, or, with ``requests``, until each client has sent that many
    (a run bounded by count, not by the clock: what the tests use)."""
    import httpx
    import psutil

    say = log or (lambda m: None)
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"query kinds must be some of {', '.join(KINDS)}, not {', '.join(sorted(unknown)) or 'none'}")
    with scratch_dir(workdir, "laion-bench-serve-") as root:
        proc = None
        try:
            if db is None:
                shards, db = _prepare(root, rows, say)
                queries = np.load(shards / "text_emb_0.npy", mmap_mode="r")[:256].astype(np.float32)
                like_ids = list(range(rows))
            else:
                queries, like_ids, rows = _existing(db, say)
            proc, base = _start_server(db)
            server = psutil.Process(proc.pid)
            rss_before = server.memory_info().rss
            mix = list(kinds)
            lat: dict[str, list[float]] = {m: [] for m in mix}
            errors = [0]
            shed: dict[str, int] = {}
            lock = threading.Lock()
            stop_at = float("inf")  # set once warmed up
            say(f"{clients} clients × {seconds:.0f} s of {'/'.join(mix)} queries")

            def client(seed: int) -> None:
                rnd = random.Random(seed)
                sent = 0
                with _client(base, timeout=30) as c:
                    while (sent < requests) if requests is not None else time.time() < stop_at:
                        sent += 1
                        kind = rnd.choice(mix)
                        q = queries[rnd.randrange(len(queries))].tolist()
                        body: dict[str, Any] = {"vector": q, "k": 10}
                        if kind == "exact":
                            body["exact"] = True
                        elif kind == "filtered":
                            body.update(nsfw="exclude", where=["width>=400"])
                        elif kind == "like":
                            body = {"like": rnd.choice(like_ids), "k": 10}
                        elif kind == "knn":
                            body = {"embedding_input": q, "num_images": 10}
                        t = time.perf_counter()
                        retry_after = None
                        try:
                            r = c.post("/knn-service" if kind == "knn" else "/api/search", json=body)
                            code = r.status_code
                            if code == 429:
                                retry_after = float(r.headers.get("Retry-After", "1"))
                        except httpx.HTTPError:
                            code = -1
                        dt = time.perf_counter() - t
                        with lock:
                            if code == 200:
                                lat[kind].append(dt)
                            elif code == 429:
                                shed[kind] = shed.get(kind, 0) + 1
                            else:
                                errors[0] += 1
                        if retry_after is not None:  # a documented shed: back off as told
                            time.sleep(max(0.0, min(retry_after, stop_at - time.time())) if requests is None
                                       else retry_after)

            with _client(base, timeout=120) as c:  # warm-up, untimed: the graphs load on first use
                for kind in mix:
                    for _ in range(3):
                        if kind == "knn":
                            c.post("/knn-service", json={"embedding_input": queries[0].tolist(), "num_images": 10})
                        else:
                            c.post("/api/search", json={"vector": queries[0].tolist(), "k": 10,
                                                        "exact": kind == "exact"})
            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            stop_at = time.time() + seconds
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            rss_after = server.memory_info().rss
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    all_lat = sorted(x for v in lat.values() for x in v)

    def pct(values: list[float], p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))] * 1000 if values else float("nan")

    per_kind = {k: {"requests": len(v), "p50_ms": statistics.median(v) * 1000 if v else float("nan"),
                    "p99_ms": pct(sorted(v), 0.99), "shed": shed.get(k, 0)} for k, v in lat.items()}
    result = {"rows": rows, "clients": clients, "seconds": elapsed, "requests": len(all_lat), "errors": errors[0],
              "sent": clients * requests if requests is not None else None,
              "shed": sum(shed.values()),
              "qps": len(all_lat) / elapsed, "p50_ms": pct(all_lat, 0.5), "p99_ms": pct(all_lat, 0.99),
              "rss_before": rss_before, "rss_after": rss_after, "per_kind": per_kind}
    what = "mixed queries" if len(mix) > 1 else f"{mix[0]} queries only"
    result["kinds"] = mix
    lines = [f"{rows:,} rows, {clients} clients, {elapsed:.0f} s, {what} (k=10) over HTTP on 127.0.0.1", "",
             "| query | answered | p50 ms | p99 ms | shed (429) |", "|---|---:|---:|---:|---:|"]
    for k, v in per_kind.items():
        lines.append(f"| {k} | {v['requests']:,} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {v['shed']:,} |")
    lines += ["", f"total **{result['qps']:.1f} QPS**, p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                  f"**{errors[0]} errors**, {result['shed']:,} shed with 429 + Retry-After, server RSS {rss_before / 2**20:,.0f} MB → {rss_after / 2**20:,.0f} MB"]
    if per_kind.get("knn", {}).get("requests") and per_kind.get("indexed", {}).get("requests"):
        result["knn_vs_indexed_p50"] = per_kind["knn"]["p50_ms"] / per_kind["indexed"]["p50_ms"]
        lines += ["", f"/knn-service p50 is **{result['knn_vs_indexed_p50']:.2f}×** /api/search's on the same queries"]
    result["markdown"] = "\n".join(lines)
    return result


if __name__ == "__main__":  # pragma: no cover
    print(run(rows=int(os.environ.get("ROWS", "20000")), seconds=10)["markdown"])


#: The heavy statement ``--mixed --load sql`` sends back to back: every image vector read and summed.
SQL_LOAD = "SELECT count(), sum(arraySum(image_embedding)), uniqExact(caption) FROM laion"
LOADS = ("scan", "sql")


def _idle_latencies(c: Any, body: Callable[[], dict[str, Any]], n: int, say: Callable[[str], Any]) -> list[float]:
    """Seconds of ``n`` indexed searches one at a time on an idle server (after a warm-up)."""
    for _ in range(10):  # warm-up
        c.post("/api/search", json=body())
    say(f"idle: {n} indexed searches, one at a time")
    idle = []
    for _ in range(n):
        t = time.perf_counter()
        r = c.post("/api/search", json=body())
        if r.status_code != 200:
            raise RuntimeError(f"idle indexed search failed: HTTP {r.status_code} {r.text[:200]}")
        idle.append(time.perf_counter() - t)
    return idle


def run_mixed(rows: int = 200_000, scan_clients: int = 4, rate: float = 20.0, seconds: float = 30.0,
              idle_requests: int = 200, workdir: Path | None = None, server_args: tuple[str, ...] = (),
              log: Callable[[str], Any] | None = None, load: str = "scan") -> dict[str, Any]:
    """Indexed latency idle, then under back-to-back exact scans or SQL statements (see the module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    say = log or (lambda m: None)
    with scratch_dir(workdir, "laion-bench-serve-") as root:
        proc = None
        try:
            shards, db = _prepare(root, rows, say)
            queries = np.load(shards / "text_emb_0.npy", mmap_mode="r")[:512].astype(np.float32)
            if load not in LOADS:
                raise ValueError(f"load must be one of {', '.join(LOADS)}")
            proc, base = _start_server(db, *server_args, *(("--allow-sql",) if load == "sql" else ()))
            rnd = random.Random(7)

            def body(exact: bool = False) -> dict[str, Any]:
                return {"vector": queries[rnd.randrange(len(queries))].tolist(), "k": 10, "exact": exact}

            with _client(base, timeout=60,
                         limits=httpx.Limits(max_connections=200, max_keepalive_connections=200)) as c:
                idle = _idle_latencies(c, body, idle_requests, say)
                heavy = "SQL statements" if load == "sql" else "exact scans"
                say(f"load: {scan_clients} clients of back-to-back {heavy} + {rate:g} indexed/s open loop, "
                    f"{seconds:.0f} s")
                lock = threading.Lock()
                scans = {"done": 0, "shed": 0, "errors": 0}
                indexed: list[float] = []
                indexed_errors: list[str] = []
                stop = threading.Event()

                answered = [threading.Event() for _ in range(scan_clients)]

                def scanner(i: int) -> None:
                    while not stop.is_set():
                        try:
                            r = (c.post("/api/sql", json={"query": SQL_LOAD}) if load == "sql"
                                 else c.post("/api/search", json=body(exact=True)))
                            code = r.status_code
                        except httpx.HTTPError:
                            code = -1
                        with lock:
                            key = "done" if code == 200 else "shed" if code == 429 else "errors"
                            scans[key] += 1
                        answered[i].set()
                        if code == 429:  # a documented shed: back off as told
                            stop.wait(float(r.headers.get("Retry-After", "1")))

                def one(due: float, b: dict[str, Any]) -> None:
                    try:
                        r = c.post("/api/search", json=b)
                        ok = r.status_code == 200
                        why = f"HTTP {r.status_code}"
                    except httpx.HTTPError as exc:
                        ok, why = False, type(exc).__name__
                    dt = time.perf_counter() - due  # from the scheduled time: queueing counts
                    with lock:
                        if ok:
                            indexed.append(dt)
                        else:
                            indexed_errors.append(why)

                threads = [threading.Thread(target=scanner, args=(i,)) for i in range(scan_clients)]
                for th in threads:
                    th.start()
                total = int(rate * seconds)
                with ThreadPoolExecutor(max_workers=128) as pool:
                    t0 = time.perf_counter()
                    for i in range(total):
                        due = t0 + i / rate
                        delay = due - time.perf_counter()
                        if delay > 0:
                            time.sleep(delay)
                        pool.submit(one, due, body())
                # the load lasts until every scan client has had an answer too, however slow the
                # scans: "under scans" then means under at least one scan per client (an event)
                for ev in answered:
                    if not ev.wait(600):  # a failure deadline only
                        stop.set()
                        raise RuntimeError("a scan client got no answer in 600 s")
                stop.set()
                for th in threads:
                    th.join()
                elapsed = time.perf_counter() - t0
        finally:
            _stop(proc)
    idle_p50 = statistics.median(idle) * 1000
    p50, p99 = _pct(indexed, 0.5), _pct(indexed, 0.99)
    result: dict[str, Any] = {"rows": rows, "scan_clients": scan_clients, "rate": rate, "seconds": elapsed,
              "idle_p50_ms": idle_p50, "idle_p99_ms": _pct(idle, 0.99), "indexed_sent": total,
              "indexed_answered": len(indexed), "indexed_errors": len(indexed_errors), "indexed_p50_ms": p50,
              "indexed_p99_ms": p99, "p99_over_idle_p50": p99 / idle_p50 if idle_p50 else float("nan"),
              "scans_done": scans["done"], "scans_shed": scans["shed"], "scan_errors": scans["errors"],
              "server_args": list(server_args), "load": load}
    result["target_met"] = bool(result["p99_over_idle_p50"] <= 4 and len(indexed) == total
                                and not indexed_errors and not scans["errors"])
    heavy = "SQL statements (/api/sql: " + SQL_LOAD + ")" if load == "sql" else "exact scans"
    lines = [f"{rows:,} rows; {scan_clients} clients sending {heavy} back to back + an open-loop stream of "
             f"{rate:g} indexed searches/s for {elapsed:.0f} s, HTTP on 127.0.0.1"
             + (f" (server: {' '.join(server_args)})" if server_args else ""), "",
             "| | p50 ms | p99 ms |", "|---|---:|---:|",
             f"| indexed, idle (one at a time) | {idle_p50:.1f} | {result['idle_p99_ms']:.1f} |",
             f"| indexed, under {'SQL' if load == 'sql' else 'scans'} | {p50:.1f} | {p99:.1f} |", "",
             f"indexed p99 = **{result['p99_over_idle_p50']:.1f}× idle p50** (target ≤ 4×); indexed answered "
             f"**{len(indexed)}/{total}**, errors {len(indexed_errors)}; {heavy.split(' (')[0]} done {scans['done']}, "
             f"shed with 429 {scans['shed']}, other errors {scans['errors']} → target "
             f"{'met' if result['target_met'] else 'NOT met'}"]
    result["markdown"] = "\n".join(lines)
    return result
