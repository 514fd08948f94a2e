"""`laion download` against a real HTTP server on 127.0.0.1 that injects faults: every case ends
with files byte-identical to the source, or a clear failure after the retry budget — never a
corrupt file presented as complete. Plus --ingest end to end, with a SIGKILL and a rerun."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from laion_search.sources.download import DEFAULT_BASE_URL, MANIFEST, Remote, RetryPolicy, download
from laion_search.errors import UsageError
from laion_search.index.text import tokenize
from laion_search.sources.shards import KINDS, discover
from laion_search.sources.synth import synth
from laion_search.testing.faulty_http import Fault, FaultyServer

from .conftest import run_cli
from .crash_harness import kill_when

ROWS = 300  # 300 × 512 float16 = 307 KB per .npy: fast, yet many socket reads per file
FAST = RetryPolicy(tries=5, base_delay=0.01, max_delay=0.05, connect_timeout=2, read_timeout=0.5)


def _name(kind: str, n: int, pad: int = 0) -> str:
    ext = ".parquet" if kind == "metadata" else ".npy"
    return f"{kind}_{n:0{pad}d}{ext}" if pad else f"{kind}_{n}{ext}"


def _remote_path(kind: str, n: int, pad: int = 0) -> str:
    return f"/{kind}/{_name(kind, n, pad)}"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """What the mirror serves: LAION's folders layout, shards 0 and 1."""
    out = tmp_path_factory.mktemp("mirror")
    synth(out, [0, 1], ROWS, seed=21, layout="folders")
    return out


@pytest.fixture
def mirror(source, tmp_path):
    """A private copy of the source (tests may rewrite files) behind a fresh server."""
    root = tmp_path / "mirror"
    shutil.copytree(source, root)
    with FaultyServer(root) as srv:
        yield srv


def _assert_identical(src: Path, dest: Path, shards=(0, 1), pad: int = 0, layout: str = "flat") -> None:
    for n in shards:
        for kind in KINDS:
            local = dest / (f"{kind}/" if layout == "folders" else "") / _name(kind, n, pad)
            remote = src / kind / _name(kind, n, pad)
            assert local.is_file(), local
            assert filecmp.cmp(remote, local, shallow=False), f"{local} differs from {remote}"
    leftovers = [p for p in dest.rglob("*") if p.name.endswith((".part", ".part.json", ".tmp"))]
    assert leftovers == []


def _run(srv: FaultyServer, dest: Path, shards=(0, 1), policy: RetryPolicy = FAST, jobs: int = 2, **kw):
    events: list[dict] = []
    report = download(list(shards), dest, remote=Remote(base_url=srv.url, **kw), jobs=jobs, policy=policy,
                      progress=events.append)
    return report, events


def _offset(range_header: str | None) -> int:
    assert range_header and range_header.startswith("bytes=") and range_header.endswith("-"), range_header
    return int(range_header[6:-1])


def _of(events, kind):
    return [e for e in events if e["event"] == kind]


# -- naming, layout, defaults ----------------------------------------------------------------------
def test_remote_and_local_names():
    guide = Path(__file__).resolve().parents[1].parent / "shared/seed/laion-400m-clickhouse-guide.zh.md"
    if guide.exists():  # the default is the guide's prefix
        assert f"{DEFAULT_BASE_URL}/img_emb/img_emb_${{number}}.npy" in guide.read_text()
    r = Remote()
    assert r.url("img_emb", 7) == f"{DEFAULT_BASE_URL}/img_emb/img_emb_7.npy"
    assert r.url("metadata", 7).endswith("/metadata/metadata_7.parquet")
    assert r.relpath("text_emb", 7) == "text_emb_7.npy"
    r = Remote(base_url="http://m.example/x/", remote_layout="flat", layout="folders", pad=4)
    assert r.url("text_emb", 12) == "http://m.example/x/text_emb_0012.npy"
    assert r.relpath("metadata", 12) == "metadata/metadata_0012.parquet"
    for bad in ({"layout": "tree"}, {"remote_layout": "x"}, {"base_url": "ftp://x"}, {"pad": 13}):
        with pytest.raises(UsageError):
            Remote(**bad)


