"""The ``laion`` command: thin wrappers that open the store, call one library function, and
turn library errors into a one-line message and a non-zero exit."""

from __future__ import annotations

import collections.abc
import functools
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from laion_search.cli import output
from laion_search.schema import DEFAULT_IVF_CODES
from laion_search.errors import LaionError, UsageError
# the options and helpers every command shares (importable from here as before)
from laion_search.cli.common import (DbOption, JsonOption, UrlOption, handle_errors, open_store,  # noqa: F401
                                     report_error)
from laion_search.cli.bench import (bench_app, bench_clip, bench_data_real_text, bench_data_sisap,  # noqa: F401
                                    bench_download, bench_geometry, bench_ingest, bench_ivf, bench_pipeline,
                                    bench_search, bench_serve, bench_words, data_app)
from laion_search.cli.index import (KindOption, index_app, index_create, index_drop, index_status_cmd,  # noqa: F401
                                    index_tune)

app = typer.Typer(help="Search LAION image-text embeddings in ClickHouse: embedded chDB, or a server, "
                       "cluster or Cloud service with --url clickhouse://….",
                  no_args_is_help=True, add_completion=False, rich_markup_mode="rich")
app.add_typer(bench_app, name="bench")
IndexOnIngestOption = typer.Option(None, "--index", help="image, text or both: declare these indexes first "
                                   "(default parameters; existing ones are kept), so each shard lands indexed.")
IndexKindOnIngestOption = typer.Option("hnsw", "--index-kind", help="The kind --index declares: hnsw (engine graph, "
                                       "in RAM) or ivf (partitioned, on disk; each shard is assigned as it lands).")
TextIndexOnIngestOption = typer.Option(False, "--text-index", help="Declare the caption text index first (keyword "
                                       "search: laion search --words), so each shard lands indexed.")
ModelOption = typer.Option(None, "--model", envvar="LAION_CLIP_MODEL", show_envvar=True,
                           help="CLIP model: a local directory or hub id, or open_clip:ARCH/PRETRAINED. Default: the "
                                "model the table records (openai/clip-vit-base-patch32 for LAION-400M, "
                                "openai/clip-vit-large-patch14 for LAION-5B / SISAP).")


