"""``laion bench pipeline``: one shard from its files to the first query served by both HNSW
indexes, timed step by step, beside raw usearch and the guide, in one run.

* **ours, index after** — ``laion ingest`` then ``laion index create --column both`` (one
  compaction, both builds queued together);
* **ours, index on ingest** — ``laion ingest --index both``: the indexes are declared first and
  the shard's one part is indexed in the stage before it is swapped in (no second pass);
* **usearch** — the library inside ClickHouse's index, used directly on the same vectors with
  the same M, ef_construction, quantization and number of threads: the build-rate reference;
* **guide** — the guide's ``process.py`` → CSV → ``INSERT FROM INFILE``, then its two
  ``ALTER TABLE … ADD INDEX`` (bf16, M=64, ef_construction=256) and ``MATERIALIZE INDEX``, run
  on a smaller shard (it needs ~41 KB of RAM per row) and scaled linearly to the same rows
  (optimistic for the guide: an HNSW insert costs more as the graph grows).

Each pipeline runs in its own process with a fresh store, so its peak RSS (VmHWM) is its own,
and ``--build-threads`` repeats ours with the engine's index-build pool at other sizes (default:
``$LAION_INDEX_BUILD_THREADS``, else the engine's 16 threads, whatever the machine); raw usearch
runs with the same number of threads. Recall@k of both indexes is measured
against numpy's exact ranking (text→image and image→text queries of random rows).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from laion_search.bench.common import scratch_dir
from laion_search.bench.ingest import _peak_rss_bytes

GUIDE_M, GUIDE_EF = 64, 256
MODES = ("after", "on-ingest")
LABELS = {"after": "ours: ingest, then index create --column both",
          "on-ingest": "ours: ingest --index both (indexed as it lands)",
          "usearch": "raw usearch, both indexes",
          "guide": "guide: process.py → CSV → INSERT, MATERIALIZE ×2 (64, 256)"}


def _queries(shard_dir: Path, n: int) -> dict[str, np.ndarray]:
    """Per indexed column: query vectors (the other modality of random rows, unit length)."""
    rng = np.random.default_rng(0)
    img = np.load(shard_dir / "img_emb_0.npy", mmap_mode="r")
    txt = np.load(shard_dir / "text_emb_0.npy", mmap_mode="r")
    pick = np.sort(rng.choice(len(img), size=min(n, len(img)), replace=False))
    out = {}
    for column, other in (("image", txt), ("text", img)):
        q = np.asarray(other[pick], dtype=np.float32)
        out[column] = q / np.linalg.norm(q, axis=1, keepdims=True)
    return out


def _truth(shard_dir: Path, queries: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """numpy's exact cosine top-k per column, one column's vectors in memory at a time."""
    out = {}
    for column, name in (("image", "img_emb_0.npy"), ("text", "text_emb_0.npy")):
        base = np.load(shard_dir / name, mmap_mode="r")
        scores = np.empty((len(queries[column]), len(base)), np.float32)
        step = 131072
        for lo in range(0, len(base), step):
            chunk = np.asarray(base[lo:lo + step], dtype=np.float32)
            chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
            scores[:, lo:lo + step] = queries[column] @ chunk.T
        out[column] = np.argsort(-scores, axis=1)[:, :k]
    return out


def _recall(found: list[list[int]], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One pipeline in this (fresh) process: see the module docstring; ``spec`` says which."""
    method, shard_dir, db = spec["method"], Path(spec["shard_dir"]), spec["db"]
    k = spec["k"]
    qs = {c: np.load(Path(spec["work"]) / f"queries-{c}.npy") for c in ("image", "text")}
    truth = {c: np.load(Path(spec["work"]) / f"truth-{c}.npy") for c in ("image", "text")}
    if method == "usearch":
        return _usearch(shard_dir, qs, truth, k, spec)
    if method == "guide":
        return _guide(shard_dir, db, spec)
    from laion_search import connect
    from laion_search.index import IndexSpec, create_indexes
    from laion_search.ingest import ingest
    from laion_search.search import search

    specs = [IndexSpec(c, "cosine", spec["quantization"], spec["m"], spec["ef"]) for c in ("image", "text")]
    phases: dict[str, float] = {}
    built: list[float] = []

    def watch(e: dict[str, Any]) -> None:
        if e["event"] == "shard_indexed":
            built.append(e["seconds"])

    with connect(db) as store:
        t = time.perf_counter()
        if method == "on-ingest":
            create_indexes(store, specs, materialize=False, dim=int(np.load(shard_dir / "img_emb_0.npy",
                                                                             mmap_mode="r").shape[1]))
            ingest(store, shard_dir, progress=watch)
            phases["index"] = sum(built)
            phases["ingest"] = time.perf_counter() - t - phases["index"]
        else:
            ingest(store, shard_dir)
            phases["ingest"] = time.perf_counter() - t
            t = time.perf_counter()
            create_indexes(store, specs)
            phases["index"] = time.perf_counter() - t
        # a part without its graph is searched by brute force, silently: such a run measures nothing
        lacking = [(i["name"], i["parts_covered"], i["parts"]) for i in store.index_status()
                   if i.get("method") != "scan" and i["parts_covered"] < i["parts"]]
        if lacking:
            raise RuntimeError(f"after the build, parts without their index (name, indexed, parts): {lacking}")
        t = time.perf_counter()
        first = search(store, qs["image"][0], k=k)
        phases["first_query"] = time.perf_counter() - t
        strategy = first.strategy
        recall = {}
        for column in ("image", "text"):
            found = [[r["id"] for r in search(store, q, k=k, modality=column)] for q in qs[column]]
            recall[column] = _recall(found, truth[column], k)
        rows = store.scalar("SELECT count() FROM laion")
        parts = store.scalar("SELECT count() FROM system.parts WHERE database = currentDatabase() AND table = 'laion' "
                             "AND active AND rows > 0")
        latency = _latency(store, qs["image"], k) if spec.get("latency") else None
    out = {"method": method, "rows": rows, "parts": parts, "phases": phases, "strategy": strategy, "recall": recall,
           "peak_rss": _peak_rss_bytes(), "build_threads": spec.get("build_threads")}
    if latency is not None:
        latency["http_ms"] = _http_p50(db, qs["image"], k)
        out["latency"] = latency
    return out


