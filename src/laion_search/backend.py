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
        if value.dtype == np.float32 and value.ndim == 1:
            # query vectors: 9 significant digits round-trip a float32 exactly, in ~2/3 of repr's
            # text (less for the engine to parse) and ~2.5× faster to format
            return "[" + ",".join(["%.9g" % v for v in value.tolist()]) + "]"
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
MAX_SESSIONS = max(4, os.cpu_count() or 1)  # concurrent queries on one embedded store
_process_lock = threading.Lock()
_open_path: str | None = None

OWNER_FILE = "laion-search.owner.json"


class ChdbBackend:
    """Embedded ClickHouse (chDB) over a directory on disk."""

    name = "chdb"
    embedded = True
    cluster = None

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
                first = chdb_session.Session(uri)
            except Exception as exc:  # chDB raises plain RuntimeError/ChdbError here
                raise _busy_or_store_error(self.path, exc) from exc
            _open_path = self.path
        self._new_session = lambda: chdb_session.Session(uri)
        # A pool of sessions over the one engine: concurrent queries from several threads run in
        # parallel (one chDB session is not safe to share: parameters of one query leak into
        # another). ``SET`` statements are recorded and replayed on every session.
        self._cond = threading.Condition()
        self._all = [first]
        self._idle = [first]
        self._applied = {id(first): 0}
        self._sets: list[str] = []
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
        text_params = {k: format_param(v) for k, v in (params or {}).items()}
        is_set = not params and _SET_RE.match(sql) is not None
        session = self._acquire()
        try:
            if is_set:
                session.query(sql, "CSV")  # raises on a bad setting before it is recorded
                with self._cond:
                    self._sets.append(sql)
                    self._applied[id(session)] = len(self._sets)
                return None
            if text_params:
                return session.query(sql, fmt, params=text_params)
            return session.query(sql, fmt)
        except Exception as exc:
            raise QueryError(clean_engine_message(str(exc))) from exc
        finally:
            self._release(session)

    def _acquire(self) -> Any:
        with self._cond:
            while True:
                if self._closed:
                    raise StoreError(f"the store {self.path} is closed")
                if self._idle:
                    session = self._idle.pop()
                    break
                if len(self._all) < MAX_SESSIONS:
                    session = self._new_session()
                    self._all.append(session)
                    self._applied[id(session)] = 0
                    break
                self._cond.wait()
            pending = self._sets[self._applied[id(session)]:]
            self._applied[id(session)] = len(self._sets)
        for stmt in pending:
            session.query(stmt, "CSV")
        return session

    def _release(self, session: Any) -> None:
        with self._cond:
            if self._closed:
                session.close()
            else:
                self._idle.append(session)
                self._cond.notify()

    def close(self) -> None:
        global _open_path
        with _process_lock:
            if self._closed:
                return
            with self._cond:
                self._closed = True
                idle, self._idle = self._idle, []
                self._cond.notify_all()
            try:
                for session in idle:  # sessions busy right now close when their query ends
                    session.close()
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
    # a process that won the race for the lock after our probe: chDB then reports only
    # "Error initializing EmbeddedServer", so look at the lock again
    if "Cannot lock file" in message or "already running" in message or _locked_by_other_process(path):
        owner = read_owner(path)
        who = ""
        if owner:
            who = f" by process {owner.get('pid')} ({owner.get('command')}, since {owner.get('since')})"
        return StoreBusyError(
            f"the store {path} is in use{who}. chDB lets one process open a store at a time: "
            "wait for that process to finish (or stop it) and retry"
        )
    return StoreError(f"cannot open the store {path}: {clean_engine_message(message)}")


# -- ClickHouse server / cluster ------------------------------------------------------------------

#: URL schemes a store target may use, and what they mean for clickhouse-connect.
URL_SCHEMES = {"clickhouse": ("http", 8123), "http": ("http", 8123),
               "clickhouses": ("https", 8443), "https": ("https", 8443)}

_SET_RE = re.compile(r"^\s*SET\s+([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.+?)\s*;?\s*$", re.I | re.S)
_RESULT_RE = re.compile(r"^\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*(\(\s*)*(SELECT|WITH|EXPLAIN|SHOW|DESC|DESCRIBE|EXISTS)\b",
                        re.I | re.S)
#: Sent with every result query: Strings as Arrow strings (as the embedded engine returns them),
#: whatever the server's default.
_ARROW_SETTINGS = {"output_format_arrow_string_as_string": 1}


def is_url(target: Any) -> bool:
    return isinstance(target, str) and target.split("://", 1)[0].lower() in URL_SCHEMES and "://" in target


