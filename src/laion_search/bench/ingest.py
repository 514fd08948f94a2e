"""``laion bench ingest``: three ways to load the same LAION shard, measured in one run.

* **ours** — :func:`laion_search.ingest` (streaming Arrow batches, staging + atomic swap);
* **native** — the engine reading the files itself: ``INSERT INTO laion SELECT … FROM
  file('img_emb_0.npy', Npy) PASTE JOIN file('text_emb_0.npy', Npy) PASTE JOIN
  file('metadata_0.parquet')`` (no validation, no atomicity: the speed reference);
* **guide** — the guide's ``process.py`` as published (pandas merge → ``tolist()`` → CSV), then
  ``INSERT INTO laion FROM INFILE`` into the guide's table.

Each runs in its own process (so peak RSS is its own, read from ``getrusage``) on files that
are already in the page cache. The guide pipeline runs on a smaller shard (it needs ~41 KB of
RAM per row); rows/s is what is compared.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from laion_search.bench.common import scratch_dir

GUIDE_DDL = """
CREATE TABLE laion
(
    `id` Int64,
    `url` String,
    `caption` String,
    `NSFW` String,
    `similarity` Float32,
    `image_embedding` Array(Float32),
    `text_embedding` Array(Float32)
)
ENGINE = MergeTree
ORDER BY id
SETTINGS index_granularity = 8192
"""


def _peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Unlike ru_maxrss it is reset by exec, so a
    worker does not inherit the high-water mark of the process that started it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(method: str, shard_dir: str, db: str) -> dict[str, Any]:
    from laion_search import connect
    from laion_search.ingest import ingest

    t0 = time.perf_counter()
    if method == "ours":
        with connect(db) as store:
            report = ingest(store, shard_dir)
            rows = report.rows
        return {"method": method, "rows": rows, "seconds": time.perf_counter() - t0, "peak_rss": _peak_rss_bytes()}
    if method == "native":
        d = Path(shard_dir)
        with connect(db) as store:
            store.run_ddl(
                "INSERT INTO laion (id, shard, shard_row, url, caption, NSFW, similarity, key, width, height, "
                "original_width, original_height, LICENSE, image_embedding, text_embedding) "
                "SELECT toInt64(i._row_number), 0, toUInt32(i._row_number), m.url, ifNull(m.caption, ''), "
                "ifNull(m.NSFW, ''), ifNull(m.similarity, 0), ifNull(m.key, ''), ifNull(m.width, 0), "
                "ifNull(m.height, 0), ifNull(m.original_width, 0), ifNull(m.original_height, 0), "
                "ifNull(m.LICENSE, ''), i.array, t.array "
                "FROM file({img:String}, Npy) AS i PASTE JOIN file({txt:String}, Npy) AS t "
                "PASTE JOIN file({meta:String}, Parquet) AS m SETTINGS max_insert_threads = 2",
                {"img": str(d / "img_emb_0.npy"), "txt": str(d / "text_emb_0.npy"),
                 "meta": str(d / "metadata_0.parquet")})
            rows = store.scalar("SELECT count() FROM laion")
        return {"method": method, "rows": rows, "seconds": time.perf_counter() - t0, "peak_rss": _peak_rss_bytes()}
    if method == "guide":
        import numpy as np
        import pandas as pd

        # --- the guide's process.py, step for step (minus the final rm) ---
        os.chdir(shard_dir)
        str_i = "0"
        im_emb = np.load("img_emb_" + str_i + ".npy")
        text_emb = np.load("text_emb_" + str_i + ".npy")
        data = pd.read_parquet("metadata_" + str_i + ".parquet")
        data = pd.concat([data, pd.DataFrame({"image_embedding": [*im_emb]}),
                          pd.DataFrame({"text_embedding": [*text_emb]})], axis=1, copy=False)
        data = data[["url", "caption", "NSFW", "similarity", "image_embedding", "text_embedding"]]
        data["image_embedding"] = data["image_embedding"].apply(lambda x: x.tolist())
        data["text_embedding"] = data["text_embedding"].apply(lambda x: x.tolist())
        data["caption"] = data["caption"].apply(lambda x: x.replace("'", " ").replace('"', " "))
        data.to_csv(str_i + ".csv", header=False)
        rows = len(data)
        del data, im_emb, text_emb
        t_process = time.perf_counter() - t0
        csv_bytes = os.path.getsize(str_i + ".csv")
        # --- then the guide's CREATE TABLE and INSERT … FROM INFILE ---
        from laion_search.store import guide_store

        with guide_store(db) as guide:  # the guide's own table, not ours
            guide.run_ddl(GUIDE_DDL)
            t1 = time.perf_counter()
            guide.run_ddl(f"INSERT INTO laion FROM INFILE '{Path(shard_dir) / '0.csv'}' FORMAT CSV")
            t_insert = time.perf_counter() - t1
            loaded = guide.scalar("SELECT count() AS n FROM laion")
        return {"method": method, "rows": loaded, "seconds": time.perf_counter() - t0, "peak_rss": _peak_rss_bytes(),
                "process_seconds": t_process, "insert_seconds": t_insert, "csv_bytes": csv_bytes, "source_rows": rows}
    if method == "source":  # one file of a real-world format (ClickHouse Parquet part, SISAP .h5)
        from laion_search.ingest import ingest_source

        samples: list[tuple[int, int]] = []  # (rows inserted, peak resident bytes so far) after every batch

        def sample(event: dict[str, Any]) -> None:
            if event["event"] == "batch":
                samples.append((event["rows_done"], _peak_rss_bytes()))

        with connect(db) as store:
            base = _rss_bytes()  # engine + libraries loaded, nothing read yet
            report = ingest_source(store, shard_dir, progress=sample)
        return {"method": method, "rows": report.rows, "seconds": time.perf_counter() - t0,
                "peak_rss": _peak_rss_bytes(), "base_rss": base, "samples": samples}
    raise ValueError(method)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


SOURCE_FORMATS = ("clickhouse-parquet", "sisap-h5")


def run_formats(rows: int = 200_000, formats: tuple[str, ...] = SOURCE_FORMATS, workdir: Path | None = None,
                log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Peak RSS and speed of ``laion ingest`` on a generated 768-d ClickHouse LAION-5B part and a
    SISAP .h5 file of ``rows`` rows (fresh process and store each).

    Whether memory is bounded shows *within* a run: the peak resident memory so far is sampled
    after every batch, and its slope over the second half of the run (after the first batches
    have sized the reused buffers) is what a longer file would add. The 10M-row figure is the
    measured peak plus that slope × the rows still to come: linear, so pessimistic when the peak
    only creeps up with rare spikes; short runs (a few batches in their second half) overstate it
    — 1M rows gives a steadier figure."""
    from laion_search.sources.synth import synth_clickhouse_parquet, synth_sisap_h5

    for f in formats:
        if f not in SOURCE_FORMATS:
            raise ValueError(f"format must be one of {', '.join(SOURCE_FORMATS)}, got {f!r}")
    say = log or (lambda msg: None)
    results = []
    with scratch_dir(workdir, "laion-bench-src-") as root:
        for fmt in formats:
            if fmt == "clickhouse-parquet":
                path = synth_clickhouse_parquet(root / "laion5b_100m_part_1_of_10.parquet", rows, seed=1)
            else:
                path = synth_sisap_h5(root / f"laion2B-en-clip768v2-n={rows}.h5", rows, seed=1)
            size = path.stat().st_size
            say(f"{fmt}: {rows:,} rows ({size / 2**20:,.0f} MB) …")
            db = root / f"db-{fmt}"
            shutil.rmtree(db, ignore_errors=True)
            r = _run_worker("source", path, db)
            path.unlink()
            shutil.rmtree(db, ignore_errors=True)
            r.update(format=fmt, file_bytes=size, rows_per_second=r["rows"] / r["seconds"],
                     slope_bytes_per_row=_late_slope(r.pop("samples")))
            r["peak_rss_10m"] = r["peak_rss"] + max(0.0, r["slope_bytes_per_row"]) * max(0, 10_000_000 - r["rows"])
            results.append(r)
            say(f"  {r['rows']:,} rows in {r['seconds']:.2f} s, peak RSS {r['peak_rss'] / 2**20:,.0f} MB "
                f"(before reading: {r['base_rss'] / 2**20:,.0f} MB)")
    lines = ["| format | rows | file | seconds | rows/s | RSS before | peak RSS | growth, 2nd half | 10M rows (extrapolated) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['format']} | {r['rows']:,} | {r['file_bytes'] / 2**20:,.0f} MB | {r['seconds']:.2f} | "
                     f"{r['rows_per_second']:,.0f} | {r['base_rss'] / 2**20:,.0f} MB | {r['peak_rss'] / 2**20:,.0f} MB | "
                     f"+{max(0.0, r['slope_bytes_per_row']) * 1e6 / 2**20:,.0f} MB/M rows | "
                     f"**{r['peak_rss_10m'] / 2**20:,.0f} MB** |")
    lines.append("")
    lines.append("target: peak RSS < 1,536 MB for a 10M-row Parquet part or .h5 file")
    return {"results": results, "markdown": "\n".join(lines)}


