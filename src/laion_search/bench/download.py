"""``laion bench download``: our downloader vs a plain single-stream download of the same files.

A loopback HTTP server (:mod:`laion_search.testing.faulty_http`, one thread per connection, in
its own process) serves synth shards in LAION's ``img_emb/ text_emb/ metadata/`` layout. In one
run, for each server setting, these methods take turns (round-robin, ``repeat`` rounds; the
median of each is reported):

* **curl** — one ``curl`` process fetching every file one after another over one connection
  (the guide's ``wget`` loop without its per-file process start); when curl is missing, a plain
  Python ``urllib`` copy, and the table says so;
* **curl + fsync** — the same, then ``sync FILE… DIR`` (GNU coreutils: an fsync of each file and
  of the directory): what curl costs when its files must survive a power cut, as ours do;
* **laion download -j 1** and **-j 4** — the whole ``laion download`` process with its defaults
  (start-up, verification, fsync and manifest included): compared like for like with
  *curl + fsync*;
* **laion download -j 1 / -j 4 --no-fsync** — without the flushes: compared with plain *curl*.

Before each run the page cache's dirty data is written out (``os.sync``, untimed), so no run
pays for the previous one's writeback. Server settings: **throttled** (``rate`` bytes/s per
connection, as a mirror limits each stream) and **unthrottled** (loopback speed: what the client
itself costs). Every download is checked byte for byte against the source.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from laion_search.sources.naming import KINDS, shard_file_name

_URLLIB_COPY = """
import shutil, sys, urllib.request
pairs = sys.argv[1:]
for url, dest in zip(pairs[::2], pairs[1::2]):
    with urllib.request.urlopen(url) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
"""
_FSYNC = """
import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""

#: (label, tool, jobs, fsync); the baselines come first
METHODS = [("curl", "curl", 1, False), ("curl + fsync", "curl", 1, True),
           ("laion download -j 1", "laion", 1, True), ("laion download -j 4", "laion", 4, True),
           ("laion download -j 1 --no-fsync", "laion", 1, False), ("laion download -j 4 --no-fsync", "laion", 4, False)]


