"""``laion bench serve``: load test of ``laion serve`` on 127.0.0.1.

Starts the server as a subprocess over a synth store (HNSW index on image embeddings), then
``clients`` concurrent clients send a mix of queries for ``seconds``: indexed vector searches,
exact searches, filtered indexed searches (safe mode + width) and "more like this". Reports
QPS, p50/p99 latency, errors (non-200 answers or failed connections) and the server's RSS
before and after. Bounded in time and count; loopback only.
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


def run(rows: int = 100_000, clients: int = 16, seconds: float = 30.0, workdir: Path | None = None,
        log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    import httpx
    import psutil

    from laion_search.index import IndexSpec, create_index
    from laion_search.ingest import ingest
    from laion_search.store import connect
    from laion_search.sources.synth import synth

    say = log or (lambda m: None)
    with scratch_dir(workdir, "laion-bench-serve-") as root:
        proc = None
        try:
            shards, db = root / "shards", root / "db"
            if not (shards / "metadata_0.parquet").exists():
                say(f"synth {rows:,} rows")
                synth(shards, [0], rows, seed=21)
            with connect(db) as store:
                if store.scalar("SELECT count() FROM laion") != rows:
                    ingest(store, shards)
                if not store.rows("SELECT name FROM system.data_skipping_indices WHERE table = 'laion'"):
                    say("index (default: M=16, ef_construction=64)")
                    create_index(store, IndexSpec("image"))
            queries = np.load(shards / "text_emb_0.npy", mmap_mode="r")[:256].astype(np.float32)
            port = _free_port()
            proc = subprocess.Popen([sys.executable, "-m", "laion_search.cli", "serve", "--db", str(db), "--port",
                                     str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            else:
                raise RuntimeError("server did not start")
            server = psutil.Process(proc.pid)
            rss_before = server.memory_info().rss
            mix = ["indexed", "exact", "filtered", "like"]
            lat: dict[str, list[float]] = {m: [] for m in mix}
            errors = [0]
            lock = threading.Lock()
            stop_at = time.time() + seconds
            say(f"{clients} clients × {seconds:.0f} s of mixed queries")

            def client(seed: int) -> None:
                rnd = random.Random(seed)
                with httpx.Client(base_url=base, timeout=30) as c:
                    while time.time() < stop_at:
                        kind = rnd.choice(mix)
                        q = queries[rnd.randrange(len(queries))].tolist()
                        body: dict[str, Any] = {"vector": q, "k": 10}
                        if kind == "exact":
                            body["exact"] = True
                        elif kind == "filtered":
                            body.update(nsfw="exclude", where=["width>=400"])
                        elif kind == "like":
                            body = {"like": rnd.randrange(rows), "k": 10}
                        t = time.perf_counter()
                        try:
                            ok = c.post("/api/search", json=body).status_code == 200
                        except httpx.HTTPError:
                            ok = False
                        dt = time.perf_counter() - t
                        with lock:
                            if ok:
                                lat[kind].append(dt)
                            else:
                                errors[0] += 1

            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
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
                    "p99_ms": pct(sorted(v), 0.99)} for k, v in lat.items()}
    result = {"rows": rows, "clients": clients, "seconds": elapsed, "requests": len(all_lat), "errors": errors[0],
              "qps": len(all_lat) / elapsed, "p50_ms": pct(all_lat, 0.5), "p99_ms": pct(all_lat, 0.99),
              "rss_before": rss_before, "rss_after": rss_after, "per_kind": per_kind}
    lines = [f"{rows:,} rows, {clients} clients, {elapsed:.0f} s, mixed queries over HTTP on 127.0.0.1", "",
             "| query | requests | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    for k, v in per_kind.items():
        lines.append(f"| {k} | {v['requests']:,} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} |")
    lines += ["", f"total **{result['qps']:.1f} QPS**, p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                  f"**{errors[0]} errors**, server RSS {rss_before / 2**20:,.0f} MB → {rss_after / 2**20:,.0f} MB"]
    result["markdown"] = "\n".join(lines)
    return result


if __name__ == "__main__":  # pragma: no cover
    print(run(rows=int(os.environ.get("ROWS", "20000")), seconds=10)["markdown"])
