"""Rendering for the CLI: tables, JSON, and progress that suits a terminal or a script."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence, TypeVar

from laion_search import killpoints

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
    from rich.text import Text

    # values and names as plain text: a value such as "[/tmp/x/]" (system.tables' data_paths) is
    # not rich markup
    table = Table(title=title, show_lines=False, header_style="bold")
    for c in cols:
        table.add_column(Text(str(c)), overflow="fold")
    for r in records:
        table.add_row(*(Text(short(r.get(c), width)) for c in cols))
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


def progress_mode(json_output: bool) -> str:
    if json_output:
        return "json"
    return "bar" if _console("err").is_terminal else "plain"


P = TypeVar("P", bound="Progress")


class Progress:
    """A command's progress, rendered for where it goes — the one pattern every command uses:

    * ``bar`` (stderr is a terminal): rich progress bars, drawn by :meth:`draw`;
    * ``plain`` (stderr is a file or a pipe): the lines :meth:`line` returns, on stderr;
    * ``json`` (``--json``): the events themselves as JSON lines on stdout, except ``json_skip``
      (per-batch noise) — or nothing at all when ``json_lines`` is False (commands whose JSON
      output is a single document).

    Use it as a context manager (the bars stop at the end) and pass it as the ``progress``
    callback. :meth:`observe` sees every event first, in every mode (for running totals)."""

    json_lines = True
    json_skip: frozenset[str] = frozenset({"batch", "ivf_progress"})

    def __init__(self, mode: str):
        self.mode = mode  # "bar", "plain" or "json"
        self._progress: Any = None  # the rich Progress, made by bars() on first use

    def __enter__(self: P) -> P:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __call__(self, event: dict[str, Any]) -> None:
        killpoints.reached(event["event"], **{k: event[k] for k in ("shard", "index", "file") if k in event})
        self.observe(event)
        if self.mode == "json":
            if self.json_lines and self.want_json(event):
                sys.stdout.write(dumps(event) + "\n")
                sys.stdout.flush()
        elif self.mode == "plain":
            text = self.line(event)
            if text:
                _console("err").print(text, markup=False, highlight=False)
        else:
            self.draw(event)

    # -- what a subclass says
    def observe(self, e: dict[str, Any]) -> None:
        pass

    def want_json(self, e: dict[str, Any]) -> bool:
        return e["event"] not in self.json_skip

    def line(self, e: dict[str, Any]) -> str | None:
        return None

    def draw(self, e: dict[str, Any]) -> None:
        pass

    # -- helpers
    def bars(self, *columns: Any) -> Any:
        """The rich Progress on stderr with these columns, started on first use."""
        if self._progress is None:
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(*columns, console=_console("err"), transient=False)
            self._progress.start()
        return self._progress


class CountProgress(Progress):
    """One bar counting to ``total`` (``synth``): ``progress.count(done, total)`` is the callback.
    Nothing in plain or JSON mode."""

    json_lines = False

    def __init__(self, mode: str, label: str, total: int):
        super().__init__(mode)
        self.label, self.total, self._task = label, total, None

    def count(self, done: int, total: int | None = None) -> None:
        self({"event": "progress", "done": done, "total": total})

    def draw(self, e: dict[str, Any]) -> None:
        p = self.bars()  # rich's default columns
        if self._task is None:
            self._task = p.add_task(self.label, total=self.total)
        p.update(self._task, completed=e["done"])


class IndexProgress(Progress):
    """Index builds (``index_start`` / ``index_progress`` events): a bar of parts per index on a
    terminal, a ``NAME: done/total parts`` line per step otherwise; nothing with --json."""

    json_lines = False

    def __init__(self, mode: str):
        super().__init__(mode)
        self._task = None

    def line(self, e: dict[str, Any]) -> str | None:
        if e["event"] == "index_progress":
            return f"{e['index']}: {e['parts_done']}/{e['parts']} parts"
        return ivf_line(e)

    def draw(self, e: dict[str, Any]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        p = self.bars(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[unit]}"), TimeElapsedColumn())
        if e["event"] == "index_start":
            self._task = p.add_task(e["index"], total=e["parts"], unit="parts")
        elif e["event"] == "index_progress" and self._task is not None:
            p.update(self._task, completed=e["parts_done"])
        elif e["event"] == "ivf_progress":
            # IVF: rows assigned to their lists, over every shard the build covers
            if self._task is None:
                self._task = p.add_task("assigning rows to lists", total=e["rows"], unit="rows")
            p.update(self._task, completed=e["rows_done"])
        elif ivf_line(e):
            p.console.print(ivf_line(e), markup=False, highlight=False)


def ivf_line(e: dict[str, Any]) -> str | None:
    """The IVF build's steps (laion_search.index.ivf), as one line each."""
    if e["event"] == "ivf_train":
        return f"{e['index']}: k-means, {e['lists']:,} lists on {e['sample']:,} sampled rows"
    if e["event"] == "ivf_compact":
        return f"{e['index']}: merging its {e['parts']} parts (a probe reads each list once per part)"
    return None


