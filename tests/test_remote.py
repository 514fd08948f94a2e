"""Remote reads (open_input over http(s):// and hf://), named sources (`laion sources`,
`laion download --source`) and recall against a gold standard (`laion bench search --gold`).

Everything runs against the loopback fault-injecting server (laion_search.testing.faulty_http)
with fixtures generated here; the live smoke test runs only with LAION_TEST_LIVE=1."""

from __future__ import annotations

import filecmp
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

h5py = pytest.importorskip("h5py")

from laion_search.errors import DownloadError, ShardValidationError, UsageError  # noqa: E402
from laion_search.sources.http import RetryPolicy  # noqa: E402
from laion_search.sources.hdf5 import check_hdf5  # noqa: E402
from laion_search.sources.remote import HTTPFile, LocalFile, hf_url, open_input  # noqa: E402
from laion_search.testing.faulty_http import Fault, FaultyServer  # noqa: E402

from .conftest import run_cli  # noqa: E402

FAST = RetryPolicy(tries=4, base_delay=0.01, max_delay=0.02, connect_timeout=2, read_timeout=2)
BLOCK = 4096  # small blocks: a fixture file spans many, so footers and chunks are read piecemeal
TOKEN = "hf_SECRET_token_1234567890"
SISAP_DATA = "laion2B-en-clip768v2-n=300K.h5"
SISAP_QUERIES = "public-queries-2024-laion2B-en-clip768v2-n=10k.h5"
SISAP_GOLD = "gold-standard-dbsize=300K--" + SISAP_QUERIES


def _parquet(path: Path, rows: int = 3000, dim: int = 32, seed: int = 0) -> None:
    """A ClickHouse-LAION-5B-like part: id, caption, vector list<float32>, several row groups."""
    rng = np.random.default_rng(seed)
    vec = rng.standard_normal((rows, dim)).astype(np.float32)
    table = pa.table({"id": pa.array(np.arange(rows, dtype=np.uint32) * 7 + 3),
                      "caption": pa.array([f"caption {i} ✓" for i in range(rows)]),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), dim).cast(pa.list_(pa.float32()))})
    pq.write_table(table, path, row_group_size=500)