class _Server:
    def __init__(self, root: Path, rate: float | None):
        cmd = [sys.executable, "-m", "laion_search.testing.faulty_http", str(root)]
        if rate:
            cmd += ["--rate", str(rate)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
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


def _gnu_sync() -> str | None:
    """``sync`` that fsyncs the files it is given (GNU coreutils ≥ 8.24), else None."""
    path = shutil.which("sync")
    if not path:
        return None
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "GNU coreutils" in proc.stdout else None


def run(shards: int = 4, rows: int = 50_000, rate: float = 25e6, repeat: int = 3, workdir: Path | None = None,
        out: Path | None = None, unthrottled: bool = True, log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    from laion_search.bench.common import scratch_dir

    with scratch_dir(workdir, "laion-bench-download-") as root:
        return _run(shards, rows, rate, repeat, root, out, unthrottled, log or (lambda msg: None))


def _run(shards: int, rows: int, rate: float, repeat: int, workdir: Path, out: Path | None, unthrottled: bool,
         say: Callable[[str], Any]) -> dict[str, Any]:
    from laion_search.sources.synth import synth

    numbers = list(range(shards))
    src = workdir / f"src-{shards}x{rows}"
    if not all((src / k / shard_file_name(k, n)).is_file() for n in numbers for k in KINDS):
        say(f"synthesizing {shards} shard(s) × {rows:,} rows …")
        synth(src, numbers, rows, seed=0, layout="folders")
    files = [(k, n) for n in numbers for k in KINDS]
    total = sum((src / k / shard_file_name(k, n)).stat().st_size for k, n in files)
    curl = shutil.which("curl")
    sync = _gnu_sync()
    baseline = "curl" if curl else "python urllib (curl not found)"
    settings = [("throttled", rate)] + ([("unthrottled", None)] if unthrottled else [])
    dest = workdir / "dest"
    results: list[dict[str, Any]] = []
    for setting, r in settings:
        server = _Server(src, r)
        samples: dict[str, list[float]] = {m[0]: [] for m in METHODS}
        inner: dict[str, list[float]] = {m[0]: [] for m in METHODS}
        try:
            for round_ in range(repeat):
                for label, tool, jobs, fsync in METHODS:
                    shutil.rmtree(dest, ignore_errors=True)
                    dest.mkdir(parents=True)
                    os.sync()  # earlier runs' dirty pages are not this run's work
                    say(f"{setting}: {label} (round {round_ + 1} of {repeat}) …")
                    if tool == "curl":
                        pairs: list[str] = []
                        for k, n in files:
                            url = f"{server.url}/{k}/{shard_file_name(k, n)}"
                            pairs += ["-o", str(dest / shard_file_name(k, n)), url] if curl else [url, str(dest / shard_file_name(k, n))]
                        cmds = [[curl, "-sS", "--fail", *pairs] if curl else [sys.executable, "-c", _URLLIB_COPY, *pairs]]
                        if fsync:
                            paths = [str(dest / shard_file_name(k, n)) for k, n in files] + [str(dest)]
                            cmds.append([sync, *paths] if sync else [sys.executable, "-c", _FSYNC, *paths])
                    else:
                        cmds = [[sys.executable, "-m", "laion_search.cli", "download", f"0-{shards - 1}", "--to",
                                 str(dest), "--base-url", server.url, "-j", str(jobs), "--json",
                                 *([] if fsync else ["--no-fsync"])]]
                    t0 = time.perf_counter()
                    for cmd in cmds:
                        proc = subprocess.run(cmd, capture_output=True, text=True)
                        if proc.returncode != 0:
                            raise RuntimeError(f"{label} failed: {proc.stderr.strip()[-500:]}")
                    samples[label].append(time.perf_counter() - t0)
                    if tool == "laion":  # the tool's own clock: transfers + verify + fsync, no start-up
                        inner[label].append(json.loads(proc.stdout.splitlines()[-1])["seconds"])
                    for k, n in files:
                        if not filecmp.cmp(src / k / shard_file_name(k, n), dest / shard_file_name(k, n), shallow=False):
                            raise RuntimeError(f"{label}: {shard_file_name(k, n)} differs from the source")
            shutil.rmtree(dest, ignore_errors=True)
        finally:
            server.close()
        for label, tool, jobs, fsync in METHODS:
            seconds = statistics.median(samples[label])
            method = label if tool == "laion" else baseline.split(" (")[0] + (" + fsync" if fsync else "")
            results.append({"setting": setting, "rate": r, "method": method, "tool": tool, "jobs": jobs,
                            "fsync": fsync, "seconds": round(seconds, 3), "samples": [round(x, 3) for x in samples[label]],
                            "mb_per_s": round(total / 1e6 / seconds, 1),
                            "in_process_seconds": round(statistics.median(inner[label]), 3) if inner[label] else None})
    ratios: dict[str, float] = {}
    ratio_baselines: dict[str, str] = {}
    for row in results:
        same = [x for x in results if x["setting"] == row["setting"] and x["tool"] == "curl"]
        plain, synced = (next(x for x in same if x["fsync"] is f) for f in (False, True))
        row["vs_curl"] = round(plain["seconds"] / row["seconds"], 2)
        row["vs_curl_fsync"] = round(synced["seconds"] / row["seconds"], 2)
        if row["tool"] == "laion":  # like for like: durable vs durable, page cache vs page cache
            key = f"{row['setting']} -j {row['jobs']}" + ("" if row["fsync"] else " --no-fsync")
            like = synced if row["fsync"] else plain
            ratios[key] = row["vs_curl_fsync"] if row["fsync"] else row["vs_curl"]
            ratio_baselines[key] = like["method"]
    b = plain["method"]
    lines = [f"{shards} shard(s) × {rows:,} rows = {len(files)} files, {total / 1e6:,.0f} MB, from a loopback "
             f"HTTP server; throttled = {rate / 1e6:g} MB/s per connection; median of {repeat} round(s), methods "
             f"taking turns; all downloads byte-identical to the source",
             "", f"| server | method | seconds | MB/s | vs {b} | vs {b} + fsync | in-process seconds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for x in results:
        label = f"throttled ({x['rate'] / 1e6:g} MB/s per connection)" if x["rate"] else "unthrottled"
        inner_s = f"{x['in_process_seconds']:.2f}" if x["in_process_seconds"] is not None else "-"
        vc = f"**{x['vs_curl']:.2f}×**" if x["tool"] == "laion" and not x["fsync"] else f"{x['vs_curl']:.2f}×"
        vf = f"**{x['vs_curl_fsync']:.2f}×**" if x["tool"] == "laion" and x["fsync"] else f"{x['vs_curl_fsync']:.2f}×"
        lines.append(f"| {label} | {x['method']} | {x['seconds']:.2f} | {x['mb_per_s']:,.1f} | {vc} | {vf} | {inner_s} |")
    lines += ["", "seconds: the whole process (start-up included; for curl + fsync, curl then `sync FILE… DIR`); "
              "in-process: the downloader's own clock (transfers, verification, fsync, manifest; no interpreter "
              "start-up). Bold: the like-for-like ratio — `laion download` (durable: fsync by default) vs curl + "
              "fsync, and `--no-fsync` vs plain curl."]
    markdown = "\n".join(lines)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-download.md").write_text(markdown + "\n")
    return {"shards": shards, "rows": rows, "bytes": total, "rate": rate, "repeat": repeat, "baseline": baseline,
            "results": results, "ratios": ratios, "ratio_baselines": ratio_baselines, "markdown": markdown}


if __name__ == "__main__":
    print(run(shards=2, rows=20_000, rate=20e6, log=print)["markdown"])
