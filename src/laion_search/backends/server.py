"""A ClickHouse server or cluster through clickhouse-connect (HTTP), behind the same Backend boundary."""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from laion_search.backends.base import _SET_RE, Params, clean_engine_message
from laion_search.errors import QueryError, StoreError

#: URL schemes a store target may use, and what they mean for clickhouse-connect.
URL_SCHEMES = {"clickhouse": ("http", 8123), "http": ("http", 8123),
               "clickhouses": ("https", 8443), "https": ("https", 8443)}

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

    def query_text(self, sql: str, params: Params | None = None, fmt: str = "CSV") -> str:
        data = self._call(lambda: self._client.raw_query(sql, parameters=self._params(params),
                                                          settings=self._settings or None, fmt=fmt))
        return bytes(data or b"").decode("utf-8", "replace")

    def rows_read(self, sql: str, params: Params | None = None) -> int | None:
        result = self._call(lambda: self._client.query(sql, parameters=self._params(params),
                                                        settings=self._settings or None))
        read = (getattr(result, "summary", None) or {}).get("read_rows")
        return int(read) if read is not None else None

    def query_raw(self, sql: str, params: Params | None = None, *, fmt: str = "JSONCompact",
                  settings: Mapping[str, Any] | None = None, readonly: bool = False) -> bytes:
        merged = {**self._settings, **(settings or {}), **({"readonly": 1} if readonly else {})}
        return bytes(self._call(lambda: self._client.raw_query(sql, parameters=self._params(params),
                                                               settings=merged or None, fmt=fmt)))

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
