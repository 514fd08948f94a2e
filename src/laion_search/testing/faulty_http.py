"""A real HTTP/1.1 file server on 127.0.0.1 with scripted faults, for download tests and benchmarks.

It serves a directory with ``Content-Length``, ``ETag`` (size + mtime), ``Last-Modified``, single
``Range`` requests (``206`` + ``Content-Range``, ``416`` past the end) and ``If-Range``, one thread
per connection (so parallel downloads really run in parallel), optionally throttled per
connection (``rate`` bytes/s: a mirror's per-stream limit).

Faults are scripted per path: ``server.fault("/img_emb/img_emb_0.npy", Fault(reset_after=1000), Fault(status=503))``
queues faults that the next requests for that path consume, one each. Server-wide switches:
``no_range`` (ignore Range: always 200 with the whole file), ``ignore_if_range`` (serve the range
even when If-Range does not match), ``auth`` (answer ``401`` unless the request's ``Authorization``
header equals it: a gated repository), ``redirect_to`` (answer every request with ``302`` to this
prefix + the path, after the ``auth`` check: a hub whose files live on a CDN). ``Fault(redirect=URL)`` answers ``302`` (a hub handing off to
its CDN; with ``redirect_prefix`` the request's path is appended). Every request is logged in
``server.log``, with its ``Range`` and ``Authorization`` headers.

Run standalone for benchmarks: ``python -m laion_search.testing.faulty_http ROOT --rate 20e6``
(prints ``PORT <n>`` and serves until killed).
"""

from __future__ import annotations

import argparse
import email.utils
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit


RESET_WAIT = 10.0  # at most this many seconds for the client to read what was sent before a scripted reset
RESET_GRACE = 0.3  # where the client's receive queue cannot be seen: seconds to wait instead


def _hex_addr(addr: tuple) -> str:
    """``("127.0.0.1", 8080)`` as ``/proc/net/tcp`` writes it: ``0100007F:1F90``."""
    host, port = addr[0], addr[1]
    if ":" in host:  # IPv6: four 32-bit words, each in host (little-endian) order
        raw = socket.inet_pton(socket.AF_INET6, host)
        words = "".join(f"{int.from_bytes(raw[i:i + 4], 'little'):08X}" for i in range(0, 16, 4))
        return f"{words}:{port:04X}"
    return f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}"


def _peer_unread(sock: socket.socket) -> int | None:
    """Bytes sent on ``sock`` that the client has not read yet: still unacknowledged in our send
    queue, or unread in the receive queue of the client's end (the client runs on this host:
    loopback), from ``/proc/net/tcp``. None where the client's socket cannot be seen."""
    try:
        client, server = _hex_addr(sock.getpeername()), _hex_addr(sock.getsockname())
    except OSError:
        return None
    in_flight, unread = 0, None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    tx, rx = (int(x, 16) for x in fields[4].split(":"))
                    if fields[1] == client and fields[2] == server:
                        unread = rx
                    elif fields[1] == server and fields[2] == client:
                        in_flight = tx
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return None if unread is None else in_flight + unread


def _wait_until_read(sock: socket.socket) -> None:
    """Block until the client has taken every byte sent so far off its socket. A TCP reset that
    reaches a socket with unread data makes the client's kernel drop that data, so without this
    wait a scripted "reset after N bytes" would deliver N bytes or none depending on scheduling."""
    deadline = time.monotonic() + RESET_WAIT
    unread = _peer_unread(sock)
    if unread is None:
        time.sleep(RESET_GRACE)
        return
    while unread and time.monotonic() < deadline:
        time.sleep(0.005)
        unread = _peer_unread(sock) or 0


@dataclass
class Fault:
    """One scripted misbehaviour, consumed by one request for its path."""

    status: int | None = None            #: answer this status (500, 503, 429 …) with a short body
    retry_after: str | None = None       #: with ``status``: a Retry-After header value
    reset_after: int | None = None       #: send the headers and this many body bytes, then a TCP reset
    short_after: int | None = None       #: send this many body bytes of a full Content-Length, then close cleanly
    stall_after: int | None = None       #: send this many body bytes, then go silent for ``stall`` seconds
    stall: float = 0.0
    ignore_range: bool = False           #: answer this request with 200 and the whole file
    redirect: str | None = None          #: answer 302 with this Location (a mirror handing off to a CDN)
    redirect_prefix: str | None = None   #: answer 302 with this prefix + the request's path
    before: Callable[[], None] | None = None  #: run before answering (e.g. rewrite the file)


@dataclass
class LogEntry:
    path: str
    method: str
    range: str | None
    if_range: str | None
    status: int
    fault: Fault | None
    sent: int = 0
    authorization: str | None = None


class FaultyServer:
    """``with FaultyServer(root) as srv: url = srv.url`` — see the module docstring."""

    def __init__(self, root: str | os.PathLike[str], *, rate: float | None = None, no_range: bool = False,
                 ignore_if_range: bool = False, etag: bool = True, last_modified: bool = True,
                 host: str = "127.0.0.1", port: int = 0, auth: str | None = None,
                 redirect_to: str | None = None):
        self.root = Path(root).resolve()
        self.rate = rate
        self.no_range = no_range
        self.ignore_if_range = ignore_if_range
        self.etag = etag
        self.last_modified = last_modified
        self.auth = auth
        self.redirect_to = redirect_to
        self.log: list[LogEntry] = []
        self._faults: dict[str, list[Fault]] = {}
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.active = 0      # responses being sent right now
        self.max_active = 0  # the most at once: shows parallel downloads really overlap
        handler = type("Handler", (_Handler,), {"owner": self})
        self.httpd = _QuietServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fault(self, path: str, *faults: Fault) -> None:
        with self._lock:
            self._faults.setdefault(_norm(path), []).extend(faults)

    def pending_faults(self, path: str | None = None) -> int:
        with self._lock:
            if path is not None:
                return len(self._faults.get(_norm(path), []))
            return sum(len(v) for v in self._faults.values())

    def _take(self, path: str) -> Fault | None:
        with self._lock:
            q = self._faults.get(path)
            return q.pop(0) if q else None

    def requests(self, path: str | None = None, method: str = "GET") -> list[LogEntry]:
        with self._lock:
            return [e for e in self.log if (path is None or e.path == _norm(path)) and e.method == method]

    def start(self) -> "FaultyServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="faulty-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FaultyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up (timeouts, resets in tests) are expected here


