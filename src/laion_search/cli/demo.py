"""``laion demo``: the whole path on synthetic data, end to end, in about a minute on 2 cores."""

from __future__ import annotations

import time
from pathlib import Path

from laion_search.cli import output
from laion_search.index import IndexSpec, create_index
from laion_search.ingest import ingest
from laion_search.search import Filters, search
from laion_search.schema import ID_STRIDE
from laion_search.api import connect
from laion_search.sources.synth import synth

GUIDE_QUERY = ("SELECT url, caption FROM laion "
               "ORDER BY cosineDistance(image_embedding, {target:Array(Float32)}) LIMIT 10")


def run_demo(workdir: Path, rows: int = 10_000, shards: int = 3) -> None:
    o = output.out
    workdir = Path(workdir)
    shard_dir, db = workdir / "shards", workdir / "db"
    numbers = list(range(shards))
    t0 = time.perf_counter()
    if not all((shard_dir / f"metadata_{n}.parquet").exists() for n in numbers):
        o.rule("1. synthesize LAION-format shards")
        synth(shard_dir, numbers, rows, seed=42, images=True)
        o.print(f"wrote {shards} shards × {rows:,} rows (512-d float16 img/text embeddings + metadata + a small "
                f"picture per row) to {shard_dir} in {time.perf_counter() - t0:.1f} s")
    with connect(db) as store:
        o.rule("2. ingest (streaming, atomic per shard; rerun = no-op)")
        report = ingest(store, shard_dir)
        o.print(f"loaded {len(report.loaded)} shard(s), {report.rows:,} rows in {report.seconds:.1f} s; "
                f"skipped {len(report.skipped)} already loaded → {store.scalar('SELECT count() FROM laion'):,} rows")
        o.rule("3. HNSW vector index on image_embedding")
        t = time.perf_counter()
        info = create_index(store, IndexSpec(column="image"))
        o.print(f"{info['type']} ready in {time.perf_counter() - t:.1f} s")
        row_id = 1 * ID_STRIDE + 42
        caption = store.scalar("SELECT caption FROM laion WHERE id = {id:Int64}", {"id": row_id})
        o.rule(f"4. more like row {row_id} ({caption!r})")
        res = search(store, like=row_id, k=5, columns=["NSFW"])
        output.print_records(res.rows, title=f"indexed search · {res.seconds * 1000:.1f} ms", width=60)
        exact = search(store, like=row_id, k=5, exact=True)
        overlap = len({r["id"] for r in res.rows} & {r["id"] for r in exact.rows})
        o.print(f"exact (brute force) search: {exact.seconds * 1000:.1f} ms, same top-5 ids: {overlap}/5")
        word = (caption or "a").split()[0]
        o.rule(f"5. filtered: safe mode, width ≥ 500, caption contains {word!r}")
        res = search(store, like=row_id, k=5, filters=Filters(nsfw="exclude", caption_contains=word,
                                                              where=["width>=500"]), columns=["width"])
        output.print_records(res.rows, title=f"{res.strategy} · {res.seconds * 1000:.1f} ms", width=60)
        o.rule("6. the guide's SQL, verbatim, with {target:Array(Float32)} as a query parameter")
        target = store.scalar("SELECT image_embedding FROM laion WHERE id = {id:Int64}", {"id": row_id})
        o.print(GUIDE_QUERY)
        result = store.sql(GUIDE_QUERY, {"target": target})
        output.print_records(result.to_pylist()[:5], width=60)
    o.rule("done")
    o.print(f"total {time.perf_counter() - t0:.1f} s. Try:  laion search --db {db} --like {row_id} --k 5")
    o.print(f"and the page with pictures:  laion serve --db {db} --images {shard_dir}")