def test_clean_download_then_rerun_skips_without_transfers(mirror, tmp_path):
    dest = tmp_path / "out"
    report, events = _run(mirror, dest)
    assert report.ok and sorted(report.shards_verified) == [0, 1] and len(report.downloaded) == 6
    assert report.bytes == sum(p.stat().st_size for p in dest.iterdir() if p.name != MANIFEST)
    _assert_identical(mirror.root, dest)
    assert [f.shard for f in discover(dest)] == [0, 1]  # `laion ingest DIR` reads what we wrote
    before = len(mirror.log)
    report, events = _run(mirror, dest)
    assert report.ok and report.shards_skipped == [0, 1] and report.downloaded == [] and report.bytes == 0
    assert len(mirror.log) == before  # the manifest answered: no request at all


def test_folders_layout_and_padding(tmp_path):
    src = tmp_path / "mirror"
    synth(src, [3, 12], 100, seed=4, layout="folders", pad=4)
    with FaultyServer(src) as srv:
        report, _ = _run(srv, tmp_path / "out", shards=(3, 12), layout="folders", pad=4)
    assert report.ok
    _assert_identical(src, tmp_path / "out", shards=(3, 12), pad=4, layout="folders")
    assert [f.shard for f in discover(tmp_path / "out")] == [3, 12]


# -- faults ----------------------------------------------------------------------------------------
def test_connection_reset_mid_body_resumes_with_range(mirror, tmp_path):
    path = _remote_path("img_emb", 0)
    mirror.fault(path, Fault(reset_after=50_000), Fault(reset_after=70_000))
    report, events = _run(mirror, tmp_path / "out")
    assert report.ok and report.retries == 2
    _assert_identical(mirror.root, tmp_path / "out")
    gets = mirror.requests(path)
    assert [g.status for g in gets] == [200, 206, 206]
    # each attempt resumed after the bytes the last one kept, validated by If-Range (a TCP reset may
    # discard bytes the server sent but we had not read yet, so the offsets are bounded, not exact)
    off1, off2 = (_offset(g.range) for g in gets[1:])
    assert 0 < off1 <= gets[0].sent and off1 < off2 <= off1 + gets[1].sent and gets[1].if_range
    assert any("reset" in e["reason"] for e in _of(events, "retry"))


@pytest.mark.parametrize("status", [500, 503, 429])
def test_5xx_and_429_are_retried(mirror, tmp_path, status):
    path = _remote_path("text_emb", 1)
    mirror.fault(path, Fault(status=status), Fault(status=status))
    report, events = _run(mirror, tmp_path / "out")
    assert report.ok and report.retries == 2
    assert [e["reason"].split()[1] for e in _of(events, "retry")] == [str(status)] * 2
    _assert_identical(mirror.root, tmp_path / "out")


def test_retry_after_is_honoured(mirror, tmp_path, monkeypatch):
    path = _remote_path("metadata", 0)
    mirror.fault(path, Fault(status=429, retry_after="1"), Fault(status=503, retry_after="0"))
    waits: list[float | None] = []
    real_wait = threading.Event.wait

    def recording_wait(self, timeout=None):
        waits.append(timeout)
        return real_wait(self, timeout)

    monkeypatch.setattr(threading.Event, "wait", recording_wait)
    report, events = _run(mirror, tmp_path / "out", shards=(0,))
    monkeypatch.undo()
    assert report.ok
    retries = _of(events, "retry")
    assert [e["delay"] for e in retries] == [1.0, 0.0] and retries[0]["retry_after"] == 1.0
    assert 1.0 in waits  # waited what the server asked, not FAST's 10 ms backoff
    _assert_identical(mirror.root, tmp_path / "out", shards=(0,))


def test_stall_past_read_timeout_is_retried(mirror, tmp_path):
    path = _remote_path("img_emb", 1)
    mirror.fault(path, Fault(stall_after=100_000, stall=30.0))
    report, events = _run(mirror, tmp_path / "out")
    assert report.ok and report.retries == 1
    # gave up on the stall after read_timeout (0.5 s): had it waited the stall out, the bytes
    # would have come and there would be no retry
    assert "timed out" in _of(events, "retry")[0]["reason"]
    gets = mirror.requests(path)
    assert gets[1].range == "bytes=100000-"  # kept the bytes that came before the stall
    _assert_identical(mirror.root, tmp_path / "out")


