"""Shared fixtures. Every dataset is generated here, in temp dirs; nothing touches the network."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from laion_search import connect
from laion_search.sources.synth import synth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shards_flat(tmp_path_factory) -> Path:
    """3 shards × 600 rows, 512-d, the guide's flat layout."""
    out = tmp_path_factory.mktemp("flat")
    synth(out, [0, 1, 2], 600, seed=7)
    return out


@pytest.fixture(scope="session")
def shards_folders(tmp_path_factory) -> Path:
    """2 shards × 400 rows in img_emb/ text_emb/ metadata/ with zero-padded numbers (0003, 0010)."""
    out = tmp_path_factory.mktemp("folders")
    synth(out, [3, 10], 400, seed=8, layout="folders", pad=4)
    return out


@pytest.fixture
def store(tmp_path):
    s = connect(tmp_path / "db")
    try:
        yield s
    finally:
        s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a thread; yields its base URL, stops it after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60  # a failure timeout only: we wait for the started flag
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = False,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `laion` entry point in a subprocess (its own chDB engine)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "laion_search.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"laion {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# -- ClickHouse HTTP test fixture (chDB behind ClickHouse's HTTP interface) ---------------------------
def _start_chdb_http(tmp_path_factory, *extra: str):
    """Start ``laion_search.testing.chdb_http`` on 127.0.0.1 in its own process; yields
    ``(base_url, user, password)`` and stops it afterwards."""
    import time

    from .crash_harness import readable

    path = tmp_path_factory.mktemp("chdb-http") / "db"
    user, password = "laion", "p@ss:w/rd"
    proc = subprocess.Popen([sys.executable, "-m", "laion_search.testing.chdb_http", "--path", str(path),
                             "--port", "0", "--user", user, "--password", password, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    line = ""
    while time.monotonic() < deadline:
        if readable(proc.stdout, 0.5):
            line = proc.stdout.readline()
            break
        if proc.poll() is not None:
            break
    if not line.startswith("LISTENING "):
        proc.kill()
        raise RuntimeError(f"chdb_http fixture did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}")
    try:
        yield line.split()[1], user, password
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def chdb_http(tmp_path_factory):
    """TEST FIXTURE, not a ClickHouse server: ``laion_search.testing.chdb_http`` serves one chDB
    store over the part of ClickHouse's HTTP interface that clickhouse-connect uses, in its own
    process (chDB hosts one store per process), on 127.0.0.1. Yields ``(base_url, user, password)``."""
    yield from _start_chdb_http(tmp_path_factory)


#: The one-node cluster the cluster fixture is (``chdb_http --cluster``).
FIXTURE_CLUSTER = "laion_fixture"


@pytest.fixture(scope="session")
def chdb_http_cluster(tmp_path_factory):
    """The same fixture as a one-node cluster named FIXTURE_CLUSTER: Distributed tables, the
    ``cluster()`` function and synchronous Distributed inserts run for real (the one shard is the
    engine itself); ``ON CLUSTER`` statements run on that one node (see the fixture's docstring)."""
    yield from _start_chdb_http(tmp_path_factory, "--cluster", FIXTURE_CLUSTER)


@pytest.fixture
def cluster_url(chdb_http_cluster, request):
    """A ``clickhouse://`` URL to a fresh database on the one-node cluster fixture, initialised as a
    cluster store (``laion init --cluster``: ``laion_local`` + Distributed ``laion``)."""
    from laion_search.backends.cluster import ClusterLayout

    url, db = _fresh_fixture_database(chdb_http_cluster, request, f" ON CLUSTER {FIXTURE_CLUSTER}")
    try:
        with connect(url, create=False) as s:
            s.init_cluster(ClusterLayout(FIXTURE_CLUSTER, db))
        yield url
    finally:
        _fixture_sql(chdb_http_cluster, f"DROP DATABASE IF EXISTS {db} ON CLUSTER {FIXTURE_CLUSTER} SYNC")


def _fresh_fixture_database(fixture, request, on_cluster: str = "") -> tuple[str, str]:
    import re
    import urllib.parse

    base, user, password = fixture
    db = "t_" + re.sub(r"[^A-Za-z0-9]", "_", request.node.name)[:40] + "_" + os.urandom(3).hex()
    _fixture_sql(fixture, f"CREATE DATABASE {db}{on_cluster}")
    host = base.split("://", 1)[1]
    return f"clickhouse://{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@{host}/{db}", db


@pytest.fixture
def server_url(chdb_http, request):
    """A ``clickhouse://`` URL to a fresh, empty database on the chDB HTTP fixture."""
    url, db = _fresh_fixture_database(chdb_http, request)
    try:
        yield url
    finally:
        _fixture_sql(chdb_http, f"DROP DATABASE IF EXISTS {db} SYNC")


def _fixture_sql(chdb_http, sql: str) -> bytes:
    import base64
    import urllib.request

    base, user, password = chdb_http
    req = urllib.request.Request(base + "/", data=sql.encode(), method="POST",
                                 headers={"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()


@pytest.fixture(autouse=True)
def _await_the_clip_model(monkeypatch):
    """A served text/image request waits for the server's background CLIP load (an event) for
    ``ENCODER_WAIT`` seconds, then answers 503 "still loading". Tests await that event instead of
    racing a clock: on a busy machine the first load in a worker can take longer than 10 s. The
    value is only a failure deadline; the wait ends the moment the model is loaded."""
    try:
        import laion_search.web.app as web_app
    except ImportError:  # the server extra is not installed: no served requests to wait in
        return
    monkeypatch.setattr(web_app, "ENCODER_WAIT", 600.0)
