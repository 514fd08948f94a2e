"""``laion bench download``: our downloader vs a plain single-stream download of the same files.

A loopback HTTP server (:mod:`laion_search.testing.faulty_http`, one thread per connection, in
its own process) serves synth shards in LAION's ``img_emb/ text_emb/ metadata/`` layout. In one
run, for each server setting:

* **curl** — one ``curl`` process fetching every file one after another over one connection
  (the guide's ``wget`` loop without its per-file process start); when curl is missing, a plain
  Python ``urllib`` copy, and the table says so;
* **laion download -j 1** and **-j 4** — the whole ``laion download`` process (start-up,
  verification, fsync and manifest included).

Server settings: **throttled** (``rate`` bytes/s per connection, as a mirror limits each stream;
the headline) and **unthrottled** (loopback speed: what the client itself costs). Every
download is checked byte for byte against the source.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .shards import KINDS

_URLLIB_COPY = """
import shutil, sys, urllib.request
pairs = sys.argv[1:]
for url, dest in zip(pairs[::2], pairs[1::2]):
    with urllib.request.urlopen(url) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
"""


def _name(kind: str, n: int) -> str:
    return f"{kind}_{n}{'.parquet' if kind == 'metadata' else '.npy'}"


class _Server:
    def __init__(self, root: Path, rate: float | None):
        cmd = [sys.executable, "-m", "laion_search.testing.faulty_http", str(root)]
        if rate:
            cmd += ["--rate", str(rate)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError("benchmark server did not start")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run(shards: int = 4, rows: int = 50_000, rate: float = 25e6, repeat: int = 1, workdir: Path | None = None,
        out: Path | None = None, unthrottled: bool = True, log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    say = log or (lambda msg: None)
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="laion-bench-download-")
        workdir = Path(tmp)
    workdir = Path(workdir)
    try:
        return _run(shards, rows, rate, repeat, workdir, out, unthrottled, say)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(shards: int, rows: int, rate: float, repeat: int, workdir: Path, out: Path | None, unthrottled: bool,
         say: Callable[[str], Any]) -> dict[str, Any]:
    from .synth import synth

    numbers = list(range(shards))
    src = workdir / f"src-{shards}x{rows}"
    if not all((src / k / _name(k, n)).is_file() for n in numbers for k in KINDS):
        say(f"synthesizing {shards} shard(s) × {rows:,} rows …")
        synth(src, numbers, rows, seed=0, layout="folders")
    files = [(k, n) for n in numbers for k in KINDS]
    total = sum((src / k / _name(k, n)).stat().st_size for k, n in files)
    curl = shutil.which("curl")
    baseline = "curl" if curl else "python urllib (curl not found)"
    settings = [("throttled", rate)] + ([("unthrottled", None)] if unthrottled else [])
    results: list[dict[str, Any]] = []
    for setting, r in settings:
        server = _Server(src, r)
        try:
            for method, jobs in ((baseline, 1), ("laion download -j 1", 1), ("laion download -j 4", 4)):
                best, best_inner = None, None
                for _ in range(repeat):
                    dest = workdir / "dest"
                    shutil.rmtree(dest, ignore_errors=True)
                    dest.mkdir(parents=True)
                    say(f"{setting}: {method} …")
                    if method == baseline:
                        pairs: list[str] = []
                        for k, n in files:
                            url = f"{server.url}/{k}/{_name(k, n)}"
                            pairs += ["-o", str(dest / _name(k, n)), url] if curl else [url, str(dest / _name(k, n))]
                        cmd = [curl, "-sS", "--fail", *pairs] if curl else [sys.executable, "-c", _URLLIB_COPY, *pairs]
                    else:
                        cmd = [sys.executable, "-m", "laion_search.cli", "download", f"0-{shards - 1}", "--to",
                               str(dest), "--base-url", server.url, "-j", str(jobs), "--json"]
                    t0 = time.perf_counter()
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    seconds = time.perf_counter() - t0
                    if proc.returncode != 0:
                        raise RuntimeError(f"{method} failed: {proc.stderr.strip()[-500:]}")
                    for k, n in files:
                        if not filecmp.cmp(src / k / _name(k, n), dest / _name(k, n), shallow=False):
                            raise RuntimeError(f"{method}: {_name(k, n)} differs from the source")
                    inner = None
                    if method != baseline:  # the tool's own clock: transfers + verify + fsync, no start-up
                        import json as _json

                        inner = _json.loads(proc.stdout.splitlines()[-1])["seconds"]
                    if best is None or seconds < best:
                        best, best_inner = seconds, inner
                    shutil.rmtree(dest, ignore_errors=True)
                results.append({"setting": setting, "rate": r, "method": method, "jobs": jobs,
                                "seconds": round(best, 3), "mb_per_s": round(total / 1e6 / best, 1),
                                "in_process_seconds": best_inner})
        finally:
            server.close()
    for row in results:
        base = next(x for x in results if x["setting"] == row["setting"] and x["method"] == baseline)
        row["vs_baseline"] = round(base["seconds"] / row["seconds"], 2)
    ratios = {f"{x['setting']} -j {x['jobs']}": x["vs_baseline"] for x in results if x["method"] != baseline}
    lines = [f"{shards} shard(s) × {rows:,} rows = {len(files)} files, {total / 1e6:,.0f} MB, from a loopback "
             f"HTTP server; throttled = {rate / 1e6:g} MB/s per connection; all downloads byte-identical to the source",
             "", f"| server | method | seconds | MB/s | vs {baseline.split()[0]} | in-process seconds |",
             "|---|---|---:|---:|---:|---:|"]
    for x in results:
        label = f"throttled ({x['rate'] / 1e6:g} MB/s per connection)" if x["rate"] else "unthrottled"
        inner = f"{x['in_process_seconds']:.2f}" if x["in_process_seconds"] is not None else "-"
        lines.append(f"| {label} | {x['method']} | {x['seconds']:.2f} | {x['mb_per_s']:,.1f} | "
                     f"{x['vs_baseline']:.2f}× | {inner} |")
    lines += ["", "seconds: the whole process (start-up included); in-process: the downloader's own clock "
              "(transfers, verification, fsync, manifest; no interpreter start-up)"]
    markdown = "\n".join(lines)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-download.md").write_text(markdown + "\n")
    return {"shards": shards, "rows": rows, "bytes": total, "rate": rate, "baseline": baseline,
            "results": results, "ratios": ratios, "markdown": markdown}


if __name__ == "__main__":
    print(run(shards=2, rows=20_000, rate=20e6, log=print)["markdown"])
