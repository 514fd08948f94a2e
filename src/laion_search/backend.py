"""The one boundary between laion-search and a ClickHouse engine.

A backend does four things: run a statement with query parameters, fetch a result as an
Arrow table, insert an Arrow table, and close. Everything above it (store, ingest, search,
CLI, HTTP) is written against :class:`Backend` only, so the embedded chDB engine and a
ClickHouse server run the same SQL.

User values always travel as query parameters (``{name:Type}`` placeholders); identifiers
come from fixed sets chosen by the caller, never from users.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import pyarrow as pa

from .errors import QueryError, StoreBusyError, StoreError

Params = Mapping[str, Any]


class Backend(Protocol):
    """What the store needs from an engine."""

    name: str
    location: str

    def command(self, sql: str, params: Params | None = None) -> None: ...

    def query_arrow(self, sql: str, params: Params | None = None) -> pa.Table: ...

    def insert_arrow(self, table: str, data: pa.Table, settings: Mapping[str, Any] | None = None) -> None: ...

    def close(self) -> None: ...


def format_param(value: Any) -> str:
    """Render a Python value as the text ClickHouse expects for a query parameter.

    The engine parses this text as a value of the placeholder's declared type, so it can never
    become SQL. A top-level String is read with TSV escaping (``\\t``, ``\\n``, ``\\\\``); strings
    inside arrays are quoted literals with backslash escapes. Either way the value arrives exactly.
    """
    if isinstance(value, str):
        return value.translate(_TSV)
    return _literal(value)


_TSV = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0"})


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.translate(_TSV).replace("'", "\\'") + "'"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    raise TypeError(f"unsupported query parameter type: {type(value).__name__}")


def settings_sql(settings: Mapping[str, Any]) -> str:
    """`` SETTINGS a = 1, b = 'x'`` for settings our code chooses (names and values never come
    from users); empty when there are none."""
    if not settings:
        return ""
    parts = [f"{k} = '{v}'" if isinstance(v, str) else f"{k} = {format_param(v)}" for k, v in settings.items()]
    return " SETTINGS " + ", ".join(parts)


_CODE_RE = re.compile(r"\s*\(version [^)]*\)")


def clean_engine_message(message: str) -> str:
    """Keep the engine's first meaningful line: no stack traces, no version suffix."""
    text = str(message).strip()
    text = text.split("Stack trace", 1)[0].strip()
    text = _CODE_RE.sub("", text)
    # chDB sometimes nests "Code: N. DB::Exception: Code: N. DB::Exception: …"
    while text.count("DB::Exception:") > 1:
        text = text.split("DB::Exception:", 1)[1].strip()
    return text.splitlines()[0] if text else "unknown engine error"


# chDB hosts one engine per process, bound to one data directory at a time.
_process_lock = threading.Lock()
_open_path: str | None = None

OWNER_FILE = "laion-search.owner.json"


class ChdbBackend:
    """Embedded ClickHouse (chDB) over a directory on disk."""

    name = "chdb"

    def __init__(self, path: str | os.PathLike[str], *, udf_path: str | None = None):
        global _open_path
        from chdb import session as chdb_session  # imported here: heavy, and only this backend needs it

        self.path = str(Path(path).expanduser().resolve())
        self.location = self.path
        Path(self.path).mkdir(parents=True, exist_ok=True)
        with _process_lock:
            if _open_path is not None and _open_path != self.path:
                raise StoreError(
                    f"this process already has the embedded store {_open_path} open; chDB can open one "
                    f"store per process, close it before opening {self.path}"
                )
            if _locked_by_other_process(self.path):
                raise _busy_or_store_error(self.path, RuntimeError("Cannot lock file"))
            uri = self.path if not udf_path else f"{self.path}?udf_path={udf_path}"
            try:
                self._session = chdb_session.Session(uri)
            except Exception as exc:  # chDB raises plain RuntimeError/ChdbError here
                raise _busy_or_store_error(self.path, exc) from exc
            _open_path = self.path
        self._lock = threading.RLock()
        self._closed = False
        _write_owner(self.path)

    # -- statements -------------------------------------------------------------------------
    def command(self, sql: str, params: Params | None = None) -> None:
        self._run(sql, params, "CSV")

    def query_arrow(self, sql: str, params: Params | None = None) -> pa.Table:
        result = self._run(sql, params, "ArrowTable")
        if isinstance(result, pa.Table):
            return result
        return pa.table({})

    def insert_arrow(self, table: str, data: pa.Table, settings: Mapping[str, Any] | None = None) -> None:
        # chDB's Python() table function finds the object by its variable name in this frame.
        laion_insert_batch = data  # noqa: F841  (read by the engine, by name)
        columns = ", ".join(f"`{c}`" for c in data.column_names)
        sql = f"INSERT INTO {table} ({columns}) SELECT {columns} FROM Python(laion_insert_batch)"
        self._run(sql + settings_sql(settings or {}), None, "CSV")

    def _run(self, sql: str, params: Params | None, fmt: str) -> Any:
        if self._closed:
            raise StoreError(f"the store {self.path} is closed")
        text_params = {k: format_param(v) for k, v in (params or {}).items()}
        with self._lock:
            try:
                if text_params:
                    return self._session.query(sql, fmt, params=text_params)
                return self._session.query(sql, fmt)
            except Exception as exc:
                raise QueryError(clean_engine_message(str(exc))) from exc

    def close(self) -> None:
        global _open_path
        with _process_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._session.close()
            finally:
                _open_path = None
                try:
                    (Path(self.path) / OWNER_FILE).unlink()
                except OSError:
                    pass


def _locked_by_other_process(path: str) -> bool:
    """ClickHouse holds an exclusive ``flock`` on ``<store>/status`` while a process has the
    store open. Probe it ourselves, so a busy store gives our clear error instead of chDB's
    ("Error initializing EmbeddedServer"), and without chDB printing to stderr."""
    import fcntl

    status = Path(path) / "status"
    try:
        fd = os.open(status, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _write_owner(path: str) -> None:
    import sys

    info = {"pid": os.getpid(), "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300],
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        (Path(path) / OWNER_FILE).write_text(json.dumps(info))
    except OSError:
        pass


def read_owner(path: str) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _busy_or_store_error(path: str, exc: Exception) -> StoreError:
    message = str(exc)
    if "Cannot lock file" in message or "already running" in message:
        owner = read_owner(path)
        who = ""
        if owner:
            who = f" by process {owner.get('pid')} ({owner.get('command')}, since {owner.get('since')})"
        return StoreBusyError(
            f"the store {path} is in use{who}. chDB lets one process open a store at a time: "
            "wait for that process to finish (or stop it) and retry"
        )
    return StoreError(f"cannot open the store {path}: {clean_engine_message(message)}")
