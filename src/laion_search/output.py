"""Rendering for the CLI: tables, JSON, and progress that suits a terminal or a script."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Sequence

import pyarrow as pa
from rich.console import Console
from rich.table import Table

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


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
        out.print("(no rows)")
        return
    cols = list(columns or records[0].keys())
    table = Table(title=title, show_lines=False, header_style="bold")
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in records:
        table.add_row(*(short(r.get(c), width) for c in cols))
    out.print(table)


def print_arrow(result: pa.Table, fmt: str = "table") -> None:
    """Print a query result as ``table``, ``json`` (one array), ``jsonl``, ``csv`` or ``tsv``."""
    if result.num_columns == 0:  # DDL / DML: nothing to show but success
        if fmt == "table":
            out.print("ok")
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
            err.print(f"ingesting {len(e['shards'])} shard(s), {e['rows']:,} rows")
        elif kind == "shard_skipped":
            err.print(f"shard {e['shard']}: skipped ({e['reason']})")
        elif kind == "shard_done":
            rate = e["rows"] / e["seconds"] if e["seconds"] else 0
            extra = f", {e['renormalised']:,} vectors renormalised" if e["renormalised"] else ""
            err.print(f"shard {e['shard']}: {e['rows']:,} rows in {e['seconds']:.1f} s ({rate:,.0f} rows/s){extra}")

    def _bar(self, e: dict[str, Any]) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        kind = e["event"]
        if kind == "start":
            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                      TimeRemainingColumn(), console=err, transient=False)
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
    return "bar" if err.is_terminal else "plain"
