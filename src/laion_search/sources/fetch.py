"""Fetching one file, resiliently: the per-file half of ``laion download`` (the per-shard half,
scheduling and ingest, is :mod:`.download`), also used alone for single-file sources
(:func:`download_files`) and for the local copy a remote read falls back to
(:func:`laion_search.sources.remote.cached_copy`). It imports nothing above it in ``sources/``
(no shard readers, no remote reads), so both can build on it without an import cycle.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from laion_search.errors import DownloadError, LaionError, UsageError
from laion_search.sources.http import RETRY_STATUSES, RetryPolicy, header_int, if_range
from laion_search.sources.http import Retryable as _Retryable
from laion_search.sources.http import content_range as _content_range
from laion_search.sources.http import describe as _describe
from laion_search.sources.http import request as _request
from laion_search.sources.http import retry_after as _retry_after
from laion_search.sources.http import validators as _validators
from laion_search.sources.npy import embedding_rows, read_npy_header

# pyarrow (a Parquet footer) and numpy (naming what is wrong with an .npy) are imported when the
# first file needs them, not at start-up. (Not in a background thread during the first transfers:
# on a busy machine the import's hold on the GIL slowed the transfers by more than it saved.)

ProgressFn = Callable[[dict[str, Any]], None]

MANIFEST = ".laion-download.json"
PART = ".part"
#: local errors no retry can fix (disk full, quota, read-only, permission)
_LOCAL_FATAL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
PROGRESS_RESET_BYTES = 1 << 20  # an attempt that brought this much new data resets the failure count
CHUNK_BYTES = 4 << 20  # one reusable read buffer per transfer
WRITEBACK_BYTES = 8 << 20  # with fsync: start the disk writeback of every 8 MiB received (sync_file_range)


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


class Cancelled(Exception):
    """The run's cancel event is set (its caller failed or was interrupted): the worker just stops."""


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


def fsync_dirs(paths: Any) -> None:
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
class Fetcher:
    """Fetches files one :meth:`fetch` at a time, from any number of worker threads: one instance
    per run, so the retry jitter, the byte and retry counts and the cancel event are shared by
    every worker, and the callers (shard scheduler, :func:`download_files`) decide the order."""

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
                raise Cancelled()
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
                    raise Cancelled() from None

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
                    raise Cancelled()
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



def download_files(files: list[FileJob], to: str | os.PathLike[str], *, jobs: int = 4,
                   policy: RetryPolicy | None = None, chunk_bytes: int = CHUNK_BYTES,
                   progress: ProgressFn | None = None, fsync: bool = True, source: str | None = None,
                   base_url: str | None = None) -> DownloadReport:
    """Download single-file parts (a Parquet part, an ``.h5``) into ``to`` with every per-file
    guarantee of :func:`laion_search.sources.download.download`: skipped when the manifest says complete, adopted when already
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
    fetcher = Fetcher(policy, emit, cancel, manifest, chunk_bytes, fsync=fsync)
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
            except Cancelled:
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

__all__ = [
    "CHUNK_BYTES",
    "MANIFEST",
    "Cancelled",
    "DownloadReport",
    "Fetcher",
    "FileJob",
    "Manifest",
    "ProgressFn",
    "download_files",
    "fsync_dirs",
    "verify_file",
]