def test_server_without_range_support_restarts_cleanly(source, tmp_path):
    root = tmp_path / "mirror"
    shutil.copytree(source, root)
    with FaultyServer(root, no_range=True) as srv:
        path = _remote_path("img_emb", 0)
        srv.fault(path, Fault(reset_after=60_000), Fault(reset_after=120_000))
        report, events = _run(srv, tmp_path / "out")
        gets = srv.requests(path)
    assert report.ok
    assert [g.status for g in gets] == [200, 200, 200] and gets[1].range == "bytes=60000-"
    assert any("ignored the Range" in e["reason"] for e in _of(events, "restart"))
    _assert_identical(root, tmp_path / "out")


def test_body_shorter_than_content_length(mirror, tmp_path):
    path = _remote_path("text_emb", 0)
    mirror.fault(path, Fault(short_after=10_000), Fault(short_after=20_000))
    report, events = _run(mirror, tmp_path / "out")
    assert report.ok and report.retries == 2
    assert all("shorter than its Content-Length" in e["reason"] for e in _of(events, "retry"))
    assert mirror.requests(path)[1].range == "bytes=10000-"
    _assert_identical(mirror.root, tmp_path / "out")


def _rewriter(target: Path, seed: int):
    """Replace ``target`` (an img_emb file) atomically with different content of the same size.
    The new content is made now: the hook the server runs mid-request only renames it in, so
    it cannot outlast the client's read timeout on a busy machine."""
    other = target.parent.parent / f"other-{seed}"
    synth(other, [0], ROWS, seed=seed, layout="folders")
    new = other / "img_emb" / "img_emb_0.npy"
    assert new.stat().st_size == target.stat().st_size and new.read_bytes() != target.read_bytes()

    def rewrite() -> None:
        os.replace(new, target)
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime → new ETag
    return rewrite


@pytest.mark.parametrize("server_honours_if_range", [True, False])
def test_file_changed_between_attempts(source, tmp_path, server_honours_if_range):
    root = tmp_path / "mirror"
    shutil.copytree(source, root)
    target = root / "img_emb" / "img_emb_0.npy"
    old = target.read_bytes()
    with FaultyServer(root, ignore_if_range=not server_honours_if_range) as srv:
        path = _remote_path("img_emb", 0)
        srv.fault(path, Fault(reset_after=100_000), Fault(before=_rewriter(target, seed=99)))
        report, events = _run(srv, tmp_path / "out", shards=(0,))
        statuses = [g.status for g in srv.requests(path)]
    got = (tmp_path / "out" / "img_emb_0.npy").read_bytes()
    assert got == target.read_bytes() and got != old  # the new version, whole — no old prefix
    assert report.ok
    restarts = [e["reason"] for e in _of(events, "restart")]
    assert any("changed on the server" in r for r in restarts), restarts
    # honoured If-Range: the server sent the new file (200); ignored: we saw the new ETag on a 206
    assert statuses == ([200, 200] if server_honours_if_range else [200, 206, 200])


def test_retry_budget_exhausted_is_a_clear_failure(mirror, tmp_path):
    path = _remote_path("img_emb", 0)
    mirror.fault(path, *[Fault(reset_after=1000) for _ in range(10)])
    policy = RetryPolicy(tries=3, base_delay=0.01, max_delay=0.02, read_timeout=0.5)
    report, events = _run(mirror, tmp_path / "out", policy=policy)
    assert not report.ok and report.shards_failed == [0] and report.shards_verified == [1]
    [failure] = report.failed
    assert failure["file"] == "img_emb_0.npy" and failure["url"] == mirror.url + path
    assert "gave up after 3 attempt(s): connection reset" in failure["reason"]
    assert not (tmp_path / "out" / "img_emb_0.npy").exists()  # never presented as complete
    assert len(mirror.requests(path)) == 3
    # a rerun against a healthy server resumes the partial file and completes
    while mirror.pending_faults(path):  # the mirror recovers
        mirror._take(path)
    report, _ = _run(mirror, tmp_path / "out", policy=policy)
    assert report.ok and 0 < _offset(mirror.requests(path)[-1].range) <= 3000
    _assert_identical(mirror.root, tmp_path / "out")