class EmbedProgress(Progress):
    """``laion embed``: a bar of images with images/s on a terminal, a line per shard otherwise,
    the events (but ``batch``) as JSON lines with --json."""

    def __init__(self, mode: str):
        super().__init__(mode)
        self._task = None

    def line(self, e: dict[str, Any]) -> str | None:
        if e["event"] in ("shard_done", "shard_skipped"):
            return f"shard {e['shard']}: {e['images']} images {'skipped (complete)' if 'skipped' in e['event'] else 'written'}"
        return None

    def draw(self, e: dict[str, Any]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        p = self.bars(TextColumn("embed"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                      TimeRemainingColumn())
        if self._task is None:
            self._task = p.add_task("embed", total=None, rate="")
        if e["event"] == "start":
            p.update(self._task, total=e["images"])
        elif e["event"] == "batch":
            p.update(self._task, completed=e["images_done"],
                     rate=f"{e['images_done'] / max(e['seconds'], 1e-9):.1f} images/s")


def _label(e: dict[str, Any]) -> str:
    """``shard 3``, or ``shard 1000000 (laion5b_100m_part_1_of_10.parquet)`` for a single-file source."""
    return f"shard {e['shard']}" + (f" ({e['name']})" if e.get("name") else "")


class IngestProgress(Progress):
    """Ingest events: one bar of rows (rows/s, ETA) on a terminal, a line per shard otherwise, the
    events (but ``batch``) as JSON lines with --json."""

    def __init__(self, mode: str):
        super().__init__(mode)
        self._task = None
        self._done_before = 0
        self._t0 = time.perf_counter()

    def line(self, e: dict[str, Any]) -> str | None:
        kind = e["event"]
        if kind == "start":
            return f"ingesting {len(e['shards'])} shard(s), {e['rows']:,} rows"
        if kind == "shard_skipped":
            return f"{_label(e)}: skipped ({e['reason']})"
        if kind == "shard_done":
            rate = e["rows"] / e["seconds"] if e["seconds"] else 0
            extra = f", {e['renormalised']:,} vectors renormalised" if e["renormalised"] else ""
            return f"{_label(e)}: {e['rows']:,} rows in {e['seconds']:.1f} s ({rate:,.0f} rows/s){extra}"
        if kind == "shard_indexed":
            return f"{_label(e)}: {', '.join(e['indexes'])} built in {e['seconds']:.1f} s"
        if kind == "ivf_progress":  # shards loaded before --index-kind ivf, assigned from the table
            return f"IVF: {e['rows_done']:,}/{e['rows']:,} rows of earlier shards assigned"
        return ivf_line(e)

    def draw(self, e: dict[str, Any]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        kind = e["event"]
        if kind == "start":
            p = self.bars(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                          TimeRemainingColumn())
            self._task = p.add_task("ingest", total=e["rows"] or None, rate="")
            return
        p = self._progress
        if p is None:
            return
        if kind == "shard_start":
            p.update(self._task, description=_label(e))
        elif kind == "shard_index":
            p.update(self._task, description=f"{_label(e)}: building {', '.join(e['indexes'])}")
        elif kind == "shard_indexed" or ivf_line(e):
            p.console.print(self.line(e), markup=False, highlight=False)
        elif kind == "batch":
            done = self._done_before + e["rows_done"]
            elapsed = time.perf_counter() - self._t0
            rate = f"{done / elapsed:,.0f} rows/s" if elapsed > 0 else ""
            p.update(self._task, completed=done, rate=rate)
        elif kind in ("shard_done", "shard_skipped"):
            self._done_before += e["rows"]
            p.update(self._task, completed=self._done_before)
            if kind == "shard_skipped":
                p.console.print(f"{_label(e)}: skipped ({e['reason']})")
        elif kind == "done":
            p.update(self._task, completed=self._done_before, description="ingest")


class DownloadProgress(Progress):
    """Download events as rich bars (one per active file, plus a total with MB/s and ETA) on a
    terminal, plain lines otherwise, or JSON lines (``file_bytes`` at most once a second per file)."""

    json_skip = frozenset({"ingest_batch"})

    def __init__(self, mode: str):
        super().__init__(mode)
        self._total_task = None
        self._tasks: dict[str, Any] = {}
        self._files: dict[str, dict[str, Any]] = {}  # file → {base, size, done, kind}
        self._pending_kinds: dict[str, int] = {}     # files not started yet, by kind
        self._last_json: dict[str, float] = {}
        self._last_plain = time.monotonic()  # first plain progress line after 5 s
        self._t0 = time.perf_counter()

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

    def observe(self, e: dict[str, Any]) -> None:
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

    def want_json(self, e: dict[str, Any]) -> bool:
        if e["event"] == "file_bytes":
            now = time.monotonic()
            if now - self._last_json.get(e["file"], 0.0) < 1.0:
                return False
            self._last_json[e["file"]] = now
        return super().want_json(e)

    def _rate_eta(self) -> str:
        done, total = self._totals()
        elapsed = time.perf_counter() - self._t0
        rate = done / elapsed if elapsed > 0 else 0
        eta = f", ETA {(total - done) / rate:,.0f} s" if rate > 0 and total > done else ""
        return f"{human_bytes(done)} of ~{human_bytes(total)}, {rate / 1e6:,.1f} MB/s{eta}"

    def line(self, e: dict[str, Any]) -> str | None:
        if e["event"] == "file_bytes":
            now = time.monotonic()
            if now - self._last_plain >= 5.0:
                self._last_plain = now
                return f"progress: {self._rate_eta()}"
            return None
        return self._message(e)

    def _message(self, e: dict[str, Any]) -> str | None:
        kind = e["event"]
        if kind == "start" and e.get("source"):
            return (f"downloading {e['files']} file(s) of {e['source']} from {e['base_url'] or 'its URLs'} "
                    f"to {e['to']} with {e['jobs']} connection(s)")
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
            return f"{_label(e)}: skipped ({e['reason']})"
        if kind == "shard_failed":
            return f"FAILED shard {e['shard']} {e['file']} ({e['url']}): {e['reason']}"
        if kind == "ingest_done":
            return f"shard {e['shard']}: ingested {e['rows']:,} rows in {e['seconds']:.1f} s"
        if kind == "ingest_skipped":
            return f"shard {e['shard']}: ingest skipped ({e['reason']})"
        if kind == "shard_deleted":
            return f"shard {e['shard']}: files deleted after ingest"
        return None

    def draw(self, e: dict[str, Any]) -> None:
        from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        kind = e["event"]
        if self._progress is None:
            bars = self.bars(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                             TextColumn("ETA"), TimeRemainingColumn())
            self._total_task = bars.add_task("[bold]total", total=None)
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
