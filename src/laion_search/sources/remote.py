"""Read a file where it lies — a local path, an ``http(s)://`` URL or ``hf://`` on Hugging Face —
through one seekable binary file object, so the Parquet and HDF5 readers (``pyarrow``, ``h5py``)
fetch only the bytes they touch (a footer, a row group, a chunk), never the whole file first.

::

    with open_input("https://…/laion5b_100m_part_1_of_10.parquet") as f:
        pq.ParquetFile(f).metadata.num_rows          # reads the footer: a few blocks, not 30 GB

Over HTTP, :class:`HTTPFile` reads with ``Range`` requests, block by block (``block_size``, a
small LRU cache of ``cache_blocks`` blocks; a read of many blocks goes straight through in one
request). Each request goes through the downloader's policy (:mod:`.http`): retries with
exponential backoff and jitter on connection errors, stalls (``read_timeout``), 5xx, 408, 429,
``Retry-After`` honoured, bytes received before a cut kept and only the rest asked for again.
The file's size and validator (ETag / Last-Modified) are taken on open; every later range must
agree (``If-Range``), so a file that changes on the server mid-read is an error, not a mix of two
versions.

``hf://datasets/OWNER/REPO/PATH`` — or ``hf://datasets/OWNER/REPO@REVISION/PATH`` (the revision may
also follow the path: ``…/PATH@REVISION``) — is read from
``$LAION_HF_ENDPOINT/datasets/OWNER/REPO/resolve/REVISION/PATH`` (endpoint
``https://huggingface.co``, revision ``main`` by default); ``hf://OWNER/REPO/PATH`` is a model repo.
With ``$HF_TOKEN`` set, ``Authorization: Bearer …`` is sent to the endpoint — and only there: Hugging
Face answers with a redirect to its CDN, which gets the same ``Range`` but never the token. The
token is not part of any name, repr, event, log line or error message.

A server without Range support (it answers ``200`` and the whole file to a ranged request): by
default a :class:`~laion_search.errors.DownloadError` that says so. With ``cache_dir`` (or
``$LAION_REMOTE_CACHE``) the file is instead downloaded once, with every guarantee of
``laion download`` (resume, retries, verification by kind, fsync + atomic rename, manifest), into
``cache_dir/<hash of the URL>/NAME``, and read from there; a later open reuses the verified copy.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from laion_search.errors import DownloadError, UsageError
from laion_search.sources.http import (
    CREDENTIAL_HEADERS,
    RETRY_STATUSES,
    Retryable,
    RetryPolicy,
    content_range,
    describe,
    header_int,
    if_range,
    origin,
    request,
    retry_after,
    safe_url,
    validators,
)

log = logging.getLogger(__name__)

HF_ENDPOINT_ENV = "LAION_HF_ENDPOINT"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
CACHE_ENV = "LAION_REMOTE_CACHE"
DEFAULT_BLOCK_SIZE = 2 << 20   #: bytes per Range request for small reads (and per cached block)
DEFAULT_CACHE_BLOCKS = 16      #: cached blocks (32 MiB by default): footers, h5 metadata, B-tree nodes
#: a read of at least this many blocks skips the cache: one request straight into the caller's buffer
DIRECT_BLOCKS = 4
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

ProgressFn = Callable[[dict[str, Any]], None]


# -- where a name points ------------------------------------------------------------------------
def hf_url(spec: str, endpoint: str | None = None) -> str:
    """``hf://datasets/OWNER/REPO[@REV]/PATH[@REV]`` → the resolve URL on the Hugging Face endpoint
    (``$LAION_HF_ENDPOINT``, default https://huggingface.co), revision ``main`` unless given."""
    if not spec.startswith("hf://"):
        raise UsageError(f"not an hf:// URL: {spec!r}")
    rest = spec[len("hf://"):].strip("/")
    parts = rest.split("/")
    kind = ""
    if parts and parts[0] in ("datasets", "spaces"):
        kind, parts = parts[0], parts[1:]
    elif parts and parts[0] == "models":
        parts = parts[1:]
    if len(parts) < 3 or not all(parts):
        raise UsageError(f"hf:// URL must look like hf://datasets/OWNER/REPO/PATH (optionally @REVISION), not {spec!r}")
    owner, repo, path = parts[0], parts[1], parts[2:]
    revision = "main"
    if "@" in repo:
        repo, _, revision = repo.partition("@")
    elif "@" in path[-1]:
        path[-1], _, revision = path[-1].rpartition("@")
    if not repo or not revision or not path[-1]:
        raise UsageError(f"hf:// URL must look like hf://datasets/OWNER/REPO/PATH (optionally @REVISION), not {spec!r}")
    base = (endpoint or os.environ.get(HF_ENDPOINT_ENV) or DEFAULT_HF_ENDPOINT).rstrip("/")
    prefix = f"{base}/{kind}/" if kind else f"{base}/"
    return (f"{prefix}{quote(owner)}/{quote(repo)}/resolve/{quote(unquote(revision), safe='')}/"
            + "/".join(quote(p) for p in path))


def resolve(path_or_url: str | os.PathLike[str], headers: dict[str, str] | None = None
            ) -> tuple[str | None, Path | None, dict[str, str]]:
    """``(url, None, headers)`` for a remote name, ``(None, path, {})`` for a local one. ``hf://``
    adds ``Authorization: Bearer $HF_TOKEN`` when the variable is set."""
    text = os.fspath(path_or_url)
    headers = dict(headers or {})
    if isinstance(path_or_url, str) and text.startswith("hf://"):
        token = os.environ.get("HF_TOKEN")
        if token and not any(k.lower() == "authorization" for k in headers):
            headers["Authorization"] = f"Bearer {token}"
        return hf_url(text), None, headers
    if isinstance(path_or_url, str) and text.startswith(("http://", "https://")):
        return text, None, headers
    if isinstance(path_or_url, str) and text.startswith("file://"):
        return None, Path(unquote(urlsplit(text).path)), {}
    if isinstance(path_or_url, str) and "://" in text.split("/", 1)[0] + "/":
        raise UsageError(f"unsupported URL scheme in {safe_url(text)!r}: use a path, http(s):// or hf://")
    return None, Path(text), {}


def is_remote(path_or_url: str | os.PathLike[str]) -> bool:
    """True for any ``scheme://…`` string, not only the schemes we read: such a name goes to
    :func:`open_input`, which reads ``http(s)://`` and ``hf://``, maps ``file://`` to its path and
    refuses any other scheme with a :class:`~laion_search.errors.UsageError` naming it — where a
    check for http(s)/hf alone would hand ``s3://…`` to the local readers as a path, to fail as a
    missing file. ``os.PathLike`` objects are always local."""
    return isinstance(path_or_url, str) and _URL_RE.match(path_or_url) is not None


# -- local ---------------------------------------------------------------------------------------
class LocalFile(io.FileIO):
    """A local file opened for reading, with the ``size()`` that :class:`HTTPFile` also has."""

    def size(self) -> int:
        return os.fstat(self.fileno()).st_size


# -- remote --------------------------------------------------------------------------------------
class HTTPFile(io.RawIOBase):
    """A read-only, seekable view of one remote file, read with Range requests (see the module
    docstring). ``requests`` and ``bytes_fetched`` count what went over the network."""

    def __init__(self, url: str, *, headers: dict[str, str] | None = None, policy: RetryPolicy | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, cache_blocks: int = DEFAULT_CACHE_BLOCKS,
                 name: str | None = None, progress: ProgressFn | None = None, seed: int | None = None):
        super().__init__()
        if block_size < 1 or cache_blocks < 1:
            raise UsageError("block_size and cache_blocks must be at least 1")
        self._url = url
        self._headers = dict(headers or {})  # may hold a token: never shown
        self._policy = policy or RetryPolicy()
        self._emit = progress or (lambda e: None)
        self._rng = random.Random(seed)
        self.block_size = block_size
        self.cache_blocks = cache_blocks
        self.name = name or safe_url(url)
        self._target: str | None = None  # where the last redirect led (a CDN): asked directly next time
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._pos = 0
        self.requests = 0
        self.bytes_fetched = 0
        self.retries = 0
        self._size = -1
        self._validator: dict[str, Any] = {}
        self._open()

    def __repr__(self) -> str:
        return f"<HTTPFile {self.name!r} size={self._size}>"

    # -- io.RawIOBase ----------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def size(self) -> int:
        return self._size

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(22, f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, b: Any) -> int:
        self._checkClosed()
        view = memoryview(b).cast("B")
        n = min(len(view), self._size - self._pos)
        if n <= 0:
            return 0
        start = self._pos
        if n >= DIRECT_BLOCKS * self.block_size:
            self._read_range(start, view[:n])
        else:
            bs = self.block_size
            first, last = start // bs, (start + n - 1) // bs
            self._load_blocks(first, last)
            done = 0
            for i in range(first, last + 1):
                block = self._cache[i]
                lo = start + done - i * bs
                take = min(len(block) - lo, n - done)
                view[done:done + take] = block[lo:lo + take]
                done += take
        self._pos = start + n
        return n

    def close(self) -> None:
        self._cache.clear()
        super().close()

    # -- blocks ----------------------------------------------------------------------------------
    def _load_blocks(self, first: int, last: int) -> None:
        for i in range(first, last + 1):
            if i in self._cache:
                self._cache.move_to_end(i)
        missing = [i for i in range(first, last + 1) if i not in self._cache]
        bs = self.block_size
        while missing:  # consecutive missing blocks: one request
            run = [missing.pop(0)]
            while missing and missing[0] == run[-1] + 1:
                run.append(missing.pop(0))
            lo = run[0] * bs
            hi = min(self._size, (run[-1] + 1) * bs)
            buf = bytearray(hi - lo)
            self._read_range(lo, memoryview(buf))
            for i in run:
                self._remember(i, bytes(buf[(i - run[0]) * bs:(i - run[0] + 1) * bs]))

    def _remember(self, i: int, data: bytes) -> None:
        self._cache[i] = data
        self._cache.move_to_end(i)
        while len(self._cache) > max(self.cache_blocks, 1):
            self._cache.popitem(last=False)

    # -- network ---------------------------------------------------------------------------------
    def _open(self) -> None:
        """Learn the size and validators with a ranged request for the first block (kept)."""
        want = self.block_size
        buf = bytearray(want)
        got = self._retrying(lambda: self._first(buf))
        if got is not None:
            self._remember(0, bytes(buf[:got]))

    def _first(self, buf: bytearray) -> int | None:
        conn, resp, final = self._send({"Range": f"bytes=0-{len(buf) - 1}"})
        try:
            status = resp.status
            self._check_status(resp)
            if status == 416:  # an empty file
                cr = content_range(resp.getheader("Content-Range"))
                if cr and cr[1] == 0:
                    self._size = 0
                    self._validator = validators(resp)
                    return None
                raise DownloadError(f"{self.name}: server refused the first byte range (HTTP 416)")
            if status == 200:
                length = header_int(resp.getheader("Content-Length"))
                if length is None or length > len(buf):
                    raise DownloadError(
                        f"{self.name}: the server does not support Range requests (it answered a ranged request "
                        f"with HTTP 200 and the whole file{'' if length is None else f', {length:,} bytes'}); "
                        f"download it first (laion download, curl) and read the local copy, or set "
                        f"{CACHE_ENV}=DIR to let laion-search keep a verified copy there")
                total = length
                start = 0
            elif status == 206:
                cr = content_range(resp.getheader("Content-Range"))
                if cr is None or cr[0] != 0 or cr[1] is None:
                    raise DownloadError(f"{self.name}: unusable Content-Range {resp.getheader('Content-Range')!r}")
                start, total = 0, cr[1]
            else:
                raise DownloadError(f"{self.name}: HTTP {status} {resp.reason}{self._hint(status)}")
            self._size = total
            self._validator = validators(resp)
            self._note_target(final)
            want = min(len(buf), total - start)
            got = self._stream(resp, memoryview(buf)[:want])
        finally:
            resp.close()
            conn.close()
        if got < want:
            raise Retryable(f"connection closed after {got:,} of {want:,} bytes", progressed=0)
        return got

    def _read_range(self, start: int, view: memoryview) -> None:
        done = {"n": 0}

        def attempt() -> None:
            while done["n"] < len(view):
                self._range_once(start + done["n"], view[done["n"]:], done)

        self._retrying(attempt, done)

    def _range_once(self, offset: int, view: memoryview, done: dict[str, int]) -> None:
        end = offset + len(view) - 1
        headers = {"Range": f"bytes={offset}-{end}"}
        validator = if_range(self._validator)
        if validator:
            headers["If-Range"] = validator
        conn, resp, final = self._send(headers)
        try:
            status = resp.status
            self._check_status(resp)
            if status == 200:
                if _changed(self._validator, validators(resp)) or header_int(resp.getheader("Content-Length")) != self._size:
                    raise DownloadError(f"{self.name}: the file changed on the server while being read")
                raise DownloadError(f"{self.name}: the server stopped honouring Range requests (HTTP 200 to a range)")
            if status != 206:
                raise DownloadError(f"{self.name}: HTTP {status} {resp.reason}{self._hint(status)}")
            cr = content_range(resp.getheader("Content-Range"))
            if cr is None or cr[0] != offset or (cr[1] is not None and cr[1] != self._size) or \
                    _changed(self._validator, validators(resp)):
                raise DownloadError(f"{self.name}: the file changed on the server while being read "
                                    f"(Content-Range {resp.getheader('Content-Range')!r}, expected bytes {offset}-{end}/{self._size})")
            self._note_target(final)
            before = done["n"]
            try:
                self._stream(resp, view, done)
            finally:
                got = done["n"] - before
            if got < len(view):
                raise Retryable(f"connection closed after {got:,} of {len(view):,} bytes of a range", progressed=got)
        finally:
            resp.close()
            conn.close()

    def _send(self, extra: dict[str, str]) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, str]:
        url = self._target or self._url
        headers = {**self._headers, **extra}
        if origin(url) != origin(self._url):  # straight to the CDN a redirect named: no credentials
            headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
        self.requests += 1
        log.debug("GET %s Range %s", safe_url(url), extra.get("Range"))
        try:
            return request("GET", url, headers, self._policy)
        except DownloadError as exc:
            raise DownloadError(f"{self.name}: {exc}") from None

    def _note_target(self, final: str) -> None:
        self._target = final if final != self._url else None

    def _check_status(self, resp: http.client.HTTPResponse) -> None:
        status = resp.status
        if status in RETRY_STATUSES or 500 <= status < 600:
            raise Retryable(f"HTTP {status} {resp.reason}", retry_after(resp.getheader("Retry-After")))
        if status in (403, 404, 410) and self._target is not None:
            # a redirect target (a signed CDN URL) that expired: ask the original URL again
            self._target = None
            raise Retryable(f"HTTP {status} from the redirect target; asking {self.name} again", 0.0)

    def _hint(self, status: int) -> str:
        if status in (401, 403) and self.name.startswith(("hf://", _hf_base())):
            return ("" if any(k.lower() == "authorization" for k in self._headers)
                    else " (a gated Hugging Face dataset: set HF_TOKEN)")
        return ""

    def _stream(self, resp: http.client.HTTPResponse, view: memoryview, done: dict[str, int] | None = None) -> int:
        got = 0
        fp: Any = getattr(resp, "fp", None)
        direct = not resp.chunked and resp.length is not None and hasattr(fp, "readinto1")
        left = resp.length or 0
        drained = False
        while got < len(view):
            try:
                if direct:
                    # one socket read per call (as the downloader does): bytes that arrived before a
                    # reset are kept, so the retry asks only for the rest. The body bytes that came
                    # with the headers sit in fp's buffer: take exactly those first
                    want = min(len(view) - got, left)
                    if want <= 0:
                        break
                    if not drained:
                        drained = True
                        want = min(want, len(fp.peek()) or want)
                    k = fp.readinto1(view[got:got + want])
                    left -= k
                else:
                    k = resp.readinto(view[got:])
            except (OSError, http.client.HTTPException) as exc:
                if done is not None:
                    done["n"] += got
                raise Retryable(describe(exc), progressed=got) from None
            if not k:
                break
            got += k
            self.bytes_fetched += k
        if done is not None:
            done["n"] += got
        return got

    def _retrying(self, attempt: Callable[[], Any], done: dict[str, int] | None = None) -> Any:
        failures = 0
        while True:
            before = done["n"] if done is not None else 0
            try:
                return attempt()
            except (Retryable, OSError, http.client.HTTPException) as exc:
                if isinstance(exc, Retryable):
                    reason, after = exc.reason, exc.retry_after
                else:
                    reason, after = describe(exc), None
                progressed = (done["n"] - before) if done is not None else 0
                failures = 1 if progressed > 0 else failures + 1  # bytes that arrived reset the count
                if failures >= self._policy.tries:
                    raise DownloadError(f"{self.name}: gave up after {failures} attempt(s): {reason}") from None
                delay = self._policy.delay(failures, after, self._rng)
                self.retries += 1
                event = {"event": "retry", "file": self.name, "attempt": failures + 1, "reason": reason,
                         "delay": round(delay, 3), "retry_after": after}
                log.debug("retry %s in %.3f s: %s", self.name, delay, reason)
                self._emit(event)
                time.sleep(delay)