def _h5(path: Path, rows: int = 2000, dim: int = 48, seed: int = 1, chunks: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((rows, dim)).astype(np.float16)
    with h5py.File(path, "w") as f:
        f.create_dataset("emb", data=emb, chunks=(min(100, rows), dim) if chunks else None)
    return emb


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote-files")
    _parquet(root / "part.parquet")
    _h5(root / "data.h5")
    return root


@pytest.fixture
def srv(files):
    with FaultyServer(files) as s:
        yield s


def _gets(server: FaultyServer, path: str | None = None):
    return server.requests(path, "GET")


# -- open_input: equals the local file, reads only what it needs ---------------------------------------
def test_local_path_is_a_seekable_file(files):
    with open_input(str(files / "data.h5")) as f:
        assert isinstance(f, LocalFile) and f.seekable() and f.size() == (files / "data.h5").stat().st_size
        assert f.name == str(files / "data.h5")


def test_parquet_through_http_equals_local_and_reads_the_footer_only(files, srv):
    size = (files / "part.parquet").stat().st_size
    with open_input(srv.url + "/part.parquet", block_size=BLOCK, cache_blocks=4, policy=FAST) as f:
        assert isinstance(f, HTTPFile) and f.size() == size and f.seekable() and f.readable()
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_rows == 3000 and pf.metadata.num_row_groups == 6
        assert f.bytes_fetched < size / 4  # the footer, not the file
        assert pf.read_row_group(3).equals(pq.ParquetFile(files / "part.parquet").read_row_group(3))
        assert pf.read().equals(pq.read_table(files / "part.parquet"))
    gets = _gets(srv, "/part.parquet")
    assert gets and all(e.range and e.range.startswith("bytes=") and e.status == 206 for e in gets)


def test_h5_through_http_equals_local(files, srv):
    with open_input(srv.url + "/data.h5", block_size=BLOCK, cache_blocks=4, policy=FAST) as f, \
            h5py.File(f, "r") as h, h5py.File(files / "data.h5", "r") as local:
        assert h["emb"].shape == local["emb"].shape and h["emb"].dtype == np.float16
        assert np.array_equal(h["emb"][1234:1300], local["emb"][1234:1300])
        assert np.array_equal(h["emb"][:], local["emb"][:])
        assert f.requests >= 3


def test_seek_tell_read_semantics(files, srv):
    raw = (files / "data.h5").read_bytes()
    with open_input(srv.url + "/data.h5", block_size=BLOCK, policy=FAST) as f:
        assert f.seek(-100, os.SEEK_END) == len(raw) - 100 and f.read() == raw[-100:]
        assert f.read(10) == b""  # at the end
        f.seek(5000)
        assert f.tell() == 5000 and f.read(3 * BLOCK + 17) == raw[5000:5000 + 3 * BLOCK + 17]
        assert f.tell() == 5000 + 3 * BLOCK + 17
        f.seek(10, os.SEEK_CUR)
        assert f.read(50) == raw[5000 + 3 * BLOCK + 27:5000 + 3 * BLOCK + 77]
        with pytest.raises(OSError):
            f.seek(-1)


# -- faults --------------------------------------------------------------------------------------
def test_cut_mid_body_resumes_from_the_byte_it_reached(files, srv):
    raw = (files / "data.h5").read_bytes()
    # request 1 probes the first block; request 2 (the big read) is reset after 10,000 bytes,
    # request 3 closes cleanly 5,000 bytes short of its Content-Length
    srv.fault("/data.h5", Fault(), Fault(reset_after=10_000), Fault(short_after=5_000))
    events: list[dict] = []
    with open_input(srv.url + "/data.h5", block_size=BLOCK, policy=FAST, progress=events.append) as f:
        f.seek(BLOCK)
        assert f.read(len(raw)) == raw[BLOCK:]  # many blocks: one ranged request, straight through
    gets = _gets(srv, "/data.h5")
    assert [e.status for e in gets[:4]] == [206, 206, 206, 206]
    starts = [int(e.range[6:].split("-")[0]) for e in gets[1:4]]
    assert starts == [BLOCK, BLOCK + gets[1].sent, BLOCK + gets[1].sent + gets[2].sent]
    assert gets[1].sent == 10_000 and gets[2].sent == 5_000
    assert [e["event"] for e in events] == ["retry", "retry"]


def test_503_with_retry_after_is_retried_then_gives_up_when_it_persists(files, srv):
    raw = (files / "part.parquet").read_bytes()
    srv.fault("/part.parquet", Fault(status=503, retry_after="0"), Fault(), Fault(status=429, retry_after="0"))
    events: list[dict] = []
    with open_input(srv.url + "/part.parquet", block_size=BLOCK, policy=FAST, progress=events.append) as f:
        assert f.read() == raw
    assert [(e["reason"].split()[1], e["retry_after"]) for e in events] == [("503", 0.0), ("429", 0.0)]
    srv.fault("/part.parquet", *[Fault(status=503, retry_after="0")] * FAST.tries)
    with pytest.raises(DownloadError, match=r"part.parquet: gave up after 4 attempt\(s\): HTTP 503"):
        open_input(srv.url + "/part.parquet", block_size=BLOCK, policy=FAST)


def test_final_http_errors_are_named(srv):
    with pytest.raises(DownloadError, match=r"missing.h5: HTTP 404"):
        open_input(srv.url + "/missing.h5", policy=FAST)


def test_file_changed_mid_read_is_an_error(files, tmp_path):
    shutil.copy(files / "data.h5", tmp_path / "data.h5")
    with FaultyServer(tmp_path) as s:
        f = open_input(s.url + "/data.h5", block_size=BLOCK, policy=FAST)
        _h5(tmp_path / "data.h5", rows=2100, seed=9)  # rewritten on the server: new size and ETag
        with pytest.raises(DownloadError, match="changed on the server"):
            f.read()


def test_no_range_support_is_a_clear_error_or_a_verified_cached_copy(files, tmp_path):
    raw = (files / "part.parquet").read_bytes()
    with FaultyServer(files, no_range=True) as s:
        with pytest.raises(DownloadError, match="does not support Range requests") as err:
            open_input(s.url + "/part.parquet", block_size=BLOCK, policy=FAST)
        assert "LAION_REMOTE_CACHE" in str(err.value)
        cache = tmp_path / "cache"
        with open_input(s.url + "/part.parquet", block_size=BLOCK, policy=FAST, cache_dir=cache) as f:
            assert isinstance(f, LocalFile) and f.read() == raw
            assert pq.ParquetFile(f).metadata.num_rows == 3000
        copies = list(cache.rglob("part.parquet"))
        assert len(copies) == 1 and (copies[0].parent / ".laion-download.json").is_file()
        before = len(_gets(s))
        with open_input(s.url + "/part.parquet", block_size=BLOCK, policy=FAST, cache_dir=cache) as f:
            assert f.read() == raw
        assert len(_gets(s)) == before + 1  # the ranged probe only: the verified copy is reused


# -- redirects and credentials -------------------------------------------------------------------
def test_redirect_to_another_origin_keeps_range_and_drops_authorization(files):
    with FaultyServer(files) as cdn, FaultyServer(files, auth="Bearer abc", redirect_to=cdn.url) as hub:
        with open_input(hub.url + "/part.parquet", headers={"Authorization": "Bearer abc"}, block_size=BLOCK,
                        policy=FAST) as f:
            assert pq.ParquetFile(f).read().equals(pq.read_table(files / "part.parquet"))
        hub_gets, cdn_gets = _gets(hub), _gets(cdn)
        assert [e.status for e in hub_gets] == [302] and hub_gets[0].authorization == "Bearer abc"
        assert len(cdn_gets) >= 3  # later reads go straight to the redirect target
        assert all(e.authorization is None for e in cdn_gets)
        assert all(e.range and e.status == 206 for e in cdn_gets)
        assert cdn_gets[0].range == hub_gets[0].range  # the Range survived the hop


def test_redirect_within_the_same_origin_keeps_authorization(files):
    with FaultyServer(files, auth="Bearer abc") as s:
        s.fault("/alias.h5", Fault(redirect=s.url + "/data.h5"))
        with open_input(s.url + "/alias.h5", headers={"Authorization": "Bearer abc"}, block_size=BLOCK,
                        policy=FAST) as f:
            assert f.read(16) == (files / "data.h5").read_bytes()[:16]
        gets = _gets(s)
        assert [(e.path, e.status) for e in gets] == [("/alias.h5", 302), ("/data.h5", 206)]
        assert gets[1].authorization == "Bearer abc" and gets[1].range == gets[0].range


def test_expired_redirect_target_goes_back_to_the_original_url(files):
    with FaultyServer(files) as cdn, FaultyServer(files, redirect_to=cdn.url) as hub:
        raw = (files / "data.h5").read_bytes()
        with open_input(hub.url + "/data.h5", block_size=BLOCK, policy=FAST) as f:
            cdn.fault("/data.h5", Fault(status=403))  # the signed CDN URL expired
            assert f.read() == raw
        assert len(_gets(hub)) == 2 and [e.status for e in _gets(cdn)][:2] == [206, 403]


# -- hf:// -----------------------------------------------------------------------------------------
def test_hf_url_mapping(monkeypatch):
    monkeypatch.delenv("LAION_HF_ENDPOINT", raising=False)
    assert hf_url("hf://datasets/laion/relaion2B-en/emb/part-0.parquet") == \
        "https://huggingface.co/datasets/laion/relaion2B-en/resolve/main/emb/part-0.parquet"
    assert hf_url("hf://datasets/o/r@v1.0/a/b.h5") == "https://huggingface.co/datasets/o/r/resolve/v1.0/a/b.h5"
    assert hf_url("hf://datasets/o/r/a/b.h5@refs%2Fpr%2F3") == \
        "https://huggingface.co/datasets/o/r/resolve/refs%2Fpr%2F3/a/b.h5"
    assert hf_url("hf://o/model/w.bin") == "https://huggingface.co/o/model/resolve/main/w.bin"
    monkeypatch.setenv("LAION_HF_ENDPOINT", "http://127.0.0.1:9/")
    assert hf_url("hf://datasets/o/r/x y.h5") == "http://127.0.0.1:9/datasets/o/r/resolve/main/x%20y.h5"
    for bad in ("hf://datasets/o/r", "hf://datasets/o", "hf://datasets/o/r@/x.h5", "hf://"):
        with pytest.raises(UsageError, match="hf://datasets/OWNER/REPO/PATH"):
            hf_url(bad)


@pytest.fixture
def hub(files, tmp_path, monkeypatch):
    """Hugging Face on loopback: a gated hub that checks the token and redirects to its CDN."""
    cdn_root = tmp_path / "cdn"
    (cdn_root / "datasets/o/r/resolve/main/sub").mkdir(parents=True)
    for name in ("data.h5", "part.parquet"):
        shutil.copy(files / name, cdn_root / "datasets/o/r/resolve/main/sub" / name)
    with FaultyServer(cdn_root) as cdn, FaultyServer(files, auth=f"Bearer {TOKEN}", redirect_to=cdn.url) as h:
        monkeypatch.setenv("LAION_HF_ENDPOINT", h.url)
        yield h, cdn


def test_hf_sends_the_bearer_token_to_the_hub_only_and_never_shows_it(files, hub, monkeypatch, caplog):
    h, cdn = hub
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    events: list[dict] = []
    cdn.fault("/datasets/o/r/resolve/main/sub/data.h5", Fault(), Fault(status=503, retry_after="0"))
    with open_input("hf://datasets/o/r/sub/data.h5", block_size=BLOCK, policy=FAST, progress=events.append) as f, \
            h5py.File(f, "r") as got, h5py.File(files / "data.h5", "r") as local:
        assert np.array_equal(got["emb"][:], local["emb"][:])
        shown = [repr(f), str(f.name)]
    assert f.name == "hf://datasets/o/r/sub/data.h5"
    assert [e.authorization for e in _gets(h)] == [f"Bearer {TOKEN}"]
    assert _gets(h)[0].path == "/datasets/o/r/resolve/main/sub/data.h5"
    assert _gets(cdn) and all(e.authorization is None for e in _gets(cdn))
    assert any(e["event"] == "retry" for e in events)
    # a failure's message, a missing file's message: no token either
    with pytest.raises(DownloadError) as missing:
        open_input("hf://datasets/o/r/sub/nope.h5", policy=FAST)
    shown += [str(missing.value), json.dumps(events), caplog.text]
    assert caplog.text  # the debug log did record the requests
    assert not [s for s in shown if TOKEN in s]


def test_hf_without_a_token_on_a_gated_repo_says_so(hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(DownloadError, match=r"HTTP 401.*set HF_TOKEN"):
        open_input("hf://datasets/o/r/sub/data.h5", policy=FAST)


# -- HDF5 header check ---------------------------------------------------------------------------
def test_check_hdf5_names_truncated_and_foreign_files(files, tmp_path):
    check_hdf5(files / "data.h5")
    raw = (files / "data.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ShardValidationError, match=r"cut.h5: truncated HDF5 file"):
        check_hdf5(tmp_path / "cut.h5")
    (tmp_path / "x.h5").write_bytes(b"PAR1" + b"\0" * 5000)
    with pytest.raises(ShardValidationError, match=r"x.h5: not an HDF5 file"):
        check_hdf5(tmp_path / "x.h5")


# -- laion sources / download --source -------------------------------------------------------------
def test_sources_json_lists_every_named_source():
    proc = run_cli("sources", "--json", check=True)
    by = {s["name"]: s for s in json.loads(proc.stdout)["sources"]}
    assert set(by) == {"laion400m", "laion5b-100m", "sisap-300k", "sisap-10m", "sisap-30m", "sisap-100m"}
    assert by["laion400m"]["base_url"] == "https://deploy.laion.ai/8f83b608504d46bb81708ec86e912220/embeddings"
    assert by["laion400m"]["shards"] == 410 and by["laion400m"]["dim"] == 512 and "ViT-B/32" in by["laion400m"]["model"]
    ch = by["laion5b-100m"]
    assert ch["rows"] == 100_000_000 and ch["dim"] == 768 and "ViT-L/14" in ch["model"] and ch["modalities"] == ["image"]
    assert [f["url"] for f in ch["files"]] == [
        f"https://clickhouse-datasets.s3.amazonaws.com/laion-5b/laion5b_100m_part_{i}_of_10.parquet" for i in range(1, 11)]
    assert all(f["rows"] == 10_000_000 for f in ch["files"])
    s = by["sisap-300k"]
    assert [(f["role"], f["name"]) for f in s["files"]] == [("data", SISAP_DATA), ("queries", SISAP_QUERIES),
                                                            ("gold", SISAP_GOLD)]
    assert s["rows"] == 300_000 and s["dim"] == 768 and "1-based" in s["ids"]
    assert by["sisap-100m"]["files"][0]["name"] == "laion2B-en-clip768v2-n=100M.h5"
    assert all(x["licence"] and x["size_bytes"] > 0 for x in by.values())
    text = run_cli("sources", check=True).stdout
    assert "sisap-30m" in text and "laion5b-100m" in text


@pytest.fixture
def sisap_mirror(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()
    _h5(root / SISAP_DATA, rows=1500, dim=32, seed=3)
    _h5(root / SISAP_QUERIES, rows=40, dim=32, seed=4)
    with h5py.File(root / SISAP_GOLD, "w") as f:
        f["knns"] = np.arange(1, 40 * 30 + 1, dtype=np.int32).reshape(40, 30)
        f["dists"] = np.zeros((40, 30), dtype=np.float32)
    _parquet(root / "laion5b_100m_part_2_of_10.parquet", rows=800)
    with FaultyServer(root) as s:
        yield s, root


def test_download_source_through_a_mirror_resumes_and_verifies(sisap_mirror, tmp_path):
    s, root = sisap_mirror
    s.fault("/" + SISAP_DATA, Fault(reset_after=20_000))
    s.fault("/" + SISAP_GOLD, Fault(status=503, retry_after="0"))
    dest = tmp_path / "sisap"
    proc = run_cli("download", "--source", "sisap-300k", "--to", str(dest), "--base-url", s.url, "--json",
                   "--retry-delay", "0.01", "--max-retry-delay", "0.02", check=True)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = events[-1]
    assert summary["event"] == "summary" and summary["ok"] and summary["retries"] == 2
    assert sorted(summary["downloaded"]) == sorted([SISAP_DATA, SISAP_QUERIES, SISAP_GOLD])
    for name in (SISAP_DATA, SISAP_QUERIES, SISAP_GOLD):
        assert filecmp.cmp(root / name, dest / name, shallow=False)
    resumed = _gets(s, "/" + SISAP_DATA)
    assert resumed[1].range == f"bytes={resumed[0].sent}-"  # the cut was resumed, not restarted
    manifest = json.loads((dest / ".laion-download.json").read_text())
    assert set(manifest["files"]) == {SISAP_DATA, SISAP_QUERIES, SISAP_GOLD}
    assert not [p for p in dest.iterdir() if p.name.endswith((".part", ".part.json"))]
    # a rerun fetches nothing; parts by role name; a ClickHouse part by number
    before = len(_gets(s))
    again = run_cli("download", "--source", "sisap-300k", "queries,gold", "--to", str(dest), "--base-url", s.url,
                    "--json", check=True)
    assert sorted(json.loads(again.stdout.splitlines()[-1])["skipped"]) == sorted([SISAP_QUERIES, SISAP_GOLD])
    assert len(_gets(s)) == before
    ch = run_cli("download", "--source", "laion5b-100m", "2", "--to", str(tmp_path / "ch"), "--base-url", s.url,
                 "--json", check=True)
    assert json.loads(ch.stdout.splitlines()[-1])["shards_verified"] == [2]
    assert pq.ParquetFile(tmp_path / "ch" / "laion5b_100m_part_2_of_10.parquet").metadata.num_rows == 800


def test_download_source_refuses_a_truncated_h5_and_bad_parts(sisap_mirror, tmp_path):
    s, root = sisap_mirror
    raw = (root / SISAP_DATA).read_bytes()
    (root / SISAP_DATA).write_bytes(raw[:len(raw) - 4096])  # complete by size, yet cut short
    dest = tmp_path / "d"
    proc = run_cli("download", "--source", "sisap-300k", "data", "--to", str(dest), "--base-url", s.url,
                   "--tries", "2", "--retry-delay", "0.01")
    assert proc.returncode == 1
    assert f"{SISAP_DATA}" in proc.stdout and "truncated HDF5 file" in proc.stdout
    assert not (dest / SISAP_DATA).exists()
    bad = run_cli("download", "--source", "sisap-300k", "7", "--to", str(dest))
    assert bad.returncode == 2 and "sisap-300k has no part 7" in bad.stderr and "Traceback" not in bad.stderr
    unknown = run_cli("download", "--source", "nope", "--to", str(dest))
    assert unknown.returncode == 2 and "unknown source 'nope'" in unknown.stderr


def test_laion400m_404_says_what_to_use_instead(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with FaultyServer(empty) as s:
        proc = run_cli("download", "--source", "laion400m", "0", "--to", str(tmp_path / "d"), "--base-url", s.url,
                       "--tries", "1")
    assert proc.returncode == 1 and "HTTP 404" in proc.stdout
    assert "hint:" in proc.stderr and "--source laion5b-100m" in proc.stderr and "sisap-300k" in proc.stderr


# -- recall against a gold standard ------------------------------------------------------------------
N, DIM, NQ, KG = 600, 16, 24, 50


def _sisap_fixture(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tiny SISAP-like set: unit base vectors (ids 1..N), queries, and the gold standard computed
    with numpy (dot products, 1-based ids, nearest first) — in .h5 and .npy."""
    rng = np.random.default_rng(11)
    base = rng.standard_normal((N, DIM)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    qs = rng.standard_normal((NQ, DIM)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    dots = qs @ base.T
    knns = (np.argsort(-dots, axis=1)[:, :KG] + 1).astype(np.int32)
    dists = np.take_along_axis(dots, knns - 1, axis=1)
    with h5py.File(root / "q.h5", "w") as f:
        f["emb"] = qs
    with h5py.File(root / "gold.h5", "w") as f:
        f["knns"] = knns
        f["dists"] = dists
    np.save(root / "q.npy", qs)
    np.save(root / "gold.npy", knns)
    return base, qs, knns


def _fill(store, base: np.ndarray) -> None:
    """The table a SISAP .h5 ingest makes: ids = 1-based row numbers, image embeddings only."""
    store.backend.insert_arrow("laion", pa.table({
        "id": pa.array(np.arange(1, len(base) + 1, dtype=np.int64)),
        "image_embedding": pa.array(list(base), type=pa.list_(pa.float32())),
        "shard": pa.array(np.zeros(len(base), dtype=np.uint32)),
        "shard_row": pa.array(np.arange(len(base), dtype=np.uint32))}))
    store.clear_caches()


def test_gold_recall_exact_and_indexed(store, tmp_path):
    from laion_search.bench.search import run_gold

    base, qs, knns = _sisap_fixture(tmp_path)
    _fill(store, base)
    assert store.scalar("SELECT count() FROM laion") == N
    res = run_gold(store, tmp_path / "q.h5", tmp_path / "gold.h5", configs="8:32", out=tmp_path / "out")
    by = {r["method"]: r for r in res["results"]}
    assert res["queries"] == NQ and res["ks"] == [10, 30]
    assert by["laion exact (chDB)"]["recall@10"] == 1.0 and by["laion exact (chDB)"]["recall@30"] == 1.0
    hnsw = by["laion hnsw M=8 ef_c=32"]
    assert 0.8 <= hnsw["recall@10"] <= 1.0 and 0.8 <= hnsw["recall@30"] <= 1.0 and hnsw["build_vps"] > 0
    md = (tmp_path / "out" / "bench-search.md").read_text()
    assert "| recall@10 | recall@30 |" in md and "gold.h5" in md
    assert (tmp_path / "out" / "bench-search.png").read_bytes()[:4] == b"\x89PNG"
    # without --configs: the table's own index (the one just built) is measured
    again = run_gold(store, tmp_path / "q.npy", tmp_path / "gold.npy", configs=None, limit=10)
    names = [r["method"] for r in again["results"]]
    assert again["queries"] == 10 and names[0] == "laion exact (chDB)" and names[1].startswith("laion hnsw (the table")
    assert again["results"][0]["recall@30"] == 1.0


def test_gold_recall_detects_a_wrong_gold_standard(store, tmp_path):
    from laion_search.bench.search import run_gold

    base, qs, knns = _sisap_fixture(tmp_path)
    _fill(store, base)
    np.save(tmp_path / "zero-based.npy", knns - 1)  # ids off by one: most neighbours no longer match
    res = run_gold(store, tmp_path / "q.npy", tmp_path / "zero-based.npy", configs=None)
    assert res["results"][0]["recall@10"] < 0.5
    np.save(tmp_path / "short.npy", knns[:, :20])
    with pytest.raises(UsageError, match="recall@30 needs at least 30"):
        run_gold(store, tmp_path / "q.npy", tmp_path / "short.npy")
    with h5py.File(tmp_path / "wrong.h5", "w") as f:
        f["neighbors"] = knns
    with pytest.raises(ShardValidationError, match=r"wrong.h5: no gold dataset 'knns' \(datasets: neighbors\)"):
        run_gold(store, tmp_path / "q.h5", tmp_path / "wrong.h5")
    np.save(tmp_path / "q8.npy", np.zeros((NQ, 8), dtype=np.float32))
    with pytest.raises(UsageError, match="8-d queries but the table holds 16-d"):
        run_gold(store, tmp_path / "q8.npy", tmp_path / "gold.npy")


def test_bench_search_gold_cli(tmp_path):
    from laion_search import connect

    base, qs, knns = _sisap_fixture(tmp_path)
    with connect(tmp_path / "db") as st:
        _fill(st, base)
    proc = run_cli("bench", "search", "--db", str(tmp_path / "db"), "--queries", str(tmp_path / "q.h5"),
                   "--gold", str(tmp_path / "gold.h5"), "--json", "--out", str(tmp_path / "o"), check=True)
    res = json.loads(proc.stdout)
    assert res["results"][0]["method"] == "laion exact (chDB)" and res["results"][0]["recall@30"] == 1.0
    bad = run_cli("bench", "search", "--db", str(tmp_path / "db"), "--queries", str(tmp_path / "q.h5"),
                  "--gold", str(tmp_path / "q.h5"))
    assert bad.returncode == 1 and "q.h5: no gold dataset 'knns'" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    nogold = run_cli("bench", "search", "--queries", str(tmp_path / "q.h5"))
    assert nogold.returncode == 2 and "needs --gold" in nogold.stderr


# -- live -----------------------------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("LAION_TEST_LIVE") != "1",
                    reason="live smoke test against the real sources: set LAION_TEST_LIVE=1 (needs internet)")
def test_live_smoke():
    from laion_search.sources.catalog import get_source

    part = get_source("laion5b-100m").files[0]
    with open_input(part.url, policy=RetryPolicy(tries=3)) as f:
        meta = pq.ParquetFile(f).metadata
        assert meta.num_rows == 10_000_000 and "vector" in meta.schema.names
        assert f.bytes_fetched < f.size() // 100
    queries = get_source("sisap-300k").files[1]
    with open_input(queries.url, policy=RetryPolicy(tries=3)) as f, h5py.File(f, "r") as h:
        assert h["emb"].shape == (10_000, 768)


def test_downloader_sends_credentials_to_the_first_origin_only(files, tmp_path):
    """The cached-copy fallback goes through the downloader: its redirects drop Authorization too."""
    with FaultyServer(files, no_range=True) as cdn, \
            FaultyServer(files, auth="Bearer abc", redirect_to=cdn.url, no_range=True) as hub:
        with open_input(hub.url + "/part.parquet", headers={"Authorization": "Bearer abc"}, policy=FAST,
                        block_size=BLOCK, cache_dir=tmp_path / "cache") as f:
            assert f.read() == (files / "part.parquet").read_bytes()
        assert _gets(hub) and all(e.authorization == "Bearer abc" for e in _gets(hub))
        assert len(_gets(cdn)) == 2 and all(e.authorization is None for e in _gets(cdn))  # probe + full copy


def test_a_stalled_range_is_retried_from_the_byte_it_reached(files, srv):
    raw = (files / "data.h5").read_bytes()
    srv.fault("/data.h5", Fault(), Fault(stall_after=6_000, stall=3.0))  # silent for longer than read_timeout
    policy = RetryPolicy(tries=4, base_delay=0.01, max_delay=0.02, connect_timeout=2, read_timeout=0.3)
    events: list[dict] = []
    with open_input(srv.url + "/data.h5", block_size=BLOCK, policy=policy, progress=events.append) as f:
        assert f.read(len(raw)) == raw
    gets = _gets(srv, "/data.h5")
    assert gets[2].range == f"bytes={6_000}-{len(raw) - 1}"
    assert [e["reason"] for e in events] == ["timed out (no data within the read timeout)"]
