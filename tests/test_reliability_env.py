"""Environment faults: a full disk during ingest (a small tmpfs), a read-only store directory
(a read-only bind mount: root ignores permission bits), and the store deleted under a running
server. Each gives a clear one-line error, and once the fault is cleared a rerun completes with
whole shards only. Mount-based tests need root (or CAP_SYS_ADMIN) and skip with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from laion_search.sources.synth import synth

from .conftest import free_port, run_cli
from .crash_harness import record_figures, source_checksums, verify_store


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PermissionError(proc.stderr.strip() or f"mount {' '.join(args)} failed")


@contextlib.contextmanager
def mounted(*args: str, target: Path):
    target.mkdir(parents=True, exist_ok=True)
    try:
        _mount(*args, str(target))
    except (PermissionError, FileNotFoundError) as exc:
        pytest.skip(f"cannot mount here ({exc}); needs root or CAP_SYS_ADMIN")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _one_error_line(stderr: str) -> str:
    errors = [x for x in stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_disk_full_during_ingest_then_rerun(tmp_path):
    src = tmp_path / "shards"
    shards = [0, 1, 2, 3]
    synth(src, shards, 2000, seed=51)  # 512-d: ~8 MB per shard in the table
    expected = source_checksums(src, shards)
    with mounted("-t", "tmpfs", "-o", "size=20m", "tmpfs", target=tmp_path / "small") as disk:
        db = disk / "db"
        p = run_cli("ingest", str(src), "--db", str(db))
        assert p.returncode == 1, p.stdout + p.stderr
        line = _one_error_line(p.stderr)
        assert "not enough space" in line.lower() or "no space left" in line.lower(), line
        assert "loading shard" in line and "rerun to finish" in line, line
        loaded_before = verify_store(db, expected, complete=False)  # whole shards only, checksums intact
        assert loaded_before > 0
        _mount("-o", "remount,size=200m", str(disk))  # the fault clears
        run_cli("ingest", str(src), "--db", str(db), check=True)
        verify_store(db, expected, complete=True)
    record_figures("disk full", error=line)


def test_read_only_store_then_writable_again(tmp_path):
    src = tmp_path / "shards"
    synth(src, [0, 1], 300, dim=16, seed=52)
    expected = source_checksums(src, [0, 1])
    db = tmp_path / "db"
    run_cli("ingest", str(src), "--shards", "0", "--db", str(db), check=True)
    with mounted("--bind", str(db), target=db):
        _mount("-o", "remount,bind,ro", str(db))
        for args in (("ingest", str(src)), ("search", "--like", "5"), ("status",)):
            p = run_cli(*args, "--db", str(db))
            assert p.returncode == 1, p.stderr
            line = _one_error_line(p.stderr)
            assert f"cannot open the store {db}: cannot write to {db} (Read-only file system)" in line, line
    run_cli("ingest", str(src), "--db", str(db), check=True)  # writable again: the rerun completes
    verify_store(db, expected, complete=True)


def test_new_store_under_read_only_parent(tmp_path):
    with mounted("-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", target=tmp_path / "ro") as ro:
        p = run_cli("init", "--db", str(ro / "sub" / "db"))  # a command that creates (status refuses a missing store)
        assert p.returncode == 1
        assert f"cannot write to {ro} (Read-only file system)" in _one_error_line(p.stderr)


def test_store_deleted_under_running_server(tmp_path):
    import httpx

    pytest.importorskip("fastapi")
    src = tmp_path / "shards"
    synth(src, [0, 1], 400, dim=16, seed=53)
    db = tmp_path / "db"
    run_cli("ingest", str(src), "--db", str(db), check=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "laion_search.cli", "serve", "--db", str(db), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "server did not start"
            time.sleep(0.2)
        assert httpx.post(base + "/api/search", json={"like": 5, "k": 3}).status_code == 200
        shutil.rmtree(db)
        answers = []
        for method, url, body in [("GET", "/api/status", None), ("POST", "/api/search", {"like": 5, "k": 3}),
                                  ("POST", "/api/search", {"like": 5, "k": 3, "exact": True}),
                                  ("GET", "/api/search?like=7&k=2", None),
                                  ("POST", "/metadata", {"ids": [1, 2]}), ("GET", "/health", None)]:
            r = httpx.request(method, base + url, json=body, timeout=30)
            answers.append(r.status_code)
            assert "Traceback" not in r.text and str(tmp_path) not in r.text, r.text
            if url != "/health":
                assert r.status_code == 503, (url, r.status_code, r.text)
                assert r.json()["error"].startswith("the store is unavailable (its files are missing"), r.text
        assert server.poll() is None, "the server must survive"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    # the fault clears (a fresh store at the same place), the command is rerun: whole shards
    run_cli("ingest", str(src), "--db", str(db), check=True)
    verify_store(db, source_checksums(src, [0, 1]), complete=True)
    record_figures("store deleted under server", statuses=answers)
    assert os.path.isdir(db)
