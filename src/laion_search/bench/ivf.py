"""``laion bench ivf``: the partitioned (IVF) index beside HNSW and the libraries, in one run.

On one synth shard (realistic geometry) or the real-text set, with a numpy ground truth over the
image embeddings, for two query kinds (image → image: stored image vectors; text → image: the same
rows' caption vectors, LAION's cross-modal search):

* **pipeline** — the shard on disk → ``ingest --index both --index-kind ivf`` (both columns assigned
  as they land) → the first indexed text → image query: the seconds to a searchable shard;
* **laion ivf** — :func:`laion_search.search.search` through the IVF index (per ``--codes``), at
  each ``--nprobe``: recall@k, p50, QPS with N client threads, build seconds, bytes held in RAM per
  vector (the centroids) and on disk;
* **tuned** (``--tune R``) — ``laion index tune --recall R`` on the pipeline's index, then this run's
  queries (not the tune's own sample) at the nprobe it stored;
* **laion hnsw** — the engine's graph at our default (M, ef_construction) (``--hnsw``);
* **usearch** — the library inside ClickHouse's index, used directly, same parameters;
* **faiss IVF-Flat / IVF-PQ** — the clip-retrieval / autofaiss approach, same lists and probes;
* **parts** — rows a probe reads as one table's rows are spread over more parts (``--parts``):
  a probe reads at least one granule per list per part.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from laion_search.bench.search import _latencies, _qps, _recall
from laion_search.errors import UsageError

Say = Callable[[str], Any]


def _measure(name: str, fn: Callable[[np.ndarray], list[int]], queries: dict[str, tuple[np.ndarray, np.ndarray]],
             k: int, threads: int, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"method": name, **extra}
    for kind, (qs, truth) in queries.items():
        fn(qs[0])  # warm: first-use costs (caches, imports) are not a query's
        got, lat = _latencies(fn, qs)
        row[f"recall_{kind}"] = _recall(got, truth, k)
        row[f"p50_ms_{kind}"] = statistics.median(lat) * 1000
        row[f"qps_{kind}"] = _qps(fn, qs, threads)
    return row


def _warm(db: Any) -> None:
    """Read the served lists once, as a serving process has: some kernels page out file pages left
    idle for a minute (this machine's DAMON reclaim does), and the tune's exact searches leave the
    lists idle for longer (nprobe 22 measured right after it: 15.7 / 15.1 ms; warm: 12.5 / 13.2)."""
    from laion_search.backends import settings_sql
    from laion_search.index import ivf
    from laion_search.schema import IVF_ROW_COLUMNS

    st = ivf.state(db)
    for info in st.served.values():
        rows = "".join(f", max(`{c}`)" for c in IVF_ROW_COLUMNS) if (info.column, info.gen) in st.with_rows else ""
        db.rows(f"SELECT max(vec[1]){rows} FROM {info.table}" + settings_sql(st.read_settings))


def _settle(db: Any, poll_s: float = 0.5) -> float:
    """Wait until the store's background merges (of the shard just loaded) have ended, then until the
    kernel has written the new files back (``os.sync``): a latency measured beside either measures
    them (merges: p50 48–62 ms instead of 22–26 ms at 1M rows; 1.6 GB of dirty pages being written:
    15.5 / 14.8 ms instead of 13.5 / 14.0, at nprobe 22)."""
    t0 = time.perf_counter()
    while db.scalar("SELECT count() FROM system.merges WHERE database = currentDatabase()"):
        time.sleep(poll_s)
    os.sync()
    return time.perf_counter() - t0


def run(rows: int = 1_000_000, queries: int = 100, k: int = 10, nprobes: str = "8,16,32,64", codes: str = "none",
        lists: int | None = None, hnsw: bool = True, peers: bool = True, threads: int = 2,
        workdir: Path | None = None, out: Path | None = None, log: Say | None = None, data: str = "synth",
        corpus: Any = None, parts: bool = True, tune_recall: float | None = None) -> dict[str, Any]:
    from laion_search.api import connect
    from laion_search.bench.common import bench_shard, scratch_dir
    from laion_search.index import IndexSpec, create_index, drop_index, ivf
    from laion_search.schema import DEFAULT_IVF_CODES as ivf_default_codes
    from laion_search.search import SearchOptions, search

    say = log or (lambda m: None)
    probes = [int(x) for x in nprobes.split(",") if x.strip()]
    code_list = [c.strip() for c in codes.split(",") if c.strip()]
    results: list[dict[str, Any]] = []
    with scratch_dir(workdir, "laion-bench-ivf-") as root:
        shard_dir = bench_shard(root, rows, data, corpus=corpus, log=say, name=f"shards-{rows}")
        base = np.load(shard_dir / "img_emb_0.npy").astype(np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        texts = np.load(shard_dir / "text_emb_0.npy", mmap_mode="r")
        rng = np.random.default_rng(0)
        pick = rng.choice(len(base), size=min(queries, len(base)), replace=False)
        q_txt = np.asarray(texts[pick], dtype=np.float32)
        q_txt /= np.linalg.norm(q_txt, axis=1, keepdims=True)
        q_img = base[pick]
        say("ground truth (numpy)")
        qsets = {"img": (q_img, np.argsort(-(q_img @ base.T), axis=1)[:, :k]),
                 "txt": (q_txt, np.argsort(-(q_txt @ base.T), axis=1)[:, :k])}
        dim = base.shape[1]

        # -- the pipeline: shard on disk → searchable through IVF on both columns ------------------------
        db_path = root / f"db-{data}-{rows}"
        import shutil

        shutil.rmtree(db_path, ignore_errors=True)
        say("pipeline: ingest --index both --index-kind ivf, then the first text→image query")
        t0 = time.perf_counter()
        with connect(db_path) as db:
            report = db.ingest(shard_dir, index="both", index_kind="ivf")
            ingested = time.perf_counter() - t0
            first = search(db, vector=q_txt[0], k=k)
            total = time.perf_counter() - t0
            served = ivf.state(db).served
            pipeline: dict[str, Any] = {"rows": report.rows, "seconds_to_first_query": total, "ingest_and_ivf_seconds": ingested,
                        "first_query_ms": first.seconds * 1000, "strategy": first.strategy,
                        "lists": served["image"].lists,
                        "train_seconds": sum(served[c].train_seconds for c in served)}
            say(f"pipeline: {total:.1f} s to the first query ({ingested:.1f} s ingest + IVF on both columns)")
            pipeline["merges_settled_seconds"] = _settle(db)
            _warm(db)
            say(f"the table's background merges ended and its files were written back "
                f"{pipeline['merges_settled_seconds']:.1f} s later; "
                "latencies are measured after them")
            gen_lists = served["image"].lists if lists is None else lists

            def ivf_fn(nprobe: int) -> Callable[[np.ndarray], list[int]]:
                opts = SearchOptions(nprobe=nprobe)
                return lambda q: [r["id"] for r in search(db, vector=q, k=k, options=opts, columns=["id"]).rows]

            if tune_recall is not None:
                pipeline["tune"], row = _tuned(db, tune_recall, k, threads, qsets, len(base), float(ingested), say)
                results += [row] if row else []
            for code in code_list:
                if code != ivf_default_codes or lists is not None:
                    say(f"build ivf codes={code} lists={gen_lists}")
                    t = time.perf_counter()
                    ivf.create_ivf(db, ["image"], lists=gen_lists, codes=code, replace=True)
                    build_s = time.perf_counter() - t
                else:
                    build_s = float(ingested)
                st = next(s for s in ivf.status(db) if s["column"] == "image_embedding")
                for nprobe in probes:
                    say(f"ivf codes={code} nprobe={nprobe}")
                    results.append(_measure(f"laion ivf {code} lists={st['lists']} nprobe={nprobe}", ivf_fn(nprobe),
                                            qsets, k, threads, build_s=build_s, ram_bytes_per_vector=st["memory_bytes_estimate"] / len(base),
                                            disk_bytes_per_vector=st["bytes_on_disk"] / len(base), nprobe=nprobe,
                                            codes=code, lists=st["lists"]))
            if hnsw:
                from laion_search.index import DEFAULT_EF_CONSTRUCTION, DEFAULT_M

                say(f"build hnsw M={DEFAULT_M} ef_c={DEFAULT_EF_CONSTRUCTION}")
                t = time.perf_counter()
                create_index(db, IndexSpec("image"))
                build_s = time.perf_counter() - t
                st = next(i for i in db.index_status() if i["name"] == "image_index")
                results.append(_measure(f"laion hnsw M={DEFAULT_M} ef_c={DEFAULT_EF_CONSTRUCTION}",
                                        lambda q: [r["id"] for r in search(db, vector=q, k=k, columns=["id"]).rows],
                                        qsets, k, threads, build_s=build_s,
                                        ram_bytes_per_vector=st["memory_bytes_estimate"] / len(base),
                                        disk_bytes_per_vector=st["bytes_on_disk"] / len(base)))
                drop_index(db, "image")
        if peers:
            results += _peers(base, qsets, k, threads, gen_lists, probes, hnsw, say)
        parts_rows = _parts_experiment(root, dim, say, rows=min(200_000, max(20 * len(base), 20_000))) if parts else []
    md = markdown(results, pipeline, parts_rows, len(base), dim, len(pick), k, threads, data)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-ivf.md").write_text(md + "\n")
    return {"rows": len(base), "dim": dim, "data": data, "queries": len(pick), "k": k, "pipeline": pipeline,
            "results": results, "parts": parts_rows, "markdown": md}


def _tuned(db: Any, recall: float, k: int, threads: int, qsets: dict, rows: int, build_s: float,
           say: Say) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``laion index tune`` on the pipeline's index, then the run's own queries (not the tune's sample)
    at the nprobe it stored: the setting a user of the tuned index gets. (the tune's summary, the
    measured row or None when nothing was stored)"""
    from laion_search.index import ivf
    from laion_search.schema import DEFAULT_IVF_CODES as codes
    from laion_search.search import search
    from laion_search.tune import tune

    say(f"tune: laion index tune --recall {recall:g} --column image --kind ivf")
    t = time.perf_counter()
    try:
        tuned = tune(db, "image", recall=recall, k=k, kind="ivf")
    except UsageError as exc:  # e.g. too few rows for recall@k: the run goes on without it
        say(f"tune: {exc}")
        return {"target": recall, "stored": False, "recommendation": str(exc)}, None
    summary = {**{key: v for key, v in tuned.as_dict().items() if key != "curve"}, "seconds": time.perf_counter() - t}
    _warm(db)
    if not tuned.stored:
        return summary, None
    st = next(s for s in ivf.status(db) if s["column"] == "image_embedding")
    say(f"tuned nprobe {tuned.nprobe}: its recall and p50 on this run's queries")
    return summary, _measure(
        f"laion ivf {codes} lists={st['lists']} nprobe={tuned.nprobe} (tuned for {recall:g})",
        lambda q: [r["id"] for r in search(db, vector=q, k=k, columns=["id"]).rows], qsets, k, threads,
        build_s=build_s, ram_bytes_per_vector=st["memory_bytes_estimate"] / rows,
        disk_bytes_per_vector=st["bytes_on_disk"] / rows, nprobe=tuned.nprobe, codes=codes, lists=st["lists"],
        tuned_for=recall)


def _peers(base: np.ndarray, qsets: dict, k: int, threads: int, lists: int, probes: list[int], hnsw: bool,
           say: Say) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        import faiss
    except ImportError:
        say("faiss not installed: its rows are skipped")
        faiss = None  # type: ignore[assignment]
    if faiss is not None:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        dim = base.shape[1]
        sample = base[np.random.default_rng(1).choice(len(base), min(len(base), lists * 64), replace=False)]
        for name, make, bpv in (("faiss IVF-Flat", lambda q: faiss.IndexIVFFlat(q, dim, lists, faiss.METRIC_INNER_PRODUCT),
                                 dim * 4 + 8),
                                ("faiss IVF-PQ m=64", lambda q: faiss.IndexIVFPQ(q, dim, lists, 64, 8,
                                                                                 faiss.METRIC_INNER_PRODUCT), 64 + 8)):
            say(f"build {name} lists={lists}")
            quant = faiss.IndexFlatIP(dim)
            index = make(quant)
            t = time.perf_counter()
            index.train(sample)
            index.add(base)
            build_s = time.perf_counter() - t
            for nprobe in probes:
                index.nprobe = nprobe

                def fn(q: np.ndarray, index: Any = index) -> list[int]:
                    return index.search(q[None, :], k)[1][0].tolist()

                out.append(_measure(f"{name} lists={lists} nprobe={nprobe}", fn, qsets, k, threads, build_s=build_s,
                                    ram_bytes_per_vector=bpv + lists * dim * 4 / len(base), nprobe=nprobe))
    if hnsw:
        try:
            from usearch.index import Index
        except ImportError:
            say("usearch not installed: its row is skipped")
            return out
        from laion_search.index import DEFAULT_EF_CONSTRUCTION, DEFAULT_M

        say("build usearch")
        idx = Index(ndim=base.shape[1], metric="cos", dtype="bf16", connectivity=DEFAULT_M,
                    expansion_add=DEFAULT_EF_CONSTRUCTION, expansion_search=256)
        t = time.perf_counter()
        idx.add(np.arange(len(base)), base, threads=os.cpu_count() or 1)
        build_s = time.perf_counter() - t
        out.append(_measure(f"usearch M={DEFAULT_M} ef_c={DEFAULT_EF_CONSTRUCTION}",
                            lambda q: idx.search(q, k).keys.tolist(), qsets, k, threads, build_s=build_s,
                            ram_bytes_per_vector=idx.memory_usage / len(base)))
    return out


def _parts_experiment(root: Path, dim: int, say: Say, rows: int = 200_000, lists: int = 256,
                      nprobe: int = 16, spreads: tuple[int, ...] = (1, 8, 40)) -> list[dict[str, Any]]:
    """Rows and granules a probe reads when the same rows sit in 1, 8 or 40 parts (merges paused):
    the engine's own plan (``EXPLAIN indexes = 1``) counts the granules the primary key keeps."""
    from laion_search.api import connect
    from laion_search.index import ivf
    from laion_search.schema import IVF_GRANULARITY, ivf_table_ddl

    say(f"parts: {rows:,} rows × {dim}-d in 1 … {max(spreads)} parts")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    cents = ivf.train(x[rng.choice(rows, lists * 32, replace=False)], lists, rounds=4)
    lab = ivf.assign(x, cents)
    import pyarrow as pa

    out = []
    db_path = root / "db-parts"
    import shutil

    shutil.rmtree(db_path, ignore_errors=True)
    with connect(db_path) as db:
        qs = x[rng.choice(rows, 20, replace=False)]
        for n in spreads:
            table = f"bench_parts_{n}"
            db.run_ddl(ivf_table_ddl(table, "none", dim))
            db.run_ddl(f"SYSTEM STOP MERGES {table}")
            for chunk in np.array_split(np.arange(rows), n):
                vec = pa.FixedSizeListArray.from_arrays(pa.array(x[chunk].ravel()), dim).cast(pa.list_(pa.float32()))
                db.insert(table, ivf._companion_batch(lab[chunk], pa.array(chunk.astype(np.int64)), 0, vec))
            granules, latency = [], []
            for q in qs:
                probe = ivf.nearest_lists(q, cents, nprobe).tolist()
                plan = "\n".join(str(v) for r in db.rows(
                    f"EXPLAIN indexes = 1 SELECT id FROM {table} WHERE list IN {{l:Array(UInt32)}}", {"l": probe})
                    for v in r.values())
                m = re.findall(r"Granules: (\d+)/(\d+)", plan)
                granules.append(int(m[-1][0]) if m else 0)
                t = time.perf_counter()
                db.rows(f"SELECT id, cosineDistance(vec, {{q:Array(Float32)}}) AS d FROM {table} WHERE list IN "
                        "{l:Array(UInt32)} ORDER BY d LIMIT 10", {"q": q, "l": probe})
                latency.append(time.perf_counter() - t)
            need = nprobe * rows / lists
            read = float(np.mean(granules)) * IVF_GRANULARITY
            out.append({"parts": n, "rows_per_part": rows // n, "granules_read": float(np.mean(granules)),
                        "rows_read": read, "rows_in_probed_lists": need, "amplification": read / need,
                        "p50_ms": statistics.median(latency) * 1000})
            db.run_ddl(f"DROP TABLE {table}")
    return out


def markdown(results: list[dict[str, Any]], pipeline: dict[str, Any], parts: list[dict[str, Any]], rows: int, dim: int,
             queries: int, k: int, threads: int, data: str) -> str:
    lines = [f"{data}: {rows:,} rows × {dim}-d; {queries} queries per kind (img: stored image vectors → images; txt: "
             f"the same rows' caption vectors → images); recall@{k} against numpy; QPS with {threads} client threads", "",
             f"**Pipeline** (shard on disk → `laion ingest --index both --index-kind ivf` → first text→image query): "
             f"**{pipeline['seconds_to_first_query']:.1f} s** ({pipeline['ingest_and_ivf_seconds']:.1f} s ingest with "
             f"both columns assigned, of which k-means {pipeline['train_seconds']:.1f} s; first query "
             f"{pipeline['first_query_ms']:.1f} ms, {pipeline['lists']} lists). The latencies below were measured "
             f"after the table's background merges ended and its files were written back "
             f"({pipeline.get('merges_settled_seconds', 0.0):.1f} s later)."
             + _tune_line(pipeline.get("tune"), k), "",
             f"| method | build s | RAM B/vector | recall@{k} img | p50 ms img | QPS img | recall@{k} txt | p50 ms txt | "
             "QPS txt |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['method']} | {r.get('build_s', float('nan')):.1f} | {r.get('ram_bytes_per_vector', 0):,.1f} | "
                     f"{r['recall_img']:.3f} | {r['p50_ms_img']:.1f} | {r['qps_img']:.0f} | {r['recall_txt']:.3f} | "
                     f"{r['p50_ms_txt']:.1f} | {r['qps_txt']:.0f} |")
    if parts:
        lines += ["", "**Parts** (the same rows in more parts, merges paused; a probe of "
                  f"{16} lists of {parts[0]['rows_in_probed_lists'] / 16:,.0f} rows on average):", "",
                  "| parts | rows per part | granules read | rows read | rows in the probed lists | read amplification | p50 ms |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for p in parts:
            lines.append(f"| {p['parts']} | {p['rows_per_part']:,} | {p['granules_read']:,.0f} | {p['rows_read']:,.0f} | "
                         f"{p['rows_in_probed_lists']:,.0f} | {p['amplification']:.2f}× | {p['p50_ms']:.1f} |")
    return "\n".join(lines)


def _tune_line(tuned: dict[str, Any] | None, k: int) -> str:
    if not tuned:
        return ""
    if not tuned.get("stored"):
        return (f" `laion index tune --recall {tuned['target']:g}` stored nothing: {tuned.get('recommendation')}")
    return (f" `laion index tune --recall {tuned['target']:g}` ({tuned['queries']} queries, {tuned['mix']}, "
            f"{tuned['seconds']:.0f} s) stored nprobe {tuned['nprobe']}: recall@{k} {tuned['recall']:.3f} on its sample, "
            f"lower bound {tuned['recall_lower']:.3f}, p50 {tuned['p50_ms']:.1f} ms; its row below is measured on this "
            "run's queries.")
