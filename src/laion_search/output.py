"""Rendering for the CLI: tables, JSON, and progress that suits a terminal or a script."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import pyarrow as pa
    from rich.console import Console

    out: Console
    err: Console


def __getattr__(name: str) -> Any:
    """``out`` (stdout) and ``err`` (stderr) rich consoles, made on first use: a command that
    prints JSON only never imports rich."""
    if name in ("out", "err"):
        from rich.console import Console

        console = Console(stderr=(name == "err"), soft_wrap=True)
        globals()[name] = console
        return console
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _console(name: str) -> "Console":
    console = globals().get(name)  # a test may have replaced it
    return console if console is not None else __getattr__(name)


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def short(value: Any, width: int = 80) -> str:
    """A cell for humans: long arrays summarised, long text cut, control characters shown."""
    if isinstance(value, (list, tuple)):
        if len(value) > 6:
            head = ", ".join(_num(v) for v in value[:3])
            return f"[{head}, … {len(value)} values]"
        return "[" + ", ".join(_num(v) for v in value) + "]"
    if isinstance(value, float):
        return _num(value)
    text = "" if value is None else str(value)
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= width else text[: width - 1] + "…"


def _num(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.6g}"
    return str(v)


def json_default(o: Any) -> Any:
    import datetime as _dt

    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (_dt.date, _dt.datetime)):
        return o.isoformat()
    if isinstance(o, bytes):
        return o.decode("utf-8", "replace")
    return str(o)


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=json_default)


def print_records(records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                  title: str | None = None, width: int = 80) -> None:
    if not records:
        _console("out").print("(no rows)")
        return
    cols = list(columns or records[0].keys())
    from rich.table import Table

    table = Table(title=title, show_lines=False, header_style="bold")
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in records:
        table.add_row(*(short(r.get(c), width) for c in cols))
    _console("out").print(table)


def print_arrow(result: "pa.Table", fmt: str = "table") -> None:
    """Print a query result as ``table``, ``json`` (one array), ``jsonl``, ``csv`` or ``tsv``."""
    if result.num_columns == 0:  # DDL / DML: nothing to show but success
        if fmt == "table":
            _console("out").print("ok")
        return
    records = result.to_pylist()
    if fmt == "table":
        print_records(records, result.column_names)
    elif fmt == "json":
        sys.stdout.write(dumps(records) + "\n")
    elif fmt == "jsonl":
        for r in records:
            sys.stdout.write(dumps(r) + "\n")
    elif fmt in ("csv", "tsv"):
        import csv

        w = csv.writer(sys.stdout, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        w.writerow(result.column_names)
        for r in records:
            w.writerow([dumps(v) if isinstance(v, (list, dict)) else v for v in r.values()])
    else:
        raise ValueError(f"unknown format {fmt!r}")


class IngestProgress:
    """Turns ingest events into a rich progress bar (terminal), plain lines, or JSON lines."""

    def __init__(self, mode: str):
        self.mode = mode  # "bar", "plain" or "json"
        self._progress = None
        self._task = None
        self._done_before = 0
        self._t0 = time.perf_counter()

    def __enter__(self) -> "IngestProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if self.mode == "json":
            if kind != "batch":
                sys.stdout.write(dumps(event) + "\n")
                sys.stdout.flush()
            return
        if self.mode == "plain":
            self._plain(event)
            return
        self._bar(event)

    def _plain(self, e: dict[str, Any]) -> None:
        kind = e["event"]
        if kind == "start":
            _console("err").print(f"ingesting {len(e['shards'])} shard(s), {e['rows']:,} rows")
        elif kind == "shard_skipped":
            _console("err").print(f"shard {e['shard']}: skipped ({e['reason']})")
        elif kind == "shard_done":
            rate = e["rows"] / e["seconds"] if e["seconds"] else 0
            extra = f", {e['renormalised']:,} vectors renormalised" if e["renormalised"] else ""
            _console("err").print(f"shard {e['shard']}: {e['rows']:,} rows in {e['seconds']:.1f} s ({rate:,.0f} rows/s){extra}")

    def _bar(self, e: dict[str, Any]) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        kind = e["event"]
        if kind == "start":
            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                      TimeRemainingColumn(), console=_console("err"), transient=False)
            self._progress.start()
            self._task = self._progress.add_task("ingest", total=e["rows"] or None, rate="")
        elif self._progress is None:
            return
        elif kind == "shard_start":
            self._progress.update(self._task, description=f"shard {e['shard']}")
        elif kind == "batch":
            done = self._done_before + e["rows_done"]
            elapsed = time.perf_counter() - self._t0
            rate = f"{done / elapsed:,.0f} rows/s" if elapsed > 0 else ""
            self._progress.update(self._task, completed=done, rate=rate)
        elif kind == "shard_done":
            self._done_before += e["rows"]
            self._progress.update(self._task, completed=self._done_before)
        elif kind == "shard_skipped":
            self._done_before += e["rows"]
            self._progress.update(self._task, completed=self._done_before)
            self._progress.console.print(f"shard {e['shard']}: skipped ({e['reason']})")
        elif kind == "done":
            self._progress.update(self._task, completed=self._done_before, description="ingest")


def progress_mode(json_output: bool) -> str:
    if json_output:
        return "json"
    return "bar" if _console("err").is_terminal else "plain"


class DownloadProgress:
    """Download events as rich bars (one per active file, plus a total with MB/s and ETA) on a
    terminal, plain lines otherwise, or JSON lines (``file_bytes`` at most once a second per file)."""

    def __init__(self, mode: str):
        self.mode = mode  # "bar", "plain" or "json"
        self._progress = None
        self._total_task = None
        self._tasks: dict[str, Any] = {}
        self._files: dict[str, dict[str, Any]] = {}  # file → {base, size, done, kind}
        self._pending_kinds: dict[str, int] = {}     # files not started yet, by kind
        self._last_json: dict[str, float] = {}
        self._last_plain = time.monotonic()  # first plain progress line after 5 s
        self._t0 = time.perf_counter()

    def __enter__(self) -> "DownloadProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- totals over this run's transfers: bytes received vs bytes expected (unknown sizes estimated
    #    from the average size of files of the same kind seen so far)
    def _totals(self) -> tuple[int, int]:
        done = sum(f["done"] - f["base"] for f in self._files.values())
        total = sum((f["size"] or f["done"]) - f["base"] for f in self._files.values())
        for kind, n in self._pending_kinds.items():
            sizes = [f["size"] for f in self._files.values() if f["kind"] == kind and f["size"]]
            if sizes:
                total += n * sum(sizes) // len(sizes)
        return done, max(total, done)

    def __call__(self, e: dict[str, Any]) -> None:
        kind = e["event"]
        if kind == "start":
            for f in e.get("todo", []):
                for k in ("img_emb", "text_emb", "metadata"):
                    self._pending_kinds[k] = self._pending_kinds.get(k, 0) + 1
        elif kind == "file_start":
            f = self._files.get(e["file"])
            if f is None:
                k = e.get("kind", "metadata")
                self._pending_kinds[k] = max(0, self._pending_kinds.get(k, 0) - 1)
                self._files[e["file"]] = {"base": e["offset"], "size": e["size"], "done": e["offset"], "kind": k}
            else:  # a retry: restart from byte 0 or resume
                f["size"] = e["size"]
                f["done"] = e["offset"]
                f["base"] = min(f["base"], e["offset"])
        elif kind == "file_bytes" and e["file"] in self._files:
            self._files[e["file"]]["done"] = e["done"]
        elif kind == "file_done" and e["file"] in self._files:
            self._files[e["file"]]["done"] = e["size"]
            self._files[e["file"]]["size"] = e["size"]
        if self.mode == "json":
            self._json(e)
        elif self.mode == "plain":
            self._plain(e)
        else:
            self._bar(e)

    def _json(self, e: dict[str, Any]) -> None:
        kind = e["event"]
        if kind == "ingest_batch":
            return
        if kind == "file_bytes":
            now = time.monotonic()
            if now - self._last_json.get(e["file"], 0.0) < 1.0:
                return
            self._last_json[e["file"]] = now
        sys.stdout.write(dumps(e) + "\n")
        sys.stdout.flush()

    def _rate_eta(self) -> str:
        done, total = self._totals()
        elapsed = time.perf_counter() - self._t0
        rate = done / elapsed if elapsed > 0 else 0
        eta = f", ETA {(total - done) / rate:,.0f} s" if rate > 0 and total > done else ""
        return f"{human_bytes(done)} of ~{human_bytes(total)}, {rate / 1e6:,.1f} MB/s{eta}"

    def _plain(self, e: dict[str, Any]) -> None:
        kind = e["event"]
        msg = self._message(e)
        if msg:
            _console("err").print(msg, highlight=False, markup=False)
        if kind == "file_bytes":
            now = time.monotonic()
            if now - self._last_plain >= 5.0:
                self._last_plain = now
                _console("err").print(f"progress: {self._rate_eta()}", highlight=False)

    def _message(self, e: dict[str, Any]) -> str | None:
        kind = e["event"]
        if kind == "start":
            return (f"downloading {len(e['todo'])} shard(s) ({e['files']} files) from {e['base_url']} "
                    f"to {e['to']} with {e['jobs']} connection(s)" + (", ingesting as they verify" if e["ingest"] else ""))
        if kind == "file_done":
            secs = e["seconds"]
            rate = (e["size"] - e["resumed_from"]) / secs / 1e6 if secs > 0 else 0
            resumed = f", resumed at {human_bytes(e['resumed_from'])}" if e["resumed_from"] else ""
            return f"{e['file']}: {human_bytes(e['size'])} in {secs:.1f} s ({rate:,.1f} MB/s{resumed})"
        if kind == "file_skipped":
            return f"{e['file']}: skipped ({e['reason']})"
        if kind == "retry":
            return f"{e['file']}: {e['reason']}; retry {e['attempt']} in {e['delay']:.1f} s"
        if kind == "restart":
            return f"{e['file']}: {e['reason']}"
        if kind == "file_failed":
            return f"FAILED {e['file']} ({e['url']}): {e['reason']}"
        if kind == "shard_verified":
            return f"shard {e['shard']}: verified, {e['rows']:,} rows × {e['dim']}-d"
        if kind == "shard_skipped":
            return f"shard {e['shard']}: skipped ({e['reason']})"
        if kind == "shard_failed":
            return f"FAILED shard {e['shard']} {e['file']} ({e['url']}): {e['reason']}"
        if kind == "ingest_done":
            return f"shard {e['shard']}: ingested {e['rows']:,} rows in {e['seconds']:.1f} s"
        if kind == "ingest_skipped":
            return f"shard {e['shard']}: ingest skipped ({e['reason']})"
        if kind == "shard_deleted":
            return f"shard {e['shard']}: files deleted after ingest"
        return None

    def _bar(self, e: dict[str, Any]) -> None:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        kind = e["event"]
        if self._progress is None:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                      console=_console("err"), transient=False)
            self._progress.start()
            self._total_task = self._progress.add_task("[bold]total", total=None)
        p = self._progress
        if kind == "file_start":
            task = self._tasks.get(e["file"])
            if task is None:
                self._tasks[e["file"]] = p.add_task(e["file"], total=e["size"], completed=e["offset"])
            else:
                p.reset(task, total=e["size"], completed=e["offset"])
        elif kind == "file_bytes" and e["file"] in self._tasks:
            p.update(self._tasks[e["file"]], completed=e["done"])
        elif kind in ("file_done", "file_failed") and e["file"] in self._tasks:
            p.remove_task(self._tasks.pop(e["file"]))
        elif kind == "summary":
            for task in self._tasks.values():
                p.remove_task(task)
            self._tasks.clear()
        done, total = self._totals()
        p.update(self._total_task, completed=done, total=total or None)
        msg = self._message(e)
        if msg:
            p.console.print(msg, highlight=False, markup=False, style="dim" if kind == "file_done" else None)
