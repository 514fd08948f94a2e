"""Embedded ClickHouse: chDB over a directory on disk (one engine per process, a pool of sessions)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa

from laion_search import killpoints
from laion_search.backends.base import (_SET_RE, Params, clean_engine_message, format_param, format_setting,
                                        settings_sql)
from laion_search.errors import QueryError, StoreBusyError, StoreError

# chDB hosts one engine per process, bound to one data directory at a time.
MAX_SESSIONS = max(4, os.cpu_count() or 1)  # concurrent queries on one embedded store
_process_lock = threading.Lock()


#: ClickHouse's own size for the pool its HNSW builds share, whatever the machine.
ENGINE_BUILD_THREADS = 16


def index_build_threads() -> int | None:
    """``$LAION_INDEX_BUILD_THREADS``: threads for the engine's HNSW builds (ClickHouse's
    ``max_build_vector_similarity_index_thread_pool_size``); ``None`` (unset) keeps the engine's
    default of 16, which ``laion bench pipeline --build-threads 2,16`` measured as fast as (or
    faster than) one thread per core on a 2-core machine."""
    env = os.environ.get("LAION_INDEX_BUILD_THREADS", "").strip()
    if not env:
        return None
    try:
        n = int(env)
    except ValueError:
        raise StoreError(f"LAION_INDEX_BUILD_THREADS must be a whole number, got {env!r}") from None
    if n < 1:
        raise StoreError(f"LAION_INDEX_BUILD_THREADS must be at least 1, got {n}")
    return n


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
            options = {"max_build_vector_similarity_index_thread_pool_size": index_build_threads(), "udf_path": udf_path}
            query = "&".join(f"{k}={v}" for k, v in options.items() if v)
            uri = f"{self.path}?{query}" if query else self.path
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

    def query_text(self, sql: str, params: Params | None = None, fmt: str = "CSV") -> str:
        result = self._run(sql, params, fmt)
        return "" if result is None else str(result.data())

    def rows_read(self, sql: str, params: Params | None = None) -> int | None:
        result = self._run(sql, params, "CSV")
        return int(result.storage_rows_read()) if hasattr(result, "storage_rows_read") else None

    def query_raw(self, sql: str, params: Params | None = None, *, fmt: str = "JSONCompact",
                  settings: Mapping[str, Any] | None = None, readonly: bool = False) -> bytes:
        if not readonly:
            result = self._run(sql + settings_sql(settings or {}), params, fmt)
            return bytes(result.bytes()) if result is not None else b""
        # a session of its own (~2 ms to open over the running engine), dropped afterwards:
        # ``readonly = 1`` cannot be unset, and must not leak into the pool
        with self._cond:
            if self._closed:
                raise StoreError(f"the store {self.path} is closed")
            sets = list(self._sets)
        session = self._new_session()
        try:
            for stmt in sets:  # the server's own SETs: its time limit and its query tag
                session.query(stmt, "CSV")
            for name, value in (settings or {}).items():
                session.query(f"SET {name} = {format_setting(value)}", "CSV")
            session.query("SET readonly = 1", "CSV")
            text_params = {k: format_param(v) for k, v in (params or {}).items()}
            result = session.query(sql, fmt, params=text_params) if text_params else session.query(sql, fmt)
            return bytes(result.bytes())
        except Exception as exc:
            raise QueryError(clean_engine_message(str(exc))) from exc
        finally:
            session.close()

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
        killpoints.step()  # crash tests may kill here: before this statement, ...
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
            killpoints.step()  # ... or after it

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