def _norm(path: str) -> str:
    return "/" + path.lstrip("/")


class _Handler(BaseHTTPRequestHandler):
    owner: FaultyServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _record(self, path: str, status: int, fault: Fault | None) -> LogEntry:
        entry = LogEntry(path, self.command, self.headers.get("Range"), self.headers.get("If-Range"), status, fault,
                         authorization=self.headers.get("Authorization"))
        with self.owner._lock:
            self.owner.log.append(entry)
        return entry

    def _simple(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        srv = self.owner
        with srv._lock:
            srv.active += 1
            srv.max_active = max(srv.max_active, srv.active)
        try:
            self._respond(head)
        finally:
            with srv._lock:
                srv.active -= 1

    def _respond(self, head: bool) -> None:
        srv = self.owner
        path = _norm(unquote(urlsplit(self.path).path))
        if srv.auth is not None and self.headers.get("Authorization") != srv.auth:
            self._record(path, 401, None)  # checked first: a refused request consumes no fault
            self._simple(401, b"unauthorized\n", {"WWW-Authenticate": "Bearer"})
            return
        if srv.redirect_to is not None:  # a hub: every file lives on the CDN
            self._record(path, 302, None)
            self._simple(302, b"", {"Location": srv.redirect_to.rstrip("/") + path})
            return
        fault = srv._take(path)
        if fault and fault.before:
            fault.before()
        if fault and (fault.redirect or fault.redirect_prefix):
            self._record(path, 302, fault)
            location = fault.redirect or (fault.redirect_prefix or "").rstrip("/") + path
            self._simple(302, b"", {"Location": location})
            return
        if fault and fault.status:
            self._record(path, fault.status, fault)
            hdrs = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            self._simple(fault.status, f"injected {fault.status}\n".encode(), hdrs)
            return
        file = (srv.root / path.lstrip("/")).resolve()
        if srv.root not in file.parents or not file.is_file():
            self._record(path, 404, fault)
            self._simple(404, b"not found\n")
            return
        with open(file, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            etag = f'"{size:x}-{st.st_mtime_ns:x}"'
            lm = email.utils.formatdate(st.st_mtime, usegmt=True)
            start, end, status = 0, size - 1, 200
            rng = self.headers.get("Range")
            use_range = rng is not None and not srv.no_range and not (fault and fault.ignore_range)
            if use_range:
                if_range = self.headers.get("If-Range")
                if if_range and not srv.ignore_if_range and if_range not in (etag, lm):
                    use_range = False  # validator mismatch: the whole (new) file
            if use_range and rng is not None:
                parsed = _parse_range(rng, size)
                if parsed == "unsatisfiable":
                    self._record(path, 416, fault)
                    self._simple(416, b"", {"Content-Range": f"bytes */{size}"})
                    return
                if isinstance(parsed, tuple):
                    start, end = parsed
                    status = 206
            length = max(0, end - start + 1)
            entry = self._record(path, status, fault)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "none" if srv.no_range else "bytes")
            if srv.etag:
                self.send_header("ETag", etag)
            if srv.last_modified:
                self.send_header("Last-Modified", lm)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head:
                return
            limit = length
            for cut in (fault.reset_after, fault.short_after, fault.stall_after) if fault else ():
                if cut is not None:
                    limit = min(limit, cut)
            self.wfile.flush()
            sent = self._send_body(f, start, limit)
            entry.sent = sent
            with srv._lock:
                srv.bytes_sent += sent
            if fault and (fault.stall_after is not None or limit < length):
                if fault.stall_after is not None and fault.stall:
                    time.sleep(fault.stall)
                self.close_connection = True
                if fault.reset_after is not None:  # abort: close with SO_LINGER 0 sends a TCP RST, not a FIN
                    _wait_until_read(self.connection)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()

    def _send_body(self, f, start: int, count: int) -> int:
        rate = self.owner.rate
        sock = self.connection
        sent = 0
        if not rate:
            while sent < count:
                try:
                    n = sock.sendfile(f, start + sent, count - sent)
                except (BrokenPipeError, ConnectionResetError):
                    break
                if not n:
                    break
                sent += n
            return sent
        chunk = 64 * 1024
        t0 = time.perf_counter()
        while sent < count:
            n = min(chunk, count - sent)
            try:
                k = sock.sendfile(f, start + sent, n)
            except (BrokenPipeError, ConnectionResetError):
                break
            if not k:
                break
            sent += k
            ahead = sent / rate - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)
        return sent


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range; None means 'ignore, send all'."""
    if not value.startswith("bytes=") or "," in value:
        return None
    a, _, b = value[6:].strip().partition("-")
    try:
        if a == "":
            n = int(b)
            return (max(0, size - n), size - 1) if n > 0 else "unsatisfiable"
        start = int(a)
        end = int(b) if b else size - 1
    except ValueError:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--rate", type=float, default=None, help="bytes/s per connection (default: unlimited)")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    srv = FaultyServer(args.root, rate=args.rate, port=args.port)
    print(f"PORT {srv.port}", flush=True)
    try:
        srv.httpd.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        srv.httpd.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
