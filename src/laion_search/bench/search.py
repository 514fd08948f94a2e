"""``laion bench search``: recall and latency of exact and HNSW search, beside its peers, in one run.

On one synth shard (or a loaded store's data), with a numpy ground truth:

* **numpy exact** — one float32 matrix-vector product per query (the memory-bandwidth floor);
* **faiss IndexFlatIP** — faiss's exact inner-product search (skipped when faiss is absent);
* **laion exact** — :func:`laion_search.search.search` with ``exact=True``, first over the float32
  column, then through a bf16 scan copy (``laion index create --kind scan``) with float32 re-ranking;
* **laion hnsw (M, ef_c)** — the same through a ``vector_similarity`` index, per configuration;
* **usearch (M, ef_c)** — the library inside ClickHouse's index, with the same M, ef_construction,
  quantization and ef_search (ClickHouse's default 256), used directly.

Queries are text embeddings of random rows searched against image embeddings (LAION's
text→image use). Reported: recall@k, p50/p95 latency, QPS with 1 and N client threads, build
vectors/s, index memory and disk size. Writes ``bench-search.md`` and ``bench-search.png``.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from laion_search.index import DEFAULT_EF_CONSTRUCTION, DEFAULT_M, GUIDE_EF_CONSTRUCTION, GUIDE_M

EF_SEARCH = 256  # ClickHouse's hnsw_candidate_list_size_for_search default
#: our default index and the guide's, side by side
DEFAULT_CONFIGS = f"{DEFAULT_M}:{DEFAULT_EF_CONSTRUCTION},{GUIDE_M}:{GUIDE_EF_CONSTRUCTION}"


def parse_configs(text: str) -> list[tuple[int, int]]:
    """``"32:64,64:256"`` → ``[(32, 64), (64, 256)]``; ``"none"`` or empty: exact search only."""
    out: list[tuple[int, int]] = []
    if text.strip().lower() in ("", "none"):
        return out
    for part in text.split(","):
        m, ef = part.strip().split(":")
        out.append((int(m), int(ef)))
    return out


def _latencies(fn: Callable[[np.ndarray], list[int]], queries: np.ndarray) -> tuple[list[list[int]], list[float]]:
    results, lat = [], []
    for q in queries:
        t = time.perf_counter()
        results.append(fn(q))
        lat.append(time.perf_counter() - t)
    return results, lat


def _qps(fn: Callable[[np.ndarray], Any], queries: np.ndarray, threads: int) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, queries))
    return len(queries) / (time.perf_counter() - t)


def _recall(results: list[list[int]], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(r[:k]) & set(t[:k].tolist())) / k for r, t in zip(results, truth)]))


def _row(name: str, results, lat, truth, k, qps1, qpsn, **extra) -> dict[str, Any]:
    lat_ms = sorted(x * 1000 for x in lat)
    return {"method": name, "recall": _recall(results, truth, k), "p50_ms": statistics.median(lat_ms),
            "p95_ms": lat_ms[min(len(lat_ms) - 1, int(0.95 * len(lat_ms)))], "qps_1": qps1, "qps_n": qpsn, **extra}


def run(rows: int = 100_000, queries: int = 100, k: int = 10, configs: str = DEFAULT_CONFIGS,
        quantization: str = "bf16", threads: int = 2, workdir: Path | None = None, out: Path | None = None,
        log: Callable[[str], Any] | None = None, data: str = "synth", corpus: Any = None,
        rescoring: bool = False, fetch_multiplier: float = 4.0, peers: bool = True) -> dict[str, Any]:
    """``data``: ``synth`` (realistic geometry), ``synth-hard`` (isotropic) or ``real-text``
    (:mod:`laion_search.bench.real_text`, cached). ``rescoring``: HNSW candidates re-ranked with
    exact distances (``vector_search_with_rescoring``, ``fetch_multiplier`` × k candidates), the
    setting that makes i8 / b1 indexes usable; on for those always). ``quantization`` may list
    several (``"bf16,i8,b1"``: a sweep). ``peers=False`` skips the usearch / faiss rows."""
    quantizations = [q.strip() for q in quantization.split(",") if q.strip()]
    from laion_search.bench.common import bench_shard, scratch_dir
    from laion_search.index import IndexSpec, create_index, create_scan_copy, drop_index, drop_scan_copy
    from laion_search.ingest import ingest
    from laion_search.search import SearchOptions, search
    from laion_search.api import connect

    say = log or (lambda m: None)
    results: list[dict[str, Any]] = []
    with scratch_dir(workdir, "laion-bench-search-") as root:
        shard_dir = bench_shard(root, rows, data, corpus=corpus, log=say)
        base = np.load(shard_dir / "img_emb_0.npy").astype(np.float32)
        # unit rows: the dot product is then the cosine, so numpy's ranking is the exact cosine
        # ranking (LAION's float16 vectors are only normalised to ~1e-3, enough to swap near ties)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        texts = np.load(shard_dir / "text_emb_0.npy", mmap_mode="r")
        rng = np.random.default_rng(0)
        pick = rng.choice(len(base), size=min(queries, len(base)), replace=False)
        qs = np.asarray(texts[pick], dtype=np.float32)
        qs /= np.linalg.norm(qs, axis=1, keepdims=True)
        ids = np.arange(len(base), dtype=np.int64)  # shard 0: id == row
        say("ground truth (numpy)")
        truth = np.argsort(-(qs @ base.T), axis=1)[:, :k]

        def numpy_exact(q: np.ndarray) -> list[int]:
            s = base @ q
            top = np.argpartition(-s, k)[:k]
            return top[np.argsort(-s[top])].tolist()

        res, lat = _latencies(numpy_exact, qs)
        results.append(_row("numpy exact (f32 GEMV)", res, lat, truth, k, _qps(numpy_exact, qs, 1),
                            _qps(numpy_exact, qs, threads)))
        try:
            if not peers:
                raise ImportError("--no-peers")
            import faiss

            flat = faiss.IndexFlatIP(base.shape[1])
            flat.add(base)

            def faiss_exact(q: np.ndarray) -> list[int]:
                return flat.search(q[None, :], k)[1][0].tolist()

            res, lat = _latencies(faiss_exact, qs)
            results.append(_row("faiss IndexFlatIP", res, lat, truth, k, _qps(faiss_exact, qs, 1),
                                _qps(faiss_exact, qs, threads)))
        except ImportError:
            say("faiss skipped" if not peers else "faiss not installed: skipped")

        db = root / ("db" if data == "synth" else f"db-{data}")  # one store per dataset: --dir may hold several
        with connect(db) as store:
            if store.scalar("SELECT count() FROM laion") != len(base):
                say("ingest")
                ingest(store, shard_dir)

            def laion_exact(q: np.ndarray) -> list[int]:
                return [r["id"] for r in search(store, q, k=k, exact=True).rows]

            drop_scan_copy(store, "image")
            res, lat = _latencies(laion_exact, qs)
            results.append(_row("laion exact (chDB)", res, lat, truth, k, _qps(laion_exact, qs, 1),
                                _qps(laion_exact, qs, threads)))
            say("bf16 scan copy")
            built = create_scan_copy(store, "image")
            scan = next(i for i in store.index_status() if i["name"] == "image_embedding_bf16")
            res, lat = _latencies(laion_exact, qs)
            results.append(_row("laion exact, bf16 scan copy (chDB)", res, lat, truth, k, _qps(laion_exact, qs, 1),
                                _qps(laion_exact, qs, threads), build_vps=built["vectors_per_second"],
                                index_disk=scan["bytes_on_disk"], index_memory=0))
            drop_scan_copy(store, "image")
            for quant in quantizations:
                # i8 / b1 graphs rank by rough distances: re-rank their candidates exactly
                resc = rescoring or quant in ("i8", "b1")
                tag = ("" if len(quantizations) == 1 and quant == "bf16" else f" {quant}") + \
                    (f" rescored×{fetch_multiplier:g}" if resc else "")
                for m, ef in parse_configs(configs):
                    drop_index(store, "image")
                    say(f"build hnsw {quant} M={m} ef_construction={ef}")
                    built = create_index(store, IndexSpec("image", "cosine", quant, m, ef))
                    st = store.index_status()[0]
                    opts = SearchOptions(rescoring=resc, fetch_multiplier=fetch_multiplier)

                    def laion_hnsw(q: np.ndarray, opts: SearchOptions = opts) -> list[int]:
                        return [r["id"] for r in search(store, q, k=k, options=opts).rows]

                    res, lat = _latencies(laion_hnsw, qs)
                    results.append(_row(f"laion hnsw M={m} ef_c={ef}{tag}", res, lat, truth, k, _qps(laion_hnsw, qs, 1),
                                        _qps(laion_hnsw, qs, threads), build_vps=built["vectors_per_second"],
                                        index_disk=st["bytes_on_disk"], index_memory=st["memory_bytes_estimate"],
                                        m=m, ef_construction=ef, quantization=quant,
                                        bytes_per_vector=st["memory_bytes_estimate"] / len(base)))
                    if peers:
                        row = _usearch_row(base, ids, qs, truth, k, m, ef, quant, threads, root, say)
                        row["method"] += tag.replace(f" rescored×{fetch_multiplier:g}", "")
                        results.append(row)
            drop_index(store, "image")
    md = _markdown(results, len(base), len(qs), k, quantization, threads, dim=base.shape[1], data=data,
                   rescoring=rescoring)
    ratios = _ratios(results)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-search.md").write_text(md + "\n")
        _plot(results, out / "bench-search.png")
    return {"rows": len(base), "data": data, "queries": len(qs), "k": k, "results": results, "ratios": ratios, "markdown": md}


def _usearch_row(base, ids, qs, truth, k, m, ef, quantization, threads, root, say) -> dict[str, Any]:
    try:
        from usearch.index import Index
    except ImportError:
        say("usearch not installed: skipped")
        return {"method": f"usearch M={m} ef_c={ef} (missing)", "recall": float("nan"), "p50_ms": float("nan"),
                "p95_ms": float("nan"), "qps_1": float("nan"), "qps_n": float("nan")}
    idx = Index(ndim=base.shape[1], metric="cos", dtype=quantization, connectivity=m, expansion_add=ef,
                expansion_search=EF_SEARCH)
    t = time.perf_counter()
    idx.add(ids, base, threads=os.cpu_count() or 1)
    build = time.perf_counter() - t
    path = root / f"usearch-{m}-{ef}.usearch"
    idx.save(str(path))

    def usearch_q(q: np.ndarray) -> list[int]:
        return idx.search(q, k).keys.tolist()

    res, lat = _latencies(usearch_q, qs)
    row = _row(f"usearch M={m} ef_c={ef}", res, lat, truth, k, _qps(usearch_q, qs, 1), _qps(usearch_q, qs, threads),
               build_vps=len(base) / build, index_disk=path.stat().st_size, index_memory=idx.memory_usage,
               m=m, ef_construction=ef)
    path.unlink()
    return row


def _ratios(results: list[dict[str, Any]]) -> dict[str, float]:
    by = {r["method"]: r for r in results}
    out: dict[str, float] = {}
    np_row = by.get("numpy exact (f32 GEMV)")
    if np_row and "laion exact (chDB)" in by:
        out["exact_vs_numpy_p50"] = by["laion exact (chDB)"]["p50_ms"] / np_row["p50_ms"]
    if np_row and "laion exact, bf16 scan copy (chDB)" in by:
        out["exact_bf16_scan_vs_numpy_p50"] = by["laion exact, bf16 scan copy (chDB)"]["p50_ms"] / np_row["p50_ms"]
    guide = by.get("laion hnsw M=64 ef_c=256")
    for r in results:
        if r["method"].startswith("laion hnsw"):
            peer = by.get(r["method"].replace("laion hnsw", "usearch"))
            if peer:
                out[f"{r['method']} vs usearch p50"] = r["p50_ms"] / peer["p50_ms"]
                if peer.get("build_vps"):
                    out[f"{r['method']} build vs usearch"] = r["build_vps"] / peer["build_vps"]
            if guide and guide is not r and guide.get("build_vps"):
                out[f"{r['method']} build vs guide's (64, 256)"] = r["build_vps"] / guide["build_vps"]
    return out


def _mb(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x / 2**20:,.1f} MB"


def _per_vector(r: dict[str, Any], rows: int) -> str:
    """Index bytes in memory per vector (vectors at the index's quantization plus graph links)."""
    mem = r.get("index_memory")
    return "-" if not mem or not rows else f"{mem / rows:,.0f}"


def _markdown(results, rows, queries, k, quantization, threads, dim=512, data="synth", rescoring=False) -> str:
    lines = [f"{data}: {rows:,} rows × {dim}-d, {queries} text→image queries, recall@{k}, quantization {quantization}"
             f"{' with rescoring' if rescoring else ''}, ef_search {EF_SEARCH}, QPS with 1 and {threads} client threads",
             "",
             f"| method | recall@{k} | p50 ms | p95 ms | QPS (1) | QPS ({threads}) | build vectors/s | index memory | "
             "bytes/vector | index disk |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        bv = r.get("build_vps")
        lines.append(f"| {r['method']} | {r['recall']:.3f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['qps_1']:,.0f} | "
                     f"{r['qps_n']:,.0f} | {'-' if not bv else f'{bv:,.0f}'} | {_mb(r.get('index_memory'))} | "
                     f"{_per_vector(r, rows)} | {_mb(r.get('index_disk'))} |")
    return "\n".join(lines)


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if np.isnan(r["recall"]):
            continue
        marker = "s" if "exact" in r["method"] or "Flat" in r["method"] else ("o" if "laion" in r["method"] else "^")
        ax.scatter(r["p50_ms"], r["recall"], marker=marker, s=60, label=r["method"])
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("p50 latency per query (ms, log scale)")
    ax.set_ylabel("recall@10")
    ax.set_title("laion-search: recall vs latency")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- recall against a published gold standard (SISAP) ------------------------------------------------
GOLD_KS = (10, 30)


def _h5_dataset(path: Path, names: tuple[str, ...], what: str):
    try:
        import h5py
    except ImportError:
        from laion_search.errors import UsageError

        raise UsageError(f"{path}: reading .h5 needs h5py (pip install 'laion-search[sources]')") from None
    from laion_search.errors import ShardValidationError

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ShardValidationError(f"not a readable HDF5 file ({exc})", path=str(path)) from None
    with f:
        for name in names:
            if name in f:
                return np.asarray(f[name][()])
        found = ", ".join(sorted(f.keys())) or "none"
    raise ShardValidationError(f"no {what} dataset {names[0]!r} (datasets: {found})", path=str(path))


def read_queries(path: str | os.PathLike[str]) -> np.ndarray:
    """Query vectors, float32 rows: an ``.h5`` file's ``emb`` dataset (SISAP) or a 2-D ``.npy``."""
    from laion_search.errors import ShardValidationError

    p = Path(path)
    arr = _h5_dataset(p, ("emb",), "query") if p.suffix.lower() in (".h5", ".hdf5") else _npy(p)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.dtype.kind != "f":
        raise ShardValidationError(f"queries must be a non-empty 2-D float array, got {arr.dtype} {arr.shape}",
                                   path=str(p))
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_gold(path: str | os.PathLike[str]) -> np.ndarray:
    """Gold-standard neighbour ids, one row per query, nearest first: an ``.h5`` file's ``knns``
    (SISAP: int32, starting at 1) or a 2-D integer ``.npy``."""
    from laion_search.errors import ShardValidationError

    p = Path(path)
    arr = _h5_dataset(p, ("knns",), "gold") if p.suffix.lower() in (".h5", ".hdf5") else _npy(p)
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise ShardValidationError(f"gold ids must be a 2-D integer array (knns), got {arr.dtype} {arr.shape}",
                                   path=str(p))
    return arr.astype(np.int64)


def _npy(p: Path) -> np.ndarray:
    from laion_search.errors import ShardValidationError

    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ShardValidationError(f"not a readable .npy file ({exc})", path=str(p)) from None


def gold_recall(results: list[list[int]], gold: np.ndarray, k: int) -> float:
    """Mean over queries of |first k results ∩ first k gold ids| / k."""
    return float(np.mean([len(set(r[:k]) & set(g[:k].tolist())) / k for r, g in zip(results, gold)]))


def run_gold(store: Any, queries: str | os.PathLike[str], gold: str | os.PathLike[str], *, limit: int | None = 1000,
             configs: str | None = None, quantization: str = "bf16", threads: int = 2, metric: str = "cosine",
             qps_queries: int = 200, out: Path | None = None,
             log: Callable[[str], Any] | None = None, nprobes: Sequence[int] = (),
             exact: bool = True) -> dict[str, Any]:
    """Recall@10 and @30 of exact and indexed search on ``store`` against a published gold standard.

    The table's ids must be the ids the gold standard uses (SISAP: the 1-based row number, which
    is how a SISAP .h5 is ingested). ``limit``: the first N queries (None: all). ``configs``:
    ``"16:64,…"`` builds each HNSW index in turn (replacing the image index; the last one stays),
    None measures the image index the table already has, if any. ``nprobes``: the table's IVF index
    on the image column at each of these probes. ``exact=False`` skips timing exact search (a full
    scan per query). Writes ``bench-search.md`` and ``bench-search.png`` into ``out``."""
    from laion_search.errors import UsageError
    from laion_search.index import IndexSpec, create_index, drop_index
    from laion_search.search import search

    say = log or (lambda m: None)
    qs = read_queries(queries)
    truth = read_gold(gold)
    kmax = max(GOLD_KS)
    if truth.shape[0] != qs.shape[0]:
        raise UsageError(f"{gold} has {truth.shape[0]:,} rows but {queries} has {qs.shape[0]:,} queries: "
                         "they must come from the same query set")
    if truth.shape[1] < kmax:
        raise UsageError(f"{gold} has {truth.shape[1]} neighbours per query; recall@{kmax} needs at least {kmax}")
    if limit is not None and limit > 0:
        qs, truth = qs[:limit], truth[:limit]
    dim = store.dim()
    rows = store.scalar("SELECT count() FROM laion") or 0
    if dim is None or rows == 0:
        raise UsageError("the table is empty: ingest the data set the gold standard was computed on first")
    if qs.shape[1] != dim:
        raise UsageError(f"{queries} has {qs.shape[1]}-d queries but the table holds {dim}-d vectors")
    if rows < kmax:
        raise UsageError(f"the table has {rows} rows; recall@{kmax} needs at least {kmax}")
    lo, hi = int(truth[:, :kmax].min()), int(truth[:, :kmax].max())
    have = store.rows("SELECT min(id) AS lo, max(id) AS hi FROM laion")[0]
    if lo < have["lo"] or hi > have["hi"]:
        say(f"warning: gold ids span {lo}..{hi} but table ids span {have['lo']}..{have['hi']}: "
            "is this the data set the gold standard was computed on?")
    timed = qs[:max(1, min(qps_queries, len(qs)))]
    results: list[dict[str, Any]] = []

    def measure(name: str, fn: Callable[[np.ndarray], list[int]], **extra: Any) -> None:
        say(f"{name}: {len(qs):,} queries")
        res, lat = _latencies(fn, qs)
        lat_ms = sorted(x * 1000 for x in lat)
        results.append({"method": name, **{f"recall@{k}": gold_recall(res, truth, k) for k in GOLD_KS},
                        "recall": gold_recall(res, truth, GOLD_KS[0]), "p50_ms": statistics.median(lat_ms),
                        "p95_ms": lat_ms[min(len(lat_ms) - 1, int(0.95 * len(lat_ms)))],
                        "qps_1": _qps(fn, timed, 1), "qps_n": _qps(fn, timed, threads), **extra})

    def exact_ids(q: np.ndarray) -> list[int]:
        return [r["id"] for r in search(store, q, k=kmax, exact=True, metric=metric, columns=["id"]).rows]

    def indexed(q: np.ndarray) -> list[int]:
        return [r["id"] for r in search(store, q, k=kmax, metric=metric, columns=["id"]).rows]

    from laion_search.schema import INDEX_METRICS, METRICS

    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if exact:
        measure("laion exact (chDB)", exact_ids)
    if nprobes:
        from laion_search.index import ivf

        info = ivf.state(store).served.get("image")
        if info is None:
            raise UsageError("--nprobe: the table has no IVF index on the image column "
                             "(laion index create --kind ivf --column image)")
        for n in nprobes:
            def probed(q: np.ndarray, n: int = n) -> list[int]:
                return [r["id"] for r in search(store, q, k=kmax, metric=metric, nprobe=n, columns=["id"]).rows]

            measure(f"laion ivf lists={info.lists} nprobe={n}", probed, index_memory=info.lists * info.dim * 4)
    if metric not in INDEX_METRICS:
        say(f"--metric {metric}: ClickHouse's HNSW index ranks by {' or '.join(INDEX_METRICS)} only, so only exact "
            "search is measured")
    elif configs:
        for m, ef in parse_configs(configs):
            drop_index(store, "image")
            say(f"build hnsw M={m} ef_construction={ef}")
            built = create_index(store, IndexSpec("image", metric, quantization, m, ef))
            st = next(i for i in store.index_status() if i["name"] == IndexSpec("image").name)
            measure(f"laion hnsw M={m} ef_c={ef}", indexed, build_vps=built["vectors_per_second"],
                    index_disk=st["bytes_on_disk"], index_memory=st["memory_bytes_estimate"], m=m, ef_construction=ef)
    else:
        existing = [i for i in store.list_indexes() if i["name"] == IndexSpec("image").name]
        if existing:
            st = next(i for i in store.index_status() if i["name"] == existing[0]["name"])
            measure(f"laion hnsw (the table's index: {existing[0]['type_full']})", indexed,
                    index_disk=st["bytes_on_disk"], index_memory=st["memory_bytes_estimate"])
        elif not nprobes:
            say("no image index on the table: exact search only (--configs 16:64 builds one)")
    md = _markdown_gold(results, rows, dim, len(qs), Path(queries).name, Path(gold).name, threads, len(timed))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-search.md").write_text(md + "\n")
        _plot(results, out / "bench-search.png")
    return {"rows": rows, "dim": dim, "queries": len(qs), "gold": str(gold), "ks": list(GOLD_KS),
            "results": results, "ratios": {}, "markdown": md}


def _markdown_gold(results, rows, dim, queries, qname, gname, threads, timed) -> str:
    ks = " | ".join(f"recall@{k}" for k in GOLD_KS)
    lines = [f"{rows:,} rows × {dim}-d, {queries:,} queries from {qname}, gold standard {gname}; "
             f"QPS with 1 and {threads} client threads over the first {timed} queries",
             "",
             f"| method | {ks} | p50 ms | p95 ms | QPS (1) | QPS ({threads}) | build vectors/s | index memory | index disk |",
             "|---|" + "---:|" * (len(GOLD_KS) + 7)]
    for r in results:
        bv = r.get("build_vps")
        recalls = " | ".join(f"{r[f'recall@{k}']:.3f}" for k in GOLD_KS)
        lines.append(f"| {r['method']} | {recalls} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['qps_1']:,.0f} | "
                     f"{r['qps_n']:,.0f} | {'-' if not bv else f'{bv:,.0f}'} | {_mb(r.get('index_memory'))} | "
                     f"{_mb(r.get('index_disk'))} |")
    return "\n".join(lines)