def _late_slope(samples: list[tuple[int, int]]) -> float:
    """Bytes of peak resident memory per row over the second half of a run (least squares)."""
    if not samples:
        return 0.0
    half = samples[-1][0] / 2
    late = [(x, y) for x, y in samples if x >= half]
    if len(late) < 2:
        return 0.0
    import numpy as np

    xs, ys = np.array([x for x, _ in late], float), np.array([y for _, y in late], float)
    return float(np.polyfit(xs, ys, 1)[0])


def _run_worker(method: str, shard_dir: Path, db: Path) -> dict[str, Any]:
    # Flush dirty pages left by the synth step or the previous worker, so that no pipeline is
    # throttled by another's writeback.
    os.sync()
    proc = subprocess.run([sys.executable, "-m", "laion_search.bench.ingest", method, str(shard_dir), str(db)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {method} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(rows: int = 200_000, guide_rows: int = 20_000, workdir: Path | None = None,
        log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    from laion_search.sources.synth import synth

    say = log or (lambda msg: None)
    with scratch_dir(workdir, "laion-bench-") as root:
        big, small = root / "shard-big", root / "shard-guide"
        say(f"synth: 1 shard × {rows:,} rows and 1 shard × {guide_rows:,} rows under {root}")
        synth(big, [0], rows, seed=1)
        synth(small, [0], guide_rows, seed=1)
        results = []
        for method, shard_dir in (("ours", big), ("native", big), ("guide", small)):
            say(f"running {method} …")
            db = root / f"db-{method}"
            shutil.rmtree(db, ignore_errors=True)  # every pipeline loads into a fresh store
            r = _run_worker(method, shard_dir, db)
            r["rows_per_second"] = r["rows"] / r["seconds"]
            results.append(r)
            say(f"  {method}: {r['rows']:,} rows in {r['seconds']:.2f} s, peak RSS {r['peak_rss'] / 2**20:,.0f} MB")
    by = {r["method"]: r for r in results}
    ratios = {
        "ours_vs_guide": by["ours"]["rows_per_second"] / by["guide"]["rows_per_second"],
        "ours_vs_native": by["ours"]["rows_per_second"] / by["native"]["rows_per_second"],
    }
    labels = {"ours": "laion ingest (streaming, atomic per shard)",
              "native": "engine-native INSERT … FROM file(Npy) PASTE JOIN",
              "guide": "guide: pandas → CSV → INSERT FROM INFILE"}
    lines = ["| pipeline | rows | seconds | rows/s | peak RSS | vs guide |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {labels[r['method']]} | {r['rows']:,} | {r['seconds']:.2f} | {r['rows_per_second']:,.0f} | "
                     f"{r['peak_rss'] / 2**20:,.0f} MB | "
                     f"{r['rows_per_second'] / by['guide']['rows_per_second']:.1f}× |")
    lines.append("")
    lines.append(f"ours / guide throughput: **{ratios['ours_vs_guide']:.0f}×** (target ≥ 100×); "
                 f"ours / native: **{ratios['ours_vs_native']:.2f}×** (target ≥ 0.7×); "
                 f"our peak RSS: **{by['ours']['peak_rss'] / 2**20:,.0f} MB** (target < 1,536 MB at 1M rows)")
    if "csv_bytes" in by["guide"]:
        lines.append(f"guide CSV: {by['guide']['csv_bytes'] / 2**20:,.0f} MB for {by['guide']['rows']:,} rows "
                     f"(process.py {by['guide']['process_seconds']:.1f} s, insert {by['guide']['insert_seconds']:.1f} s)")
    return {"results": results, "ratios": ratios, "markdown": "\n".join(lines)}


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1], sys.argv[2], sys.argv[3])))
