"""``laion bench``: benchmarks that print ratios measured side by side in one run."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from laion_search.cli import output
from laion_search.cli.common import DbOption, JsonOption, UrlOption, handle_errors, open_store
from laion_search.errors import UsageError
from laion_search.schema import DEFAULT_IVF_CODES

bench_app = typer.Typer(help="Benchmarks that print ratios measured side by side in one run.",
                        no_args_is_help=True)


def _print_bench(result: dict, json_output: bool, out: Optional[Path]) -> None:
    """A bench's result: JSON, or its markdown table (also written to ``out`` when given)."""
    if json_output:
        print(output.dumps(result))
    else:
        output.out.print(result["markdown"])
    if out:
        out.write_text(result["markdown"] + "\n")


def _print_with_ratios(result: dict, json_output: bool) -> bool:
    """A bench's result: JSON, or its markdown table and each measured ratio (``name vs baseline``
    where the result names the baseline). Returns whether it printed the plain form."""
    if json_output:
        print(output.dumps(result))
        return False
    output.out.print(result["markdown"])
    for name, value in result["ratios"].items():
        base = result.get("ratio_baselines", {}).get(name)
        output.out.print(f"{name}{f' vs {base}' if base else ''}: {value:.2f}×")
    return True


@bench_app.command("ingest")
@handle_errors
def bench_ingest(
    rows: int = typer.Option(200_000, "--rows", min=1000, help="Rows of the synth shard our ingest and the native path load."),
    guide_rows: int = typer.Option(20_000, "--guide-rows", min=100,
                                   help="Rows for the guide pipeline (it is ~100× slower and needs ~41 KB RAM per row)."),
    workdir: Optional[Path] = typer.Option(None, "--dir", help="Scratch directory (default: a temp dir)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the markdown table here."),
    formats: Optional[str] = typer.Option(None, "--formats",
                                          help="Instead: peak RSS and speed of ingesting a generated 768-d "
                                               "ClickHouse LAION-5B part and/or SISAP .h5 (clickhouse-parquet,"
                                               "sisap-h5) of --rows rows, extrapolated to 10M rows from the memory growth over the run."),
    json_output: bool = JsonOption,
) -> None:
    """Our streaming ingest vs the guide's pandas→CSV pipeline vs the engine's native Npy insert.

    Examples: laion bench ingest --rows 1000000 --guide-rows 50000 ·
    laion bench ingest --formats clickhouse-parquet,sisap-h5 --rows 200000
    """
    from laion_search.bench.ingest import SOURCE_FORMATS, run_formats
    from laion_search.bench.ingest import run as run_bench

    log = None if json_output else output.err.print
    if formats is not None:
        chosen = tuple(f.strip() for f in formats.split(",") if f.strip())
        bad = [f for f in chosen if f not in SOURCE_FORMATS] or ([] if chosen else ["(none)"])
        if bad:
            raise UsageError(f"--formats takes {', '.join(SOURCE_FORMATS)}; got {', '.join(bad)}")
        result = run_formats(rows=rows, formats=chosen, workdir=workdir, log=log)
    else:
        result = run_bench(rows=rows, guide_rows=guide_rows, workdir=workdir, log=log)
    _print_bench(result, json_output, out)


