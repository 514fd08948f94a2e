"""Crash harness: run a real `laion` command in a subprocess, SIGKILL it at a seeded random
moment, check what a crash may leave behind, rerun to completion, check the end state.

Used by tests/test_reliability_crash.py; reusable for any command that prints ``--json``
progress lines. A "kill point" counts only when the process was still running when the signal
was sent (a command that finished first is a plain run, not a survived kill).

Checks (:func:`verify_store`):

* every shard the table shows is whole: its row count equals its source's (no partial shard);
* no duplicate ids, and ``id = shard × 10⁹ + shard_row``;
* embeddings bit-identical to the source files: a SHA-256 per shard over the float32 image and
  text vectors in id order, computed from the ``.npy`` files and from the table;
* after the final rerun: every shard present, exact total row count, no staging table left.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from laion_search import connect


@dataclass
class KillPoint:
    """One SIGKILL: when it landed, and the last progress event the process had printed."""

    command: str
    delay: float
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


def laion_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "laion_search.cli", *args]


def run_and_kill(cmd: Sequence[str], rng: random.Random, *, window: tuple[float, float],
                 wait_for_first_line: bool = True, env: dict[str, str] | None = None,
                 label: str = "", merge_stderr: bool = False) -> KillPoint:
    """Start ``cmd``; once it prints its first line (it is under way), wait a random time drawn
    from ``window`` and SIGKILL it if it is still running. Returns what happened."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    last = ["(no output yet)"]
    first = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
                desc = ev.get("event", "?") if isinstance(ev, dict) else "output"
                if isinstance(ev, dict) and "shard" in ev:
                    desc += f" shard {ev['shard']}"
            except ValueError:
                desc = line[:48]
            last[0] = desc
            first.set()
        first.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    if wait_for_first_line:
        first.wait(timeout=120)
    delay = rng.uniform(*window)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    t.join(timeout=5)
    return KillPoint(label or Path(cmd[3] if len(cmd) > 3 else cmd[0]).name, round(delay, 3), last[0], killed)


def run_to_completion(cmd: Sequence[str], *, env: dict[str, str] | None = None,
                      timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


# -- verification ------------------------------------------------------------------------------------
def source_checksums(shards_dir: Path, shards: Sequence[int], pad: int = 0) -> dict[int, tuple[int, str]]:
    """Per shard: (rows, SHA-256 of the float32 image + text vectors), from the .npy files."""
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
        out[n] = (a.shape[0], h.hexdigest())
    return out


def _find(root: Path, name: str) -> Path:
    for p in (root / name, root / name.split("_")[0] / name, root / "_".join(name.split("_")[:2]) / name):
        if p.exists():
            return p
    raise FileNotFoundError(root / name)


def table_checksum(store: Any, shard: int) -> tuple[int, str]:
    t = store.sql("SELECT image_embedding, text_embedding FROM laion WHERE shard = {s:UInt32} ORDER BY id",
                  {"s": shard})
    h = hashlib.sha256()
    img = t.column("image_embedding").combine_chunks()
    txt = t.column("text_embedding").combine_chunks()
    rows = t.num_rows
    if rows:
        h.update(np.asarray(img.flatten(), dtype=np.float32).tobytes())
        h.update(np.asarray(txt.flatten(), dtype=np.float32).tobytes())
    return rows, h.hexdigest()


def verify_store(db: Path, expected: dict[int, tuple[int, str]], *, complete: bool,
                 extra: Callable[[Any], None] | None = None) -> int:
    """Check the invariants above; ``complete`` also requires every expected shard. Returns the
    number of checks made."""
    checks = 0
    with connect(db) as store:
        counts = store.partition_rows()
        for shard, n in counts.items():
            assert shard in expected, f"unexpected shard {shard} in the table"
            assert n == expected[shard][0], f"shard {shard} is partial: {n} of {expected[shard][0]} rows"
            assert table_checksum(store, shard) == expected[shard], f"shard {shard}: embeddings differ from source"
            checks += 2
        dup = store.scalar("SELECT count() - uniqExact(id) FROM laion")
        assert dup == 0, f"{dup} duplicate ids"
        bad_ids = store.scalar("SELECT countIf(id != toInt64(shard) * 1000000000 + shard_row) FROM laion")
        assert bad_ids == 0
        checks += 2
        if complete:
            assert set(counts) == set(expected), f"shards {sorted(set(expected) - set(counts))} missing"
            assert store.scalar("SELECT count() FROM laion") == sum(r for r, _ in expected.values())
            assert store.rows("SELECT name FROM system.tables WHERE database = currentDatabase() "
                              "AND startsWith(name, 'laion_stage_')") == []
            recs = store.shard_records()
            assert {s: r.rows for s, r in recs.items() if s in expected} == {s: r for s, (r, _) in expected.items()}
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