def test_http_404_is_final_and_corrupt_source_never_completes(mirror, tmp_path):
    bad = mirror.root / "text_emb" / "text_emb_1.npy"
    bad.write_bytes(bad.read_bytes()[:-512])  # header promises more rows than the body holds
    (mirror.root / "metadata" / "metadata_0.parquet").unlink()
    report, events = _run(mirror, tmp_path / "out", policy=RetryPolicy(tries=2, base_delay=0.01, read_timeout=0.5))
    reasons = {f["file"]: f["reason"] for f in report.failed}
    assert reasons["metadata_0.parquet"] == "HTTP 404 Not Found"
    assert len(mirror.requests("/metadata/metadata_0.parquet")) == 1  # 404: not retried
    assert "fails verification" in reasons["text_emb_1.npy"] and "truncated" in reasons["text_emb_1.npy"]
    assert not (tmp_path / "out" / "text_emb_1.npy").exists()
    assert not list((tmp_path / "out").glob("*.part"))
    assert report.shards_failed == [0, 1]


def test_shard_whose_files_disagree_fails(mirror, tmp_path):
    other = tmp_path / "other"
    synth(other, [1], ROWS + 5, seed=3)
    shutil.copy(other / "metadata_1.parquet", mirror.root / "metadata" / "metadata_1.parquet")
    report, events = _run(mirror, tmp_path / "out")
    assert report.shards_verified == [0] and report.shards_failed == [1]
    assert "row counts disagree" in report.failed[0]["reason"]