def _hf_base() -> str:
    return (os.environ.get(HF_ENDPOINT_ENV) or DEFAULT_HF_ENDPOINT).rstrip("/")


def _changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    for key in ("etag", "last_modified"):
        if old.get(key) and new.get(key) and old[key] != new[key]:
            return True
    return False


# -- the one entry point ---------------------------------------------------------------------------
def open_input(path_or_url: str | os.PathLike[str], *, headers: dict[str, str] | None = None,
               policy: RetryPolicy | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
               cache_blocks: int = DEFAULT_CACHE_BLOCKS, cache_dir: str | os.PathLike[str] | None = None,
               progress: ProgressFn | None = None) -> io.RawIOBase:
    """A seekable, readable binary file object (``readinto``/``seek``/``tell``/``size()``/``.name``)
    for a local path, an ``http(s)://`` URL or an ``hf://`` URL — see the module docstring.
    Errors: :class:`~laion_search.errors.DownloadError` (remote), ``OSError`` (local)."""
    url, path, hdrs = resolve(path_or_url, headers)
    if path is not None:
        return LocalFile(os.fspath(path), "rb")
    assert url is not None
    name = safe_url(os.fspath(path_or_url))
    try:
        return HTTPFile(url, headers=hdrs, policy=policy, block_size=block_size, cache_blocks=cache_blocks,
                        name=name, progress=progress)
    except DownloadError as exc:
        cache = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV)
        if cache and "does not support Range requests" in str(exc):
            return LocalFile(os.fspath(cached_copy(url, cache, headers=hdrs, policy=policy, progress=progress, name=name)), "rb")
        raise


