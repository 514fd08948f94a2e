"""``laion bench clip``: what a text query costs end to end, and the UDF path vs in-process.

In one run, with a CLIP model of ViT-B/32's exact architecture (random weights unless
``--model`` points at the real one — the compute is the same):

* **encode** — in-process ``encode_text`` of one query (p50);
* **text search** — ``search(text=…)``: encode + indexed search over ``rows`` synth rows (p50);
* **UDF** — ``SELECT encode_text('…')`` through the engine's ``executable_pool`` UDF after its
  first call (p50), and that first call (model load); the guide's ``executable`` type pays the
  load on every call;
* **embed** — images/s of ``laion embed`` on generated JPEGs.

Targets: text search ≤ 1.5× encode; pooled UDF ≤ 1.5× in-process encode.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from laion_search.bench.common import scratch_dir

QUERIES = ["a dog and a cat", "LEGO Friends set", "red sports car on a road", "sunset over the beach",
           "a bowl of salad", "city skyline at night", "vintage leather boots", "a white kitten sleeping"]


def _p50(fn: Callable[[str], Any], items: list[str], repeat: int) -> float:
    times = []
    for i in range(repeat):
        t = time.perf_counter()
        fn(items[i % len(items)])
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def run(rows: int = 100_000, model: str | None = None, repeat: int = 30, images: int = 64,
        workdir: Path | None = None, log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    from PIL import Image

    from laion_search.clip.embed import embed
    from laion_search.clip.encoders import get_encoder
    from laion_search.index import IndexSpec, create_index
    from laion_search.ingest import ingest
    from laion_search.search import search
    from laion_search.api import connect
    from laion_search.sources.synth import synth
    from laion_search.clip.tiny import make_clip_model
    from laion_search.clip.udf import install_udfs

    say = log or (lambda m: None)
    with scratch_dir(workdir, "laion-bench-clip-") as root:
        if model is None:
            model_dir = root / "vit-b-32-random"
            if not (model_dir / "config.json").exists():
                say("writing a random-weight CLIP ViT-B/32 (same architecture and compute as OpenAI's)")
                make_clip_model(model_dir, "vit-b-32")
            model = str(model_dir)
        enc = get_encoder(model)
        dim = enc.dim
        shard_dir = root / "shards"
        if not (shard_dir / "metadata_0.parquet").exists():
            say(f"synth {rows:,} rows of {dim}-d")
            synth(shard_dir, [0], rows, dim=dim, seed=9)
        db = root / "db"
        install_udfs(db / "udf", model=model)
        with connect(db) as store:
            if store.scalar("SELECT count() FROM laion") != rows:
                ingest(store, shard_dir)
            say(f"index (default: M={IndexSpec().m}, ef_construction={IndexSpec().ef_construction})")
            create_index(store, IndexSpec("image"))
            enc.encode_text(QUERIES)  # warm
            encode_ms = _p50(lambda q: enc.encode_text([q]), QUERIES, repeat)
            search(store, text=QUERIES[0], model=model, k=10)
            search_ms = _p50(lambda q: search(store, text=q, model=model, k=10), QUERIES, repeat)
            vectors = {q: enc.encode_text([q])[0] for q in QUERIES}
            index_only_ms = _p50(lambda q: search(store, vectors[q], k=10), QUERIES, repeat)
            say("UDF: first call starts the pool process and loads the model")
            t = time.perf_counter()
            store.sql("SELECT encode_text({q:String})", {"q": QUERIES[0]})
            udf_first_ms = (time.perf_counter() - t) * 1000
            udf_ms = _p50(lambda q: store.sql("SELECT encode_text({q:String})", {"q": q}), QUERIES, repeat)
        img_dir = root / "images"
        img_dir.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(images):
            p = img_dir / f"image_{i:04d}.jpg"
            if not p.exists():
                Image.fromarray(rng.integers(0, 255, (320, 480, 3), dtype=np.uint8)).save(p, quality=85)
        say(f"embed {images} images")
        import shutil

        shutil.rmtree(root / "embedded", ignore_errors=True)  # embed skips finished shards: start clean
        rep = embed(img_dir, root / "embedded", model=model, shard_size=10_000)
    result: dict[str, Any] = {
        "model": model, "rows": rows, "encode_ms": encode_ms, "text_search_ms": search_ms,
        "indexed_search_only_ms": index_only_ms, "udf_first_call_ms": udf_first_ms, "udf_pooled_ms": udf_ms,
        "embed_images_per_second": rep.images_per_second,
        "ratios": {"text_search_vs_encode": search_ms / encode_ms, "udf_pooled_vs_in_process": udf_ms / encode_ms},
    }
    result["markdown"] = "\n".join([
        f"{rows:,} rows, model {Path(model).name}, p50 of {repeat} queries",
        "",
        "| measure | ms (p50) |",
        "|---|---:|",
        f"| encode one text query, in process | {encode_ms:.1f} |",
        f"| text search end to end (encode + indexed search) | {search_ms:.1f} |",
        f"| indexed search alone | {index_only_ms:.1f} |",
        f"| `SELECT encode_text(…)` via executable_pool UDF, warm | {udf_ms:.1f} |",
        f"| first UDF call (process start + model load; paid per call by the guide's `executable`) | {udf_first_ms:.0f} |",
        "",
        f"text search / encode: **{result['ratios']['text_search_vs_encode']:.2f}×** (target ≤ 1.5×); "
        f"pooled UDF / in-process: **{result['ratios']['udf_pooled_vs_in_process']:.2f}×** (target ≤ 1.5×); "
        f"`laion embed`: **{rep.images_per_second:.1f} images/s**",
    ])
    return result