def test_existing_files_adopted_or_replaced(mirror, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    shutil.copy(mirror.root / "img_emb" / "img_emb_0.npy", dest / "img_emb_0.npy")  # e.g. from wget
    (dest / "text_emb_0.npy").write_bytes(b"\x93NUMPY garbage")  # a broken leftover
    report, events = _run(mirror, dest, shards=(0,))
    assert report.ok and report.skipped == ["img_emb_0.npy"]
    assert sorted(report.downloaded) == ["metadata_0.parquet", "text_emb_0.npy"]
    assert mirror.requests("/img_emb/img_emb_0.npy", method="HEAD") and not mirror.requests("/img_emb/img_emb_0.npy")
    _assert_identical(mirror.root, dest, shards=(0,))


def test_parallel_transfers_run_concurrently(source, tmp_path):
    root = tmp_path / "mirror"
    shutil.copytree(source, root)
    with FaultyServer(root, rate=1_000_000) as srv:  # 1 MB/s per connection
        report, _ = _run(srv, tmp_path / "out", jobs=4)
        most = srv.max_active
    assert report.ok
    assert most >= 3  # transfers overlapped on the server
    _assert_identical(root, tmp_path / "out")


# -- the CLI, --ingest, kill and rerun (each store in its own process) -------------------------------
_CHECK = textwrap.dedent("""
    import json, sys
    import numpy as np
    from laion_search import connect
    db, src, shards = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    with connect(db) as store:
        out = {"count": store.scalar("SELECT count() FROM laion"),
               "distinct": store.scalar("SELECT count(DISTINCT id) FROM laion"),
               "partitions": {str(k): v for k, v in store.partition_rows().items()},
               "stages": len(store.rows("SELECT name FROM system.tables WHERE name LIKE 'laion_stage_%'")),
               "identical": True}
        for n in shards:
            for col, kind in (("image_embedding", "img_emb"), ("text_embedding", "text_emb")):
                want = np.load(f"{src}/{kind}/{kind}_{n}.npy").astype(np.float32)
                got = np.array(store.sql(f"SELECT {col} FROM laion WHERE shard = {n} ORDER BY id").column(0).to_pylist(),
                               np.float32)
                out["identical"] &= bool(got.shape == want.shape and np.array_equal(got, want))
    print(json.dumps(out))
""")


def _check_store(db: Path, src: Path, shards: list[int]) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHECK, str(db), str(src), json.dumps(shards)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_cli_download_ingest_killed_then_rerun(tmp_path):
    src = tmp_path / "mirror"
    shards = [0, 1, 2, 3]
    synth(src, shards, 1000, seed=5, layout="folders")  # 1 MB per .npy
    dest, db = tmp_path / "out", tmp_path / "db"
    with FaultyServer(src, rate=1_500_000) as srv:  # slow mirror: time to kill mid-transfer
        args = ["download", "0-3", "--to", str(dest), "--base-url", srv.url, "-j", "2", "--ingest",
                "--db", str(db), "--json", "--retry-delay", "0.01", "--read-timeout", "5"]
        # killed once a shard is ingested and a later file has bytes on disk
        seen = kill_when([sys.executable, "-m", "laion_search.cli", *args],
                         lambda pts: any(p["event"] == "ingest_done" for p in pts) and pts[-1]["event"] == "file_bytes")
        assert any(e["event"] == "ingest_done" for e in seen)
        parts = {p.name[:-5]: p.stat().st_size for p in dest.glob("*.part") if p.stat().st_size}
        assert parts, "killed while a file was in flight"
        mid = _check_store(db, src, [])
        assert mid["stages"] in (0, 1) and all(v == 1000 for v in mid["partitions"].values())  # whole shards only

        srv.rate = None
        first_rerun_request = len(srv.log)
        rerun = run_cli(*args, check=True)
        events = [json.loads(line) for line in rerun.stdout.splitlines()]
        resumed = [e for e in srv.log[first_rerun_request:] if e.range]
    summary = events[-1]
    assert summary["event"] == "summary" and summary["ok"]
    assert sorted(summary["ingested"] + summary["ingest_skipped"]) == shards
    assert 0 in summary["ingest_skipped"] or 0 in summary["shards_skipped"]  # loaded before the kill
    for name, size in parts.items():  # every partial file continued where it stopped
        kind = name.split("_")[0] + ("_emb" if "emb" in name else "")
        assert any(r.path == f"/{kind}/{name}" and r.range == f"bytes={size}-" for r in resumed), (name, size)
    _assert_identical(src, dest, shards=shards)
    final = _check_store(db, src, shards)
    assert final == {"count": 4000, "distinct": 4000, "partitions": {str(n): 1000 for n in shards},
                     "stages": 0, "identical": True}


def test_cli_delete_after_ingest_plain_output_and_rerun(tmp_path):
    src = tmp_path / "mirror"
    synth(src, [0, 1, 2], 200, seed=6, layout="folders")
    dest, db = tmp_path / "out", tmp_path / "db"
    with FaultyServer(src) as srv:
        srv.fault("/img_emb/img_emb_1.npy", Fault(reset_after=5000))
        args = ["download", "0-2", "--to", str(dest), "--base-url", srv.url, "-j", "3", "--ingest",
                "--delete-after-ingest", "--db", str(db), "--retry-delay", "0.01"]
        proc = run_cli(*args, check=True)
        assert "download summary" in proc.stdout and "shards ingested" in proc.stdout
        assert "img_emb_1.npy: connection reset by peer; retry 2" in proc.stderr
        assert "shard 2: ingested 200 rows" in proc.stderr
        assert sorted(p.name for p in dest.iterdir()) == [MANIFEST]  # disk freed, progress kept
        n_requests = len(srv.log)
        again = run_cli(*args, "--json", check=True)
        assert len(srv.log) == n_requests  # nothing fetched again: the store already has them
    summary = json.loads(again.stdout.splitlines()[-1])
    assert summary["ingest_skipped"] == [0, 1, 2] and summary["downloaded"] == []
    assert _check_store(db, src, [0, 1, 2]) == {"count": 600, "distinct": 600, "stages": 0, "identical": True,
                                                "partitions": {"0": 200, "1": 200, "2": 200}}


def test_cli_download_ingest_with_the_text_index(tmp_path):
    """`download --ingest --text-index`: the caption text index is declared before the first shard
    lands, so every part arrives indexed, and keyword search answers from it."""
    src = tmp_path / "mirror"
    synth(src, [0, 1], 300, seed=8, layout="folders")
    dest, db = tmp_path / "out", tmp_path / "db"
    with FaultyServer(src) as srv:
        run_cli("download", "0-1", "--to", str(dest), "--base-url", srv.url, "-j", "2", "--ingest", "--text-index",
                "--db", str(db), "--retry-delay", "0.01", check=True)
    st = json.loads(run_cli("index", "status", "--db", str(db), "--json", check=True).stdout)
    assert [x["name"] for x in st] == ["caption_index"] and st[0]["parts"] >= 2
    assert st[0]["parts_covered"] == st[0]["parts"]  # landed indexed: no build left to run
    word = "photo"
    captions = pq.read_table(src / "metadata" / "metadata_0.parquet")["caption"].to_pylist()
    captions += pq.read_table(src / "metadata" / "metadata_1.parquet")["caption"].to_pylist()
    want = sum(1 for c in captions if word in tokenize(c or ""))
    got = json.loads(run_cli("search", "--words", word, "-k", "1000", "--db", str(db), "--json",
                             check=True).stdout)["results"]
    assert want > 0 and len(got) == want and all(word in tokenize(r["caption"]) for r in got)


def test_cli_failure_exit_code_and_usage_errors(tmp_path):
    from typer.testing import CliRunner

    from laion_search.cli.main import app

    runner = CliRunner()
    with FaultyServer(tmp_path) as srv:  # serves nothing: every file is a 404
        res = runner.invoke(app, ["download", "5", "--to", str(tmp_path / "out"), "--base-url", srv.url])
    assert res.exit_code == 1
    assert f"failed: shard 5 img_emb_5.npy ({srv.url}/img_emb/img_emb_5.npy): HTTP 404 Not Found" in res.output
    assert runner.invoke(app, ["download", "x-y", "--to", str(tmp_path)]).exit_code == 2
    bad = runner.invoke(app, ["download", "1", "--to", str(tmp_path), "--delete-after-ingest"])
    assert bad.exit_code == 2 and "needs --ingest" in bad.output
    bad = runner.invoke(app, ["download", "1", "--to", str(tmp_path), "--text-index"])
    assert bad.exit_code == 2 and "--text-index needs --ingest" in bad.output
    assert runner.invoke(app, ["download", "1", "--to", str(tmp_path), "--base-url", "ftp://x"]).exit_code == 2


def test_bench_download_end_to_end(tmp_path):
    """`laion bench download` on tiny data: the table is produced and every copy was byte-identical
    (the bench itself fails otherwise). No timing asserts."""
    proc = run_cli("bench", "download", "--shards", "2", "--rows", "200", "--rate", "5", "--throttled-only",
                   "--repeat", "1", "--dir", str(tmp_path / "w"), "--out", str(tmp_path / "out"), "--json", check=True)
    result = json.loads(proc.stdout)
    methods = [r["method"] for r in result["results"]]
    assert methods[2:] == ["laion download -j 1", "laion download -j 4", "laion download -j 1 --no-fsync",
                           "laion download -j 4 --no-fsync"]
    assert methods[1] == methods[0] + " + fsync"  # the durable baseline next to the plain one
    assert all(r["seconds"] > 0 and r["mb_per_s"] > 0 and len(r["samples"]) == 1 for r in result["results"])
    table = (tmp_path / "out" / "bench-download.md").read_text()
    assert "| throttled (5 MB/s per connection) | laion download -j 4 |" in table
    # like for like: the defaults (fsync) against curl + fsync, --no-fsync against plain curl
    assert result["ratio_baselines"] == {"throttled -j 1": methods[1], "throttled -j 4": methods[1],
                                         "throttled -j 1 --no-fsync": methods[0],
                                         "throttled -j 4 --no-fsync": methods[0]}
    assert set(result["ratios"]) == set(result["ratio_baselines"])


def test_complete_part_left_by_a_crash_before_the_rename(mirror, tmp_path):
    """Killed after the last byte but before the rename: the rerun asks for the bytes after the end,
    gets 416 with the same total, verifies the .part and renames it — no byte fetched again."""
    dest = tmp_path / "out"
    report, _ = _run(mirror, dest, shards=(0,))
    target = dest / "img_emb_0.npy"
    state = {"url": mirror.url + "/img_emb/img_emb_0.npy", "size": target.stat().st_size,
             "etag": None, "last_modified": None}
    (dest / MANIFEST).unlink()
    os.replace(target, dest / "img_emb_0.npy.part")
    (dest / "img_emb_0.npy.part.json").write_text(json.dumps(state))
    before = len(mirror.log)
    report, events = _run(mirror, dest, shards=(0,))
    assert report.ok and "img_emb_0.npy" in report.downloaded and report.bytes == 0
    assert [(e.status, e.range) for e in mirror.log[before:] if e.path == "/img_emb/img_emb_0.npy"] == [
        (416, f"bytes={state['size']}-")]
    _assert_identical(mirror.root, dest, shards=(0,))


def test_retry_after_forms():
    import email.utils

    from laion_search.sources.http import retry_after as _retry_after

    assert _retry_after("7") == 7.0 and _retry_after(None) is None and _retry_after("soon") is None
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _retry_after(when) <= 31
    assert _retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0


@pytest.mark.parametrize("mode", ["bar", "plain", "json"])
def test_progress_renderers(mirror, tmp_path, mode, monkeypatch, capsys):
    """The three renderings of a run with a retry: a bar per active file plus the total on a terminal,
    plain lines otherwise, JSON lines with --json."""
    import io

    from rich.console import Console

    from laion_search.cli import output

    term = io.StringIO()
    monkeypatch.setattr(output, "err", Console(file=term, force_terminal=(mode == "bar"), width=120))
    mirror.fault(_remote_path("img_emb", 1), Fault(reset_after=20_000))
    seen: dict[str, str] = {}
    with output.DownloadProgress(mode) as progress:
        def spy(event: dict) -> None:
            progress(event)
            if mode == "bar" and event["event"] == "file_bytes" and progress._progress is not None:
                snap = io.StringIO()
                Console(file=snap, width=120, color_system=None).print(progress._progress.get_renderable())
                seen.setdefault("frame", snap.getvalue())
        report = download([0, 1], tmp_path / "out", remote=Remote(base_url=mirror.url), jobs=2, policy=FAST,
                          progress=spy)
    assert report.ok
    text = term.getvalue()
    if mode == "json":
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert events[0]["event"] == "start" and events[-1]["event"] == "summary" and events[-1]["ok"]
        assert any(e["event"] == "retry" and e["file"] == "img_emb_1.npy" for e in events)
    else:
        assert "img_emb_1.npy: connection reset by peer; retry 2" in text
        assert "shard 1: verified, 300 rows × 512-d" in text
    if mode == "bar":
        assert seen["frame"].splitlines()[0].startswith("total") and ".npy" in seen["frame"]


def test_disk_full_is_a_clear_failure_not_retried(mirror, tmp_path):
    """A full disk is not a network fault: the file fails at once, named, with nothing presented
    as complete. (A small tmpfs; needs root or CAP_SYS_ADMIN, skipped otherwise.)"""
    small = tmp_path / "small"
    small.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(small)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
    try:
        report, events = _run(mirror, small, shards=(0,), jobs=1)
        names = sorted(p.name for p in small.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
    assert not report.ok and report.shards_failed == [0] and report.retries == 0
    reasons = [f["reason"] for f in report.failed]
    assert any("No space left on device" in r and str(small) in r for r in reasons), reasons
    assert not {f["file"] for f in report.failed} & set(names)  # a failed file never gets its real name


def test_redirect_is_followed_and_resume_goes_back_to_the_same_url(mirror, tmp_path):
    path = _remote_path("img_emb", 0)
    mirror.fault(path, Fault(redirect=f"{mirror.url}/img_emb/img_emb_0.npy?cdn=1"), Fault(reset_after=40_000),
                 Fault(redirect="/img_emb/img_emb_0.npy?cdn=2"))
    report, events = _run(mirror, tmp_path / "out", shards=(0,))
    assert report.ok and report.retries == 1
    assert [g.status for g in mirror.requests(path)] == [302, 200, 302, 206]
    _assert_identical(mirror.root, tmp_path / "out", shards=(0,))


def test_no_fsync_files_are_trusted_until_a_reboot(mirror, tmp_path):
    """fsync=False (--no-fsync): the manifest marks files as not flushed, with the boot id; a rerun in
    the same boot skips them, a rerun after a reboot (another boot id) fetches them again."""
    dest = tmp_path / "out"
    report = download([0], dest, remote=Remote(base_url=mirror.url), jobs=2, policy=FAST, fsync=False)
    assert report.ok and len(report.downloaded) == 3
    manifest = json.loads((dest / MANIFEST).read_text())
    entries = list(manifest["files"].values())
    assert entries and all(e["durable"] is False and e["boot_id"] for e in entries)
    again = download([0], dest, remote=Remote(base_url=mirror.url), jobs=2, policy=FAST)
    assert again.ok and again.bytes == 0 and again.shards_skipped == [0]
    for e in manifest["files"].values():
        e["boot_id"] = "another-boot"
    (dest / MANIFEST).write_text(json.dumps(manifest))
    before = len(mirror.log)
    after_reboot = download([0], dest, remote=Remote(base_url=mirror.url), jobs=2, policy=FAST)
    assert after_reboot.ok and sorted(after_reboot.downloaded) == sorted(e for e in manifest["files"])
    assert all(e.method == "GET" and e.range is None for e in mirror.log[before:])  # fetched whole, not adopted
    _assert_identical(mirror.root, dest, shards=(0,))
    assert all("durable" not in e for e in json.loads((dest / MANIFEST).read_text())["files"].values())


def test_npy_check_reads_the_header_only_and_agrees_with_read_npy_header(tmp_path):
    from laion_search.sources.download import verify_file
    from laion_search.sources.npy import embedding_rows
    from laion_search.errors import ShardValidationError
    from laion_search.sources.shards import read_npy_header

    good = tmp_path / "good.npy"
    np.save(good, np.zeros((7, 4), dtype="<f2"))
    assert embedding_rows(good) == 7 == read_npy_header(good).rows == verify_file(good, "img_emb")
    v2 = tmp_path / "v2.npy"
    with open(v2, "wb") as f:
        np.lib.format.write_array(f, np.zeros((3, 2), dtype="<f4"), version=(2, 0))
    assert embedding_rows(v2) == 3 == verify_file(v2, "text_emb")
    bad = {"fortran": np.asfortranarray(np.zeros((3, 2), dtype="<f4")), "bigendian": np.zeros((3, 2), dtype=">f4"),
           "float64": np.zeros((3, 2)), "1d": np.zeros(6, dtype="<f4")}
    for name, arr in bad.items():
        p = tmp_path / f"{name}.npy"
        np.save(p, arr)
        assert embedding_rows(p) is None, name
        with pytest.raises(ShardValidationError):
            verify_file(p, "img_emb")
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(good.read_bytes()[:-1])
    trailing = tmp_path / "trailing.npy"
    trailing.write_bytes(good.read_bytes() + b"x")
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': <f2'}" + b"\0" * 40)
    for p, why in ((truncated, "truncated"), (trailing, "trailing bytes"), (garbage, "corrupt .npy header")):
        assert embedding_rows(p) is None
        with pytest.raises(ShardValidationError, match=why):
            verify_file(p, "img_emb")


def test_download_command_starts_without_the_heavy_imports():
    """`laion download` parses its arguments and starts transfers without chdb, pyarrow, numpy,
    rich or torch (they come when the first file is verified); the package's names load on first use."""
    code = textwrap.dedent("""
        import sys
        import laion_search, laion_search.cli.main, laion_search.sources.download
        heavy = {"chdb", "pyarrow", "numpy", "rich", "torch", "laion_search.store", "laion_search.ingest"}
        print(sorted(heavy & set(sys.modules)))
        from laion_search import connect, IngestReport, SearchQuery
        import laion_search.ingest as sub
        print(laion_search.ingest is sub and callable(sub.ingest), callable(connect), IngestReport.__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split("\n")[:2] == ["[]", "True True IngestReport"], proc.stdout + proc.stderr