def parse_url(url: str) -> dict[str, Any]:
    """``clickhouse://user:password@host:8123/db?secure=1`` → clickhouse-connect ``get_client`` arguments.

    ``clickhouse://`` and ``http://`` speak HTTP (default port 8123); ``clickhouses://`` and
    ``https://`` speak HTTPS (default 8443, ClickHouse Cloud's port). The path is the database
    (default ``default``); query options: ``secure=1``, ``verify=0``, ``cluster=NAME``.
    """
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in URL_SCHEMES:
        raise StoreError(f"unsupported URL scheme {parts.scheme!r}: use clickhouse://, clickhouses://, http:// or https://")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    interface, default_port = URL_SCHEMES[scheme]
    if query.get("secure", "").lower() in ("1", "true", "yes"):
        interface, default_port = "https", 8443
    if not parts.hostname:
        raise StoreError(f"no host in the URL {redact_url(url)}")
    try:
        port = parts.port or default_port
    except ValueError:
        raise StoreError(f"bad port in the URL {redact_url(url)}") from None
    database = unquote(parts.path.strip("/")) or "default"
    if not re.fullmatch(r"[A-Za-z0-9_]+", database):
        raise StoreError(f"database name must be letters, digits and underscores, got {database!r}")
    out: dict[str, Any] = {"interface": interface, "host": parts.hostname, "port": port, "database": database,
                           "username": unquote(parts.username) if parts.username else "default",
                           "password": unquote(parts.password) if parts.password else ""}
    if query.get("verify", "").lower() in ("0", "false", "no"):
        out["verify"] = False
    if query.get("cluster"):
        out["cluster"] = query["cluster"]
    return out


def redact_url(url: str) -> str:
    """The URL without its password (for messages and ``laion status``)."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _plain(value: Any) -> Any:
    """Query parameter values as the plain Python types clickhouse-connect formats exactly
    (it would print a numpy array with ``str()``, i.e. abbreviated)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)  # str(float) is repr: the shortest text that reads back exactly
    return value


class ClickHouseBackend:
    """A ClickHouse server, cluster or ClickHouse Cloud service over HTTP(S), via clickhouse-connect.

    Results come back as Arrow; inserts go as Arrow (``INSERT … FORMAT Arrow``), never as text.
    Query parameters are bound by the server (``param_<name>``), so values arrive exactly.
    ``SET name = value`` is kept client-side and sent with every later statement: the HTTP
    interface is stateless, and a shared session would serialise concurrent queries.
    """

    name = "clickhouse"
    embedded = False

    def __init__(self, url: str, **client_options: Any):
        import clickhouse_connect
        from clickhouse_connect.driver.exceptions import ClickHouseError

        self.url = url
        self.location = redact_url(url)
        opts = parse_url(url)
        self.cluster: str | None = opts.pop("cluster", None)
        self.database = opts["database"]
        self._settings: dict[str, Any] = {}
        self._closed = False
        try:
            self._client = clickhouse_connect.get_client(
                **opts, autogenerate_session_id=False, compress=False, connect_timeout=10,
                send_receive_timeout=3600, **client_options)
        except ClickHouseError as exc:
            raise StoreError(f"cannot connect to {self.location}: {_client_message(exc)}") from exc
        except Exception as exc:  # urllib3/socket errors surface as OperationalError or plain OSError
            raise StoreError(f"cannot connect to {self.location}: {_client_message(exc)}") from exc
        self.server_version = self._client.server_version

    # -- statements -------------------------------------------------------------------------
    def command(self, sql: str, params: Params | None = None) -> None:
        m = _SET_RE.match(sql)
        if m and not params:
            value = m.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] == "'":
                value = value[1:-1]
            self._settings[m.group(1)] = value
            return
        self._call(lambda: self._client.command(sql, parameters=self._params(params),
                                                settings=self._settings or None))

    def query_arrow(self, sql: str, params: Params | None = None) -> pa.Table:
        if not _RESULT_RE.match(sql):  # DDL/DML: no result set, so no FORMAT clause
            self.command(sql, params)
            return pa.table({})
        data = self._call(lambda: self._client.raw_query(sql, parameters=self._params(params),
                                                          settings={**_ARROW_SETTINGS, **self._settings}, fmt="Arrow"))
        if not data:
            return pa.table({})
        return pa.ipc.open_file(pa.py_buffer(data)).read_all()

    def insert_arrow(self, table: str, data: pa.Table, settings: Mapping[str, Any] | None = None) -> None:
        merged = {**self._settings, **(settings or {})}
        self._call(lambda: self._client.insert_arrow(table, data, settings=merged or None))

    def _params(self, params: Params | None) -> dict[str, Any] | None:
        if not params:
            return None
        return {k: _plain(v) for k, v in params.items()}

    def _call(self, fn: Any) -> Any:
        if self._closed:
            raise StoreError(f"the connection to {self.location} is closed")
        try:
            return fn()
        except Exception as exc:
            raise QueryError(_client_message(exc)) from exc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing a pool never matters to the caller
                pass


_CLIENT_NOISE = re.compile(r"^.*?(?=Code: \d+\.)", re.S)


def _client_message(exc: BaseException) -> str:
    """clickhouse-connect wraps the server's ``Code: N. DB::Exception: …`` in its own text
    (URL, HTTP status); keep the engine's message, one line."""
    text = str(exc)
    if "Code:" in text:
        text = _CLIENT_NOISE.sub("", text, count=1)
    text = re.sub(r"\s*\(for url [^)]*\)", "", text)
    return clean_engine_message(text)
