"""Resilient download of LAION shards (``img_emb_N.npy``, ``text_emb_N.npy``, ``metadata_N.parquet``),
optionally pipelined into ingest: the per-shard scheduling. Each file is fetched with every
per-file guarantee of :mod:`.fetch` (manifest, resume, retries, verification, fsync + atomic
rename), whose public names are importable from here too.

Per shard, once its three files are complete: :func:`laion_search.sources.shards.open_shard` checks they
agree (dimensions, dtypes, metadata columns, row counts), and the shard is recorded in the
manifest. With a store, verified shards are handed to ingest (in the calling thread) while the
pool keeps downloading; ``delete_after_ingest`` removes a shard's files once it is loaded (and
then bounds how many shards sit on disk at once). A rerun skips what is done: shards the store
holds from the same files, verified shards, complete files, and resumes ``.part`` files.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from laion_search.errors import LaionError, UsageError
from laion_search.sources.fetch import (
    CHUNK_BYTES,
    MANIFEST,
    Cancelled,
    DownloadReport,
    Fetcher,
    FileJob,
    Manifest,
    ProgressFn,
    download_files,
    fsync_dirs,
    verify_file,
)
from laion_search.sources.http import RetryPolicy
from laion_search.sources.http import describe as _describe
from laion_search.sources.naming import KINDS, shard_file_name, shard_file_relpath

# .shards (numpy, pyarrow) is imported when the first shard is verified, not at start-up.

#: loads verified shards into a store: ``laion_search.ingest.ingest_files`` (the downloader does
#: not import the ingest layer; its callers hand it over)
LoadFn = Callable[..., Any]

#: Where ClickHouse's LAION-400M guide downloads from (``…/img_emb/img_emb_N.npy`` etc.).
DEFAULT_BASE_URL = "https://deploy.laion.ai/8f83b608504d46bb81708ec86e912220/embeddings"


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
        self.fetcher = Fetcher(policy, self.emit, self.cancel, self.manifest, chunk_bytes, fsync=fsync)
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
                fsync_dirs(j.dest.parent for j in files)
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
            except Cancelled:
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


__all__ = ["DEFAULT_BASE_URL", "MANIFEST", "DownloadReport", "FileJob", "Remote", "RetryPolicy", "ShardScheduler",
           "download", "download_files", "verify_file"]
