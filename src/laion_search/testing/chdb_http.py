"""TEST FIXTURE: a ClickHouse HTTP endpoint backed by chDB — not a ClickHouse server.

No ClickHouse server binary can be installed on our build machines, but chDB *is* the
ClickHouse engine (in-process). This module puts the part of ClickHouse's HTTP interface that
clickhouse-connect uses in front of one chDB store, so the server code path of laion-search
(:class:`~laion_search.backends.server.ClickHouseBackend`: URL parsing, clickhouse-connect, server-side
query parameters, Arrow results, Arrow inserts, error mapping) runs in every ``make test``
against the real engine. Run it in its own process (chDB hosts one store per process)::

    python -m laion_search.testing.chdb_http --path /tmp/fixture-db --port 0 [--user U --password P]
        [--tls-cert cert.pem --tls-key key.pem]   # HTTPS

It prints ``LISTENING http://127.0.0.1:PORT`` once ready and serves until killed. Binds 127.0.0.1.

What it implements (ClickHouse HTTP interface, https://clickhouse.com/docs/interfaces/http):

* ``GET /ping`` and ``GET /`` → ``Ok.``;
* ``GET``/``POST /`` with the query in the ``query`` URL parameter, in the body, or both
  (URL part + ``\\n`` + body, as the server does), or as ``multipart/form-data`` fields
  (``query`` and ``param_*``; clickhouse-connect uses this for long parameters);
* ``param_<name>`` query parameters, passed to the engine as they arrive, so the engine's own
  parser binds them (``{name:Type}``);
* ``database`` (runs ``USE``), ``default_format`` (default ``TabSeparated``), ``query_id``;
  other URL parameters are ClickHouse settings: HTTP-transport ones are ignored, the others are
  applied with ``SET`` for that one statement and restored afterwards;
* any output format the engine has (Native, Arrow, JSON, …), from a ``FORMAT`` clause or
  ``default_format``;
* ``INSERT … FORMAT <fmt>`` followed by data in the body (Arrow, Native, anything the engine
  reads): the data goes to a temp file and the engine runs ``INSERT … FROM INFILE`` on it;
  ``Content-Encoding: gzip``/``deflate`` request bodies are decompressed;
* response headers ``X-ClickHouse-Query-Id``, ``X-ClickHouse-Format``, ``X-ClickHouse-Timezone``,
  ``X-ClickHouse-Summary`` (read/written rows);
* errors as the server sends them: ``Code: N. DB::Exception: … (version …)`` with HTTP 400/404/500
  and ``X-ClickHouse-Exception-Code: N``; with ``--user/--password``, HTTP Basic auth or
  ``X-ClickHouse-User``/``X-ClickHouse-Key`` are checked (code 516 otherwise).

What it does not do: sessions (``session_id`` is ignored: there is one engine session),
response compression (it always answers uncompressed, which clients accept), external data,
progress headers, the native TCP protocol, Keeper. All statements run one at a time under a lock.

**A one-node cluster** (``--cluster NAME``): the engine starts with a ``remote_servers`` entry
``NAME`` of one shard whose one replica is this engine itself (127.0.0.1 on the configured
``tcp_port``, so the engine counts it local and never connects: chDB cannot listen). Distributed
tables over ``NAME``, ``cluster('NAME', …)`` and ``insert_distributed_sync`` then run for real.
``ON CLUSTER NAME`` DDL needs Keeper's DDL queue, which chDB lacks; on a one-node cluster that
queue's only host would run the statement itself, so the fixture runs it here without the clause
(its answer is the statement's own, not the per-host status table a server sends). Anything else
about clusters (more shards, replication) is out of its reach.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import re
import sys
import tempfile
import threading
import uuid
import zlib
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

#: URL parameters that configure the HTTP transport, not the query.
TRANSPORT_PARAMS = {
    "query", "database", "default_format", "query_id", "session_id", "session_timeout", "session_check",
    "user", "password", "quota_key", "compress", "decompress", "buffer_size", "wait_end_of_query",
    "enable_http_compression", "http_zlib_compression_level", "send_progress_in_http_headers",
    "http_headers_progress_interval_ms", "cancel_http_readonly_queries_on_client_close", "client_protocol_version",
    "http_native_compression_disable_checksumming_on_decompress", "role", "default_database",
}
_FORMAT_RE = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.I)
_INSERT_HEAD_RE = re.compile(rb"^\s*INSERT\b.*?\bFORMAT\s+([A-Za-z0-9_]+)[ \t]*(\r?\n)?", re.I | re.S)
_CODE_RE = re.compile(r"Code:\s*(\d+)")
_RESULT_RE = re.compile(r"^\s*(\(\s*)*(SELECT|WITH|EXPLAIN|SHOW|DESC|DESCRIBE|EXISTS)\b", re.I)
_HTTP_STATUS = {62: 400, 27: 400, 36: 400, 43: 400, 47: 400, 53: 400, 60: 404, 81: 404, 516: 403, 164: 403}


class Engine:
    """One chDB session, used by one statement at a time."""

    def __init__(self, path: str, cluster: str | None = None):
        from chdb import session as chdb_session

        self.path = path
        self.cluster = cluster
        self.uri = path
        if cluster:
            self.uri = f"{path}?config-file={_cluster_config(path, cluster)}"
        self.session = chdb_session.Session(self.uri)
        self.lock = threading.Lock()
        self.database = "default"
        self.version = self._scalar("SELECT version()")
        self.timezone = self._scalar("SELECT timezone()")

    def _scalar(self, sql: str) -> str:
        return self.session.query(sql, "TabSeparated").bytes().decode().strip()

    def run(self, sql: str, fmt: str, params: dict[str, str], settings: dict[str, str], database: str | None,
            data: bytes | None = None, data_format: str | None = None) -> tuple[bytes, dict[str, int]]:
        sql = self._here(sql)
        if settings.get("readonly", "0") not in ("", "0"):
            return self._run_read_only(sql, fmt, params, settings, database)
        with self.lock:
            if database and database != self.database:
                self.session.query(f"USE `{database.replace('`', '')}`", "TabSeparated")
                self.database = database
            restore = self._apply(settings)
            tmp = None
            try:
                if data is not None:
                    tmp = tempfile.NamedTemporaryFile(prefix="chdb-http-", suffix=".bin", delete=False)
                    tmp.write(data)
                    tmp.close()
                    quoted = tmp.name.replace("\\", "\\\\").replace("'", "\\'")
                    sql = f"{sql} FROM INFILE '{quoted}' FORMAT {data_format}"
                result = self.session.query(sql, fmt, params=params) if params else self.session.query(sql, fmt)
                body = result.bytes() if hasattr(result, "bytes") else (result or b"")
                stats = {}
                for name in ("rows_read", "bytes_read"):  # from storage, as a server's read_rows counts them
                    try:
                        stats[name] = int(getattr(result, "storage_" + name)())
                    except Exception:  # noqa: BLE001 - statistics are optional
                        stats[name] = 0
                return body or b"", stats
            finally:
                if tmp is not None:
                    os.unlink(tmp.name)
                for stmt in restore:
                    try:
                        self.session.query(stmt, "TabSeparated")
                    except Exception:  # noqa: BLE001
                        pass

    def _run_read_only(self, sql: str, fmt: str, params: dict[str, str], settings: dict[str, str],
                       database: str | None) -> tuple[bytes, dict[str, int]]:
        """A statement with ``readonly`` set, as a server runs it: in a session of its own (a
        read-only session cannot be put back, so it is not the shared one), ``readonly`` last."""
        from chdb import session as chdb_session

        session = chdb_session.Session(self.uri)
        try:
            session.query(f"USE `{(database or self.database).replace('`', '')}`", "TabSeparated")
            for name, value in sorted(settings.items(), key=lambda kv: kv[0] == "readonly"):
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    raise EngineError(115, f"Unknown setting '{name}'")
                quoted = value.replace("\\", "\\\\").replace("'", "\\'")
                session.query(f"SET {name} = '{quoted}'", "TabSeparated")
            result = session.query(sql, fmt, params=params) if params else session.query(sql, fmt)
            body = result.bytes() if hasattr(result, "bytes") else (result or b"")
            return body or b"", {"rows_read": 0, "bytes_read": 0}
        finally:
            session.close()

    def _here(self, sql: str) -> str:
        """The statement as this node runs it: ``ON CLUSTER`` this fixture's one-node cluster is
        run by its only host, without the clause."""
        if not self.cluster:
            return sql
        name = re.escape(self.cluster)
        return re.sub(rf"\s+ON\s+CLUSTER\s+(`{name}`|'{name}'|\"{name}\"|{name}\b)", "", sql, count=1, flags=re.I)

    def _apply(self, settings: dict[str, str]) -> list[str]:
        """SET each setting for one statement; return the statements that put them back."""
        restore = []
        for name, value in settings.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise EngineError(115, f"Unknown setting '{name}'")
            old = self.session.query("SELECT value FROM system.settings WHERE name = {n:String}", "TabSeparated",
                                     params={"n": name}).bytes().decode().rstrip("\n")
            quoted = value.replace("\\", "\\\\").replace("'", "\\'")
            self.session.query(f"SET {name} = '{quoted}'", "TabSeparated")
            if old == "":
                raise EngineError(115, f"Unknown setting '{name}'")
            restore.append(f"SET {name} = '{old.replace(chr(92), chr(92) * 2).replace(chr(39), chr(92) + chr(39))}'")
        return restore


#: The one-node cluster's ``tcp_port``: never listened on (chDB cannot), only compared with the
#: replica's port so that the engine counts the replica as itself.
CLUSTER_TCP_PORT = 9000


def _cluster_config(path: str, cluster: str) -> str:
    """Write the engine's config for a one-node cluster named ``cluster``; returns its path."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", cluster):
        raise ValueError(f"cluster name must be letters, digits, '_' or '-', got {cluster!r}")
    config = os.path.abspath(path.rstrip("/") + ".cluster.xml")
    with open(config, "w") as f:
        f.write(f"""<clickhouse>
  <tcp_port>{CLUSTER_TCP_PORT}</tcp_port>
  <remote_servers>
    <{cluster}>
      <shard><replica><host>127.0.0.1</host><port>{CLUSTER_TCP_PORT}</port></replica></shard>
    </{cluster}>
  </remote_servers>
</clickhouse>
""")
    return config


