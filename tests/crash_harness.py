"""Crash harness: run a real `laion` command in a subprocess, SIGKILL it at a seeded random
moment, check what a crash may leave behind, rerun to completion, check the end state.

Used by tests/test_reliability_crash.py; reusable for any command that prints ``--json``
progress lines. Kills land on the command's own kill points (laion_search.killpoints: every progress event
and the store's opening), never on the clock: the process stops at each point until the harness
lets it go on, so the harness knows it is alive and mid-work when it sends the signal.

Checks (:func:`verify_store`):

* every shard the table shows is whole: its row count equals its source's (no partial shard);
* no duplicate ids, and ``id = shard × 10⁹ + shard_row``;
* embeddings bit-identical to the source files: a SHA-256 per shard over the float32 image and
  text vectors in id order, computed from the ``.npy`` files and from the table;
* url and caption of every row equal to the source Parquet's (a SHA-256 per shard, in id order);
* after the final rerun: every shard present, exact total row count, no staging table left.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import selectors
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from laion_search import connect, killpoints

#: The most statement steps a mid-way kill lets a process run past its kill point.
MAX_STEPS = 5


@dataclass
class KillPoint:
    """One SIGKILL: the kill point it landed at (or after), and how many statement steps the
    process was let run past that point first (0: killed while it waited at the point)."""

    command: str
    steps: int
    last_event: str
    killed: bool


@dataclass
class CrashLog:
    """Figures a crash test produces (printed, and summed up for the README)."""

    points: list[KillPoint] = field(default_factory=list)
    checks: int = 0

    @property
    def kills(self) -> int:
        return sum(p.killed for p in self.points)

    def phases(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.points:
            if p.killed:
                out[p.last_event] = out.get(p.last_event, 0) + 1
        return out


def readable(f: Any, timeout: float) -> bool:
    """Whether ``f`` has input within ``timeout`` seconds. Through epoll, not ``select()``: a test
    process that opened many stores (chDB keeps their files open) holds descriptors above 1024,
    which ``select()`` refuses ("filedescriptor out of range")."""
    with selectors.DefaultSelector() as sel:
        sel.register(f, selectors.EVENT_READ)
        return bool(sel.select(timeout))


def laion_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "laion_search.cli", *args]


def _describe(ev: dict[str, Any]) -> str:
    desc = str(ev.get("event", "?"))
    for key in ("shard", "index"):
        if key in ev:
            desc += f" {key} {ev[key]}"
    return desc


def _start_gated(cmd: Sequence[str], env: dict[str, str] | None) -> tuple[subprocess.Popen, Any, int]:
    """Start ``cmd`` with its kill points wired to us (see laion_search.killpoints): returns the
    process, a line reader of its points, and the fd that lets it go on (one byte per point)."""
    ev_r, ev_w = os.pipe()
    ack_r, ack_w = os.pipe()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            pass_fds=(ev_w, ack_r),
                            env={**os.environ, **(env or {}), "LAION_KILLPOINT_FDS": f"{ev_w}:{ack_r}"})
    os.close(ev_w)
    os.close(ack_r)
    return proc, os.fdopen(ev_r, "rb", buffering=0), ack_w


def count_points(cmd: Sequence[str], *, env: dict[str, str] | None = None) -> list[str]:
    """Run ``cmd`` to the end, letting it pass every kill point; returns the points in order (used
    to size the range a kill is drawn from). Fails if the command fails."""
    proc, events, ack = _start_gated(cmd, env)
    seen = []
    try:
        for line in events:
            seen.append(_describe(json.loads(line)))
            os.write(ack, b"1")
    finally:
        events.close()
        os.close(ack)
    assert proc.wait(timeout=300) == 0, f"{' '.join(cmd)} failed"
    return seen


def kill_when(cmd: Sequence[str], stop: Callable[[list[dict[str, Any]]], bool], *,
              env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run ``cmd`` through its kill points until ``stop(points so far)`` is true, then SIGKILL it
    while it waits at that point. Returns the points it reached; fails if it exits first."""
    proc, events, ack = _start_gated(cmd, env)
    seen: list[dict[str, Any]] = []
    try:
        for line in events:
            seen.append(json.loads(line))
            if stop(seen):
                os.kill(proc.pid, signal.SIGKILL)
                break
            os.write(ack, b"1")
    finally:
        events.close()
        os.close(ack)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"it exited ({proc.returncode}) before the kill point: {seen[-5:]}"
    return seen


def run_and_kill(cmd: Sequence[str], rng: random.Random, *, points: int, env: dict[str, str] | None = None,
                 label: str = "", last: Sequence[str] = ()) -> KillPoint:
    """Start ``cmd`` and SIGKILL it at a kill point drawn at random from its first ``points``
    (about as many as a whole run reaches, see :func:`count_points`): at that point, either while
    it waits there, or mid-way to the next one — at its n-th statement step from there (n drawn
    from the seed too; see laion_search.killpoints.step), where it kills itself, or at the next
    point if it gets there first. Nothing depends on the clock: a seed replays the same kills.
    A process that reaches one of the events named in
    ``last`` (its final ones: event names, or descriptions such as ``"index_done index text_index"``) before the drawn point is killed there, so every attempt kills a
    running process; one that exits before (a failure) is reported with ``killed=False``."""
    proc, events, ack = _start_gated(cmd, env)
    target = rng.randint(1, max(1, points))
    jitter = rng.choice([0, rng.randint(1, MAX_STEPS)])
    n, desc, killed = 0, "(none)", False
    try:
        for line in events:
            n += 1
            ev = json.loads(line)
            desc = _describe(ev)
            final = ev.get("event") in last or desc in last
            if n < target and not final:
                os.write(ack, b"1")
                continue
            if jitter and not final:
                # let it run on to its jitter-th statement step, where it kills itself (or to the
                # next point, if it gets there first: killed there)
                os.write(ack, bytes([killpoints.STEP_BASE + jitter]))
                nxt = events.readline()  # the next point, or EOF: it is gone
                if nxt:
                    desc = _describe(json.loads(nxt)) + " (after " + desc + ")"
                else:
                    proc.wait(timeout=60)
                    killed = proc.returncode == -signal.SIGKILL  # else it exited: that point was its last
                    desc = f"step {jitter} after {desc}"
                    break
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
            break
    finally:
        events.close()
        os.close(ack)
    proc.wait(timeout=60)
    if killed:
        assert proc.returncode == -signal.SIGKILL
    return KillPoint(label or Path(cmd[3] if len(cmd) > 3 else cmd[0]).name, jitter, desc, killed)