@bench_app.command("pipeline")
@handle_errors
def bench_pipeline(
    rows: int = typer.Option(1_000_000, "--rows", min=1000, help="Rows of the synth shard (realistic geometry)."),
    modes: str = typer.Option("after,on-ingest", "--modes",
                              help="Our pipelines: after (ingest, then index create --column both) and/or "
                                   "on-ingest (ingest --index both)."),
    build_threads: Optional[str] = typer.Option(None, "--build-threads",
                                                help="Index-build pool sizes to compare, e.g. 2,16 (default: "
                                                     "$LAION_INDEX_BUILD_THREADS, else ClickHouse's 16)."),
    m: Optional[int] = typer.Option(None, "--m", min=2, max=512, help="HNSW links per node (default: ours, 32)."),
    ef_construction: Optional[int] = typer.Option(None, "--ef-construction", min=1, max=10_000,
                                                  help="HNSW build candidate list (default: ours, 64)."),
    quantization: str = typer.Option("bf16", "--quantization", help="bf16, f16, f32, i8 or b1."),
    n_queries: int = typer.Option(100, "--queries", min=1, help="Queries for recall@10 of each index."),
    guide_rows: int = typer.Option(20_000, "--guide-rows", min=100,
                                   help="Rows the guide's pipeline runs on (scaled linearly to --rows)."),
    peers: bool = typer.Option(True, "--peers/--no-peers", help="Also run raw usearch and the guide."),
    workdir: Optional[Path] = typer.Option(None, "--dir", help="Scratch directory, kept to reuse the shard (default: a temp dir)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the markdown table here."),
    json_output: bool = JsonOption,
) -> None:
    """A shard from files to the first query served by both HNSW indexes: ingest, builds, first
    query, recall and peak RSS, beside raw usearch and the guide's pipeline.

    Example: laion bench pipeline --rows 1000000 --build-threads 2,16
    """
    from laion_search.bench.pipeline import MODES, run as run_bench
    from laion_search.index import QUANTIZATIONS

    chosen = tuple(x.strip() for x in modes.split(",") if x.strip())
    bad = [x for x in chosen if x not in MODES] or ([] if chosen else ["(none)"])
    if bad:
        raise UsageError(f"--modes takes {', '.join(MODES)}; got {', '.join(bad)}")
    if quantization not in QUANTIZATIONS:
        raise UsageError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}")
    threads = None
    if build_threads:
        try:
            threads = tuple(int(x) for x in build_threads.split(",") if x.strip())
        except ValueError:
            raise UsageError(f"--build-threads takes whole numbers, e.g. 2,16; got {build_threads!r}") from None
        if not threads or min(threads) < 1:
            raise UsageError(f"--build-threads takes numbers ≥ 1, e.g. 2,16; got {build_threads!r}")
    log = None if json_output else output.err.print
    result = run_bench(rows=rows, modes=chosen, build_threads=threads, m=m, ef_construction=ef_construction,
                       quantization=quantization, queries=n_queries, guide_rows=guide_rows, peers=peers,
                       workdir=workdir, log=log)
    _print_bench(result, json_output, out)


