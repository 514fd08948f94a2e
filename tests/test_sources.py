"""Real LAION source formats: ClickHouse's LAION-5B Parquet parts, SISAP's LAION2B .h5 files, the
LAION-5B npy layout; format detection; hostile files; image-only tables; the recorded CLIP model.

Every file is generated here (laion_search.sources.synth writes each format column for column)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

h5py = pytest.importorskip("h5py")

from laion_search import connect  # noqa: E402
from laion_search.errors import ModalityError, ShardError, ShardValidationError, UsageError  # noqa: E402
from laion_search.ingest import ingest_source  # noqa: E402
from laion_search.search import search  # noqa: E402
from laion_search.sources.formats import FILE_SHARD_BASE, detect_file  # noqa: E402
from laion_search.sources.inputs import as_input  # noqa: E402
from laion_search.sources.synth import CLICKHOUSE_SCHEMA, synth, synth_clickhouse_parquet, synth_sisap_h5  # noqa: E402

from tests.conftest import run_cli  # noqa: E402

VIT_L = "openai/clip-vit-large-patch14"
PART = "laion5b_100m_part_1_of_10.parquet"
H5 = "laion2B-en-clip768v2-n=300K.h5"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    part = synth_clickhouse_parquet(d / PART, 3000, first_id=10_000_000, row_group_rows=1000, seed=3)
    h5 = synth_sisap_h5(d / H5, 2500, seed=4)
    return {"dir": d, "part": part, "h5": h5}


def checksum(store) -> tuple:
    """Everything a failed ingest must leave as it was: rows, ids, captions, vectors, partitions."""
    row = store.rows("SELECT count() AS n, sum(cityHash64(id, caption, url)) AS h, "
                     "groupBitXor(cityHash64(image_embedding, text_embedding)) AS v, "
                     "groupArrayDistinct(shard) AS shards FROM laion")[0]
    stages = store.rows("SELECT name FROM system.tables WHERE name LIKE 'laion_stage_%'")
    return row["n"], row["h"], row["v"], sorted(row["shards"]), len(stages)


# -- ClickHouse LAION-5B Parquet ------------------------------------------------------------------------
def test_clickhouse_part_ids_captions_vectors_and_idempotence(tmp_path, files):
    src = pq.read_table(files["part"])
    with connect(tmp_path / "db") as store:
        # batches of 700 rows across row groups of 1000: batches never align with the file's groups
        report = ingest_source(store, files["part"], batch_rows=700)
        assert report.loaded == [FILE_SHARD_BASE] and report.rows == 3000
        got = store.sql("SELECT id, caption, url, NSFW, LICENSE, similarity, width, shard_row, image_embedding, "
                        "length(text_embedding) AS t FROM laion ORDER BY id")
        assert got.column("id").to_pylist() == src.column("id").to_pylist()  # the file's own ids
        assert got.column("caption").to_pylist() == src.column("caption").to_pylist()  # verbatim
        assert got.column("url").to_pylist() == src.column("url").to_pylist()
        assert got.column("NSFW").to_pylist() == [v or "" for v in src.column("NSFW").to_pylist()]  # NULL → ""
        assert got.column("LICENSE").to_pylist() == [v or "" for v in src.column("LICENSE").to_pylist()]
        assert got.column("width").to_pylist() == src.column("width").to_pylist()
        assert got.column("shard_row").to_pylist() == list(range(3000))
        assert np.array_equal(np.array(got.column("image_embedding").to_pylist(), np.float32),
                              np.array(src.column("vector").to_pylist(), np.float32))
        assert set(got.column("t").to_pylist()) == {0}  # no text embedding stored, not 768 zeros
        st = store.status().as_dict()
        assert st["modalities"] == ["image"] and st["model"] == VIT_L and st["dim"] == 768
        sh = st["shards"][0]
        assert (sh["format"], sh["modalities"], sh["source"]) == ("clickhouse-parquet", ["image"], str(files["part"]))
        before = checksum(store)
        again = ingest_source(store, files["part"])
        assert again.skipped == [FILE_SHARD_BASE] and again.loaded == [] and checksum(store) == before
        forced = ingest_source(store, files["part"], force=True)  # replaces its partition: no duplicates
        assert forced.loaded == [FILE_SHARD_BASE]
        assert store.scalar("SELECT count() FROM laion") == 3000
        assert store.scalar("SELECT uniqExact(id) FROM laion") == 3000


def test_parquet_batches_stay_bounded_when_row_groups_are_large(tmp_path):
    part = synth_clickhouse_parquet(tmp_path / "big_groups.parquet", 5000, row_group_rows=5000, dim=64)
    from laion_search.sources.clickhouse_parquet import open_part

    reader = open_part(as_input(part))
    sizes = [t.num_rows for t in reader.batches(512)]
    assert max(sizes) <= 512 and sum(sizes) == 5000  # streamed in batches, not one 5000-row group


def test_parquet_pieces_that_straddle_batches_are_split(tmp_path, monkeypatch):
    """Decoded pieces (300 rows here), row groups (1000) and batches (700) all disagree: every
    row still lands once, in order, with its id, caption and vector."""
    import laion_search.sources.clickhouse_parquet as chp

    monkeypatch.setattr(chp, "READ_ROWS", 300)
    part = synth_clickhouse_parquet(tmp_path / "p.parquet", 2500, dim=16, row_group_rows=1000)
    batches = list(chp.open_part(as_input(part)).batches(700))
    assert [t.num_rows for t in batches] == [700, 700, 700, 400]
    got, src = pa.concat_tables(batches), pq.read_table(part)
    assert got.column("id").to_pylist() == src.column("id").to_pylist()
    assert got.column("caption").to_pylist() == src.column("caption").to_pylist()
    assert got.column("shard_row").to_pylist() == list(range(2500))
    assert np.array_equal(np.array(got.column("image_embedding").to_pylist(), np.float32),
                          np.array(src.column("vector").to_pylist(), np.float32))


# -- SISAP .h5 ----------------------------------------------------------------------------------------
def test_sisap_ids_are_one_based_row_numbers_like_the_gold_standard(tmp_path, files):
    emb = h5py.File(files["h5"], "r")["emb"][:].astype(np.float32)
    with connect(tmp_path / "db") as store:
        report = ingest_source(store, files["h5"], batch_rows=999)
        assert report.rows == 2500
        assert store.rows("SELECT min(id) AS lo, max(id) AS hi, uniqExact(id) AS n FROM laion") == \
            [{"lo": 1, "hi": 2500, "n": 2500}]
        got = store.sql("SELECT image_embedding FROM laion WHERE id IN (1, 1000, 2500) ORDER BY id")
        assert np.array_equal(np.array(got.column(0).to_pylist(), np.float32), emb[[0, 999, 2499]])
        # a gold standard's knns are 1-based row numbers of the same file: exact search returns them
        q = emb[41] + 0.05 * emb[7]
        gold = np.argsort(-(emb @ (q / np.linalg.norm(q))))[:10] + 1
        res = search(store, q, k=10, exact=True)
        assert [r["id"] for r in res.rows] == gold.tolist()
        assert store.status().as_dict()["modalities"] == ["image"]
        assert store.status().as_dict()["shards"][0]["format"] == "sisap-h5"


@pytest.mark.parametrize("dtype", ["<f4", ">f2"])
def test_sisap_float32_and_big_endian_files_read_the_same(tmp_path, dtype):
    x = _unit(700, 32, seed=2, dtype=np.float32)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("emb", data=x.astype(dtype))
    with connect(tmp_path / "db") as store:
        ingest_source(store, tmp_path / "x.h5", batch_rows=300)
        got = np.array(store.sql("SELECT image_embedding FROM laion ORDER BY id").column(0).to_pylist(), np.float32)
    # unit vectors within float16's rounding are stored as read (no renormalisation), byte order converted
    assert got.shape == (700, 32) and np.array_equal(got, x.astype(dtype).astype(np.float32))


def test_readers_take_open_binary_files(tmp_path, files):
    """What remote ingest hands the readers: a seekable binary file object with a name."""
    with connect(tmp_path / "db") as store:
        with open(files["h5"], "rb") as f:
            assert ingest_source(store, f).rows == 2500
        data = io.BytesIO(files["part"].read_bytes())
        data.name = PART
        assert ingest_source(store, data).rows == 3000
        assert {r.name for r in store.shard_records().values()} == {H5, PART}
        # the same part again, this time from its path: its name keys the same partition
        assert ingest_source(store, files["part"], force=True).loaded == [FILE_SHARD_BASE + 1]
        assert store.scalar("SELECT count() FROM laion") == 5500


# -- LAION-5B npy layout --------------------------------------------------------------------------------
def test_laion5b_npy_layout_zero_padded_folders_768d(tmp_path):
    synth(tmp_path / "l5b", [0, 12], 300, dim=768, layout="folders", pad=4, seed=5)
    assert (tmp_path / "l5b" / "img_emb" / "img_emb_0012.npy").is_file()
    assert (tmp_path / "l5b" / "metadata" / "metadata_0000.parquet").is_file()
    with connect(tmp_path / "db") as store:
        report = ingest_source(store, tmp_path / "l5b")
        assert report.loaded == [0, 12] and report.rows == 600
        assert store.scalar("SELECT min(id) FROM laion WHERE shard = 12") == 12 * 10**9
        st = store.status().as_dict()
        assert st["dim"] == 768 and st["modalities"] == ["image", "text"] and st["model"] == VIT_L
        assert store.scalar("SELECT min(length(text_embedding)) FROM laion") == 768
        assert ingest_source(store, tmp_path / "l5b", shards=[12]).skipped == [12]


# -- detection ----------------------------------------------------------------------------------------
def test_format_detection_and_unknown_files(tmp_path, files):
    assert detect_file(as_input(files["part"])) == "clickhouse-parquet"
    assert detect_file(as_input(files["h5"])) == "sisap-h5"
    junk = tmp_path / "notes.txt"
    junk.write_text("hello\n")
    with pytest.raises(ShardError, match=r"notes\.txt: not a recognised source") as e:
        detect_file(as_input(junk))
    assert "\n" not in str(e.value)
    npy = tmp_path / "img_emb_0.npy"
    np.save(npy, np.ones((2, 4), np.float16))
    with pytest.raises(ShardError, match="a single .npy file"):
        detect_file(as_input(npy))
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(ShardError, match="empty file"):
        detect_file(as_input(empty))
    with connect(tmp_path / "db") as store:  # --format overrides detection: a Parquet is not HDF5
        with pytest.raises(ShardValidationError, match=rf"{PART}: not a readable HDF5 file"):
            ingest_source(store, files["part"], format="sisap-h5")
        with pytest.raises(UsageError, match="--format must be one of"):
            ingest_source(store, files["part"], format="csv")
        with pytest.raises(UsageError, match="--shards selects LAION shards"):
            ingest_source(store, files["part"], shards=[1])
        assert store.scalar("SELECT count() FROM laion") == 0


def test_folder_of_parts_and_h5_files(tmp_path, files):
    d = tmp_path / "mixed"
    d.mkdir()
    os.link(files["part"], d / PART)
    os.link(files["h5"], d / H5)
    (d / "README.txt").write_text("not a source; ignored (no .parquet/.h5 suffix)")
    with connect(tmp_path / "db") as store:
        report = ingest_source(store, d)
        assert sorted(report.loaded) == [FILE_SHARD_BASE, FILE_SHARD_BASE + 1] and report.rows == 5500
        names = {r.shard: r.name for r in store.shard_records().values()}
        assert names == {FILE_SHARD_BASE: H5, FILE_SHARD_BASE + 1: PART}  # sorted by file name


# -- hostile files: a named error, the table unchanged --------------------------------------------------
def _h5(path, data, name="emb"):
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=data)
    return path


def _unit(rows, dim, seed=0, dtype=np.float16):
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def _part_with(path, vectors: list, ids=None):
    n = len(vectors)
    ids = list(range(n)) if ids is None else ids
    base = {f.name: pa.nulls(n, f.type) for f in CLICKHOUSE_SCHEMA}
    base.update(id=pa.array(ids, pa.uint32()), caption=[f"c{i}" for i in range(n)], url=[f"u{i}" for i in range(n)],
                vector=pa.array(vectors, pa.list_(pa.float32())))
    pq.write_table(pa.table(base, schema=CLICKHOUSE_SCHEMA), path, row_group_size=256)
    return path


def _hostile(kind: str, d) -> tuple[object, str]:
    """A bad file of one kind, and the problem its error must name."""
    if kind == "wrong dataset name":
        return _h5(d / "x.h5", _unit(50, 768), name="vectors"), r"no dataset 'emb' \(found: vectors\)"
    if kind == "gold standard instead of database":
        with h5py.File(d / "gold.h5", "w") as f:
            f["knns"] = np.ones((5, 10), np.int32)
            f["dists"] = np.ones((5, 10), np.float32)
        return d / "gold.h5", "gold-standard file"
    if kind == "float64 emb":
        return _h5(d / "f64.h5", _unit(50, 768, dtype=np.float64)), "dtype float64"
    if kind == "truncated h5":
        p = _h5(d / "cut.h5", _unit(600, 768))
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return p, "not a readable HDF5 file"
    if kind == "NaN deep inside h5":
        x = _unit(900, 768)
        x[700, 3] = np.nan
        return _h5(d / "nan.h5", x), r"NaN or Inf \(first at row 700\)"
    if kind == "mismatched dims":
        return _h5(d / "d512.h5", _unit(50, 512)), "512-d vectors, but the table holds 768-d"
    if kind == "ragged vector lists":
        v = _unit(800, 768, dtype=np.float32).tolist()
        v[600] = v[600][:767]  # past the first batches: the staged rows must vanish too
        return _part_with(d / "ragged.parquet", v), "ragged 'vector' lists: row 600 has 767 values, expected 768"
    if kind == "parquet without vector":
        pq.write_table(pa.table({"id": [1, 2], "caption": ["a", "b"], "url": ["u", "v"]}), d / "novec.parquet")
        return d / "novec.parquet", "no 'vector' column"
    if kind == "null vector":
        v = _unit(300, 768, dtype=np.float32).tolist()
        v[290] = None
        return _part_with(d / "nullvec.parquet", v), r"null vector\(s\) in column 'vector' \(first at row 290\)"
    if kind == "ids held by another partition":
        v = _unit(40, 768, dtype=np.float32).tolist()
        return _part_with(d / "clash.parquet", v, ids=list(range(10_000_100, 10_000_140))), \
            "40 of its ids are already in the table from shard"
    if kind == "duplicate ids in the file":
        v = _unit(40, 768, dtype=np.float32).tolist()
        return _part_with(d / "dup.parquet", v, ids=[1, 2, 3, 3] + list(range(50, 86))), \
            r"1 id\(s\) appear more than once \(first: 3\)"
    raise AssertionError(kind)


HOSTILE = ["wrong dataset name", "gold standard instead of database", "float64 emb", "truncated h5",
           "NaN deep inside h5", "mismatched dims", "ragged vector lists", "parquet without vector",
           "null vector", "ids held by another partition", "duplicate ids in the file"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, files):
    db = tmp_path_factory.mktemp("hostile") / "db"
    with connect(db) as store:
        ingest_source(store, files["part"])
    return db


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_file_is_named_and_table_unchanged(kind, loaded, tmp_path):
    bad, problem = _hostile(kind, tmp_path)
    with connect(loaded) as store:
        before = checksum(store)
        with pytest.raises(ShardError, match=problem) as e:
            ingest_source(store, bad, batch_rows=256)
        message = str(e.value)
        assert message.startswith(f"{bad}: ") and "\n" not in message  # one line, the file first
        assert checksum(store) == before and before[0] == 3000


def test_cli_hostile_file_one_line_exit_1(loaded, tmp_path):
    bad, _ = _hostile("float64 emb", tmp_path)
    proc = run_cli("ingest", str(bad), "--db", str(loaded))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "f64.h5" in proc.stderr and "dtype float64" in proc.stderr
    proc = run_cli("ingest", str(tmp_path / "nothing-here.parquet"), "--db", str(loaded))
    assert proc.returncode == 1 and "no such file or directory" in proc.stderr


# -- one-modality tables ---------------------------------------------------------------------------------
def test_image_only_table_refuses_text_modality(tmp_path, files):
    with connect(tmp_path / "db") as store:
        ingest_source(store, files["h5"])
        vec = _unit(1, 768, seed=9, dtype=np.float32)[0]
        assert len(search(store, vec, k=3).rows) == 3  # image embeddings: fine
        with pytest.raises(ModalityError, match=rf"no text embeddings .*{H5}"):
            search(store, vec, k=3, modality="text")
        with pytest.raises(ModalityError, match="no text embeddings"):
            search(store, like=5, k=3, modality="text")
        from laion_search.index import IndexSpec, create_index, create_scan_copy

        with pytest.raises(ModalityError, match="no text embeddings"):
            create_index(store, IndexSpec("text"), materialize=False)
        with pytest.raises(ModalityError, match="no text embeddings"):
            create_scan_copy(store, "text")
        assert "text_index" not in {i["name"] for i in store.status().as_dict()["indexes"]}
    db = str(tmp_path / "db")
    st = json.loads(run_cli("status", "--db", db, "--json", check=True).stdout)
    assert st["modalities"] == ["image"] and st["model"] == VIT_L
    human = run_cli("status", "--db", db, check=True).stdout
    assert "embeddings image · model openai/clip-vit-large-patch14" in human
    for args in (["search", "--like", "3", "--modality", "text"], ["index", "create", "--column", "text"]):
        proc = run_cli(*args, "--db", db)
        assert proc.returncode == 1, args
        assert "no text embeddings" in proc.stderr and proc.stderr.strip().count("\n") == 0
        assert "Traceback" not in proc.stderr


def test_mixed_table_has_the_modalities_every_row_has(tmp_path, files):
    synth(tmp_path / "l5b", [0], 200, dim=768, seed=6)
    with connect(tmp_path / "db") as store:
        ingest_source(store, tmp_path / "l5b")
        assert store.modalities() == ["image", "text"]
        assert len(search(store, like=5, k=2, modality="text").rows) == 2
        ingest_source(store, files["part"])
        assert store.modalities() == ["image"]
        with pytest.raises(ModalityError, match=PART):
            search(store, like=5, k=2, modality="text")
        store.sql(f"ALTER TABLE laion DROP PARTITION {FILE_SHARD_BASE}")
        assert store.modalities() == ["image", "text"]


def test_http_status_and_search_say_which_modalities_exist(tmp_path, files):
    pytest.importorskip("fastapi")
    import asyncio

    import httpx

    from laion_search.web.app import create_app

    async def call(app, method, url, **kw):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.request(method, url, **kw)

    with connect(tmp_path / "db") as store:
        ingest_source(store, files["h5"])
        app = create_app(store)
        st = asyncio.run(call(app, "GET", "/api/status"))
        assert st.status_code == 200 and st.json()["modalities"] == ["image"] and st.json()["model"] == VIT_L
        r = asyncio.run(call(app, "POST", "/api/search", json={"like": 3, "k": 2, "modality": "text"}))
        assert r.status_code == 400 and "no text embeddings" in r.json()["error"]
        r = asyncio.run(call(app, "POST", "/api/search", json={"like": 3, "k": 2, "modality": "image"}))
        assert r.status_code == 200 and len(r.json()["results"]) == 2


# -- encoders follow the data -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("transformers")
    from laion_search.clip.tiny import make_clip_model

    return str(make_clip_model(tmp_path_factory.mktemp("clip") / "tiny", "tiny"))  # 16-d projection


def test_search_encodes_with_the_recorded_model(tmp_path, tiny_model, monkeypatch):
    monkeypatch.delenv("LAION_CLIP_MODEL", raising=False)
    h5 = synth_sisap_h5(tmp_path / "tiny16.h5", 400, dim=16)
    with connect(tmp_path / "db") as store:
        ingest_source(store, h5, model=tiny_model)  # vectors made by this model: recorded with them
        assert store.status().as_dict()["model"] == tiny_model
        res = search(store, text="a photo of a dog", k=5)  # no model given: the recorded one encodes
        assert len(res.rows) == 5
        from laion_search.clip.encoders import get_encoder

        q = get_encoder(tiny_model).encode_text(["a photo of a dog"])[0]
        assert [r["id"] for r in res.rows] == [r["id"] for r in search(store, q, k=5).rows]


def test_768d_table_picks_vit_l14_and_names_it_on_a_dim_mismatch(tmp_path, files, tiny_model, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.delenv("LAION_CLIP_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub: loading the recorded model fails, naming it
    from laion_search.errors import EncoderError

    with connect(tmp_path / "db") as store:
        ingest_source(store, files["h5"])
        with pytest.raises(EncoderError, match=VIT_L):
            search(store, text="a dog", k=3)
        with pytest.raises(UsageError, match=rf"makes 16-d vectors but the table holds 768-d .*--model {VIT_L}"):
            search(store, text="a dog", k=3, model=tiny_model)


# -- the server backend ingests the same ---------------------------------------------------------------------
def test_server_backend_same_rows_modalities_and_refusals(tmp_path, files, chdb_http):
    """Through ClickHouse's HTTP interface (the chdb_http test fixture): the same rows, ids and
    modalities as the embedded store, and a bad file leaves the server's table unchanged."""
    import urllib.parse
    import uuid

    base, user, password = chdb_http
    root = f"clickhouse://{user}:{urllib.parse.quote(password, safe='')}@{base.split('://', 1)[1]}"
    name = "laion_sources_" + uuid.uuid4().hex[:8]
    with connect(root + "/default", create=False) as admin:
        admin.backend.command(f"CREATE DATABASE {name}")
    try:
        with connect(f"{root}/{name}") as server:
            ingest_source(server, files["h5"])
            ingest_source(server, files["part"])
            remote = checksum(server)[:4], server.modalities(), server.status().as_dict()["model"]
            with pytest.raises(ModalityError):
                search(server, like=3, k=2, modality="text")
            bad, problem = _hostile("ragged vector lists", tmp_path)
            with pytest.raises(ShardValidationError, match=problem):
                ingest_source(server, bad, batch_rows=256)
            assert checksum(server)[:4] == remote[0]
    finally:
        with connect(root + "/default", create=False) as admin:
            admin.backend.command(f"DROP DATABASE IF EXISTS {name} SYNC")
    with connect(tmp_path / "db") as local:
        ingest_source(local, files["h5"])
        ingest_source(local, files["part"])
        assert (checksum(local)[:4], local.modalities(), local.status().as_dict()["model"]) == remote
        assert remote[1] == ["image"] and remote[0][0] == 5500