def _p50_ms(fn: Callable[[np.ndarray], Any], queries: np.ndarray, warm: int = 5) -> float:
    for q in queries[:warm]:
        fn(q)
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def _latency(store: Any, queries: np.ndarray, k: int) -> dict[str, float]:
    """p50 of the same indexed search two ways: the engine's floor (the ANN statement, ids only,
    straight on a session of the store's chDB engine) and :func:`laion_search.search.search`."""
    from laion_search.search import search

    sql = f"SELECT id FROM laion ORDER BY cosineDistance(image_embedding, {{q:Array(Float32)}}) LIMIT {k}"

    def floor(q: np.ndarray) -> Any:
        # the vector bound as a query parameter, as the library binds it (a literal parses slower)
        return store.query_text(sql, {"q": q})  # the engine's own CSV: no Arrow decoding, no library code

    return {"floor_ms": _p50_ms(floor, queries), "library_ms": _p50_ms(lambda q: search(store, q, k=k), queries)}


def _http_p50(db: str, queries: np.ndarray, k: int) -> float:
    """p50 of ``POST /api/search`` (vector, k) against ``laion serve`` on the same store (no cache)."""
    from laion_search.bench.serve import _client, _start_server, _stop

    proc, base = _start_server(Path(db))
    try:
        with _client(base, timeout=60) as client:  # TCP_NODELAY, as clip-retrieval's client
            def one(q: np.ndarray) -> None:
                r = client.post("/api/search", json={"vector": q.tolist(), "k": k})
                r.raise_for_status()
            return _p50_ms(one, queries)
    finally:
        _stop(proc)


def _usearch(shard_dir: Path, qs: dict[str, np.ndarray], truth: dict[str, np.ndarray], k: int,
             spec: dict[str, Any]) -> dict[str, Any]:
    from usearch.index import Index

    phases, recall = {}, {}
    rows = 0
    for column, name in (("image", "img_emb_0.npy"), ("text", "text_emb_0.npy")):
        base = np.load(shard_dir / name).astype(np.float32)
        rows = len(base)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        idx = Index(ndim=base.shape[1], metric="cos", dtype=spec["quantization"], connectivity=spec["m"],
                    expansion_add=spec["ef"], expansion_search=256)
        t = time.perf_counter()
        idx.add(np.arange(rows, dtype=np.uint64), base, threads=spec["threads"])
        phases[f"index_{column}"] = time.perf_counter() - t
        del base
        found = idx.search(qs[column], k, threads=1)
        recall[column] = _recall([list(map(int, row)) for row in found.keys], truth[column], k)
        del idx
    phases["index"] = phases["index_image"] + phases["index_text"]
    return {"method": "usearch", "rows": rows, "phases": phases, "recall": recall, "peak_rss": _peak_rss_bytes(),
            "build_threads": spec["threads"]}


