"""``laion index``: create, status, tune and drop the vector indexes (HNSW, IVF, bf16 scan
copies) and the caption text index."""

from __future__ import annotations

from typing import Any, Callable, Optional

import typer

from laion_search.cli import output
from laion_search.cli.common import DbOption, JsonOption, UrlOption, handle_errors, open_store
from laion_search.schema import DEFAULT_IVF_CODES

index_app = typer.Typer(help="HNSW vector_similarity indexes (and bf16 scan copies for fast exact search): "
                             "create, status, drop.", no_args_is_help=True)
KindOption = typer.Option("hnsw", "--kind", help="hnsw: the engine's vector_similarity graph (lowest latency, in RAM); "
                                                 "ivf: partitioned lists on disk (builds in seconds, a few bytes of RAM "
                                                 "per vector); scan: a bf16 copy of the column that halves what an "
                                                 "exact search reads; text: the caption text index for --words "
                                                 "(--column does not apply).")


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
    codes: str = typer.Option(DEFAULT_IVF_CODES, "--codes",
                              help="IVF: none (float32 lists), sq8 (int8 codes scanned first, rescored on "
                                   "float32: faster probes through pread, for lists bigger than a quarter of RAM), "
                                   "int8 or rabitq (the engine's Quantized codec)."),
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
        if i.get("result_columns") == []:
            output.out.print(f"{i['name']}: built before companions kept caption and url: its searches read them "
                             "from laion by id (a second statement); --replace rebuilds it", markup=False,
                             highlight=False)
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
