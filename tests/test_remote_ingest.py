"""`laion ingest URL`: a ClickHouse LAION-5B part or a SISAP .h5 read over HTTP(S) with Range
requests (no full local copy), through the loopback fault-injecting server — cuts, 503s,
redirects, a server without Range — and over hf:// with the Bearer token; the table ends up
exactly as a local ingest of the same file leaves it."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("h5py")

from laion_search import connect  # noqa: E402
from laion_search.ingest import ingest  # noqa: E402
from laion_search.sources.synth import synth_clickhouse_parquet, synth_sisap_h5  # noqa: E402
from laion_search.testing.faulty_http import Fault, FaultyServer  # noqa: E402

from .conftest import run_cli  # noqa: E402

PART = "laion5b_100m_part_1_of_10.parquet"
H5 = "laion2B-en-clip768v2-n=300K.h5"
TOKEN = "hf_SECRET_remote_ingest_42"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-files")
    synth_clickhouse_parquet(root / PART, 5000, dim=32, seed=11)
    synth_sisap_h5(root / H5, 4000, dim=32, seed=12)
    return root


def _table(db) -> tuple[int, int, str]:
    with connect(db) as store:
        r = store.rows("SELECT count() AS n, uniqExact(id) AS u, toString(sum(cityHash64(id, caption, url, "
                       "image_embedding))) AS h FROM laion")[0]
    return r["n"], r["u"], r["h"]


@pytest.fixture(scope="module")
def local(files, tmp_path_factory):
    """What ingesting the local files gives: the reference for every remote path."""
    out = {}
    for name in (PART, H5):
        db = tmp_path_factory.mktemp("local") / "db"
        with connect(db) as store:
            ingest(store, files / name)
        out[name] = _table(db)
    return out


def _gets(srv: FaultyServer, path: str):
    return [e for e in srv.log if e.path == path and e.method == "GET"]


def test_cli_ingests_a_clickhouse_part_over_http_through_cuts_and_503s(files, local, tmp_path):
    with FaultyServer(files) as srv:
        # the part is read by ranges: cut one mid-body, answer another with 503 + Retry-After
        srv.fault("/" + PART, Fault(), Fault(reset_after=200_000), Fault(status=503, retry_after="0"))
        db = tmp_path / "db"
        proc = run_cli("ingest", srv.url + "/" + PART, "--db", str(db), "--json", check=True)
        gets = _gets(srv, "/" + PART)
    assert json.loads(proc.stdout.splitlines()[-1])["rows"] == 5000
    assert _table(db) == local[PART]
    assert all(g.range and g.range.startswith("bytes=") for g in gets)  # only Range reads
    size = (files / PART).stat().st_size
    assert sum(g.sent for g in gets) < 3 * size  # streamed, not fetched again and again
    # the same part from a local copy goes to the same partition (keyed by file name): never doubled
    again = run_cli("ingest", str(files / PART), "--db", str(db), "--json", check=True)
    assert json.loads(again.stdout.splitlines()[-1])["rows"] in (0, 5000)
    assert _table(db) == local[PART]


def test_library_ingests_a_sisap_file_through_a_redirect(files, local, tmp_path):
    with FaultyServer(files) as cdn, FaultyServer(files, redirect_to=cdn.url) as front:
        with connect(tmp_path / "db") as store:
            report = ingest(store, front.url + "/" + H5)
        assert report.rows == 4000
        assert _gets(front, "/" + H5) and all(g.range for g in _gets(cdn, "/" + H5))  # Range kept on the target
    assert _table(tmp_path / "db") == local[H5]


def test_hf_url_with_token_through_the_hub_to_its_cdn(files, local, tmp_path):
    cdn_root = tmp_path / "cdn"
    (cdn_root / "datasets/o/r/resolve/main").mkdir(parents=True)
    shutil.copy(files / H5, cdn_root / "datasets/o/r/resolve/main" / H5)
    with FaultyServer(cdn_root) as cdn, FaultyServer(cdn_root, auth=f"Bearer {TOKEN}", redirect_to=cdn.url) as hub:
        env = {"LAION_HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN}
        proc = run_cli("ingest", f"hf://datasets/o/r/{H5}", "--db", str(tmp_path / "db"), "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        assert TOKEN not in proc.stdout + proc.stderr
        hub_gets = _gets(hub, f"/datasets/o/r/resolve/main/{H5}")
        assert hub_gets and all(g.authorization == f"Bearer {TOKEN}" for g in hub_gets)
        assert all(g.authorization is None for g in _gets(cdn, f"/datasets/o/r/resolve/main/{H5}"))
        # without the token the gated hub refuses: one line that says what to set, table unchanged
        denied = run_cli("ingest", f"hf://datasets/o/r/{H5}", "--db", str(tmp_path / "db2"),
                         env={"LAION_HF_ENDPOINT": hub.url, "HF_TOKEN": ""})
    assert _table(tmp_path / "db") == local[H5]
    assert denied.returncode == 1 and "HF_TOKEN" in denied.stderr and "Traceback" not in denied.stderr
    assert len(denied.stderr.strip().splitlines()) == 1


def test_server_without_range_is_a_clear_error_or_a_verified_cached_copy(tmp_path):
    # bigger than one 2 MiB read block, so that reading it needs ranges (a smaller file comes whole
    # in the first answer, which a server without Range support serves as well)
    root = tmp_path / "big"
    root.mkdir()
    synth_clickhouse_parquet(root / PART, 30_000, dim=32, seed=13)
    with connect(tmp_path / "ref") as store:
        ingest(store, root / PART)
    with FaultyServer(root, no_range=True) as srv:
        url = srv.url + "/" + PART
        refused = run_cli("ingest", url, "--db", str(tmp_path / "db"))
        assert refused.returncode == 1 and "Range" in refused.stderr and "Traceback" not in refused.stderr
        assert PART in refused.stderr
        cached = run_cli("ingest", url, "--db", str(tmp_path / "db"), "--json",
                         env={"LAION_REMOTE_CACHE": str(tmp_path / "cache")}, check=True)
    assert json.loads(cached.stdout.splitlines()[-1])["rows"] == 30_000
    assert _table(tmp_path / "db") == _table(tmp_path / "ref")
    assert any(p.name == PART for p in (tmp_path / "cache").rglob("*"))