# -- bookkeeping of stores made before these columns existed; the memory bench --------------------------------
def test_store_from_before_source_columns_is_upgraded(tmp_path, shards_flat):
    from laion_search.ingest import ingest

    with connect(tmp_path / "db") as store:
        ingest(store, shards_flat, [0])
        store.sql("ALTER TABLE laion_shards DROP COLUMN format, DROP COLUMN modalities, DROP COLUMN model, "
                  "DROP COLUMN name")
    with connect(tmp_path / "db") as store:  # reopened: the columns come back with their defaults
        rec = store.shard_records()[0]
        assert (rec.format, rec.modalities, rec.model, rec.name) == ("laion", "image,text", "", "")
        st = store.status().as_dict()
        assert st["modalities"] == ["image", "text"] and st["model"] == "openai/clip-vit-base-patch32"  # from 512-d


def test_bench_formats_reports_peak_rss_per_format(tmp_path):
    from laion_search.bench.ingest import run_formats

    result = run_formats(rows=3000, workdir=tmp_path / "w")
    by = {r["format"]: r for r in result["results"]}
    assert set(by) == {"clickhouse-parquet", "sisap-h5"}
    for r in by.values():
        assert r["rows"] == 3000 and r["file_bytes"] > 3000 * 768  # every row ingested, from a real file
        assert r["peak_rss"] >= r["base_rss"] > 0 and r["peak_rss_10m"] >= r["peak_rss"]
    assert "| clickhouse-parquet | 3,000 |" in result["markdown"] and "| sisap-h5 | 3,000 |" in result["markdown"]