class EngineError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _form_fields(ctype: str, body: bytes) -> dict[str, str]:
    """A multipart/form-data body's fields (as ClickHouse takes query parameters); external
    data (files) is refused."""
    fields = {}
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename():
            raise EngineError(1, "this test fixture does not support external data")
        payload = part.get_payload(decode=True)
        fields[str(name)] = payload.decode() if isinstance(payload, bytes) else str(payload)
    return fields


def _split_insert(sql_bytes: bytes) -> tuple[str, bytes | None, str | None]:
    """A statement as (SQL, inline data, its format): an ``INSERT … FORMAT F`` carries its rows
    after the head; any other statement has neither."""
    head = _INSERT_HEAD_RE.match(sql_bytes[:1 << 16])
    if not head:
        return sql_bytes.decode(), None, None
    data = sql_bytes[head.end():]
    sql = sql_bytes[:head.start(1)].decode().rstrip()
    sql = re.sub(r"\bFORMAT\s*$", "", sql, flags=re.I).rstrip()
    return sql, (data if data.strip() else b""), head.group(1).decode()


def make_handler(engine: Engine, user: str | None, password: str | None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "chdb-http-fixture"

        def log_message(self, fmt: str, *args) -> None:  # quiet: tests read our stdout
            if os.environ.get("CHDB_HTTP_LOG"):
                sys.stderr.write("chdb_http: " + (fmt % args) + "\n")

        def do_GET(self) -> None:
            self._handle()

        def do_POST(self) -> None:
            self._handle()

        # -- request --------------------------------------------------------------------------
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                body = b"".join(chunks)
            else:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            encoding = (self.headers.get("Content-Encoding") or "").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding not in ("", "identity"):
                raise EngineError(1, f"this test fixture does not decode Content-Encoding {encoding}")
            return body

        def _auth(self) -> None:
            if user is None:
                return
            got_user, got_password = self.headers.get("X-ClickHouse-User"), self.headers.get("X-ClickHouse-Key", "")
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Basic "):
                got_user, _, got_password = base64.b64decode(auth[6:]).decode().partition(":")
            if got_user != user or got_password != (password or ""):
                raise EngineError(516, f"{got_user or 'default'}: Authentication failed: password is incorrect, "
                                       "or there is no user with such name.")

        def _handle(self) -> None:
            query_id = str(uuid.uuid4())
            try:
                url = urlsplit(self.path)
                if url.path == "/ping" or (self.command == "GET" and url.path == "/" and not url.query):
                    return self._reply(200, b"Ok.\n", {})
                if url.path != "/":
                    raise EngineError(0, f"this test fixture serves / and /ping only, not {url.path}")
                args = dict(parse_qsl(url.query, keep_blank_values=True))
                body = self._body()
                self._auth()
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith("multipart/form-data"):
                    args.update(_form_fields(ctype, body))
                    body = b""
                query_id = args.get("query_id") or query_id
                text = args.get("query", "")
                sql_bytes = (text.encode() + (b"\n" + body if text and body else body)) if body else text.encode()
                sql, data, data_format = _split_insert(sql_bytes)
                if not sql.strip():
                    raise EngineError(62, "Syntax error: empty query")
                params = {k[6:]: v for k, v in args.items() if k.startswith("param_")}
                settings = {k: v for k, v in args.items() if k not in TRANSPORT_PARAMS and not k.startswith("param_")}
                m = _FORMAT_RE.search(sql)
                fmt = m.group(1) if m else args.get("default_format", "TabSeparated")
                result, stats = engine.run(sql, "TabSeparated" if m else fmt, params, settings, args.get("database"),
                                           data, data_format)
                headers = {"X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": engine.timezone,
                           "X-ClickHouse-Server-Display-Name": "chdb-http-fixture",
                           "X-ClickHouse-Summary": json.dumps({
                               "read_rows": str(stats.get("rows_read", 0)), "read_bytes": str(stats.get("bytes_read", 0)),
                               "written_rows": "0", "written_bytes": "0", "total_rows_to_read": "0",
                               "result_rows": "0", "result_bytes": str(len(result)), "elapsed_ns": "0"})}
                if m or _RESULT_RE.match(sql):
                    headers["X-ClickHouse-Format"] = fmt
                self._reply(200, result, headers)
            except EngineError as exc:
                self._error(exc.code, str(exc), query_id)
            except Exception as exc:  # noqa: BLE001 - the engine's errors become HTTP errors
                message = str(exc).strip()
                m = _CODE_RE.search(message)
                code = int(m.group(1)) if m else 1001
                if m:
                    message = message[m.start():]
                    message = re.sub(r"^Code:\s*\d+\.\s*(DB::Exception:\s*)?", "", message)
                self._error(code, message, query_id)

        def _error(self, code: int, message: str, query_id: str) -> None:
            body = f"Code: {code}. DB::Exception: {message} (version {engine.version} chdb-http-fixture)\n".encode()
            self._reply(_HTTP_STATUS.get(code, 500), body,
                        {"X-ClickHouse-Exception-Code": str(code), "X-ClickHouse-Query-Id": query_id})

        def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if status == 200 else "text/plain; charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def serve(path: str, host: str = "127.0.0.1", port: int = 0, user: str | None = None,
          password: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
          cluster: str | None = None) -> None:
    engine = Engine(path, cluster)
    httpd = ThreadingHTTPServer((host, port), make_handler(engine, user, password))
    httpd.daemon_threads = True
    scheme = "http"
    if tls_cert:  # HTTPS, as ClickHouse's https_port (ClickHouse Cloud's 8443)
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_cert, tls_key)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    print(f"LISTENING {scheme}://{host}:{httpd.server_address[1]}", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="TEST FIXTURE: ClickHouse's HTTP interface over one chDB store.")
    ap.add_argument("--path", required=True, help="chDB store directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    ap.add_argument("--user", default=None, help="require this user (HTTP Basic or X-ClickHouse-User)")
    ap.add_argument("--password", default=None)
    ap.add_argument("--tls-cert", default=None, help="serve HTTPS with this certificate (PEM)")
    ap.add_argument("--tls-key", default=None, help="its private key (PEM)")
    ap.add_argument("--cluster", default=None, help="be a one-node cluster of this name (see the module docstring)")
    a = ap.parse_args(argv)
    serve(a.path, a.host, a.port, a.user, a.password, a.tls_cert, a.tls_key, a.cluster)


if __name__ == "__main__":
    main()
