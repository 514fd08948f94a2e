"""The ``laion`` command: thin wrappers that open the store, call one library function, and
turn library errors into a one-line message and a non-zero exit."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from . import output
from .errors import LaionError, UsageError

app = typer.Typer(help="Search LAION image-text embeddings in ClickHouse (embedded chDB or a server).",
                  no_args_is_help=True, add_completion=False, rich_markup_mode="rich")
bench_app = typer.Typer(help="Benchmarks that print ratios measured side by side in one run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

DbOption = typer.Option(None, "--db", envvar="LAION_DB", show_envvar=True,
                        help="Store directory (embedded chDB). Default: ~/.local/share/laion-search/db.")
JsonOption = typer.Option(False, "--json", help="Machine-readable JSON output.")


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Library errors become ``error: …`` on stderr and exit 1 (2 for usage errors)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            output.err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
            raise typer.Exit(2) from None
        except LaionError as exc:
            output.err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            output.err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def open_store(db: Optional[str]):
    from .store import connect

    return connect(db)


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
    json_output: bool = JsonOption,
) -> None:
    """Write synthetic LAION-400M-format shards (clustered, correlated image/text vectors).

    Example: laion synth ./shards --shards 0-2 --rows 100000
    """
    from .shards import parse_shard_spec
    from .synth import synth as do_synth

    numbers = parse_shard_spec(shards) or [0]
    if layout not in ("flat", "folders"):
        raise UsageError("--layout must be 'flat' or 'folders'")
    files = _with_simple_progress("synth", rows * len(numbers), json_output,
                                  lambda cb: do_synth(out, numbers, rows, dim=dim, seed=seed, layout=layout,
                                                      pad=pad, progress=cb))
    if json_output:
        print(output.dumps({"out": str(out), "shards": numbers, "rows_per_shard": rows,
                            "files": [str(f) for f in files]}))
    else:
        output.out.print(f"wrote {len(numbers)} shard(s) × {rows:,} rows to {out}")


def _with_simple_progress(label: str, total: int, quiet: bool, run: Callable[[Callable[[int, int], None]], Any]) -> Any:
    if quiet or not output.err.is_terminal:
        return run(lambda done, tot: None)
    from rich.progress import Progress

    with Progress(console=output.err) as progress:
        task = progress.add_task(label, total=total)
        return run(lambda done, tot: progress.update(task, completed=done))


# -- ingest ---------------------------------------------------------------------------------------
@app.command()
@handle_errors
def ingest(
    directory: Path = typer.Argument(..., help="Folder with img_emb_N.npy, text_emb_N.npy, metadata_N.parquet "
                                               "(flat or in img_emb/ text_emb/ metadata/)."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Only these shards: 0-9, 3,7,12-15. Default: all found."),
    batch_rows: int = typer.Option(32768, "--batch-rows", min=1, max=1_000_000, help="Rows per insert batch (bounds memory)."),
    force: bool = typer.Option(False, "--force", help="Reload shards even when already loaded from the same files."),
    db: Optional[str] = DbOption,
    json_output: bool = JsonOption,
) -> None:
    """Stream LAION shards into the laion table: validated, atomic per shard, idempotent.

    Example: laion ingest ./shards --shards 0-9 --db ./laion-db
    """
    from .ingest import ingest as do_ingest
    from .shards import parse_shard_spec

    numbers = parse_shard_spec(shards)
    with open_store(db) as store, output.IngestProgress(output.progress_mode(json_output)) as progress:
        report = do_ingest(store, directory, numbers, batch_rows=batch_rows, force=force, progress=progress)
    if not json_output:
        line = (f"loaded {len(report.loaded)} shard(s), {report.rows:,} rows in {report.seconds:.1f} s "
                f"({report.rows_per_second:,.0f} rows/s)")
        if report.skipped:
            line += f"; skipped {len(report.skipped)} already loaded"
        if report.renormalised:
            line += f"; renormalised {report.renormalised:,} vectors"
        output.out.print(line)


# -- status ---------------------------------------------------------------------------------------
@app.command()
@handle_errors
def status(db: Optional[str] = DbOption, json_output: bool = JsonOption) -> None:
    """Show the store: rows, loaded shards, size on disk, vector indexes.

    Example: laion status --db ./laion-db
    """
    with open_store(db) as store:
        info = store.status()
    if json_output:
        print(output.dumps(info))
        return
    o = output.out
    o.print(f"store   {info['store']} ({info['backend']})")
    o.print(f"table   {info['table']}: {info['rows']:,} rows, {info['parts']} parts, "
            f"{output.human_bytes(info['bytes_on_disk'])} on disk, dim {info['dim'] or '-'}")
    if info["shards"]:
        output.print_records(info["shards"], ["shard", "rows", "state", "renormalised", "loaded_at", "source"],
                             title="shards")
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
    json_output: bool = JsonOption,
) -> None:
    """Run SQL against the store; user values go in as query parameters.

    Example: laion sql "SELECT url, caption FROM laion ORDER BY cosineDistance(image_embedding,
    {target:Array(Float32)}) LIMIT 10" --param target=@vector.json
    """
    from .vectors import parse_params

    if fmt not in ("table", "json", "jsonl", "csv", "tsv"):
        raise UsageError("--format must be table, json, jsonl, csv or tsv")
    params = parse_params(param)
    with open_store(db) as store:
        result = store.sql(query, params)
    output.print_arrow(result, "json" if json_output else fmt)


# -- demo -----------------------------------------------------------------------------------------
@app.command()
@handle_errors
def demo(
    workdir: Path = typer.Option(Path("laion-demo"), "--dir", help="Where to put the demo shards and store."),
    rows: int = typer.Option(20_000, "--rows", min=100, help="Rows per shard."),
    shards: int = typer.Option(3, "--shards", min=1, max=50, help="Number of shards."),
) -> None:
    """Synthesize a small dataset, ingest it, and run example searches.

    Example: laion demo --dir ./laion-demo
    """
    from .demo import run_demo

    run_demo(workdir, rows=rows, shards=shards)


# -- bench ----------------------------------------------------------------------------------------
@bench_app.command("ingest")
@handle_errors
def bench_ingest(
    rows: int = typer.Option(200_000, "--rows", min=1000, help="Rows of the synth shard our ingest and the native path load."),
    guide_rows: int = typer.Option(20_000, "--guide-rows", min=100,
                                   help="Rows for the guide pipeline (it is ~100× slower and needs ~41 KB RAM per row)."),
    workdir: Optional[Path] = typer.Option(None, "--dir", help="Scratch directory (default: a temp dir)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the markdown table here."),
    json_output: bool = JsonOption,
) -> None:
    """Our streaming ingest vs the guide's pandas→CSV pipeline vs the engine's native Npy insert.

    Example: laion bench ingest --rows 1000000 --guide-rows 50000
    """
    from .bench_ingest import run as run_bench

    result = run_bench(rows=rows, guide_rows=guide_rows, workdir=workdir, log=None if json_output else output.err.print)
    if json_output:
        print(output.dumps(result))
    else:
        output.out.print(result["markdown"])
    if out:
        out.write_text(result["markdown"] + "\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