# -- crash safety: SIGKILL at the process's own kill points, then rerun ----------------------------------------
def test_file_sources_sigkill_then_rerun(tmp_path):
    """A folder with a ClickHouse part and a SISAP file, ingested under SIGKILL at random kill
    points: after every kill each file is in the table whole or not at all, with its own ids; a
    rerun finishes, and another one skips both."""
    import random

    from tests.crash_harness import count_points, laion_cmd, run_and_kill, run_to_completion

    src = tmp_path / "src"
    synth_clickhouse_parquet(src / PART, 1500, first_id=10_000_000, row_group_rows=500, seed=5)
    synth_sisap_h5(src / H5, 1200, seed=6)
    want = {PART: set(range(10_000_000, 10_001_500)), H5: set(range(1, 1201))}
    db = tmp_path / "db"

    def cmd(*extra: str) -> list[str]:
        return laion_cmd("ingest", str(src), "--db", str(db), "--batch-rows", "200", "--json", *extra)

    def whole_or_nothing() -> int:
        with connect(db) as store:
            names = {r.shard: r.name for r in store.shard_records().values()}
            loaded = 0
            for shard, n in store.partition_rows().items():
                ids = store.sql("SELECT id FROM laion WHERE shard = {s:UInt32}", {"s": shard}).column(0).to_pylist()
                assert len(ids) == n == len(want[names[shard]]) and set(ids) == want[names[shard]], (shard, n)
                loaded += 1
            return loaded

    points = len(count_points(laion_cmd("ingest", str(src), "--db", str(tmp_path / "scratch"), "--batch-rows", "200",
                                        "--json")))
    rng = random.Random(20261202)
    kills = 0
    for attempt in range(6):
        point = run_and_kill(cmd(*(["--force"] if attempt % 2 else [])), rng, points=points, last=("done",),
                             label="ingest")
        assert point.killed, point
        kills += 1
        whole_or_nothing()
    assert kills == 6
    run_to_completion(cmd())
    assert whole_or_nothing() == 2
    again = json.loads(run_to_completion(cmd()).stdout.splitlines()[-1])
    assert again["event"] == "done" and sorted(again["skipped"]) == [FILE_SHARD_BASE, FILE_SHARD_BASE + 1]


def test_partition_claimed_before_load_survives_a_crash_between_swap_and_record(tmp_path, files):
    """The state a SIGKILL between ``REPLACE PARTITION`` and the final ``laion_shards`` row leaves
    (made here by removing that row): the file's name still maps to its partition, so the rerun
    replaces it instead of taking a new partition and refusing its own ids."""
    with connect(tmp_path / "db") as store:
        ingest_source(store, files["h5"])
        store.sql("ALTER TABLE laion_shards DELETE WHERE fingerprint != '' SETTINGS mutations_sync = 1")
        assert store.status().as_dict()["shards"][0]["state"] == "pending"  # rows there, their record not written
        report = ingest_source(store, files["h5"])
        assert report.loaded == [FILE_SHARD_BASE] and store.scalar("SELECT count() FROM laion") == 2500
        assert store.status().as_dict()["shards"][0]["state"] == "loaded"
        # a file that fails mid-stream keeps only its claim, which status does not list
        bad, _ = _hostile("NaN deep inside h5", tmp_path)
        with pytest.raises(ShardValidationError):
            ingest_source(store, bad)
        assert [s["shard"] for s in store.status().as_dict()["shards"]] == [FILE_SHARD_BASE]