@bench_app.command("search")
@handle_errors
def bench_search(
    rows: int = typer.Option(100_000, "--rows", min=100, help="Rows of the synth shard to search."),
    queries: str = typer.Option("100", "--queries", help="Number of text→image queries on the synth shard; or a "
                                                         "query file (.h5 with emb, SISAP's; or .npy) to measure "
                                                         "recall against --gold on the store's table."),
    gold: Optional[Path] = typer.Option(None, "--gold", help="Gold standard for --queries FILE: .h5 with knns "
                                                              "(SISAP: ids from 1) or a 2-D integer .npy."),
    limit: int = typer.Option(1000, "--limit", min=0, help="With --gold: the first N queries (0: all)."),
    k: int = typer.Option(10, "--k", min=1, max=1000, help="Neighbours per query (recall@k; --gold: 10 and 30)."),
    configs: Optional[str] = typer.Option(None, "--configs", help="HNSW M:ef_construction pairs, comma-separated; "
                                                                  "none: exact search only. Default 32:64,64:256 (ours, the guide's); "
                                                                  "with --gold: the table's own index, if any."),
    quantization: str = typer.Option("bf16", "--quantization", help="bf16, f16, f32, i8 or b1; a list (bf16,i8,b1) "
                                                                  "sweeps them (i8 / b1 always with rescoring)."),
    metric: str = typer.Option("cosine", "--metric", help="With --gold: cosine, l2 or dot (SISAP's gold standard ranks by dot product; dot scores exact search only, HNSW has no dot)."),
    threads: int = typer.Option(2, "--threads", min=1, max=64, help="Client threads for the QPS column."),
    peers: bool = typer.Option(True, "--peers/--no-peers", help="Also run usearch and faiss on the same vectors."),
    workdir: Optional[Path] = typer.Option(None, "--dir", help="Scratch directory, reused between runs (default: temp)."),
    out: Optional[Path] = typer.Option(Path("bench-out"), "--out", help="Where bench-search.md and .png go."),
    db: Optional[str] = DbOption,
    url: Optional[str] = UrlOption,
    data: str = typer.Option("synth", "--data", help="synth (realistic geometry), synth-hard (isotropic) or real-text "
                                                     "(real text embedded by all-MiniLM-L6-v2: laion bench data real-text)."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="real-text: the text corpus (see laion bench data real-text)."),
    rescoring: bool = typer.Option(False, "--rescoring", help="Re-rank index candidates exactly (vector_search_with_rescoring; "
                                                             "for i8 / b1)."),
    nprobe: Optional[str] = typer.Option(None, "--nprobe", help="With --gold: also measure the table's IVF index at "
                                                                "these probes (comma-separated, e.g. 4,8,16)."),
    exact: bool = typer.Option(True, "--exact/--no-exact", help="With --gold: also time exact search (a full scan "
                                                                "per query: minutes at 10M rows)."),
    json_output: bool = JsonOption,
) -> None:
    """Recall@k, latency, QPS, build speed and index size: exact and HNSW, vs numpy, faiss and usearch;
    or, with --queries FILE --gold FILE, recall@10/@30 against a published gold standard on your table.

    Example: laion bench search --rows 1000000 --configs 32:64,16:128,64:256

    Example: laion bench search --db ./sisap-db --queries public-queries-2024-laion2B-en-clip768v2-n=10k.h5
    --gold gold-standard-dbsize=300K--public-queries-2024-laion2B-en-clip768v2-n=10k.h5 --limit 1000

    Example (an IVF-indexed table): laion bench search --db ./sisap10m-db --queries public-queries-n=500.h5
    --gold gold-standard-dbsize=10000000--public-queries-n=500.h5 --nprobe 4,8,16 --no-exact
    """
    from laion_search.bench.search import DEFAULT_CONFIGS, parse_configs, run as run_bench, run_gold

    try:
        parse_configs(configs or "none")
    except ValueError:
        raise UsageError("--configs must look like 16:128,64:256") from None
    from laion_search.schema import QUANTIZATIONS

    bad = [q for q in quantization.split(",") if q.strip() not in QUANTIZATIONS]
    if bad:
        raise UsageError(f"--quantization: {bad[0]!r} is not one of {', '.join(QUANTIZATIONS)}")
    if data not in ("synth", "synth-hard", "real-text"):
        raise UsageError(f"--data must be synth, synth-hard or real-text, got {data!r}")
    n_queries = int(queries) if queries.strip().isdigit() else None
    try:
        probes = [int(x) for x in (nprobe or "").split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--nprobe must be numbers like 4,8,16, got {nprobe!r}") from None
    if any(p < 1 for p in probes):
        raise UsageError(f"--nprobe values must be at least 1, got {nprobe!r}")
    if (probes or not exact) and gold is None:
        raise UsageError("--nprobe and --no-exact go with --queries FILE --gold FILE")
    if n_queries is None or gold is not None:
        if gold is None:
            raise UsageError("--queries FILE needs --gold FILE (the gold standard for those queries)")
        if n_queries is not None:
            raise UsageError("--gold needs --queries FILE (the query vectors), not a number")
        qpath = Path(queries)
        for p in (qpath, gold):
            if not p.is_file():
                raise UsageError(f"{p}: no such file")
        with open_store(db, url, create=False) as store:
            result = run_gold(store, qpath, gold, limit=limit or None,
                              configs=None if configs in (None, "none") else configs, quantization=quantization,
                              threads=threads, metric=metric, out=out, log=None if json_output else output.err.print,
                              nprobes=probes, exact=exact)
    else:
        if n_queries < 1:
            raise UsageError("--queries must be at least 1")
        result = run_bench(rows=rows, queries=n_queries, k=k, configs=configs or DEFAULT_CONFIGS,
                           quantization=quantization, threads=threads, workdir=workdir, out=out,
                           log=None if json_output else output.err.print, data=data, corpus=corpus,
                           rescoring=rescoring, peers=peers)
    if _print_with_ratios(result, json_output) and out:
        output.out.print(f"wrote {out / 'bench-search.md'} and {out / 'bench-search.png'}")


data_app = typer.Typer(help="Datasets for benchmarks, built offline and cached.", no_args_is_help=True)
@bench_app.command("words")
@handle_errors
def bench_words(
    rows: int = typer.Option(1_000_000, "--rows", min=1000, help="Rows (captions drawn from the corpus)."),
    shards: int = typer.Option(1, "--shards", min=1, max=1000, help="Shards the rows are split into."),
    dim: int = typer.Option(16, "--dim", min=2, max=4096, help="Vector dimension (tiny: the keyword part reads none)."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="Captions: a package list (.tsv with a summary "
                                                                 "column) or text, one per line (default: $LAION_TEXT_CORPUS, "
                                                                 "else the installed packages' summaries)."),
    reps: int = typer.Option(5, "--reps", min=1, max=1000, help="Queries per case (p50 over them)."),
    ivf: bool = typer.Option(True, "--ivf/--no-ivf", help="Also build the IVF index: the filter strategies and hybrid."),
    workdir: Optional[Path] = typer.Option(None, "--dir", help="Scratch directory, reused between runs (default: temp)."),
    out: Optional[Path] = typer.Option(Path("bench-out"), "--out", help="Where bench-words.md goes."),
    json_output: bool = JsonOption,
) -> None:
    """Keyword search at scale: the caption text index's build time and bytes per row; keyword filter
    through it vs the substring scan (p50, rows read); keyword ranking; prefilter vs postfilter; hybrid
    vs vector alone.

    Example: laion bench words --rows 10000000 --shards 10 --corpus pypi.tsv --dir ./bench-words
    """
    from laion_search.bench.words import run as run_words

    result = run_words(rows=rows, shards=shards, dim=dim, corpus=corpus, reps=reps, workdir=workdir, out=out, ivf=ivf,
                       log=None if json_output else output.err.print)
    _print_bench(result, json_output, None)
    if out and not json_output:
        output.out.print(f"wrote {out / 'bench-words.md'}")


@bench_app.command("ivf")
@handle_errors
def bench_ivf(
    rows: int = typer.Option(1_000_000, "--rows", min=100, help="Rows of the shard (synth, realistic geometry)."),
    queries: int = typer.Option(100, "--queries", min=1, help="Queries per kind (image→image, text→image)."),
    k: int = typer.Option(10, "--k", min=1, max=1000, help="Neighbours per query (recall@k)."),
    nprobes: str = typer.Option("8,16,32,64", "--nprobe", help="Probes to measure, comma-separated."),
    codes: str = typer.Option(DEFAULT_IVF_CODES, "--codes", help="IVF codes to measure, comma-separated: none, sq8, int8, rabitq (the pipeline builds the default, none)."),
    lists: Optional[int] = typer.Option(None, "--lists", min=1, help="IVF lists (default: the index's own default)."),
    hnsw: bool = typer.Option(True, "--hnsw/--no-hnsw", help="Also build our HNSW (and usearch) on the same rows."),
    peers: bool = typer.Option(True, "--peers/--no-peers", help="faiss IVF-Flat / IVF-PQ (and usearch) on the same vectors."),
    parts: bool = typer.Option(True, "--parts/--no-parts", help="Also measure rows read per probe as parts multiply."),
    threads: int = typer.Option(2, "--threads", min=1, max=64, help="Client threads for the QPS columns."),
    tune_recall: Optional[float] = typer.Option(None, "--tune", min=0.01, max=1.0,
                                                help="Also run `laion index tune --recall R` on the pipeline's index and "
                                                     "measure this run's queries at the nprobe it stores."),
    data: str = typer.Option("synth", "--data", help="synth or real-text (laion bench data real-text)."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="real-text: the text corpus."),
    workdir: Optional[Path] = typer.Option(None, "--dir", help="Scratch directory, reused between runs (default: temp)."),
    out: Optional[Path] = typer.Option(Path("bench-out"), "--out", help="Where bench-ivf.md goes."),
    json_output: bool = JsonOption,
) -> None:
    """The IVF index side by side with HNSW, usearch and faiss IVF-Flat / IVF-PQ: the seconds from a shard
    on disk to its first indexed query, build seconds, RAM per vector, recall@k and p50 / QPS for
    image→image and text→image queries at each nprobe; rows read per probe as parts multiply.

    Example: laion bench ivf --rows 1000000 --nprobe 16,32,64 --codes sq8,none --tune 0.95
    """
    from laion_search.bench.ivf import run as run_ivf

    if data not in ("synth", "real-text"):
        raise UsageError(f"--data must be synth or real-text, got {data!r}")
    result = run_ivf(rows=rows, queries=queries, k=k, nprobes=nprobes, codes=codes, lists=lists, hnsw=hnsw,
                     peers=peers, threads=threads, workdir=workdir, out=out, data=data, corpus=corpus, parts=parts,
                     tune_recall=tune_recall, log=None if json_output else output.err.print)
    _print_bench(result, json_output, None)
    if out and not json_output:
        output.out.print(f"wrote {out / 'bench-ivf.md'}")


bench_app.add_typer(data_app, name="data")


@data_app.command("real-text")
@handle_errors
def bench_data_real_text(
    rows: int = typer.Option(20_000, "--rows", min=1, help="Rows (records of the corpus) to embed."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", envvar="LAION_TEXT_CORPUS", show_envvar=True,
                                          help="TSV with a header (name, …, summary…) or a text file, one summary per "
                                               "line. Default: the summaries of the installed Python distributions."),
    seed: int = typer.Option(0, "--seed", help="Which records are drawn."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write here instead of the cache (~/.cache/laion-search/real-text)."),
    json_output: bool = JsonOption,
) -> None:
    """Write a LAION-layout shard (img_emb_0.npy, text_emb_0.npy, metadata_0.parquet) of real text
    embedded by a real model (all-MiniLM-L6-v2, offline): summary → image vector, name → text vector.

    Example: laion bench data real-text --rows 20000 --corpus packages/pypi.tsv
    """
    from laion_search.bench.real_text import build

    with output.CountProgress(output.progress_mode(json_output), "embed", rows) as progress:
        path = build(rows, corpus=corpus, seed=seed, out=out, progress=lambda done, total: progress.count(done, total),
                     log=None if json_output else output.err.print)
    import json as _json

    manifest = _json.loads((path / "manifest.json").read_text())
    if json_output:
        print(output.dumps({"dir": str(path), **manifest}))
    else:
        output.out.print(f"{manifest['rows']:,} rows × {manifest['dim']} ({manifest['model']}) in {path}")


@data_app.command("sisap")
@handle_errors
def bench_data_sisap(
    out: Path = typer.Argument(..., help="Directory for the three .h5 files."),
    rows: int = typer.Option(1_000_000, "--rows", min=100, help="Database rows."),
    queries: int = typer.Option(1000, "--queries", min=1, help="Held-out queries (same distribution, not in the database)."),
    dim: int = typer.Option(768, "--dim", min=2, help="Dimension (SISAP's LAION2B: 768)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    json_output: bool = JsonOption,
) -> None:
    """Write a SISAP-layout set: database .h5 (realistic geometry), held-out queries .h5 and their gold
    standard .h5 computed by numpy — for `laion bench search --queries … --gold …` at sizes SISAP does not publish.

    Example: laion bench data sisap ./sisap3m --rows 3000000 --queries 1000
    """
    from laion_search.bench.sisap_set import build as build_sisap

    files = build_sisap(out, rows, queries=queries, dim=dim, seed=seed, log=None if json_output else output.err.print)
    if json_output:
        print(output.dumps(files))
    else:
        output.out.print(f"database {files['data']}\nqueries  {files['queries']}\ngold     {files['gold']}")


@bench_app.command("geometry")
@handle_errors
def bench_geometry(
    dirs: List[Path] = typer.Argument(..., help="Shard directories (with img_emb_0.npy and text_emb_0.npy), side by side."),
    names: Optional[str] = typer.Option(None, "--names", help="Column names, comma-separated (default: the directory names)."),
    rows: Optional[int] = typer.Option(None, "--rows", min=100, help="Use the first N rows of each."),
    sample: int = typer.Option(500, "--sample", min=10, help="Query rows for the nearest-neighbour statistics."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write geometry.md and geometry.png here."),
    json_output: bool = JsonOption,
) -> None:
    """Spectrum, anisotropy, pair cosine, nearest-neighbour distances, hubness and recall vs
    ef_search of embedding sets, side by side (docs/realistic-vectors.md).

    Example: laion bench geometry ./real-text ./synth --names real,synth --out docs/img
    """
    from laion_search.bench import geometry

    labels = names.split(",") if names else [d.name for d in dirs]
    if len(labels) != len(dirs):
        raise UsageError(f"--names has {len(labels)} names for {len(dirs)} directories")
    named = {}
    for label, d in zip(labels, dirs):
        try:
            img, txt = geometry.load(d, rows)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"{d}: {exc}") from None
        output.err.print(f"measuring {label} ({len(img):,} rows)")
        named[label] = geometry.stats(img, txt, sample=sample)
    md = geometry.markdown(named)
    if json_output:
        print(output.dumps({k: {kk: vv for kk, vv in v.items() if kk != "nn_hist"} for k, v in named.items()}))
    else:
        output.out.print(md)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "geometry.md").write_text(md + "\n")
        geometry.plot(named, out / "geometry.png")


@bench_app.command("clip")
@handle_errors
def bench_clip(
    rows: int = typer.Option(100_000, "--rows", min=100, help="Synth rows to search."),
    model: Optional[str] = typer.Option(None, "--model", help="CLIP model (default: a random-weight ViT-B/32, "
                                                              "same compute as the real one)."),
    repeat: int = typer.Option(30, "--repeat", min=3, help="Queries per measurement."),
    images: int = typer.Option(64, "--images", min=1, help="Images for the embed throughput."),
    workdir: Optional[Path] = typer.Option(None, "--dir", help="Scratch directory, reused between runs."),
    json_output: bool = JsonOption,
) -> None:
    """Text search end to end vs encode alone, pooled UDF vs in-process encoder, embed images/s.

    Example: laion bench clip --rows 1000000
    """
    from laion_search.bench.clip import run as run_bench

    result = run_bench(rows=rows, model=model, repeat=repeat, images=images, workdir=workdir,
                       log=None if json_output else output.err.print)
    print(output.dumps(result)) if json_output else output.out.print(result["markdown"])


@bench_app.command("serve")
@handle_errors
def bench_serve(
    rows: int = typer.Option(100_000, "--rows", min=100, help="Synth rows behind the server."),
    clients: int = typer.Option(16, "--clients", min=1, max=256, help="Concurrent clients."),
    seconds: float = typer.Option(30.0, "--seconds", min=1, max=600, help="How long to load the server."),
    workdir: Optional[Path] = typer.Option(None, "--dir", help="Scratch directory, reused between runs."),
    mixed: bool = typer.Option(False, "--mixed", help="Isolation: indexed latency idle, then under clients "
                                                      "sending exact scans back to back."),
    scan_clients: int = typer.Option(4, "--scan-clients", min=1, max=256, help="--mixed: exact-scan clients."),
    load: str = typer.Option("scan", "--load", help="--mixed: what the --scan-clients send back to back: scan (exact "
                                                    "searches) or sql (a statement reading every vector, /api/sql)."),
    rate: float = typer.Option(20.0, "--rate", min=0.1, max=10_000, help="--mixed: indexed searches per second "
                                                                         "(open loop)."),
    server_arg: List[str] = typer.Option([], "--server-arg", help="--mixed: pass to `laion serve` (repeatable), "
                                                                  "e.g. --server-arg=--max-scans=2."),
    kinds: str = typer.Option("indexed,exact,filtered,like", "--kinds", help="Query kinds the clients pick from at random; "
                                                              "`indexed` alone is the indexed-only load; `knn` is "
                                                              "an indexed search through /knn-service."),
    db: Optional[Path] = typer.Option(None, "--db", help="Load an existing store (it needs an index on image "
                                                         "embeddings) instead of a synth one; --rows is then ignored."),
    json_output: bool = JsonOption,
) -> None:
    """Load test of `laion serve` on 127.0.0.1: QPS, p50/p99, errors, server RSS; or, with
    --mixed, indexed-search latency while exact scans run back to back.

    Examples: laion bench serve --rows 1000000 --clients 16 --seconds 30 ·
    laion bench serve --db ./laion-db --kinds indexed --clients 16 ·
    laion bench serve --db ./laion-db --kinds indexed,knn --clients 1 ·
    laion bench serve --mixed --rows 200000 --scan-clients 4 --rate 20
    """
    from laion_search.bench.serve import KINDS, run_mixed
    from laion_search.bench.serve import run as run_bench

    picked = tuple(k.strip() for k in kinds.split(",") if k.strip())
    if set(picked) - set(KINDS) or not picked:
        raise UsageError(f"--kinds: choose from {', '.join(KINDS)} (got {kinds!r})")
    if db is not None and not db.is_dir():
        raise UsageError(f"--db {db}: no such store")
    if load not in ("scan", "sql"):
        raise UsageError(f"--load must be scan or sql, got {load!r}")
    if mixed:
        result = run_mixed(rows=rows, scan_clients=scan_clients, rate=rate, seconds=seconds, workdir=workdir,
                           server_args=tuple(server_arg), log=None if json_output else output.err.print, load=load)
    else:
        result = run_bench(rows=rows, clients=clients, seconds=seconds, workdir=workdir, kinds=picked, db=db,
                           log=None if json_output else output.err.print)
    print(output.dumps(result)) if json_output else output.out.print(result["markdown"])


@bench_app.command("download")
@handle_errors
def bench_download(
    shards: int = typer.Option(4, "--shards", min=1, max=100, help="Synth shards to serve (3 files each)."),
    rows: int = typer.Option(50_000, "--rows", min=10, help="Rows per shard (1,024 bytes per row per .npy)."),
    rate: float = typer.Option(25.0, "--rate", min=0.1, help="Throttled setting: MB/s per connection (a mirror's limit)."),
    repeat: int = typer.Option(3, "--repeat", min=1, max=10,
                               help="Rounds: the methods take turns, and each one's median is reported."),
    unthrottled: bool = typer.Option(True, "--unthrottled/--throttled-only", help="Also measure at loopback speed."),
    workdir: Optional[Path] = typer.Option(None, "--dir", help="Scratch directory, reused between runs (default: temp)."),
    out: Optional[Path] = typer.Option(Path("bench-out"), "--out", help="Where bench-download.md goes."),
    json_output: bool = JsonOption,
) -> None:
    """laion download -j 1 / -j 4 (default and --no-fsync) vs a single-stream curl (and curl + fsync) of the
    same files from a loopback server.

    Example: laion bench download --shards 4 --rows 50000 --rate 25 --repeat 3
    """
    from laion_search.bench.download import run as run_bench

    result = run_bench(shards=shards, rows=rows, rate=rate * 1e6, repeat=repeat, unthrottled=unthrottled,
                       workdir=workdir, out=out, log=None if json_output else output.err.print)
    _print_with_ratios(result, json_output)