def kind_of(name: str) -> str:
    """The verification kind of a file name: parquet, h5, img_emb (any .npy) or raw (size only)."""
    low = urlsplit(name).path.lower() if "://" in name else name.lower()
    if low.endswith(".parquet"):
        return "parquet"
    if low.endswith((".h5", ".hdf5")):
        return "h5"
    if low.endswith(".npy"):
        return "img_emb"
    return "raw"


def cached_copy(url: str, cache_dir: str | os.PathLike[str], *, headers: dict[str, str] | None = None,
                policy: RetryPolicy | None = None, progress: ProgressFn | None = None, name: str | None = None) -> Path:
    """A verified full local copy of ``url`` under ``cache_dir`` (downloaded once, with the
    downloader's resume/retry/verify/manifest; reused afterwards). Raises DownloadError."""
    from laion_search.sources.fetch import FileJob, download_files

    base = Path(unquote(urlsplit(url).path)).name or "file"
    sub = hashlib.sha256(url.encode()).hexdigest()[:16]
    root = Path(cache_dir) / sub
    job = FileJob(0, kind_of(base), url, base, root / base, headers=dict(headers or {}))
    report = download_files([job], root, policy=policy, jobs=1, progress=progress, source=name or safe_url(url))
    if not report.ok:
        reason = report.failed[0]["reason"] if report.failed else "failed"
        raise DownloadError(f"{name or safe_url(url)}: could not keep a local copy: {reason}")
    return job.dest


# -- HDF5 header check (used by download verification) ---------------------------------------------
__all__ = [
    "HTTPFile",
    "LocalFile",
    "cached_copy",
    "hf_url",
    "is_remote",
    "kind_of",
    "open_input",
    "resolve",
]