def _guide(shard_dir: Path, db: str, spec: dict[str, Any]) -> dict[str, Any]:
    from laion_search.bench.ingest import worker as ingest_worker
    from laion_search.store import guide_store

    r = ingest_worker("guide", str(shard_dir), db)  # process.py → CSV → CREATE TABLE → INSERT FROM INFILE
    with guide_store(db) as store:
        t = time.perf_counter()
        for column in ("image", "text"):  # the guide's statements, verbatim but for its own names
            store.run_ddl(f"ALTER TABLE laion ADD INDEX {column}_index {column}_embedding TYPE vector_similarity("
                          f"'hnsw', 'cosineDistance', 512, 'bf16', {GUIDE_M}, {GUIDE_EF})")
        for column in ("image", "text"):
            store.run_ddl(f"ALTER TABLE laion MATERIALIZE INDEX {column}_index SETTINGS mutations_sync = 2")
        index_seconds = time.perf_counter() - t
    return {"method": "guide", "rows": r["rows"], "phases": {"ingest": r["seconds"], "index": index_seconds},
            "recall": {}, "peak_rss": _peak_rss_bytes(), "build_threads": spec.get("build_threads")}


def _run(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    os.sync()  # no pipeline pays for the previous one's writeback
    proc = subprocess.run([sys.executable, "-m", "laion_search.bench.pipeline", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"bench pipeline worker {spec['method']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(rows: int = 1_000_000, modes: tuple[str, ...] = MODES, build_threads: tuple[int, ...] | None = None,
        m: int | None = None, ef_construction: int | None = None, quantization: str = "bf16", queries: int = 100,
        k: int = 10, guide_rows: int = 20_000, peers: bool = True, workdir: Path | None = None,
        log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    from laion_search.backends.chdb import ENGINE_BUILD_THREADS, index_build_threads
    from laion_search.index import DEFAULT_EF_CONSTRUCTION, DEFAULT_M
    from laion_search.sources.synth import synth

    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    say = log or (lambda msg: None)
    m = m or DEFAULT_M
    ef = ef_construction or DEFAULT_EF_CONSTRUCTION
    cores = len(os.sched_getaffinity(0))
    threads = tuple(build_threads or (index_build_threads() or ENGINE_BUILD_THREADS,))
    results: list[dict[str, Any]] = []
    with scratch_dir(workdir, "laion-bench-pipeline-") as root:
        shard_dir = root / f"shard-{rows}"
        if not (shard_dir / "img_emb_0.npy").exists():
            say(f"synth (realistic geometry): 1 shard × {rows:,} rows")
            synth(shard_dir, [0], rows, seed=3, geometry="realistic")
        qs = _queries(shard_dir, queries)
        say("ground truth (numpy, exact)")
        truth = _truth(shard_dir, qs, k)
        for column in ("image", "text"):
            np.save(root / f"queries-{column}.npy", qs[column])
            np.save(root / f"truth-{column}.npy", truth[column])
        base = {"shard_dir": str(shard_dir), "work": str(root), "k": k, "m": m, "ef": ef,
                "quantization": quantization, "threads": cores}
        for n in threads:
            for mode in modes:
                say(f"{LABELS[mode]}, index build pool {n} thread(s) …")
                db = root / f"db-{mode}-{n}"
                shutil.rmtree(db, ignore_errors=True)
                first = not any(x.get("latency") for x in results)
                r = _run({**base, "method": mode, "db": str(db), "build_threads": n, "latency": first},
                         {"LAION_INDEX_BUILD_THREADS": str(n)})
                shutil.rmtree(db, ignore_errors=True)
                results.append(r)
                say("  " + _summary(r))
        if peers:
            for n in threads:  # the reference at each pool size: the same number of threads
                say(f"usearch: both indexes, {n} thread(s) …")
                results.append(_run({**base, "method": "usearch", "db": "", "threads": n}))
                say("  " + _summary(results[-1]))
            small = root / f"shard-guide-{guide_rows}"
            if not (small / "img_emb_0.npy").exists():
                synth(small, [0], guide_rows, seed=3, geometry="realistic")
            say(f"guide: {guide_rows:,} rows, scaled to {rows:,} …")
            db = root / "db-guide"
            shutil.rmtree(db, ignore_errors=True)
            g = _run({**base, "method": "guide", "db": str(db), "shard_dir": str(small), "build_threads": 16},
                     {"LAION_INDEX_BUILD_THREADS": "16"})
            shutil.rmtree(db, ignore_errors=True)
            scale = rows / g["rows"]
            g["measured_rows"], g["rows"] = g["rows"], rows
            g["phases"] = {p: s * scale for p, s in g["phases"].items()}
            g["peak_rss"] = g["peak_rss"] * scale
            results.append(g)
            say("  " + _summary(g))
    return {"rows": rows, "m": m, "ef_construction": ef, "quantization": quantization, "cores": cores,
            "results": results, "markdown": _markdown(results, rows, m, ef, quantization, cores, k)}


def _summary(r: dict[str, Any]) -> str:
    p = r["phases"]
    rec = ", ".join(f"recall@10 {c} {v:.3f}" for c, v in r["recall"].items())
    return (f"ingest {p.get('ingest', 0):,.1f} s, indexes {p['index']:,.1f} s"
            + (f", first query {p['first_query'] * 1000:,.0f} ms" if "first_query" in p else "")
            + (f", {rec}" if rec else "") + f", peak RSS {r['peak_rss'] / 2**20:,.0f} MB")


def _total(r: dict[str, Any]) -> float:
    p = r["phases"]
    return p.get("ingest", 0.0) + p["index"] + p.get("first_query", 0.0)


def _markdown(results: list[dict[str, Any]], rows: int, m: int, ef: int, quantization: str, cores: int, k: int) -> str:
    def mmss(s: float) -> str:
        return f"{int(s // 60)}:{s % 60:04.1f}"

    lines = [f"{rows:,} rows, 512-d, {cores} core(s); our indexes {quantization} M={m} ef_construction={ef}",
             "",
             "| pipeline | build threads | ingest | both indexes | vectors/s per index | first indexed query | "
             f"to first indexed query | recall@{k} image / text | parts | peak RSS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_method: dict[str, dict[str, Any]] = {}
    for r in results:
        p = r["phases"]
        vps = 2 * r["rows"] / p["index"] if p["index"] else 0.0
        r["vectors_per_second"] = vps
        by_method.setdefault(r["method"], r)
        rec = " / ".join(f"{r['recall'][c]:.3f}" for c in ("image", "text")) if r["recall"] else "—"
        label = LABELS[r["method"]] + (f" (measured on {r['measured_rows']:,} rows, scaled)" if "measured_rows" in r else "")
        first = f"{p['first_query'] * 1000:,.0f} ms" if "first_query" in p else "—"
        total = mmss(_total(r)) if r["method"] != "usearch" else "—"
        lines.append(f"| {label} | {r.get('build_threads') or '—'} | {p.get('ingest', 0):,.1f} s | {p['index']:,.1f} s | "
                     f"{vps:,.0f} | {first} | **{total}** | {rec} | {r.get('parts', '—')} | {r['peak_rss'] / 2**20:,.0f} MB |")
    lines.append("")
    ours = [r for r in results if r["method"] in MODES]
    if ours:
        best = min(ours, key=_total)
        lines.append(f"fastest: **{LABELS[best['method']]}**, {best['build_threads']} build thread(s): "
                     f"{mmss(_total(best))} to the first indexed query (target ≤ 6:00.0), "
                     f"peak RSS {best['peak_rss'] / 2**20:,.0f} MB (target < 4,096 MB), "
                     f"recall@{k} {min(best['recall'].values()):.3f} (target ≥ 0.95)")
        for u in (r for r in results if r["method"] == "usearch"):
            same = [r for r in ours if r.get("build_threads") == u["build_threads"]]
            if same:
                fast = max(same, key=lambda r: r["vectors_per_second"])
                lines.append(f"build rate vs raw usearch, {u['build_threads']} thread(s) each (same M, ef_construction, "
                             f"quantization): **{fast['vectors_per_second'] / u['vectors_per_second']:.2f}×** "
                             f"({LABELS[fast['method']].split(': ')[1]}; target ≥ 0.9×); raw usearch alone needs "
                             f"{mmss(u['phases']['index'])} for the two graphs")
        lat = next((r["latency"] for r in results if r.get("latency")), None)
        if lat:
            lines.append(f"indexed search p50 (image index, k={k}, one client): engine floor "
                         f"(ANN statement, ids only, straight on chDB) **{lat['floor_ms']:.1f} ms**, library "
                         f"**{lat['library_ms']:.1f} ms** ({lat['library_ms'] / lat['floor_ms']:.2f}× the floor; target "
                         f"≤ 1.3×), HTTP **{lat['http_ms']:.1f} ms** (library + {lat['http_ms'] - lat['library_ms']:.1f} ms; "
                         "target ≤ + 3 ms)")
        if "guide" in by_method:
            g = by_method["guide"]
            lines.append(f"vs the guide: **{_total(g) / _total(best):.1f}×** faster to the first indexed query "
                         f"({mmss(_total(g))} scaled from {g['measured_rows']:,} rows)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
