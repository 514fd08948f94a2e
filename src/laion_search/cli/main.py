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
from laion_search.errors import LaionError, UsageError

app = typer.Typer(help="Search LAION image-text embeddings in ClickHouse: embedded chDB, or a server, "
                       "cluster or Cloud service with --url clickhouse://….",
                  no_args_is_help=True, add_completion=False, rich_markup_mode="rich")
bench_app = typer.Typer(help="Benchmarks that print ratios measured side by side in one run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

DbOption = typer.Option(None, "--db", envvar="LAION_DB", show_envvar=True,
                        help="Store directory (embedded chDB), or a ClickHouse URL. "
                             "Default: ~/.local/share/laion-search/db.")
UrlOption = typer.Option(None, "--url", envvar="LAION_URL", show_envvar=True,
                         help="ClickHouse server/cluster/Cloud instead of the embedded store: "
                              "clickhouse://user:password@host:8123/db (clickhouses://…:8443 for TLS). Wins over --db.")
JsonOption = typer.Option(False, "--json", help="Machine-readable JSON output.")
IndexOnIngestOption = typer.Option(None, "--index", help="image, text or both: declare these indexes first "
                                   "(default parameters; existing ones are kept), so each shard lands indexed.")
IndexKindOnIngestOption = typer.Option("hnsw", "--index-kind", help="The kind --index declares: hnsw (engine graph, "
                                       "in RAM) or ivf (partitioned, on disk; each shard is assigned as it lands).")
ModelOption = typer.Option(None, "--model", envvar="LAION_CLIP_MODEL", show_envvar=True,
                           help="CLIP model: a local directory or hub id, or open_clip:ARCH/PRETRAINED. Default: the "
                                "model the table records (openai/clip-vit-base-patch32 for LAION-400M, "
                                "openai/clip-vit-large-patch14 for LAION-5B / SISAP).")


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Library errors become ``error: …`` on stderr and exit 1 (2 for usage errors)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LaionError as exc:
            raise typer.Exit(report_error(exc)) from None
        except KeyboardInterrupt:
            output.err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def report_error(exc: LaionError) -> int:
    """Print a library error as its one line; returns the exit status (2 for usage errors)."""
    output.err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
    if isinstance(exc, UsageError):
        return getattr(exc, "exit_code", 2)  # ModalityError: 1
    return 1


def open_store(db: Optional[str], url: Optional[str] = None, *, create: bool, require_table: bool = True):
    """The store ``--url`` or ``--db`` names. Only the commands that load or build (ingest,
    download, init, index create) pass ``create``: the others on a path without a store fail
    with one line naming it, and leave nothing behind, instead of reading a new empty store."""
    from laion_search.errors import StoreError
    from laion_search.api import connect
    from laion_search.store import missing_store_message

    store = connect(url or db, create=create)
    if not create and require_table and not store.has_table():  # a server database without the tables
        store.close()
        raise StoreError(missing_store_message(store.location))
    return store


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
    text_index: bool = typer.Option(False, "--text-index", help="Declare the caption text index first (keyword "
                                                                "search: laion search --words), so each shard lands indexed."),
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

            load = (functools.partial(ingest_files, index=index, index_kind=check_kind(index_kind, ("hnsw", "ivf")))
                    if index else ingest_files)
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


# -- index ----------------------------------------------------------------------------------------
index_app = typer.Typer(help="HNSW vector_similarity indexes (and bf16 scan copies for fast exact search): "
                             "create, status, drop.", no_args_is_help=True)
KindOption = typer.Option("hnsw", "--kind", help="hnsw: the engine's vector_similarity graph (lowest latency, in RAM); "
                                                 "ivf: partitioned lists on disk (builds in seconds, a few bytes of RAM "
                                                 "per vector); scan: a bf16 copy of the column that halves what an "
                                                 "exact search reads; text: the caption text index for --words "
                                                 "(--column does not apply).")
app.add_typer(index_app, name="index")


@index_app.command("create")
@handle_errors
def index_create(
    column: str = typer.Option("image", "--column", help="image, text or both."),
    metric: str = typer.Option("cosine", "--metric", help="cosine or l2 (ClickHouse's HNSW index has no dot product: "
                                                          "search --metric dot scans or uses an IVF index)."),
    quantization: str = typer.Option("bf16", "--quantization", help="bf16, f16, f32, i8 or b1."),
    m: Optional[int] = typer.Option(None, "--m", help="HNSW links per node (default 32; the guide uses 64)."),
    ef_construction: Optional[int] = typer.Option(None, "--ef-construction",
                                                  help="HNSW build candidate list (default 64; 128 for more recall; the guide uses 256)."),
    guide: bool = typer.Option(False, "--guide", help="The guide's exact parameters: bf16, M=64, ef_construction=256."),
    replace: bool = typer.Option(False, "--replace", help="Replace an index that exists with other parameters "
                                                          "(IVF: build a new one; the old one serves until it is ready)."),
    kind: str = KindOption,
    lists: Optional[int] = typer.Option(None, "--lists", min=1, help="IVF: number of lists (default ~√rows, a power "
                                                                     "of two: 1,024 at 1M rows)."),
    codes: str = typer.Option("none", "--codes", help="IVF: none (float32 lists), int8 or rabitq (the engine's "
                                                      "Quantized codec: scans codes, rescores on float32)."),
    db: Optional[str] = DbOption,
    url: Optional[str] = UrlOption,
    json_output: bool = JsonOption,
) -> None:
    """Add and build (materialise) vector indexes, with progress; rerun to resume.

    Examples: laion index create --column both --guide · laion index create --kind ivf --column both ·
    laion index create --kind scan · laion index create --kind text
    """
    from laion_search.index.kinds import build, check_kind

    check_kind(kind)
    with open_store(db, url, create=True) as store:  # both columns: one compaction, the builds queued together
        results = _with_index_progress(json_output, lambda progress: build(
            store, column, kind=kind, guide=guide, metric=metric, quantization=quantization, m=m,
            ef_construction=ef_construction, replace=replace, lists=lists, codes=codes, progress=progress))
    _print_built(results, json_output)


def _print_built(results: list[dict], json_output: bool) -> None:
    if json_output:
        print(output.dumps(results))
        return
    # indexes built in one call share their time (and their vectors/s counts them all): one line each
    groups: dict[float, list[dict]] = {}
    for r in results:
        groups.setdefault(r["seconds"], []).append(r)
    for group in groups.values():
        r = group[0]
        rate = f", {r['vectors_per_second']:,.0f} vectors/s" if r["vectors_per_second"] else ""
        if r.get("bytes_per_row") is not None:
            rate += f", {output.human_bytes(r['bytes_on_disk'])} ({r['bytes_per_row']:.1f} B/row)"
        if len(group) == 1:
            output.out.print(f"{r['index']}: {r['type']} built over {r['rows']:,} rows in {r['seconds']:.1f} s{rate}")
            continue
        for x in group:
            output.out.print(f"{x['index']}: {x['type']}")
        output.out.print(f"{' and '.join(x['index'] for x in group)} built together over {r['rows']:,} rows in "
                         f"{r['seconds']:.1f} s{rate}")


def _with_index_progress(json_output: bool, run: Callable[[Callable[[dict], None]], Any]) -> Any:
    with output.IndexProgress(output.progress_mode(json_output)) as progress:
        return run(progress)


@index_app.command("status")
@handle_errors
def index_status_cmd(db: Optional[str] = DbOption, url: Optional[str] = UrlOption,
               json_output: bool = JsonOption) -> None:
    """Vector indexes: parameters, parts covered, disk size and memory estimate.

    Example: laion index status
    """

    from laion_search.index.ivf import status as ivf_status
    from laion_search.index.text import text_index_status

    with open_store(db, url, create=False) as store:
        info = store.index_status()
        ivfs = ivf_status(store)
        texts = text_index_status(store)
    if json_output:
        print(output.dumps(info + ivfs + texts))
        return
    if not info and not ivfs and not texts:
        output.out.print("no vector indexes (create one: laion index create)")
        return
    rows = [{**i, "bytes_on_disk": output.human_bytes(i["bytes_on_disk"]),
             "memory": output.human_bytes(i["memory_bytes_estimate"]),
             "covered": f"{i['parts_covered']}/{i['parts']} parts"} for i in info]
    for r in rows:
        if r.get("ef_search"):
            r["tuned"] = f"{r['ef_search']} (recall@{r['tuned_k']} {r['tuned_recall']:.3f}, p50 {r['tuned_p50_ms']:.1f} ms)"
    for i in ivfs:
        rows.append({"name": i["name"], "column": i["column"], "distance": "cosine, l2", "quantization": i["codes"],
                     "m": f"{i['lists']} lists", "ef_construction": f"{i['state']}, gen {i['generation']}",
                     "covered": f"{i['rows_covered']:,}/{i['rows']:,} rows",
                     "bytes_on_disk": output.human_bytes(i["bytes_on_disk"]),
                     "memory": output.human_bytes(i["memory_bytes_estimate"]),
                     "tuned": (f"nprobe {i['nprobe']} (recall@{i['tuned_k']} {i['tuned_recall']:.3f}, "
                               f"p50 {i['tuned_p50_ms']:.1f} ms)") if i.get("nprobe") else ""})
    for t in texts:
        rows.append({"name": t["name"], "column": t["column"], "distance": "words", "quantization": t["tokenizer"],
                     "m": "", "ef_construction": "", "covered": f"{t['parts_covered']}/{t['parts']} parts",
                     "bytes_on_disk": output.human_bytes(t["bytes_on_disk"]) + (
                         f" ({t['bytes_per_row']:.1f} B/row)" if t["bytes_per_row"] is not None else ""),
                     "memory": output.human_bytes(0), "tuned": ""})
    output.print_records(rows, ["name", "column", "distance", "quantization", "m", "ef_construction", "covered",
                                "bytes_on_disk", "memory", "tuned"])
    for i in ivfs:
        if i.get("list_rows_mean") is not None:
            output.out.print(f"{i['name']}: lists hold {i['list_rows_mean']:,.0f} rows on average, at most "
                             f"{i['list_rows_max']:,}; {i['lists_empty']} empty; {i['parts']} part(s)",
                             markup=False, highlight=False)
        if i.get("retrain"):
            output.out.print(f"{i['name']}: retrain advised: {i['retrain']}", markup=False, highlight=False)


@index_app.command("tune")
@handle_errors
def index_tune(
    recall: float = typer.Option(0.95, "--recall", min=0.01, max=1.0, help="Target recall@k."),
    column: str = typer.Option("image", "--column", help="image or text."),
    k: int = typer.Option(10, "--k", min=1, max=1000, help="Neighbours per query (recall@k)."),
    sample: int = typer.Option(200, "--sample", min=2, max=100_000,
                               help="Queries: stored vectors (left out of their own results), perturbed ones and "
                                    "the other modality's (text→image), in equal parts."),
    cross_modal: bool = typer.Option(True, "--cross-modal/--same-modality",
                                     help="Include the other modality's vectors as queries (LAION's text→image search)."),
    queries: Optional[str] = typer.Option(None, "--queries",
                                          help="The sample's mix: mixed (default), same-modality, or cross-modal "
                                               "(only the other modality's vectors: tune for a text→image workload)."),
    seed: int = typer.Option(0, "--seed", help="Which rows make the sample."),
    kind: str = typer.Option("auto", "--kind", help="auto (the column's HNSW index, else its IVF index), hnsw "
                                                    "(tunes ef_search) or ivf (tunes nprobe)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Measure only; do not store the default."),
    db: Optional[str] = DbOption,
    url: Optional[str] = UrlOption,
    json_output: bool = JsonOption,
) -> None:
    """Find the smallest ef_search (HNSW) or nprobe (IVF) whose recall@k against exact search meets
    the target at the sample's lower 95 % confidence bound (so it holds on fresh queries), and store
    it as the index's default (searches use it unless given --ef-search / --nprobe).

    Examples: laion index tune --recall 0.95 --column image · laion index tune --kind ivf --queries cross-modal
    """
    from laion_search.tune import tune

    def show(e: dict) -> None:
        if not json_output and e["event"] == "tune_step":
            output.err.print(f"{e['knob']} {e['value']}: recall@{k} {e['recall']:.3f} (lower bound "
                             f"{e['recall_lower']:.3f}), p50 {e['p50_ms']:.1f} ms")

    with open_store(db, url, create=False) as store:
        result = tune(store, column, recall=recall, k=k, sample=sample, seed=seed, save=not dry_run,
                      cross_modal=cross_modal, queries=queries, progress=show, kind=kind)
    knob = "nprobe" if result.kind == "ivf" else "ef_search"
    if json_output:
        print(output.dumps(result.as_dict()))
    elif result.met:
        where = "stored as the default" if result.stored else "not stored (--dry-run)"
        output.out.print(f"{result.index}: {knob} {result.value} reaches recall@{k} {result.recall:.3f} (lower bound "
                         f"{result.recall_lower:.3f}; target {recall:g}, {result.queries} queries), p50 "
                         f"{result.p50_ms:.1f} ms; {where}")
    else:
        output.out.print(f"{result.index}: {result.recommendation}")
    if not result.met:
        raise typer.Exit(1)


@index_app.command("drop")
@handle_errors
def index_drop(column: str = typer.Option("both", "--column", help="image, text or both."),
               kind: str = KindOption,
               db: Optional[str] = DbOption, url: Optional[str] = UrlOption,
               json_output: bool = JsonOption) -> None:
    """Drop vector indexes (or, with --kind scan, the bf16 scan copies; with --kind text, the caption text index).

    Examples: laion index drop --column text · laion index drop --kind text
    """
    from laion_search.index.kinds import drop

    with open_store(db, url, create=False) as store:
        dropped = drop(store, column, kind=kind)
    if json_output:
        print(output.dumps(dropped))
    else:
        for name, existed in dropped.items():
            output.out.print(f"{name}: {'dropped' if existed else 'did not exist'}")


# -- serve ----------------------------------------------------------------------------------------
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
    codes: str = typer.Option("none", "--codes", help="ivf: none, int8 or rabitq."),
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


# -- bench ----------------------------------------------------------------------------------------
def _print_bench(result: dict, json_output: bool, out: Optional[Path]) -> None:
    """A bench's result: JSON, or its markdown table (also written to ``out`` when given)."""
    if json_output:
        print(output.dumps(result))
    else:
        output.out.print(result["markdown"])
    if out:
        out.write_text(result["markdown"] + "\n")


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
    json_output: bool = JsonOption,
) -> None:
    """Recall@k, latency, QPS, build speed and index size: exact and HNSW, vs numpy, faiss and usearch;
    or, with --queries FILE --gold FILE, recall@10/@30 against a published gold standard on your table.

    Example: laion bench search --rows 1000000 --configs 32:64,16:128,64:256

    Example: laion bench search --db ./sisap-db --queries public-queries-2024-laion2B-en-clip768v2-n=10k.h5
    --gold gold-standard-dbsize=300K--public-queries-2024-laion2B-en-clip768v2-n=10k.h5 --limit 1000
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
                              threads=threads, metric=metric, out=out, log=None if json_output else output.err.print)
    else:
        if n_queries < 1:
            raise UsageError("--queries must be at least 1")
        result = run_bench(rows=rows, queries=n_queries, k=k, configs=configs or DEFAULT_CONFIGS,
                           quantization=quantization, threads=threads, workdir=workdir, out=out,
                           log=None if json_output else output.err.print, data=data, corpus=corpus,
                           rescoring=rescoring, peers=peers)
    if json_output:
        print(output.dumps(result))
    else:
        output.out.print(result["markdown"])
        for name, value in result["ratios"].items():
            output.out.print(f"{name}: {value:.2f}×")
        if out:
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
    codes: str = typer.Option("none", "--codes", help="IVF codes to measure, comma-separated: none, int8, rabitq."),
    lists: Optional[int] = typer.Option(None, "--lists", min=1, help="IVF lists (default: the index's own default)."),
    hnsw: bool = typer.Option(True, "--hnsw/--no-hnsw", help="Also build our HNSW (and usearch) on the same rows."),
    peers: bool = typer.Option(True, "--peers/--no-peers", help="faiss IVF-Flat / IVF-PQ (and usearch) on the same vectors."),
    parts: bool = typer.Option(True, "--parts/--no-parts", help="Also measure rows read per probe as parts multiply."),
    threads: int = typer.Option(2, "--threads", min=1, max=64, help="Client threads for the QPS columns."),
    data: str = typer.Option("synth", "--data", help="synth or real-text (laion bench data real-text)."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="real-text: the text corpus."),
    workdir: Optional[Path] = typer.Option(None, "--dir", help="Scratch directory, reused between runs (default: temp)."),
    out: Optional[Path] = typer.Option(Path("bench-out"), "--out", help="Where bench-ivf.md goes."),
    json_output: bool = JsonOption,
) -> None:
    """The IVF index side by side with HNSW, usearch and faiss IVF-Flat / IVF-PQ: the seconds from a shard
    on disk to its first indexed query, build seconds, RAM per vector, recall@k and p50 / QPS for
    image→image and text→image queries at each nprobe; rows read per probe as parts multiply.

    Example: laion bench ivf --rows 1000000 --nprobe 16,32,64 --codes none,int8
    """
    from laion_search.bench.ivf import run as run_ivf

    if data not in ("synth", "real-text"):
        raise UsageError(f"--data must be synth or real-text, got {data!r}")
    result = run_ivf(rows=rows, queries=queries, k=k, nprobes=nprobes, codes=codes, lists=lists, hnsw=hnsw,
                     peers=peers, threads=threads, workdir=workdir, out=out, data=data, corpus=corpus, parts=parts,
                     log=None if json_output else output.err.print)
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
    if json_output:
        print(output.dumps(result))
    else:
        output.out.print(result["markdown"])
        for name, value in result["ratios"].items():
            output.out.print(f"{name} vs {result['ratio_baselines'][name]}: {value:.2f}×")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