def run_to_completion(cmd: Sequence[str], *, env: dict[str, str] | None = None,
                      timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


# -- verification ------------------------------------------------------------------------------------
def source_checksums(shards_dir: Path, shards: Sequence[int], pad: int = 0) -> dict[int, tuple[int, str, str]]:
    """Per shard: (rows, SHA-256 of the float32 image + text vectors from the .npy files, SHA-256
    of every row's url and caption from the metadata Parquet, in row order)."""
    import pyarrow.parquet as pq

    out = {}
    for n in shards:
        name = f"{n:0{pad}d}" if pad else str(n)
        img = _find(shards_dir, f"img_emb_{name}.npy")
        txt = _find(shards_dir, f"text_emb_{name}.npy")
        a = np.load(img).astype(np.float32)
        b = np.load(txt).astype(np.float32)
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(a).tobytes())
        h.update(np.ascontiguousarray(b).tobytes())
        meta = pq.read_table(_find(shards_dir, f"metadata_{name}.parquet"), columns=["url", "caption"])
        out[n] = (a.shape[0], h.hexdigest(), _text_digest(meta.column("url").to_pylist(),
                                                          meta.column("caption").to_pylist()))
    return out


def _text_digest(urls: Sequence[str | None], captions: Sequence[str | None]) -> str:
    """SHA-256 over (url, caption) pairs, each length-prefixed (a missing value reads as "", as
    LAION's loaders and ours store it)."""
    h = hashlib.sha256()
    for u, c in zip(urls, captions):
        for v in (u or "", c or ""):
            b = v.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def _find(root: Path, name: str) -> Path:
    for p in (root / name, root / name.split("_")[0] / name, root / "_".join(name.split("_")[:2]) / name):
        if p.exists():
            return p
    raise FileNotFoundError(root / name)


def table_checksum(store: Any, shard: int) -> tuple[int, str, str]:
    t = store.sql("SELECT image_embedding, text_embedding, url, caption FROM laion WHERE shard = {s:UInt32} "
                  "ORDER BY id", {"s": shard})
    h = hashlib.sha256()
    img = t.column("image_embedding").combine_chunks()
    txt = t.column("text_embedding").combine_chunks()
    rows = t.num_rows
    if rows:
        h.update(np.asarray(img.flatten(), dtype=np.float32).tobytes())
        h.update(np.asarray(txt.flatten(), dtype=np.float32).tobytes())
    return rows, h.hexdigest(), _text_digest(t.column("url").to_pylist(), t.column("caption").to_pylist())


def verify_store(db: Path, expected: dict[int, tuple[int, str, str]], *, complete: bool,
                 extra: Callable[[Any], None] | None = None) -> int:
    """Check the invariants above; ``complete`` also requires every expected shard. Returns the
    number of checks made."""
    checks = 0
    with connect(db) as store:
        counts = store.partition_rows()
        for shard, n in counts.items():
            assert shard in expected, f"unexpected shard {shard} in the table"
            assert n == expected[shard][0], f"shard {shard} is partial: {n} of {expected[shard][0]} rows"
            rows, vectors, text = table_checksum(store, shard)
            assert vectors == expected[shard][1], f"shard {shard}: embeddings differ from source"
            assert text == expected[shard][2], f"shard {shard}: url or caption differs from the source Parquet"
            checks += 3
        dup = store.scalar("SELECT count() - uniqExact(id) FROM laion")
        assert dup == 0, f"{dup} duplicate ids"
        bad_ids = store.scalar("SELECT countIf(id != toInt64(shard) * 1000000000 + shard_row) FROM laion")
        assert bad_ids == 0
        checks += 2
        if complete:
            assert set(counts) == set(expected), f"shards {sorted(set(expected) - set(counts))} missing"
            assert store.scalar("SELECT count() FROM laion") == sum(e[0] for e in expected.values())
            assert store.rows("SELECT name FROM system.tables WHERE database = currentDatabase() "
                              "AND startsWith(name, 'laion_stage_')") == []
            recs = store.shard_records()
            assert {s: r.rows for s, r in recs.items() if s in expected} == {s: e[0] for s, e in expected.items()}
            checks += 4
        if extra is not None:
            extra(store)
            checks += 1
    return checks


def summary_line(name: str, log: CrashLog) -> str:
    phases = ", ".join(f"{k}: {v}" for k, v in sorted(log.phases().items()))
    return f"{name}: {log.kills} kill points survived ({log.checks} checks) — last event before the kill: {phases}"


def record_figures(name: str, **figures: Any) -> None:
    """Append figures to $LAION_RELIABILITY_REPORT (a JSON-lines file) when set; used by
    scripts/reliability_report.py to print the README's figures."""
    path = os.environ.get("LAION_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


def slow() -> bool:
    return os.environ.get("LAION_SLOW_TESTS", "") not in ("", "0")
