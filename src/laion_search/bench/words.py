"""``laion bench words``: keyword search through the caption text index at scale.

Captions are real human-written text — the summaries of a package list (``--corpus``, e.g. the
``pypi.tsv`` that this project's machines carry; see :mod:`laion_search.bench.real_text`), one
summary per row drawn at random — so words have the frequencies of real prose (a few very common,
most rare). Vectors are tiny (``--dim``, default 16, synth's realistic geometry): the keyword part
does not read them, and the vector side's figures are relative (hybrid vs vector alone, same rows).

Measured, side by side in one run, over the same rows:

* index build: ``MATERIALIZE INDEX`` seconds over the loaded table, and bytes per row on disk;
* keyword filter with the text index vs the substring scan (``caption_contains``), each as the
  filter of an exact vector search (k 10): p50 and rows read (``system.query_log``);
* keyword ranking alone (``--words``, any / all): p50 and rows read;
* the keyword filter on the IVF path, prefilter vs postfilter (``filter_strategy``);
* hybrid (RRF of the keyword and IVF vector rankings) p50 vs the IVF vector search alone.

The query words are taken from the captions in three frequency bands (rare ≈ 1 row in 100,000,
medium ≈ 1 in 1,000, common ≈ 1 in 30), plus "watercolor".
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_search.bench.common import scratch_dir

Log = Callable[[str], Any]


def _captions(corpus: str | os.PathLike[str] | None) -> list[str]:
    from laion_search.bench.real_text import read_corpus

    return [s for _, s in read_corpus(corpus)]


def build_shards(root: Path, rows: int, shards: int, dim: int, corpus: Any, log: Log) -> Path:
    """LAION-layout shards (synth vectors) whose captions are corpus summaries; written once."""
    from laion_search.sources.synth import synth

    out = root / f"words-{rows}-{shards}-{dim}"
    done = out / "DONE"
    if done.exists():
        return out
    summaries = np.array(_captions(corpus), dtype=object)
    log(f"corpus: {len(summaries):,} summaries")
    per = rows // shards
    for s in range(shards):
        log(f"shard {s}: {per:,} rows")
        synth(out, [s], per, dim=dim, seed=s)
        path = out / f"metadata_{s}.parquet"
        meta = pq.read_table(path)
        rng = np.random.default_rng(s)
        caps = pa.array(summaries[rng.integers(0, len(summaries), per)].tolist(), pa.string())
        meta = meta.set_column(meta.schema.get_field_index("caption"), "caption", caps)
        pq.write_table(meta, path)
    done.write_text("ok")
    return out


def pick_words(captions: list[str], rows: int, seed: int = 0) -> dict[str, list[str]]:
    """Query words by document frequency among ``captions`` (a sample of the rows): per band, up to 10."""
    from laion_search.index.text import tokenize

    df: collections.Counter[str] = collections.Counter()
    for c in captions:
        df.update(set(tokenize(c)))
    n = len(captions)
    rng = np.random.default_rng(seed)
    bands = {"rare": (0.5e-5, 2e-5), "medium": (0.5e-3, 2e-3), "common": (1 / 60, 1 / 15)}
    out: dict[str, list[str]] = {}
    for band, (lo, hi) in bands.items():
        words = sorted(w for w, f in df.items() if lo <= f / n <= hi and w.isalpha() and len(w) > 2)
        rng.shuffle(words)
        out[band] = words[:10]
    out["watercolor"] = ["watercolor"]
    return out


def _p50(xs: list[float]) -> float:
    return statistics.median(xs) * 1000 if xs else float("nan")


def run(*, rows: int = 1_000_000, shards: int = 1, dim: int = 16, corpus: Any = None, reps: int = 3,
        workdir: str | os.PathLike[str] | None = None, out: Path | None = None, ivf: bool = True,
        log: Log | None = None) -> dict[str, Any]:
    from laion_search import connect
    from laion_search.index.ivf import create_ivf
    from laion_search.index.text import create_text_index, text_index_status
    from laion_search.search import search

    say = log or (lambda m: None)
    result: dict[str, Any] = {"rows": rows, "dim": dim, "shards": shards}
    with scratch_dir(workdir, "laion-bench-words-") as root:
        shard_dir = build_shards(root, rows, shards, dim, corpus, say)
        db_path = root / f"db-{rows}-{shards}-{dim}"
        with connect(db_path) as db:
            if sum(db.partition_rows().values()) < rows - shards:
                t0 = time.perf_counter()
                db.ingest(shard_dir)
                result["ingest_seconds"] = time.perf_counter() - t0
                say(f"ingest: {result['ingest_seconds']:.1f} s")
            if not text_index_status(db) or text_index_status(db)[0]["parts_covered"] < text_index_status(db)[0]["parts"]:
                built = create_text_index(db)
                result["build_seconds"] = built["seconds"]
                say(f"text index build: {built['seconds']:.1f} s")
            # a rerun over the same scratch store reports the build figures measured when it was built
            figures = db_path.parent / f"{db_path.name}.build.json"
            if "build_seconds" in result:
                figures.write_text(json.dumps({k: result[k] for k in ("ingest_seconds", "build_seconds") if k in result}))
            elif figures.exists():
                result.update(json.loads(figures.read_text()))
            st = text_index_status(db)[0]
            result["index_bytes"] = st["bytes_on_disk"]
            result["index_bytes_per_row"] = st["bytes_per_row"]
            result["caption_bytes_per_row"] = (db.scalar(
                "SELECT sum(column_data_compressed_bytes) FROM system.parts_columns WHERE database = currentDatabase() "
                "AND table = 'laion' AND active AND column = 'caption'") or 0) / max(1, st["rows"])
            if ivf and not db.rows("SELECT 1 FROM system.tables WHERE database = currentDatabase() AND "
                                   "name LIKE 'laion_ivf_%' AND name != 'laion_ivf' LIMIT 1"):
                t0 = time.perf_counter()
                create_ivf(db, ["image"])
                result["ivf_build_seconds"] = time.perf_counter() - t0
                say(f"ivf build: {result['ivf_build_seconds']:.1f} s")
            # every case is measured cold: the engine's query condition cache would otherwise remember
            # which granules an earlier case's filter ruled out (a rare word's substring scan of 10M rows
            # then reads 59K rows in 14 ms), and the cases below repeat the same words
            db.set_session("use_query_condition_cache", 0)
            sample = [r["caption"] for r in db.rows("SELECT caption FROM laion WHERE cityHash64(id) % 20 = 0 "
                                                    "LIMIT 200000")]
            bands = pick_words(sample, rows)
            result["words"] = bands
            rng = np.random.default_rng(1)
            qv = [rng.standard_normal(dim).astype(np.float32) for _ in range(reps)]

            def measure(label: str, band: str, fn: Callable[[int], Any]) -> dict[str, Any]:
                times: list[float] = []
                read: list[int] = []
                for i in range(reps):
                    t0 = time.perf_counter()
                    res = fn(i)
                    times.append(time.perf_counter() - t0)
                    n = _rows_read(db, res)
                    if n is not None:
                        read.append(n)
                row = {"case": label, "band": band, "p50_ms": _p50(times),
                       "rows_read": int(statistics.median(read)) if read else None,
                       "results": len(res)}
                say(f"{label} [{band}]: p50 {row['p50_ms']:.1f} ms, rows read {row['rows_read']}")
                return row

            table = []
            for band, words in bands.items():
                if not words:
                    continue
                ws = words

                def pick(i: int, ws: list[str] = ws) -> str:
                    return ws[i % len(ws)]

                table.append(measure("exact + words filter (text index)", band,
                                     lambda i: search(db, vector=qv[i], k=10, exact=True, words=pick(i))))
                table.append(measure("exact + caption_contains (substring scan)", band,
                                     lambda i: search(db, vector=qv[i], k=10, exact=True, caption_contains=pick(i))))
                table.append(measure("words alone, ranked (any)", band,
                                     lambda i: search(db, words=pick(i), k=10)))
                if ivf:
                    table.append(measure("ivf + words, postfilter→prefilter (auto)", band,
                                         lambda i: search(db, vector=qv[i], k=10, words=pick(i))))
                    table.append(measure("ivf + words, prefilter", band,
                                         lambda i: search(db, vector=qv[i], k=10, words=pick(i),
                                                          filter_strategy="prefilter")))
                    table.append(measure("ivf vector alone", band, lambda i: search(db, vector=qv[i], k=10)))
                    table.append(measure("hybrid rrf (ivf + words)", band,
                                         lambda i: search(db, vector=qv[i], k=10, words=pick(i), hybrid=True)))
            two = [w for w in bands.get("medium", [])[:2]]
            if len(two) == 2:
                table.append(measure("words alone, ranked (all, 2 medium words)", "medium×2",
                                     lambda i: search(db, words=" ".join(two), words_mode="all", k=10)))
            result["table"] = table
    result["markdown"] = markdown(result)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-words.md").write_text(result["markdown"])
    return result


def _rows_read(db: Any, res: Any) -> int | None:
    """Rows the search's statement read, as the engine's progress counts them (chDB has no
    query_log): the statement is run again, its result's ``rows_read()`` kept. Searches made of
    several statements (IVF, hybrid) are left blank."""
    if res.sql.startswith("--"):
        return None
    return db.rows_read(res.sql, res.params)


def markdown(r: dict[str, Any]) -> str:
    lines = [f"{r['rows']:,} rows, captions from a real package-summary corpus, {r['dim']}-d vectors; "
             f"text index {r['index_bytes_per_row']:.1f} B/row (captions: {r['caption_bytes_per_row']:.1f} B/row)"
             + (f", built in {r['build_seconds']:.1f} s" if "build_seconds" in r else ""), "",
             "| case | words | p50 ms | rows read | results |", "|---|---|---:|---:|---:|"]
    for t in r["table"]:
        rr = f"{t['rows_read']:,}" if t["rows_read"] is not None else "—"
        lines.append(f"| {t['case']} | {t['band']} | {t['p50_ms']:.1f} | {rr} | {t['results']} |")
    lines.append("")
    lines.append("words: " + "; ".join(f"{b}: {', '.join(ws[:5])}" for b, ws in r["words"].items()))
    return "\n".join(lines) + "\n"