# -- synth ----------------------------------------------------------------------------------------
@app.command()
@handle_errors
def synth(
    out: Path = typer.Argument(..., help="Directory to write the shards into."),
    shards: str = typer.Option("0", "--shards", help="Shard numbers: 0-2, 3,7,12-15."),
    rows: int = typer.Option(10_000, "--rows", min=0, help="Rows per shard."),
    dim: int = typer.Option(512, "--dim", min=2, help="Embedding dimension."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed writes the same files."),
    layout: str = typer.Option("flat", "--layout", help="flat (the guide's) or folders (img_emb/ text_emb/ metadata/)."),
    pad: int = typer.Option(0, "--pad", min=0, max=12, help="Zero-pad shard numbers to this width (4 = LAION-5B style)."),
    images: bool = typer.Option(False, "--images", help="Also draw a small picture per row (images/<shard>/<row>.jpg, "
                                                        "1-3 KB, look-alikes for near rows); url = that path. "
                                                        "Serve them with `laion serve --images OUT`."),
    hard: bool = typer.Option(False, "--hard", help="The old isotropic geometry (noise as large as the signal in every "
                                                    "dimension): far harder for HNSW than real embeddings."),
    intrinsic_dim: int = typer.Option(256, "--intrinsic-dim", min=1, help="Latent dimensions the vectors vary in (at most dim-2)."),
    decay: float = typer.Option(0.5, "--decay", min=0.0, max=10.0,
                                help="Spectrum decay: latent axis j has standard deviation ∝ j^-decay."),
    anisotropy: float = typer.Option(0.2, "--anisotropy", min=0.0, max=0.99,
                                     help="Shared offset: mean cosine of two random vectors (real CLIP: ~0.2-0.5)."),
    noise: float = typer.Option(0.3, "--noise", min=0.0, max=10.0, help="Isotropic noise norm, relative to the signal."),
    hubs: float = typer.Option(0.6, "--hubs", min=0.0, max=3.0, help="Hubness: spread of the per-row latent scale."),
    pair_cosine: float = typer.Option(0.32, "--pair-cosine", min=0.28, max=0.45,
                                      help="Mean image-text cosine of a pair (the similarity column; LAION: 0.28-0.45)."),
    json_output: bool = JsonOption,
) -> None:
    """Write synthetic LAION-400M-format shards: vectors shaped like real embeddings (low
    intrinsic dimension, decaying spectrum, shared offset, clusters, hubs) and image-text pairs at
    LAION's cosine. See docs/realistic-vectors.md.

    Example: laion synth ./shards --shards 0-2 --rows 100000 --images · laion synth ./hard --hard
    """
    from laion_search.sources.naming import parse_shard_spec
    from laion_search.sources.synth import synth as do_synth

    numbers = parse_shard_spec(shards) or [0]
    if layout not in ("flat", "folders"):
        raise UsageError("--layout must be 'flat' or 'folders'")
    with output.CountProgress(output.progress_mode(json_output), "synth", rows * len(numbers)) as progress:
        files = do_synth(out, numbers, rows, dim=dim, seed=seed, layout=layout, pad=pad, progress=progress.count,
                         images=images, geometry="hard" if hard else "realistic", intrinsic_dim=intrinsic_dim,
                         decay=decay, anisotropy=anisotropy, noise=noise, hubs=hubs, pair_cosine=pair_cosine)
    if json_output:
        print(output.dumps({"out": str(out), "shards": numbers, "rows_per_shard": rows,
                            "files": [str(f) for f in files]}))
    else:
        output.out.print(f"wrote {len(numbers)} shard(s) × {rows:,} rows to {out}"
                         + (f" (pictures in {Path(out) / 'images'})" if images else ""))


# -- ingest ---------------------------------------------------------------------------------------
@app.command()
@handle_errors
def ingest(
    source: str = typer.Argument(..., help="A folder of LAION shards (img_emb_N.npy, text_emb_N.npy, metadata_N.parquet, "
                                           "flat or in img_emb/ text_emb/ metadata/), a ClickHouse LAION-5B .parquet "
                                           "part, a SISAP .h5 file, or a folder of those."),
    fmt: str = typer.Option("auto", "--format", help="auto (detected from the content), laion, clickhouse-parquet "
                                                     "or sisap-h5."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Only these shards: 0-9, 3,7,12-15. Default: all found."),
    batch_rows: int = typer.Option(32768, "--batch-rows", min=1, max=1_000_000, help="Rows per insert batch (bounds memory)."),
    force: bool = typer.Option(False, "--force", help="Reload shards even when already loaded from the same files."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows",
                                       help="Drop rows with NaN/Inf or all-zero vectors (counted per reason) "
                                            "instead of failing their shard."),
    source_model: Optional[str] = typer.Option(None, "--model",
                                               help="The CLIP model that made the vectors, recorded for text/image "
                                                    "searches. Default: LAION's for the dimension (512: "
                                                    "openai/clip-vit-base-patch32, 768: openai/clip-vit-large-patch14)."),
    index: Optional[str] = IndexOnIngestOption,
    index_kind: str = IndexKindOnIngestOption,
    text_index: bool = TextIndexOnIngestOption,
    db: Optional[str] = DbOption,
    url: Optional[str] = UrlOption,
    json_output: bool = JsonOption,
) -> None:
    """Stream LAION data into the laion table: validated, atomic per shard or file, idempotent.

    Examples: laion ingest ./shards --shards 0-9 --db ./laion-db ·
    laion ingest laion5b_100m_part_1_of_10.parquet --db ./laion5b ·
    laion ingest laion2B-en-clip768v2-n=300K.h5 --db ./sisap ·
    laion ingest ./shards --index both --index-kind ivf
    """
    from laion_search.index.kinds import check_kind
    from laion_search.ingest import ingest_source
    from laion_search.sources.formats import check_format
    from laion_search.sources.naming import parse_shard_spec

    numbers = parse_shard_spec(shards)
    check_format(fmt)
    with open_store(db, url, create=True) as store, output.IngestProgress(output.progress_mode(json_output)) as progress:
        report = ingest_source(store, source, format=fmt, shards=numbers, batch_rows=batch_rows, force=force,
                               progress=progress, skip_bad_rows=skip_bad_rows, model=source_model, index=index,
                               index_kind=check_kind(index_kind, ("hnsw", "ivf")), text_index=text_index)
        hint = _unindexed_hint(store) if index and index_kind == "hnsw" else None
    if hint:
        output.err.print(f"hint: {hint}", markup=False, highlight=False)
    if not json_output:
        line = (f"loaded {len(report.loaded)} shard(s), {report.rows:,} rows in {report.seconds:.1f} s "
                f"({report.rows_per_second:,.0f} rows/s)")
        if report.skipped:
            line += f"; skipped {len(report.skipped)} already loaded"
        if report.renormalised:
            line += f"; renormalised {report.renormalised:,} vectors"
        if report.dropped:
            why = ", ".join(f"{reason}: {n:,}" for reason, n in sorted(report.dropped.items()))
            line += f"; dropped {sum(report.dropped.values()):,} bad rows ({why})"
        if report.text_repaired:
            line += f"; {report.text_repaired:,} rows had invalid UTF-8 text (bad bytes replaced with U+FFFD)"
        output.out.print(line, markup=False, highlight=False)


def _unindexed_hint(store: Any) -> str | None:
    """Parts loaded before the indexes were declared are not indexed by the ones that land now."""
    lacking = [i["name"] for i in store.index_status() if i.get("method") != "scan" and i["parts_covered"] < i["parts"]]
    if not lacking:
        return None
    return (f"{', '.join(lacking)}: parts loaded before the index was declared are not indexed yet; "
            "build them with `laion index create --column both`")


# -- download -------------------------------------------------------------------------------------
@app.command()
@handle_errors
def download(
    shards: Optional[str] = typer.Argument(None, help="Shard numbers: 0-9, 3,7,12-15. With --source: its parts "
                                                      "(1-3; sisap-*: data,queries,gold), default all."),
    to: Path = typer.Option(..., "--to", help="Directory to download into."),
    source: Optional[str] = typer.Option(None, "--source", help="A named source from `laion sources` "
                                                               "(laion400m, laion5b-100m, sisap-300k …)."),
    base_url: str = typer.Option(None, "--base-url", envvar="LAION_BASE_URL", show_envvar=True,
                                 help="Prefix under which img_emb/img_emb_N.npy, text_emb/text_emb_N.npy and "
                                      "metadata/metadata_N.parquet live. Default: LAION-400M's, as in the guide."),
    remote_layout: str = typer.Option("folders", "--remote-layout", envvar="LAION_REMOTE_LAYOUT",
                                      help="folders (BASE/img_emb/img_emb_N.npy, LAION's) or flat (BASE/img_emb_N.npy)."),
    layout: str = typer.Option("flat", "--layout", help="Local layout: flat (the guide's) or folders."),
    pad: int = typer.Option(0, "--pad", envvar="LAION_SHARD_PAD", min=0, max=12,
                            help="Zero-pad shard numbers in file names (4 = LAION-5B style 0000)."),
    jobs: int = typer.Option(4, "--jobs", "-j", min=1, max=64, help="Parallel transfers (one file each)."),
    tries: int = typer.Option(20, "--tries", min=1, help="Consecutive failed attempts per file before giving up "
                                                          "(an attempt that brought ≥1 MiB resets the count)."),
    retry_delay: float = typer.Option(1.0, "--retry-delay", min=0, help="First backoff in seconds (doubles, with jitter)."),
    max_retry_delay: float = typer.Option(60.0, "--max-retry-delay", min=0, help="Backoff cap in seconds."),
    connect_timeout: float = typer.Option(15.0, "--connect-timeout", min=0.01, help="Seconds to connect."),
    read_timeout: float = typer.Option(60.0, "--read-timeout", min=0.01,
                                       help="Seconds without data before a transfer is retried (stall)."),
    do_ingest: bool = typer.Option(False, "--ingest", help="Load each shard into the store as soon as it is verified."),
    delete_after_ingest: bool = typer.Option(False, "--delete-after-ingest",
                                             help="Delete a shard's files once it is loaded (and keep few on disk)."),
    batch_rows: int = typer.Option(32768, "--batch-rows", min=1, max=1_000_000, help="Rows per insert batch (--ingest)."),
    index: Optional[str] = IndexOnIngestOption,
    index_kind: str = IndexKindOnIngestOption,
    text_index: bool = TextIndexOnIngestOption,
    no_fsync: bool = typer.Option(False, "--no-fsync",
                                  help="Do not flush files to disk (faster when the network outruns the disk). "
                                       "Safe if the process is killed; after a power cut or reboot, files written "
                                       "this way are fetched again rather than trusted."),
    db: Optional[str] = DbOption,
    url: Optional[str] = UrlOption,
    json_output: bool = JsonOption,
) -> None:
    """Download LAION shards (or a named source's files): parallel, retried, resumed, verified;
    shards optionally ingested as they arrive.

    Example: laion download 0-9 --to ./shards -j 4 --ingest --db ./laion-db

    Example: laion download --source sisap-300k --to ./sisap
    """
    import contextlib

    from laion_search.sources.catalog import download_source, hint_for
    from laion_search.sources.download import DEFAULT_BASE_URL, Remote, RetryPolicy, download as do_download
    from laion_search.sources.naming import parse_shard_spec

    numbers: list[int] = []
    if source is None:
        numbers = parse_shard_spec(shards) or []
        if not numbers:
            raise UsageError("no shards given: e.g. 0-9 or 3,7,12-15 (or a named source: --source NAME)")
    if delete_after_ingest and not do_ingest:
        raise UsageError("--delete-after-ingest needs --ingest")
    if index and not do_ingest:
        raise UsageError("--index needs --ingest")
    if text_index and not do_ingest:
        raise UsageError("--text-index needs --ingest")
    if index not in (None, "image", "text", "both"):
        raise UsageError(f"--index must be image, text or both, got {index!r}")
    remote = Remote(base_url=base_url or DEFAULT_BASE_URL, remote_layout=remote_layout, layout=layout, pad=pad)
    policy = RetryPolicy(tries=tries, base_delay=retry_delay, max_delay=max_retry_delay,
                         connect_timeout=connect_timeout, read_timeout=read_timeout)
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(open_store(db, url, create=True)) if do_ingest else None
        load: Any = None
        if do_ingest:  # the store is open (chDB loaded): the ingest layer costs nothing more now
            from laion_search.index.kinds import check_kind
            from laion_search.ingest import ingest_files

            load = functools.partial(ingest_files, index=index, index_kind=check_kind(index_kind, ("hnsw", "ivf")),
                                     text_index=text_index)
        progress = stack.enter_context(output.DownloadProgress(output.progress_mode(json_output)))
        if source is not None:
            report = download_source(source, shards, to, base_url=base_url, store=store, load=load, jobs=jobs,
                                     policy=policy, progress=progress, fsync=not no_fsync,
                                     delete_after_ingest=delete_after_ingest, batch_rows=batch_rows)
        else:
            report = do_download(numbers, to, remote=remote, jobs=jobs, policy=policy, store=store, load=load,
                                 delete_after_ingest=delete_after_ingest, batch_rows=batch_rows, progress=progress,
                                 fsync=not no_fsync)
    if not json_output:
        print_download_summary(report, "shards" if source in (None, "laion400m") else "parts")
    hint = hint_for(report, base_url, source)
    if hint:
        output.err.print(f"hint: {hint}", markup=False, highlight=False)
    if not report.ok:
        raise typer.Exit(1)


def print_download_summary(report, unit: str = "shards") -> None:
    from rich.table import Table

    table = Table(title="download summary", header_style="bold")
    for col in ("", "count", "detail"):
        table.add_column(col)
    table.add_row("files downloaded", str(len(report.downloaded)),
                  f"{output.human_bytes(report.bytes)} in {report.seconds:.1f} s ({report.mb_per_s:,.1f} MB/s), "
                  f"{report.retries} retries")
    table.add_row("files skipped", str(len(report.skipped)), "already complete")
    table.add_row("files failed", str(len(report.failed)), "")
    table.add_row(f"{unit} verified", str(len(report.shards_verified)), _numbers(report.shards_verified))
    table.add_row(f"{unit} skipped", str(len(report.shards_skipped)), _numbers(report.shards_skipped))
    if report.ingested or report.ingest_skipped:
        table.add_row("shards ingested", str(len(report.ingested)), f"{report.ingested_rows:,} rows")
        table.add_row("already in store", str(len(report.ingest_skipped)), _numbers(report.ingest_skipped))
    if report.deleted:
        table.add_row("shards deleted", str(len(report.deleted)), "after ingest")
    table.add_row(f"{unit} failed", str(len(report.shards_failed)), _numbers(report.shards_failed))
    output.out.print(table)
    for f in report.failed:
        output.out.print(f"failed: shard {f['shard']} {f['file']} ({f['url']}): {f['reason']}",
                         markup=False, highlight=False)


def _numbers(ns) -> str:
    ns = list(ns)
    text = ", ".join(str(n) for n in ns[:20])
    return text + (f", … ({len(ns)})" if len(ns) > 20 else "")


# -- sources --------------------------------------------------------------------------------------
@app.command()
@handle_errors
def sources(json_output: bool = JsonOption) -> None:
    """Named sources of real LAION embeddings: rows, size, dimension, model, ids and licence.

    Example: laion sources --json
    """
    from rich.table import Table

    from laion_search.sources.catalog import list_sources

    items = list_sources()
    if json_output:
        print(output.dumps({"sources": [s.as_dict() for s in items]}))
        return
    table = Table(title="sources: laion download --source NAME \\[parts] --to DIR", header_style="bold")
    for col in ("name", "rows", "size", "dim", "model", "files", "ids"):
        table.add_column(col, overflow="fold")
    for s in items:
        files = f"{s.shards} shards × 3" if s.layout == "shards" else \
            ", ".join(sorted({f.role for f in s.files}, key=["data", "queries", "gold"].index)) + f" ({len(s.files)})"
        table.add_row(s.name, f"{s.rows:,}", ("~" if s.size_estimated else "") + output.human_bytes(s.size_bytes),
                      str(s.dim), s.model.removeprefix("OpenAI CLIP "), files, s.ids)
    output.out.print(table)
    for s in items:
        output.out.print(f"{s.name}: {s.note}. Licence: {s.licence}.", markup=False, highlight=False)


# -- status ---------------------------------------------------------------------------------------
@app.command()
@handle_errors
def status(db: Optional[str] = DbOption, url: Optional[str] = UrlOption,
               json_output: bool = JsonOption) -> None:
    """Show the store: rows, loaded shards, size on disk, vector indexes.

    Example: laion status --db ./laion-db
    """
    with open_store(db, url, create=False) as store:
        info = store.status().as_dict()
    if json_output:
        print(output.dumps(info))
        return
    o = output.out
    where = info["backend"] + (f", cluster {info['cluster']}" if info.get("cluster") else "")
    o.print(f"store   {info['store']} ({where})", markup=False, highlight=False)
    o.print(f"table   {info['table']}: {info['rows']:,} rows, {info['parts']} parts, "
            f"{output.human_bytes(info['bytes_on_disk'])} on disk, dim {info['dim'] or '-'}")
    if info.get("modalities"):
        o.print(f"embeddings {', '.join(info['modalities'])}" + (f" · model {info['model']}" if info.get("model") else ""),
                markup=False, highlight=False)
    if info["shards"]:
        cols = ["shard", "rows", "state", "renormalised"]
        cols += ["dropped"] if any(sh.get("dropped") for sh in info["shards"]) else []  # --skip-bad-rows
        if any(sh.get("format") != "laion" for sh in info["shards"]):
            cols += ["format"]
        output.print_records(info["shards"], cols + ["loaded_at", "source"], title="shards")
    else:
        o.print("shards  none loaded (try: laion ingest DIR)")
    if info["indexes"]:
        output.print_records(info["indexes"], title="vector indexes")
    else:
        o.print("indexes none")


# -- sql ------------------------------------------------------------------------------------------
@app.command()
@handle_errors
def sql(
    query: str = typer.Argument(..., help="The SQL statement (the guide's queries run verbatim)."),
    param: List[str] = typer.Option([], "--param", "-p", help="name=value, or name=@file.json / @file.npy for a vector."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, json, jsonl, csv or tsv."),
    db: Optional[str] = DbOption,
    url: Optional[str] = UrlOption,
    json_output: bool = JsonOption,
) -> None:
    """Run SQL against the store; user values go in as query parameters.

    Example: laion sql "SELECT url, caption FROM laion ORDER BY cosineDistance(image_embedding,
    {target:Array(Float32)}) LIMIT 10" --param target=@vector.json
    """
    from laion_search.sql import format_clause
    from laion_search.vectors import parse_params

    if fmt not in ("table", "json", "jsonl", "csv", "tsv"):
        raise UsageError("--format must be table, json, jsonl, csv or tsv")
    params = parse_params(param)
    clause = format_clause(query)
    if clause and (fmt != "table" or json_output):
        raise UsageError(f"the query's FORMAT {clause[1]} and --format/--json both choose the output: use one")
    with open_store(db, url, create=False) as store:
        if clause:  # the engine writes its own format (Vertical, JSON, CSVWithNames, Parquet…), as in clickhouse-client
            sys.stdout.flush()
            sys.stdout.buffer.write(store.query_raw(clause[0], params, fmt=clause[1]))
            sys.stdout.buffer.flush()
            return
        result = store.sql(query, params)
    output.print_arrow(result, "json" if json_output else fmt)


# -- search ---------------------------------------------------------------------------------------
#: How the CLI carries the query fields whose Python form it cannot: an image and a vector as files.
_CLI_FORMS = {"image": Path, "vector": Path}


def _search_options() -> list:
    """``laion search``'s options, one per :class:`~laion_search.query.SearchQuery` field: its
    flags, default, help (with its choices and bounds) and type come from the query model, so a
    field added there is an option here. ``--model`` is the option every CLIP command shares."""
    import inspect
    import typing

    from laion_search.query import SearchQuery, query_fields

    hints = typing.get_type_hints(SearchQuery)
    params = []
    for f in query_fields():
        kb = f.metadata["knob"]
        kind: Any = _CLI_FORMS.get(f.name) or hints[f.name]
        if typing.get_origin(kind) is collections.abc.Sequence:
            kind = List[typing.get_args(kind)[0]]  # type: ignore[misc]
        elif typing.get_origin(kind) in (typing.Union, types.UnionType) and f.name not in _CLI_FORMS:
            kind = Optional[next(a for a in typing.get_args(kind) if a is not type(None))]
        if f.name in _CLI_FORMS:
            kind = Optional[kind]
        help_text = kb.help
        if kb.choices is not None and f.name != "columns":
            help_text += f" One of: {', '.join(kb.choices)}."
        elif kb.choices is not None:
            help_text += f" Of: {', '.join(kb.choices)}."
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        if f.name == "model":
            option = ModelOption
        else:
            flags = kb.flags or ("--" + f.name.replace("_", "-"),)
            help_text = _with_bounds(help_text, kb.ge, kb.le)
            # the bounds are checked by the library (one message for every face): the CLI shows them
            option = typer.Option(default, *flags, help=help_text)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
    for name, option, kind in (("db", DbOption, Optional[str]), ("url", UrlOption, Optional[str]),
                               ("json_output", JsonOption, bool)):
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
    return params


def _with_bounds(text: str, ge: float | None, le: float | None) -> str:
    """``Number of results.`` → ``Number of results (1-1000).`` (ids' full Int64 range is not shown)."""
    if (ge is None and le is None) or (le is not None and le > 2**40):
        return text
    span = f"{ge:g}-{le:g}" if ge is not None and le is not None else f"≥ {ge:g}" if ge is not None else f"≤ {le:g}"
    return f"{text[:-1]} ({span})." if text.endswith(".") else f"{text} ({span})"


def _search_command(**fields: Any) -> None:
    """Nearest neighbours by text, image, vector or an existing row, exact or through an index
    (HNSW, IVF); caption keywords (--words) as a filter, a ranking of their own, or fused with the
    vector ranking (--hybrid).

    Examples: laion search --text "a dog and a cat" --k 5 --nsfw exclude --where "width>=400" ·
    laion search --words "red vintage car" --words-mode all · laion search --text "a red car" --words vintage --hybrid
    """
    from laion_search.query import SearchQuery
    from laion_search.search import search as do_search
    from laion_search.vectors import load_vector_file

    db, url, json_output = fields.pop("db"), fields.pop("url"), fields.pop("json_output")
    if fields["vector"] is not None:
        fields["vector"] = load_vector_file(fields["vector"])
    query = SearchQuery(**fields).check()  # before the engine starts: a bad option fails at once
    with open_store(db, url, create=False) as store:
        result = do_search(store, query=query)
    print_search(result, json_output)


def _with_signature(fn: Callable[..., Any], params: list) -> Callable[..., Any]:
    import inspect

    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return fn


search = app.command("search")(handle_errors(_with_signature(_search_command, _search_options())))


def print_search(result, json_output: bool) -> None:
    if json_output:
        print(output.dumps(result.as_dict()))
        return
    what = "caption words" if result.metric == "words" else f"{result.modality} embeddings"
    rows, columns = result.rows, None
    if rows and "found_by" in rows[0]:
        # hybrid: which side found each row and its standing there, in a table that fits (--json has all)
        rows = [{**r, "distance": "" if r["distance"] is None else f"{r['distance']:.4f}",
                 "words": "" if r["words_score"] is None else f"{r['words_score']:.2f}"} for r in rows]
        columns = ["rank", "found_by", "distance", "words"] + [c for c in rows[0] if c not in (
            "rank", "found_by", "distance", "words", "words_score", "rrf_score", "vector_rank", "words_rank")]
    output.print_records(rows, columns, title=f"{len(result.rows)} results · {what} · "
                                              f"{result.strategy} · {result.seconds * 1000:.1f} ms", width=70)


app.add_typer(index_app, name="index")


@app.command()
@handle_errors
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (127.0.0.1 = this machine only)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    token: Optional[str] = typer.Option(None, "--token", envvar="LAION_TOKEN", show_envvar=True,
                                        help="Require 'Authorization: Bearer TOKEN' on everything but /health."),
    model: Optional[str] = ModelOption,
    allow_sql: bool = typer.Option(False, "--allow-sql", help="Enable POST /api/sql (single read-only SELECTs)."),
    allow_image_url: bool = typer.Option(False, "--allow-image-url",
                                         help="Let /knn-service fetch image_url (10 MB, 5 s limits). Off: SSRF risk."),
    cors_origin: List[str] = typer.Option([], "--cors-origin", help="Allow this browser origin (CORS is off by default)."),
    query_timeout: float = typer.Option(30.0, "--query-timeout", min=0.1, max=3600, help="Seconds any query may run."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder that relative picture URLs resolve against "
                                                                 "(e.g. the shard folder of `laion synth --images`); "
                                                                 "served same-origin at /local/."),
    cache_size: int = typer.Option(256, "--cache-size", min=0, max=1_000_000,
                                   help="Results of identical requests kept (LRU; 0 = off)."),
    max_scans: Optional[int] = typer.Option(None, "--max-scans", min=1, max=1024,
                                            help="Exact scans run at once (default: a quarter of the cores, ≥ 1)."),
    scan_queue: int = typer.Option(8, "--scan-queue", min=0, max=10_000,
                                   help="Exact scans that may wait; beyond that: 429 + Retry-After."),
    scan_threads: Optional[int] = typer.Option(None, "--scan-threads", min=1, max=1024,
                                               help="Engine threads per exact scan (default: half the cores)."),
    scan_nice: int = typer.Option(19, "--scan-nice", min=0, max=19,
                                  help="Linux nice of exact scans' engine threads, so that indexed searches get "
                                       "the cores first (ClickHouse's os_thread_priority; needs CAP_SYS_NICE, "
                                       "else ignored; 0 = off)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info or warning."),
    db: Optional[str] = DbOption,
    url: Optional[str] = UrlOption,
) -> None:
    """HTTP API + web page at http://HOST:PORT/ (OpenAPI docs at /docs); speaks clip-retrieval's /knn-service.

    The CLIP model is checked once at start-up; without one, text and image search answer 503
    with the fix while vector and "more like this" search keep working. SIGTERM refuses queued
    queries, cancels running ones (their requests answer 503) and exits within a few seconds.

    Example: laion serve --port 8000 --db ./laion-db --images ./shards
    """
    import logging

    from laion_search.web.app import bind_listeners
    from laion_search.web.app import serve as run_server

    if log_level.lower() not in ("debug", "info", "warning"):
        raise UsageError("--log-level must be debug, info or warning")
    if images is not None and not images.is_dir():
        raise UsageError(f"--images {images}: no such folder")
    web_log = logging.getLogger("laion_search.web")
    web_log.setLevel(log_level.upper())
    if not web_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        web_log.addHandler(handler)
    # the port first: a taken one is one line and exit 1, before the engine starts (an engine
    # torn down at interpreter exit while the server's start-up threads still use it segfaults)
    sockets = bind_listeners(host, port)
    code = 0
    try:
        with open_store(db, url, create=False) as store:
            output.err.print(f"serving {store.location} on http://{host}:{port}/  (API docs: /docs)")
            run_server(store, host=host, port=port, sockets=sockets, token=token, model=model, allow_sql=allow_sql,
                       allow_image_url=allow_image_url, cors_origins=cors_origin or None,
                       query_timeout=query_timeout, image_root=images, cache_size=cache_size, max_scans=max_scans,
                       scan_queue=scan_queue, scan_threads=scan_threads, scan_nice=scan_nice)
    except LaionError as exc:
        code = report_error(exc)
    except SystemExit as exc:  # uvicorn's own way out when it cannot start
        code = exc.code if isinstance(exc.code, int) else 1
    # Every way out once the store was opened ends here. The store is closed and the server wrote
    # nothing that is not already on disk (it only reads). chDB's engine-wide teardown at
    # interpreter exit takes ~4 s more on its own, and crashes when the server's background
    # threads (the CLIP check, the index preload) are still in the engine: skip it, so that
    # SIGTERM → exit stays well within 5 s and no way out ends in a segfault.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -- embed --------------------------------------------------------------------------------------
@app.command()
@handle_errors
def embed(
    images: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    out: Path = typer.Argument(..., help="Where to write LAION-format shards."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="CSV with path,caption columns (paths relative "
                                                                      "to the folder). Default: captions from file names."),
    from_filenames: bool = typer.Option(False, "--from-filenames", help="Captions from file names (the default)."),
    model: Optional[str] = ModelOption,
    shard_size: int = typer.Option(10_000, "--shard-size", min=1, help="Images per shard."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, max=1024, help="Images per encoder batch."),
    json_output: bool = JsonOption,
) -> None:
    """Embed your own images with CLIP into LAION-format shards (resumable), ready for `laion ingest`.

    Example: laion embed ./photos ./photo-shards --captions captions.csv && laion ingest ./photo-shards
    """
    from laion_search.clip.embed import embed as do_embed

    if captions and from_filenames:
        raise UsageError("use either --captions or --from-filenames")
    with output.EmbedProgress(output.progress_mode(json_output)) as progress:
        report = do_embed(images, out, captions=str(captions) if captions else None, model=model,
                          shard_size=shard_size, batch_size=batch_size, progress=progress)
    if not json_output:
        output.out.print(f"embedded {report.images:,} images in {report.seconds:.1f} s "
                         f"({report.images_per_second:.1f} images/s) → {out}; shards written {report.shards_written}, "
                         f"skipped {report.shards_skipped}")
        for path, why in report.failed:
            output.err.print(f"skipped {path}: {why}")


# -- udf ----------------------------------------------------------------------------------------
udf_app = typer.Typer(help="The guide's encode_text / encode_image SQL functions (ClickHouse executable UDFs).",
                      no_args_is_help=True)
app.add_typer(udf_app, name="udf")


@udf_app.command("install")
@handle_errors
def udf_install(
    directory: Optional[Path] = typer.Option(None, "--dir", help="Write here (a server's user_scripts/). "
                                                                 "Default: into the embedded store (<db>/udf)."),
    model: Optional[str] = ModelOption,
    python: Optional[str] = typer.Option(None, "--python", help="Interpreter for the scripts (default: this one)."),
    pool_size: int = typer.Option(1, "--pool-size", min=1, max=64, help="Processes ClickHouse keeps per function."),
    db: Optional[str] = DbOption,
    url: Optional[str] = UrlOption,
    json_output: bool = JsonOption,
) -> None:
    """Write encode_text.py / encode_image.py and their *_function.xml (executable_pool).

    Example: laion udf install --model ./clip-b32 && laion sql "SELECT encode_text('a cat')"
    """
    from laion_search.backends import is_url
    from laion_search.store import UDF_DIR, default_db_path
    from laion_search.clip.udf import install_udfs, server_instructions

    server = url or (db if db and is_url(db) else None)
    if server and not directory:
        raise UsageError("on a ClickHouse server the UDF files must be copied into the server's config: "
                         "write them with --dir DIR, then follow the printed steps")
    target = directory or (Path(db) if db else default_db_path()) / UDF_DIR
    loaded: list[str] | None = None
    chosen, why = model, "--model"
    if not model:
        # the model that fits the table, resolved as searches resolve it (the store's shards)
        from laion_search.api import connect
        from laion_search.search import table_model

        try:
            with connect(server or db or default_db_path(), create=False) as store:
                chosen, why = table_model(store), "the table"
        except LaionError as exc:
            if server:
                raise
            chosen, why = None, f"default: the store could not be read ({exc})"
    files = install_udfs(target, python=python, model=chosen, pool_size=pool_size)
    if server:
        from laion_search.api import connect

        with connect(server) as store:
            loaded = sorted(r["name"] for r in store.rows(
                "SELECT name FROM system.functions WHERE name IN ('encode_text', 'encode_image')"))
    if json_output:
        info: dict[str, Any] = {"dir": str(target), "files": [str(f) for f in files], "model": chosen,
                                "model_from": why}
        if server:
            info.update(server_loaded=loaded, instructions=server_instructions(target))
        print(output.dumps(info))
        return
    for f in files:
        output.out.print(f"wrote {f}")
    output.out.print(f"model: {chosen or 'the default'} ({why})", markup=False, highlight=False)
    if server:
        output.out.print(server_instructions(target), markup=False, highlight=False)
        output.out.print(f"functions loaded on the server now: {', '.join(loaded) if loaded else 'none yet'}")
    elif directory:
        output.out.print("Copy the .py files to the server's user_scripts/ and the .xml files to the path in "
                         "<user_defined_executable_functions_config>, then SYSTEM RELOAD FUNCTIONS.")
    else:
        output.out.print("The embedded store loads them when it opens: laion sql \"SELECT encode_text('a cat')\"")


# -- init / plan (server and cluster) -----------------------------------------------------------
@app.command()
@handle_errors
def init(
    cluster: Optional[str] = typer.Option(None, "--cluster", help="ClickHouse cluster name (remote_servers): create "
                                                                 "laion_local ON CLUSTER + a Distributed laion table."),
    shards_by: str = typer.Option("modulo", "--shards-by", help="Cluster sharding key: modulo (LAION shard s → cluster "
                                                                "shard s % N) or hash (cityHash64(shard))."),
    replicated: bool = typer.Option(False, "--replicated", help="ReplicatedMergeTree local tables (needs Keeper and "
                                                                "{shard}/{replica} macros)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the statements, run nothing."),
    db: Optional[str] = DbOption,
    url: Optional[str] = UrlOption,
    json_output: bool = JsonOption,
) -> None:
    """Create the laion tables (idempotent): in a store, on a server, or across a cluster.

    Example: laion init --url clickhouse://default:@ch1:8123/default --cluster laion --replicated
    """
    from laion_search.backends import is_url, parse_url
    from laion_search.backends.cluster import ClusterLayout
    from laion_search.schema import SHARDS_DDL, SHARDS_TABLE, TABLE, TABLE_DDL

    target = url or db
    if cluster is None:
        if dry_run:
            from laion_search.store import init_statements

            statements = init_statements()
        else:
            with open_store(db, url, create=True) as store:
                statements = [f"(tables exist in {store.location})"]
    else:
        if not dry_run and not (target and is_url(str(target))):
            raise UsageError("--cluster needs a ClickHouse server: pass --url clickhouse://… (or $LAION_URL)")
        database = parse_url(str(target))["database"] if target and is_url(str(target)) else "default"
        layout = ClusterLayout(cluster, database, shards_by, replicated)
        statements = layout.init_statements(TABLE_DDL, SHARDS_DDL, TABLE, SHARDS_TABLE)
        if not dry_run:
            with open_store(None, str(target), create=False, require_table=False) as store:
                store.init_cluster(layout)
    if json_output:
        print(output.dumps({"cluster": cluster, "dry_run": dry_run, "statements": statements}))
        return
    for stmt in statements:
        output.out.print(stmt + (";" if dry_run else ""), markup=False, highlight=False)
    if not dry_run:
        output.out.print(f"ready{' on cluster ' + cluster if cluster else ''}", markup=False)


@app.command()
@handle_errors
def plan(
    rows: str = typer.Option("400M", "--rows", help="Rows: 400M (LAION-400M), 5.85B (LAION-5B), 2.3B (LAION-2B-en)."),
    nodes: int = typer.Option(3, "--nodes", min=1, help="Nodes you have (or plan) for the cluster."),
    dim: int = typer.Option(512, "--dim", min=2, help="Embedding dimension (512 ViT-B/32, 768 ViT-L/14)."),
    cores: int = typer.Option(32, "--cores", min=1, help="CPU cores per node."),
    ram: float = typer.Option(256, "--ram-gib", help="RAM per node, GiB."),
    disk: float = typer.Option(8, "--disk-tib", help="Disk per node, TiB."),
    storage: str = typer.Option("f32-none", "--storage", help="f32-none (ours), f32-lz4 (the guide's) or bf16."),
    quantization: str = typer.Option("bf16", "--quantization", help="Index quantization: bf16, f16, f32, i8 or b1."),
    m: int = typer.Option(32, "--m", min=2, help="HNSW M (ours: 32; the guide: 64)."),
    ef_construction: int = typer.Option(64, "--ef-construction", min=1,
                                        help="HNSW ef_construction (ours: 64; the guide: 256)."),
    indexes: int = typer.Option(2, "--indexes", min=0, max=2, help="Indexed columns: 2 (image and text), 1, 0."),
    replicas: Optional[int] = typer.Option(None, "--replicas", min=1, help="Replicas per shard (default: suggested)."),
    kind: str = typer.Option("hnsw", "--kind", help="hnsw (graphs in RAM; a cluster when they outgrow a node) or ivf "
                                                    "(one node: lists on disk, centroids in RAM)."),
    codes: str = typer.Option(DEFAULT_IVF_CODES, "--codes", help="ivf: none, sq8, int8 or rabitq."),
    lists: Optional[int] = typer.Option(None, "--lists", min=1, help="ivf: lists (default: the index default for the rows)."),
    nprobe: int = typer.Option(32, "--nprobe", min=1, help="ivf: lists a query probes."),
    json_output: bool = JsonOption,
) -> None:
    """Capacity plan from measured figures: disk, RAM, index build and ingest time, shards × replicas
    (HNSW), or one node's RAM, disk, build time and bytes read per query (IVF).

    Example: laion plan --rows 400M --nodes 7 ; laion plan --rows 5.85B --dim 768 --nodes 64 --ram-gib 512 ;
    laion plan --kind ivf --rows 400M --ram-gib 64
    """
    from laion_search.plan import IvfPlanInputs, PlanInputs, markdown, markdown_ivf, parse_count, plan_ivf
    from laion_search.plan import plan as do_plan

    if kind == "ivf":
        r = plan_ivf(IvfPlanInputs(rows=parse_count(rows), dim=dim, cores=cores, ram_gib=ram, disk_tib=disk,
                                   codes=codes, lists=lists, nprobe=nprobe, columns=max(1, indexes)))
        if json_output:
            print(output.dumps(r))
        else:
            output.out.print(markdown_ivf(r), markup=False, highlight=False)
        return
    if kind != "hnsw":
        raise UsageError(f"--kind must be hnsw or ivf, got {kind!r}")

    result = do_plan(PlanInputs(rows=parse_count(rows), dim=dim, nodes=nodes, cores=cores, ram_gib=ram,
                                disk_tib=disk, storage=storage, quantization=quantization, m=m,
                                ef_construction=ef_construction, indexes=indexes, replicas=replicas))
    if json_output:
        print(output.dumps(result))
    else:
        output.out.print(markdown(result), markup=False, highlight=False)


# -- demo -----------------------------------------------------------------------------------------
@app.command()
@handle_errors
def demo(
    workdir: Path = typer.Option(Path("laion-demo"), "--dir", help="Where to put the demo shards and store."),
    rows: int = typer.Option(10_000, "--rows", min=100, help="Rows per shard."),
    shards: int = typer.Option(3, "--shards", min=1, max=50, help="Number of shards."),
) -> None:
    """Synthesize a small dataset, ingest it, and run example searches.

    Example: laion demo --dir ./laion-demo
    """
    from laion_search.cli.demo import run_demo

    run_demo(workdir, rows=rows, shards=shards)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
