"""Resilient download of LAION shards (``img_emb_N.npy``, ``text_emb_N.npy``, ``metadata_N.parquet``),
optionally pipelined into ingest.

Per file:

* skipped when ``DIR/.laion-download.json`` (the manifest) says it is complete and its size and
  mtime still match; a file already there but unknown to the manifest (e.g. from ``wget``) is
  checked (structure, and its size against the server's) and adopted if sound;
* downloaded into ``NAME.part``, with ``NAME.part.json`` next to it holding the server's
  validators (ETag, Last-Modified, size). A retry or a later run resumes with
  ``Range: bytes=N-`` + ``If-Range``; a ``200`` answer (server without Range support, or a file
  that changed) restarts cleanly from byte 0, and a ``206`` whose validators or total size differ
  from the sidecar's (the file changed, and the server ignored ``If-Range``) discards the partial
  data and restarts;
* retried with exponential backoff and full jitter on connection errors, timeouts (connect, and
  read: a stall longer than ``read_timeout`` between two packets), 5xx, 408 and 429 — honouring
  ``Retry-After``. ``tries`` bounds the *consecutive* failures that made no progress (an attempt
  that brought at least 1 MiB of new data resets the count, so a 1 GB file on a flaky mirror is
  not abandoned because it dropped ten times). Other 4xx are final;
* verified before it is presented as complete: size against Content-Length / Content-Range, the
  ``.npy`` header against the file size (offset + rows × dim × itemsize), the Parquet footer
  (row count) — headers and footers only, never a second read of the data; then fsync and an
  atomic rename onto ``NAME``. The disk writes overlap the transfer (``sync_file_range`` starts the
  writeback of every 8 MiB received, so the final fsync has little left to do) and the fsync runs
  off the transfer thread; the directory is fsynced once per shard. ``fsync=False``
  (``--no-fsync``) skips the flushes: safe against a killed process, not against a power cut, so
  such files are not trusted after a reboot (the manifest keeps the boot id).

Per shard, once its three files are complete: :func:`laion_search.sources.shards.open_shard` checks they
agree (dimensions, dtypes, metadata columns, row counts), and the shard is recorded in the
manifest. With a store, verified shards are handed to ingest (in the calling thread) while the
pool keeps downloading; ``delete_after_ingest`` removes a shard's files once it is loaded (and
then bounds how many shards sit on disk at once). A rerun skips what is done: shards the store
holds from the same files, verified shards, complete files, and resumes ``.part`` files.

Memory is bounded: each worker streams through one reusable buffer (``chunk_bytes``).
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from laion_search.errors import DownloadError, LaionError, UsageError
from laion_search.sources.naming import KINDS, shard_file_name, shard_file_relpath
from laion_search.sources.npy import embedding_rows, read_npy_header
from laion_search.sources.http import RETRY_STATUSES, USER_AGENT, RetryPolicy  # noqa: F401
from laion_search.sources.http import Retryable as _Retryable
from laion_search.sources.http import content_range as _content_range
from laion_search.sources.http import describe as _describe
from laion_search.sources.http import header_int, if_range
from laion_search.sources.http import request as _request
from laion_search.sources.http import retry_after as _retry_after
from laion_search.sources.http import validators as _validators

# numpy and pyarrow (through .shards) are imported when the first file needs them, not at start-up.
# (Not in a background thread during the first transfers: on a busy machine the import's hold on
# the GIL slowed the transfers by more than it saved.)

ProgressFn = Callable[[dict[str, Any]], None]
#: loads verified shards into a store: ``laion_search.ingest.ingest_files`` (the downloader does
#: not import the ingest layer; its callers hand it over)
LoadFn = Callable[..., Any]

#: Where ClickHouse's LAION-400M guide downloads from (``…/img_emb/img_emb_N.npy`` etc.).
DEFAULT_BASE_URL = "https://deploy.laion.ai/8f83b608504d46bb81708ec86e912220/embeddings"
MANIFEST = ".laion-download.json"
PART = ".part"
#: local errors no retry can fix (disk full, quota, read-only, permission)
_LOCAL_FATAL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
PROGRESS_RESET_BYTES = 1 << 20  # an attempt that brought this much new data resets the failure count
CHUNK_BYTES = 4 << 20  # one reusable read buffer per transfer
WRITEBACK_BYTES = 8 << 20  # with fsync: start the disk writeback of every 8 MiB received (sync_file_range)


@dataclass
class Remote:
    """Where shard files live and how they are named, remotely and locally."""

    base_url: str = DEFAULT_BASE_URL
    remote_layout: str = "folders"  #: folders: BASE/img_emb/img_emb_N.npy (LAION's); flat: BASE/img_emb_N.npy
    layout: str = "flat"            #: local: flat (the guide's) or folders
    pad: int = 0                    #: zero-pad shard numbers (4 = LAION-5B style)

    def __post_init__(self) -> None:
        for name, value in (("layout", self.layout), ("remote layout", self.remote_layout)):
            if value not in ("flat", "folders"):
                raise UsageError(f"{name} must be 'flat' or 'folders', not {value!r}")
        if not 0 <= self.pad <= 12:
            raise UsageError("pad must be between 0 and 12")
        u = urlsplit(self.base_url)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise UsageError(f"base URL must be http:// or https://, not {self.base_url!r}")

    def name(self, kind: str, shard: int) -> str:
        return shard_file_name(kind, shard, self.pad)

    def url(self, kind: str, shard: int) -> str:
        return self.base_url.rstrip("/") + "/" + shard_file_relpath(kind, shard, self.pad, self.remote_layout)

    def relpath(self, kind: str, shard: int) -> str:
        return shard_file_relpath(kind, shard, self.pad, self.layout)


@dataclass
class FileJob:
    shard: int   #: shard number, or part number of a single-file source
    kind: str    #: img_emb, text_emb, metadata (a shard's files); parquet or h5 (single-file sources)
    url: str
    rel: str
    dest: Path
    #: extra request headers (e.g. Authorization for Hugging Face): never printed, logged or repr'd
    headers: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass
class DownloadReport:
    downloaded: list[str] = field(default_factory=list)   # files fetched (fully or resumed) this run
    skipped: list[str] = field(default_factory=list)      # files already complete
    failed: list[dict[str, Any]] = field(default_factory=list)  # {shard, file, url, reason}
    shards_verified: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)   # already verified / already ingested
    shards_failed: list[int] = field(default_factory=list)
    ingested: list[int] = field(default_factory=list)
    ingest_skipped: list[int] = field(default_factory=list)
    ingested_rows: int = 0
    deleted: list[int] = field(default_factory=list)
    bytes: int = 0
    retries: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.shards_failed

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"downloaded": self.downloaded, "skipped": self.skipped, "failed": self.failed,
                "shards_verified": self.shards_verified, "shards_skipped": self.shards_skipped,
                "shards_failed": self.shards_failed, "ingested": self.ingested,
                "ingest_skipped": self.ingest_skipped, "ingested_rows": self.ingested_rows,
                "deleted": self.deleted, "bytes": self.bytes, "retries": self.retries,
                "seconds": round(self.seconds, 3), "mb_per_s": round(self.mb_per_s, 2), "ok": self.ok}


# -- errors used inside the retry loop -----------------------------------------------------------
class _Restart(Exception):
    """Partial data is unusable (file changed, bad range): discard it and start again now."""


class _Cancelled(Exception):
    pass


# -- manifest ------------------------------------------------------------------------------------
class Manifest:
    """``DIR/.laion-download.json``: complete files (size, mtime, validators) and verified shards."""

    def __init__(self, root: Path):
        self.path = root / MANIFEST
        self._lock = threading.Lock()
        self.files: dict[str, dict[str, Any]] = {}
        self.shards: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(self.path.read_text())
            self.files = dict(data.get("files", {}))
            self.shards = dict(data.get("shards", {}))
        except (OSError, ValueError, AttributeError):
            pass  # missing or unreadable: everything is re-checked

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": 1, "files": self.files, "shards": self.shards}, indent=1))
        os.replace(tmp, self.path)

    def file_complete(self, rel: str, path: Path) -> bool:
        entry = self.files.get(rel)
        if not entry or not self.trusted(rel):
            return False
        try:
            st = path.stat()
        except OSError:
            return False
        return entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns

    def trusted(self, rel: str) -> bool:
        """False for a file written without fsync (``--no-fsync``) before the last reboot: a power
        cut may have lost data that its size and mtime still promise, so it is fetched again."""
        entry = self.files.get(rel) or {}
        return entry.get("durable", True) or (entry.get("boot_id") is not None and entry["boot_id"] == _boot_id())

    def set_file(self, rel: str, path: Path, url: str, validators: dict[str, Any], durable: bool = True) -> None:
        st = path.stat()
        entry = {"url": url, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                 "etag": validators.get("etag"), "last_modified": validators.get("last_modified")}
        if not durable:
            entry.update(durable=False, boot_id=_boot_id())
        with self._lock:
            self.files[rel] = entry
            self._save()

    def set_shard(self, shard: int, info: dict[str, Any]) -> None:
        with self._lock:
            self.shards[str(shard)] = info
            self._save()

    def forget(self, rels: list[str], shard: int | None = None) -> None:
        with self._lock:
            for rel in rels:
                self.files.pop(rel, None)
            if shard is not None:
                self.shards.pop(str(shard), None)
            self._save()


# -- HTTP ----------------------------------------------------------------------------------------
def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


# -- verification --------------------------------------------------------------------------------
def verify_file(path: Path, kind: str) -> int:
    """Structural check of one downloaded file, from its header (``.npy``: and the size it implies;
    HDF5: the signature and the end-of-file address its superblock records) or footer (Parquet) —
    never a read of the whole file; returns its row count (HDF5: 0, rows are per dataset). Raises
    ShardError."""
    if kind == "raw":  # a file of no known format: its size (checked by the caller) is all there is
        return 0
    if kind == "h5":
        from laion_search.sources.hdf5 import check_hdf5

        check_hdf5(path)
        return 0
    if kind in ("metadata", "parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from laion_search.errors import ShardValidationError

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
            raise ShardValidationError(f"not a complete parquet file ({exc})", path=str(path)) from None
    rows = embedding_rows(path)
    if rows is not None:
        return rows
    return read_npy_header(path).rows


def _fsync_dirs(paths: Any) -> None:
    for d in sorted({Path(p) for p in paths}):
        _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- one file ------------------------------------------------------------------------------------
class _Fetcher:
    def __init__(self, policy: RetryPolicy, emit: ProgressFn, cancel: threading.Event, manifest: Manifest,
                 chunk_bytes: int, seed: int | None = None, fsync: bool = True):
        self.policy = policy
        self.fsync = fsync
        self.emit = emit
        self.cancel = cancel
        self.manifest = manifest
        self.chunk_bytes = chunk_bytes
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.bytes = 0
        self.retries = 0

    def _retrying(self, job: FileJob, attempt: Callable[[], Any]) -> Any:
        failures = 0
        restarts = 0
        while True:
            if self.cancel.is_set():
                raise _Cancelled()
            try:
                return attempt()
            except _Restart as exc:
                restarts += 1
                if restarts > self.policy.tries:
                    raise DownloadError(f"gave up after {restarts} restarts: {exc}") from None
                self.emit({"event": "restart", "shard": job.shard, "file": job.rel, "url": job.url,
                           "reason": str(exc)})
                continue
            except (_Retryable, OSError, http.client.HTTPException) as exc:
                if isinstance(exc, OSError) and exc.errno in _LOCAL_FATAL:
                    raise DownloadError(f"cannot write {job.dest.parent}: {exc.strerror or exc}") from None
                if isinstance(exc, _Retryable):
                    reason, retry_after, progressed = exc.reason, exc.retry_after, exc.progressed
                else:
                    reason, retry_after, progressed = _describe(exc), None, getattr(exc, "progressed", 0)
                if progressed >= PROGRESS_RESET_BYTES:
                    failures = 0
                failures += 1
                if failures >= self.policy.tries:
                    raise DownloadError(f"gave up after {failures} attempt(s): {reason}") from None
                if retry_after is not None:
                    delay = min(retry_after, self.policy.max_retry_after)
                else:
                    delay = self.policy.backoff(failures, self.rng)
                with self.lock:
                    self.retries += 1
                self.emit({"event": "retry", "shard": job.shard, "file": job.rel, "url": job.url,
                           "attempt": failures + 1, "reason": reason, "delay": round(delay, 3),
                           "retry_after": retry_after})
                if self.cancel.wait(delay):
                    raise _Cancelled() from None

    def fetch(self, job: FileJob) -> Callable[[], None] | None:
        """Bring ``job.dest`` complete and verified into ``NAME.part``. Returns None when the file
        was already complete, else the step that makes it durable and visible (fsync, atomic
        rename, manifest) — run separately so the next transfer overlaps this file's disk flush."""
        dest = job.dest
        if self.manifest.file_complete(job.rel, dest):
            self.emit({"event": "file_skipped", "shard": job.shard, "file": job.rel,
                       "size": dest.stat().st_size, "reason": "already complete"})
            return None
        if not self.manifest.trusted(job.rel):
            _unlink(dest)  # written without fsync before a reboot: its bytes may not be what its size says
            self.manifest.forget([job.rel])
        if dest.exists() and self._adopt(job):
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + PART)
        side = dest.with_name(dest.name + PART + ".json")
        t0 = time.perf_counter()
        first = {"offset": None}

        def attempt() -> dict[str, Any]:
            return self._attempt(job, part, side, first)

        state = self._retrying(job, attempt)
        seconds = time.perf_counter() - t0

        def finish() -> None:
            # complete and verified: make it durable, then present it under its real name (a crash
            # before the rename leaves a complete .part, which the next run verifies and renames).
            # Most of the data is on disk already (sync_file_range during the transfer); the
            # directory is fsynced once per shard, before the shard is recorded as verified.
            if self.fsync:
                with open(part, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(part, dest)
            _unlink(side)
            self.manifest.set_file(job.rel, dest, job.url, state, durable=self.fsync)
            self.emit({"event": "file_done", "shard": job.shard, "file": job.rel, "size": dest.stat().st_size,
                       "resumed_from": first["offset"] or 0, "seconds": round(seconds, 3)})

        return finish

    def _adopt(self, job: FileJob) -> bool:
        """A file already at ``dest`` but not in the manifest (a killed run, wget): keep it if it is
        structurally sound and the server reports the same size (and validators, when we know them)."""
        try:
            verify_file(job.dest, job.kind)
        except LaionError:
            return False

        def head() -> dict[str, Any] | None:
            conn, resp, _ = _request("HEAD", job.url, dict(job.headers), self.policy)
            try:
                resp.read()
            finally:
                conn.close()
            if resp.status in RETRY_STATUSES or resp.status >= 500:
                raise _Retryable(f"HTTP {resp.status} {resp.reason} (HEAD)", _retry_after(resp.getheader("Retry-After")))
            if resp.status != 200:
                return None
            return {"size": resp.getheader("Content-Length"), **_validators(resp)}

        info = self._retrying(job, head)
        size = job.dest.stat().st_size
        if info is None or info["size"] is None or int(info["size"]) != size:
            return False
        if self.fsync:  # whoever wrote it may not have flushed it
            with open(job.dest, "rb") as f:
                os.fsync(f.fileno())
        self.manifest.set_file(job.rel, job.dest, job.url, info, durable=self.fsync)
        self.emit({"event": "file_skipped", "shard": job.shard, "file": job.rel, "size": size,
                   "reason": "already complete (checked against the server)"})
        return True

    def _attempt(self, job: FileJob, part: Path, side: Path, first: dict[str, Any]) -> dict[str, Any]:
        state = _read_json(side) if part.exists() else None
        if part.exists() and state is None:
            _unlink(part)  # partial data without validators cannot be trusted
        if state is None:
            _unlink(side)
        offset = part.stat().st_size if state is not None and part.exists() else 0
        headers: dict[str, str] = dict(job.headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
            validator = if_range(state or {})
            if validator:
                headers["If-Range"] = validator
        conn, resp, _ = _request("GET", job.url, headers, self.policy)
        try:
            status = resp.status
            if status in RETRY_STATUSES or 500 <= status < 600:
                raise _Retryable(f"HTTP {status} {resp.reason}", _retry_after(resp.getheader("Retry-After")))
            new = _validators(resp)
            if status == 416 and offset and state is not None:
                cr = _content_range(resp.getheader("Content-Range"))
                if cr and cr[1] == offset == state.get("size"):
                    return self._verified(job, part, side, state)  # we already had every byte
                _unlink(part, side)
                raise _Restart("server refused the resume range (416); restarting")
            if status == 206:
                cr = _content_range(resp.getheader("Content-Range"))
                if cr is None or cr[0] != offset:
                    _unlink(part, side)
                    raise _Restart(f"unexpected Content-Range {resp.getheader('Content-Range')!r} for offset {offset}")
                total = cr[1]
                changed = _changed(state or {}, new, total)
                if changed:
                    _unlink(part, side)
                    raise _Restart(f"file changed on the server ({changed}); restarting")
                mode = "r+b"
            elif status == 200:
                if offset:
                    why = "server ignored the Range request" if not headers.get("If-Range") or not _changed(
                        state or {}, new, header_int(resp.getheader("Content-Length"))) else "file changed on the server"
                    self.emit({"event": "restart", "shard": job.shard, "file": job.rel, "url": job.url,
                               "reason": f"{why}; starting again from byte 0"})
                offset = 0
                total = header_int(resp.getheader("Content-Length"))
                mode = "wb"
            else:
                raise DownloadError(f"HTTP {status} {resp.reason}")
            state = {"url": job.url, "size": total, **new}
            _write_json(side, state)
            first["offset"] = offset
            self.emit({"event": "file_start", "shard": job.shard, "kind": job.kind, "file": job.rel, "url": job.url,
                       "size": total, "offset": offset})
            got = self._stream(job, resp, part, mode, offset, total)
        finally:
            resp.close()
            conn.close()
        if total is not None and offset + got != total:
            exc = _Retryable(f"connection closed after {offset + got:,} of {total:,} bytes "
                             f"(body shorter than its Content-Length)", progressed=got)
            raise exc
        return self._verified(job, part, side, state)

    def _verified(self, job: FileJob, part: Path, side: Path, state: dict[str, Any]) -> dict[str, Any]:
        try:
            verify_file(part, job.kind)
        except LaionError as exc:
            _unlink(part, side)  # complete by size yet malformed: never keep it, fetch it again
            raise _Retryable(f"downloaded file fails verification: {exc}") from None
        return state

    def _stream(self, job: FileJob, resp: http.client.HTTPResponse, part: Path, mode: str, offset: int,
                total: int | None) -> int:
        view = memoryview(bytearray(self.chunk_bytes))
        got = 0
        last = 0.0
        writeback = self.fsync and hasattr(os, "sync_file_range")
        kicked = offset  # file offset up to which disk writeback has been started
        fp: Any = getattr(resp, "fp", None)
        if not resp.chunked and resp.length is not None and hasattr(fp, "readinto1"):
            # one socket read per call, straight into our buffer: bytes that arrived before a stall
            # or reset are written (and kept for the resume), and nothing is copied twice
            left = {"n": resp.length, "drained": False}

            def read(v: memoryview) -> int:
                if left["n"] <= 0:
                    return 0
                want = min(len(v), left["n"])
                if not left["drained"]:
                    # body bytes that came in with the headers sit in fp's own buffer. Take exactly
                    # those first: asked for more, readinto1 goes on to a socket read, and if that
                    # read fails (a reset) the buffered bytes are lost with the exception
                    left["drained"] = True
                    want = min(want, len(fp.peek()) or want)
                k = fp.readinto1(v[:want])
                left["n"] -= k
                return k
        else:
            def read(v: memoryview) -> int:
                data = resp.read1(len(v))
                v[:len(data)] = data
                return len(data)
        # unbuffered: each block goes from our buffer to the page cache in one write(2), no copy
        with open(part, mode, buffering=0) as f:
            fd = f.fileno()
            if mode == "r+b":
                f.seek(offset)
                f.truncate()
            while True:
                if self.cancel.is_set():
                    raise _Cancelled()
                try:
                    n = read(view)
                except (OSError, http.client.HTTPException) as exc:
                    setattr(exc, "progressed", got)  # noqa: B010 - read back by the retry loop
                    raise
                if not n:
                    break
                w = f.write(view[:n])
                while w < n:
                    w += f.write(view[w:n])
                got += n
                with self.lock:
                    self.bytes += n
                if writeback and offset + got - kicked >= WRITEBACK_BYTES:
                    # start writing this data to disk now, without waiting: the fsync at the end
                    # then finds little left to do, and the disk works while the network does
                    try:
                        os.sync_file_range(fd, kicked, offset + got - kicked, os.SYNC_FILE_RANGE_WRITE)  # type: ignore[attr-defined]
                    except OSError:
                        writeback = False  # not supported here: fsync alone does it
                    kicked = offset + got
                now = time.monotonic()
                if now - last >= 0.1:
                    last = now
                    self.emit({"event": "file_bytes", "shard": job.shard, "file": job.rel, "done": offset + got,
                               "size": total})
        return got


def _changed(old: dict[str, Any], new: dict[str, Any], total: int | None) -> str | None:
    if old.get("size") is not None and total is not None and old["size"] != total:
        return f"size {old['size']} → {total}"
    if old.get("etag") and new.get("etag") and old["etag"] != new["etag"]:
        return f"ETag {old['etag']} → {new['etag']}"
    if old.get("last_modified") and new.get("last_modified") and old["last_modified"] != new["last_modified"]:
        return f"Last-Modified {old['last_modified']} → {new['last_modified']}"
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _unlink(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


# -- the whole run -------------------------------------------------------------------------------
def plan(shards: list[int], to: Path, remote: Remote) -> dict[int, list[FileJob]]:
    out: dict[int, list[FileJob]] = {}
    for n in shards:
        out[n] = [FileJob(n, k, remote.url(k, n), remote.relpath(k, n), to / remote.relpath(k, n)) for k in KINDS]
    return out


def download(shards: list[int], to: str | os.PathLike[str], *, remote: Remote | None = None, jobs: int = 4,
             policy: RetryPolicy | None = None, store: Any = None, load: LoadFn | None = None,
             delete_after_ingest: bool = False,
             ahead: int | None = None, chunk_bytes: int = CHUNK_BYTES, progress: ProgressFn | None = None,
             batch_rows: int | None = None, fsync: bool = True) -> DownloadReport:
    """Download (and, with ``store``, ingest) ``shards`` into ``to``. Never raises for a failed file
    or shard: the report lists failures with their file, URL and reason (``report.ok``).

    ``fsync=False`` skips flushing files and directories to disk: faster where the network outruns
    the disk, and still safe against a killed process, but not against a power cut — so files
    written that way are not trusted after a reboot (they are fetched again)."""
    if jobs < 1:
        raise UsageError("jobs must be at least 1")
    if store is not None and load is None:
        raise UsageError("downloading into a store needs load= (laion_search.ingest.ingest_files)")
    if delete_after_ingest and store is None:
        raise UsageError("--delete-after-ingest needs --ingest")
    return ShardScheduler(shards, Path(to), remote=remote or Remote(), jobs=jobs, policy=policy or RetryPolicy(),
                          store=store, load=load, delete_after_ingest=delete_after_ingest, ahead=ahead, chunk_bytes=chunk_bytes,
                          progress=progress, batch_rows=batch_rows, fsync=fsync).run()


class ShardScheduler:
    """One run of :func:`download`: ``jobs`` worker threads take the shards' files in shard order
    (with ``delete_after_ingest``, never more than ``ahead`` shards on disk), a shard whose three
    files are in is verified as a whole, and the calling thread ingests verified shards in order
    while later ones download. All shared state lives here, guarded by :attr:`cond`."""

    def __init__(self, shards: list[int], root: Path, *, remote: Remote, jobs: int, policy: RetryPolicy,
                 store: Any, load: LoadFn | None, delete_after_ingest: bool, ahead: int | None, chunk_bytes: int,
                 progress: ProgressFn | None, batch_rows: int | None, fsync: bool):
        self.shards, self.root, self.remote, self.jobs = shards, root, remote, jobs
        self.store, self.load, self.delete_after_ingest = store, load, delete_after_ingest
        self.batch_rows, self.fsync = batch_rows, fsync
        root.mkdir(parents=True, exist_ok=True)
        self._emit_lock = threading.Lock()
        self._user_emit = progress or (lambda e: None)
        self.report = DownloadReport()
        self.manifest = Manifest(root)
        self.cancel = threading.Event()
        self.fetcher = _Fetcher(policy, self.emit, self.cancel, self.manifest, chunk_bytes, fsync=fsync)
        self.jobs_by_shard = plan(shards, root, remote)
        self.cond = threading.Condition()
        #: at most this many shards on disk at once (only with delete_after_ingest)
        self.limit = (ahead or max(2, (jobs + 2) // 3 + 1)) if delete_after_ingest else None
        self.todo: list[int] = []
        self.queue: list[FileJob] = []
        self.next_index = 0
        self.open_shards: set[int] = set()
        self.remaining: dict[int, int] = {}
        self.failed: dict[int, bool] = {}
        self.verified: list[int] = []  # verified shards waiting for ingest, in order
        self.downloaded_shards = 0

    def emit(self, event: dict[str, Any]) -> None:
        with self._emit_lock:
            self._user_emit(event)

    # -- what needs doing --------------------------------------------------------------------------
    def _sort_shards(self) -> list[dict[str, Any]]:
        """Split the shards into skipped (ingested already), ready (verified, only ingest left) and
        to do; returns the events to tell after ``start``."""
        records, counts = ({}, {})
        if self.store is not None:
            records, counts = self.store.shard_records(), self.store.partition_rows()
        early: list[dict[str, Any]] = []
        report, manifest = self.report, self.manifest
        for n in self.shards:
            info = manifest.shards.get(str(n))
            rec = records.get(n)
            files = self.jobs_by_shard[n]
            if (info and rec is not None and rec.fingerprint == info.get("fingerprint")
                    and counts.get(n, 0) == rec.rows == info.get("rows")):
                report.shards_skipped.append(n)
                report.ingest_skipped.append(n)
                early.append({"event": "shard_skipped", "shard": n, "rows": info.get("rows"),
                              "reason": "already ingested"})
                if self.delete_after_ingest:
                    _delete_shard(files, manifest, n, report, early.append)
                continue
            if info and all(manifest.file_complete(j.rel, j.dest) for j in files) and \
                    _fingerprint(files) == info.get("fingerprint"):
                report.shards_skipped.append(n)
                report.skipped.extend(j.rel for j in files)
                early.append({"event": "shard_skipped", "shard": n, "rows": info.get("rows"),
                              "reason": "already verified"})
                self.verified.append(n)
                continue
            self.todo.append(n)
        self.queue = [j for n in self.todo for j in self.jobs_by_shard[n]]
        self.remaining = {n: len(self.jobs_by_shard[n]) for n in self.todo}
        self.failed = {n: False for n in self.todo}
        if self.limit:
            self.open_shards = set(self.verified)
        return early

    # -- worker threads ------------------------------------------------------------------------------
    def next_job(self) -> FileJob | None:
        with self.cond:
            while True:
                if self.cancel.is_set() or self.next_index >= len(self.queue):
                    return None
                job = self.queue[self.next_index]
                if self.limit and job.shard not in self.open_shards and len(self.open_shards) >= self.limit:
                    self.cond.wait(0.2)
                    continue
                if self.limit:
                    self.open_shards.add(job.shard)
                self.next_index += 1
                return job

    def _close_shard(self, n: int) -> None:
        """Shard ``n`` no longer counts against the on-disk limit."""
        if self.limit:
            with self.cond:
                self.open_shards.discard(n)
                self.cond.notify_all()

    def finish_shard(self, n: int) -> None:
        """All of shard ``n``'s files are settled: verify them together and queue it for ingest."""
        files = self.jobs_by_shard[n]
        if self.failed[n]:
            self.report.shards_failed.append(n)
            self._close_shard(n)
            return
        try:
            from laion_search.sources.shards import ShardFiles, open_shard

            if self.fsync:  # the files' new names are durable before the shard is recorded as verified
                _fsync_dirs(j.dest.parent for j in files)
            sf = ShardFiles(n, *(j.dest for j in files))
            reader = open_shard(sf)
            self.manifest.set_shard(n, {"rows": reader.rows, "dim": reader.dim, "fingerprint": sf.fingerprint(),
                                        "verified_at": time.time()})
            self.report.shards_verified.append(n)
            self.emit({"event": "shard_verified", "shard": n, "rows": reader.rows, "dim": reader.dim})
            with self.cond:
                self.verified.append(n)
                self.cond.notify_all()
        except LaionError as exc:
            self.report.shards_failed.append(n)
            path = getattr(exc, "path", None)
            job = next((j for j in files if path and Path(path) == j.dest), files[-1])
            self.report.failed.append({"shard": n, "file": job.rel, "url": job.url,
                                       "reason": f"shard check failed: {exc}"})
            self.emit({"event": "shard_failed", "shard": n, "file": job.rel, "url": job.url, "reason": str(exc)})
            self._close_shard(n)

    def settle(self, job: FileJob, finish: Callable[[], None] | None, error: BaseException | None = None) -> None:
        """Record one file's outcome (running its durable-rename step first, if any); the last
        file of a shard triggers :meth:`finish_shard`."""
        report = self.report
        try:
            if error is not None:
                raise error
            if finish is not None:
                finish()
            with self.cond:
                (report.downloaded if finish is not None else report.skipped).append(job.rel)
        except (LaionError, OSError, http.client.HTTPException) as exc:
            reason = str(exc) if isinstance(exc, LaionError) else _describe(exc)
            with self.cond:
                self.failed[job.shard] = True
                report.failed.append({"shard": job.shard, "file": job.rel, "url": job.url, "reason": reason})
            self.emit({"event": "file_failed", "shard": job.shard, "file": job.rel, "url": job.url, "reason": reason})
        except BaseException as exc:  # noqa: BLE001 - a bug must not hang the run
            with self.cond:
                self.failed[job.shard] = True
                report.failed.append({"shard": job.shard, "file": job.rel, "url": job.url,
                                      "reason": f"internal error: {exc!r}"})
        with self.cond:
            self.remaining[job.shard] -= 1
            last = self.remaining[job.shard] == 0
        if last:
            self.finish_shard(job.shard)
        with self.cond:
            if last:
                self.downloaded_shards += 1
            self.cond.notify_all()

    def worker(self, finisher: ThreadPoolExecutor) -> None:
        while True:
            job = self.next_job()
            if job is None:
                return
            try:
                finish = self.fetcher.fetch(job)
            except _Cancelled:
                return
            except BaseException as exc:  # noqa: BLE001 - recorded by settle
                self.settle(job, None, exc)
                continue
            if finish is None:
                self.settle(job, None)
            else:
                finisher.submit(self.settle, job, finish)

    # -- the calling thread ----------------------------------------------------------------------------
    def _next_verified(self) -> int | None:
        with self.cond:
            while not self.verified and self.downloaded_shards < len(self.todo) and not self.cancel.is_set():
                self.cond.wait(0.2)
            return self.verified.pop(0) if self.verified else None

    def run(self) -> DownloadReport:
        t_start = time.perf_counter()
        early = self._sort_shards()
        self.emit({"event": "start", "shards": self.shards, "todo": self.todo, "files": len(self.queue),
                   "jobs": self.jobs, "base_url": self.remote.base_url, "to": str(self.root),
                   "ingest": self.store is not None})
        for event in early:
            self.emit(event)
        finisher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="laion-download-fsync")
        threads = [threading.Thread(target=self.worker, args=(finisher,), name=f"laion-download-{i}", daemon=True)
                   for i in range(min(self.jobs, max(1, len(self.queue))))]
        for t in threads:
            t.start()
        try:
            while (n := self._next_verified()) is not None:
                if self.store is not None and self.load is not None:
                    _ingest_one(self.load, self.store, n, self.jobs_by_shard[n], self.report, self.emit,
                                self.batch_rows)
                    if self.delete_after_ingest and n not in self.report.shards_failed:
                        _delete_shard(self.jobs_by_shard[n], self.manifest, n, self.report, self.emit)
                    self._close_shard(n)
            for t in threads:
                t.join()
            finisher.shutdown(wait=True)
        except BaseException:
            self.cancel.set()
            finisher.shutdown(wait=False, cancel_futures=True)
            for t in threads:
                t.join(timeout=2)
            raise
        report = self.report
        report.bytes = self.fetcher.bytes
        report.retries = self.fetcher.retries
        report.seconds = time.perf_counter() - t_start
        report.shards_verified.sort()
        report.shards_failed = sorted(set(report.shards_failed))
        self.emit({"event": "summary", **report.as_dict()})
        return report


def download_files(files: list[FileJob], to: str | os.PathLike[str], *, jobs: int = 4,
                   policy: RetryPolicy | None = None, chunk_bytes: int = CHUNK_BYTES,
                   progress: ProgressFn | None = None, fsync: bool = True, source: str | None = None,
                   base_url: str | None = None) -> DownloadReport:
    """Download single-file parts (a Parquet part, an ``.h5``) into ``to`` with every per-file
    guarantee of :func:`download`: skipped when the manifest says complete, adopted when already
    there and sound, resumed from ``.part`` + sidecar, retried with backoff and Retry-After, verified
    by kind (Parquet footer; HDF5 signature and end-of-file address) and size, then fsync and an
    atomic rename. A part is one whole file, so there is no cross-file shard check; each verified
    part is listed in ``report.shards_verified`` by its number. Never raises for a failed file."""
    policy = policy or RetryPolicy()
    if jobs < 1:
        raise UsageError("jobs must be at least 1")
    root = Path(to)
    root.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    user_emit = progress or (lambda e: None)

    def emit(event: dict[str, Any]) -> None:
        with lock:
            user_emit(event)

    report = DownloadReport()
    t_start = time.perf_counter()
    manifest = Manifest(root)
    cancel = threading.Event()
    fetcher = _Fetcher(policy, emit, cancel, manifest, chunk_bytes, fsync=fsync)
    emit({"event": "start", "source": source, "shards": [j.shard for j in files], "todo": [],
          "files": len(files), "jobs": jobs, "base_url": base_url or "", "to": str(root), "ingest": False})
    queue = list(files)

    def worker() -> None:
        while not cancel.is_set():
            with lock:
                if not queue:
                    return
                job = queue.pop(0)
            try:
                job.dest.parent.mkdir(parents=True, exist_ok=True)
                finish = fetcher.fetch(job)
                if finish is not None:
                    finish()
                    if fsync:
                        _fsync_dir(job.dest.parent)
                with lock:
                    (report.downloaded if finish is not None else report.skipped).append(job.rel)
                    report.shards_verified.append(job.shard)
            except _Cancelled:
                return
            except (LaionError, OSError, http.client.HTTPException) as exc:
                reason = str(exc) if isinstance(exc, LaionError) else _describe(exc)
                with lock:
                    report.failed.append({"shard": job.shard, "file": job.rel, "url": job.url, "reason": reason})
                    report.shards_failed.append(job.shard)
                emit({"event": "file_failed", "shard": job.shard, "file": job.rel, "url": job.url, "reason": reason})

    threads = [threading.Thread(target=worker, name=f"laion-download-{i}", daemon=True)
               for i in range(min(jobs, max(1, len(files))))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException:
        cancel.set()
        for t in threads:
            t.join(timeout=2)
        raise
    report.bytes = fetcher.bytes
    report.retries = fetcher.retries
    report.seconds = time.perf_counter() - t_start
    report.shards_verified.sort()
    report.shards_failed.sort()
    emit({"event": "summary", **report.as_dict()})
    return report


def _fingerprint(files: list[FileJob]) -> str | None:
    from laion_search.sources.shards import ShardFiles

    try:
        return ShardFiles(files[0].shard, *(j.dest for j in files)).fingerprint()
    except OSError:
        return None


def _ingest_one(load: LoadFn, store: Any, n: int, files: list[FileJob], report: DownloadReport, emit: ProgressFn,
                batch_rows: int | None) -> None:
    from laion_search.sources.shards import ShardFiles

    def relay(e: dict[str, Any]) -> None:
        kind = e.get("event")
        if kind in ("shard_start", "batch", "shard_done", "shard_skipped"):
            emit({**e, "event": "ingest_" + kind.removeprefix("shard_")})

    try:
        sub = load(store, [ShardFiles(n, *(j.dest for j in files))],
                   **({"batch_rows": batch_rows} if batch_rows else {}), progress=relay)
    except LaionError as exc:
        report.shards_failed.append(n)
        report.failed.append({"shard": n, "file": files[0].rel, "url": files[0].url, "reason": f"ingest failed: {exc}"})
        emit({"event": "shard_failed", "shard": n, "file": files[0].rel, "url": files[0].url,
              "reason": f"ingest failed: {exc}"})
        return
    report.ingested.extend(sub.loaded)
    report.ingest_skipped.extend(sub.skipped)
    report.ingested_rows += sub.rows


def _delete_shard(files: list[FileJob], manifest: Manifest, n: int, report: DownloadReport,
                  emit: ProgressFn) -> None:
    removed = False
    for j in files:
        try:
            j.dest.unlink()
            removed = True
        except FileNotFoundError:
            pass
    # keep the shard entry (its fingerprint says what the store holds); drop the file entries
    manifest.forget([j.rel for j in files])
    if removed:
        report.deleted.append(n)
        emit({"event": "shard_deleted", "shard": n})


__all__ = ["DEFAULT_BASE_URL", "DownloadReport", "FileJob", "Remote", "RetryPolicy", "download", "download_files",
           "verify_file"]
