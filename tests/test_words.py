"""Keyword search through the caption text index: results against a Python reference on hostile
captions, reciprocal rank fusion against a reference written here, hostile --words input, and the
same answers over HTTP and on a ClickHouse server (the chDB HTTP fixture)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_search import connect
from laion_search.errors import UsageError
from laion_search.index import ivf
from laion_search.index.text import (MAX_WORDS, create_text_index, drop_text_index, text_index_status,
                                     tokenize)
from laion_search.search import search
from laion_search.sources.synth import synth

HOSTILE = [
    "", " ", "...", "A Watercolor painting of a RED car", "red-car!!! (vintage)", "CAFÉ crème l'été",
    "İstanbul ΣΟΦΟΣ σοφός", "watercolor🎨art and 🎨", "日本語のテキスト watercolor", "x\ty\nz\0w red",
    "a_b.c,d;e:f/g\\h'i\"j", "no\u00a0break space", "red vintage car", "car vintage red", "red red red red",
    "DROP TABLE laion; -- red", "{words:String} car", "word " * 2000 + "needle watercolor",
]
VOCAB = ["red", "car", "vintage", "watercolor", "dog", "cat", "painting", "photo", "blue", "sky"]
QUERIES = [("red car", "any"), ("red car", "all"), ("red car", "phrase"), ("vintage red car", "phrase"),
           ("WATERCOLOR", "any"), ("café", "any"), ("crème CAFÉ", "all"), ("istanbul", "any"),
           ("i̇stanbul", "any"), ("σοφος", "any"), ("🎨", "any"), ("needle", "any"), ("a b c d", "phrase"),
           ("x y z w", "all"), ("break", "any"), ("日本語のテキスト", "any"), ("words string", "all")]


def _captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    caps = [" ".join(rng.choice(VOCAB, rng.integers(1, 7))) for _ in range(n)]
    caps[:len(HOSTILE)] = HOSTILE
    return caps


def _shards(root, shards: list[int], rows: int) -> dict[int, str]:
    synth(root, shards, rows, dim=16, seed=5)
    out = {}
    for s in shards:
        path = root / f"metadata_{s}.parquet"
        meta = pq.read_table(path)
        caps = _captions(rows, s)
        meta = meta.set_column(meta.schema.get_field_index("caption"), "caption", pa.array(caps, pa.string()))
        pq.write_table(meta, path)
        out.update({s * 1_000_000_000 + i: c for i, c in enumerate(caps)})
    return out


def ref_match(caption: str, words: list[str], mode: str) -> bool:
    toks = tokenize(caption)
    if mode == "any":
        return any(w in toks for w in words)
    if mode == "all":
        return all(w in toks for w in words)
    return any(toks[i:i + len(words)] == words for i in range(len(toks) - len(words) + 1))


def ref_score(caption: str, words: list[str]) -> float:
    toks = tokenize(caption)
    return len(set(words) & set(toks)) + 1 / (1 + len(toks))


def ref_rrf(rankings, c):
    """The reference: score(d) = Σ weight / (c + rank of d), ranks from 1; best first, ties by id."""
    score: dict[int, float] = {}
    for ids, weight in rankings:
        for i, d in enumerate(ids):
            score[d] = score.get(d, 0) + weight / (c + i + 1)
    return sorted(score, key=lambda d: (-score[d], d)), score


@pytest.fixture(scope="module")
def words_db(tmp_path_factory):
    """Shard 0 loaded, then the text index built over it; shard 1 loaded after (it lands indexed)."""
    root = tmp_path_factory.mktemp("words")
    caps = _shards(root / "s", [0, 1], 300)
    db = connect(root / "db")
    db.ingest(root / "s", [0])
    create_text_index(db)
    db.ingest(root / "s", [1])
    yield db, caps, root
    db.close()


def test_tokenizer_matches_the_engine_on_hostile_captions(words_db):
    db, caps, _ = words_db
    got = db.rows("SELECT id, tokens(lowerUTF8(caption), 'splitByNonAlpha') AS t FROM laion")
    assert len(got) == len(caps)
    bad = [(r["id"], caps[r["id"]][:40]) for r in got if r["t"] != tokenize(caps[r["id"]])]
    assert bad == []


def test_the_index_covers_every_part_and_shards_land_indexed(words_db):
    db, caps, _ = words_db
    st = text_index_status(db)[0]
    assert st["parts_covered"] == st["parts"] >= 2 and st["rows"] == len(caps) and st["bytes_per_row"] > 0
    plan = db.sql("EXPLAIN indexes = 1 SELECT id FROM laion WHERE hasAnyTokens(lowerUTF8(caption), ['needle'])")
    text = "\n".join(str(v) for row in plan.to_pylist() for v in row.values())
    assert "caption_index" in text  # the engine prunes with it


@pytest.mark.parametrize("words,mode", QUERIES)
def test_keyword_search_alone_matches_the_reference(words_db, words, mode):
    db, caps, _ = words_db
    toks = tokenize(words)
    uniq = list(dict.fromkeys(toks))
    want = sorted((i for i, c in caps.items() if ref_match(c, toks if mode == "phrase" else uniq, mode)),
                  key=lambda i: (-ref_score(caps[i], uniq), i))
    res = search(db, words=words, words_mode=mode, k=1000)
    assert [r["id"] for r in res] == want
    assert all(abs(r["words_score"] - ref_score(caps[r["id"]], uniq)) < 1e-9 for r in res)
    assert "text index" in res.strategy


def test_without_the_index_the_same_rows(words_db):
    """The query expression is the index expression: a scan gives the same answer."""
    db, caps, _ = words_db
    with_index = [[r["id"] for r in search(db, words=w, words_mode=m, k=1000)] for w, m in QUERIES]
    drop_text_index(db)
    try:
        res = search(db, words="red car", k=5)
        assert "no text index" in res.strategy
        assert [[r["id"] for r in search(db, words=w, words_mode=m, k=1000)] for w, m in QUERIES] == with_index
    finally:
        create_text_index(db)


@pytest.mark.parametrize("exact", [True, False])
def test_words_filter_a_vector_search(words_db, exact):
    db, caps, _ = words_db
    everything = search(db, like=3, k=1000, exact=True)
    want = [r["id"] for r in everything if ref_match(caps[r["id"]], ["vintage", "car"], "all")][:10]
    got = search(db, like=3, k=10, exact=exact, words="Vintage, CAR", words_mode="all")
    assert [r["id"] for r in got] == want and len(want) == 10


def test_words_filter_through_hnsw_and_ivf(words_db):
    db, caps, _ = words_db
    everything = search(db, like=3, k=1000, exact=True)
    want = [r["id"] for r in everything if ref_match(caps[r["id"]], ["watercolor"], "any")][:8]
    db.create_index("image")
    ivf.create_ivf(db, ["image"], lists=8)
    try:
        hnsw = search(db, like=3, k=8, words="watercolor")
        assert [r["id"] for r in hnsw] == want and hnsw.strategy == "words→prefilter"
        post = search(db, like=3, k=8, words="watercolor", filter_strategy="postfilter", ef_search=2000)
        assert set(r["id"] for r in post) <= set(want)
        viaivf = search(db, like=3, k=8, words="watercolor", nprobe=8)
        assert [r["id"] for r in viaivf] == want
        hyb = search(db, like=3, k=8, words="watercolor", nprobe=8, hybrid=True)
        assert len(hyb) == 8 and {r["found_by"] for r in hyb} <= {"words", "vector", "both"}
    finally:
        db.drop_index("image")
        ivf.drop_ivf(db, "image")


@pytest.mark.parametrize("c,wv,ww", [(60, 1.0, 1.0), (10, 2.0, 0.5), (0, 1.0, 3.0)])
def test_hybrid_is_rrf_of_the_two_rankings(words_db, c, wv, ww):
    db, caps, _ = words_db
    vec = [r["id"] for r in search(db, like=7, k=100, exact=True)]
    kw = [r["id"] for r in search(db, words="red vintage car", k=100, exclude_ids=[7])]
    order, score = ref_rrf([(vec, wv), (kw, ww)], c)
    res = search(db, like=7, k=25, exact=True, words="red vintage car", hybrid=True, rank_constant=c,
                 vector_weight=wv, words_weight=ww)
    assert [r["id"] for r in res] == order[:25]
    for r in res:
        assert abs(r["rrf_score"] - score[r["id"]]) < 1e-12
        want = {(True, True): "both", (True, False): "vector", (False, True): "words"}[(r["id"] in vec, r["id"] in kw)]
        assert r["found_by"] == want
        assert (r["distance"] is None) == (r["id"] not in vec) and (r["words_score"] is None) == (r["id"] not in kw)
    assert {r["found_by"] for r in res} >= {"both"}


@pytest.mark.parametrize("words", ["'; DROP TABLE laion; --", "red') OR 1=1 --", "{words:String}", "\\' \\\\ \\0",
                                   "car\nUNION SELECT * FROM system.tables"])
def test_hostile_words_are_parameters_never_sql(words_db, words):
    db, caps, _ = words_db
    before = db.scalar("SELECT count() FROM laion")
    res = search(db, words=words, k=1000)
    toks = list(dict.fromkeys(tokenize(words)))
    assert [r["id"] for r in res] == sorted((i for i, c in caps.items() if ref_match(c, toks, "any")),
                                            key=lambda i: (-ref_score(caps[i], toks), i))
    assert words not in res.sql and "DROP" not in res.sql and res.params["words"] == toks
    assert db.scalar("SELECT count() FROM laion") == before


@pytest.mark.parametrize("words,mode,message", [
    ("", "any", "no word"), ("  !!! ... ", "any", "no word"), (" ".join(f"w{i}" for i in range(1000)), "any", "at most"),
    (" ".join(f"w{i}" for i in range(100)), "any", f"at most {MAX_WORDS}"), ("red", "fuzzy", "words_mode must be one of"),
    ("x" * 5000, "any", "characters long")])
def test_bad_words_are_clear_errors(words_db, words, mode, message):
    db, _, _ = words_db
    with pytest.raises(UsageError, match=message) as e:
        search(db, words=words, words_mode=mode, k=5)
    assert "words" in str(e.value)


def test_hybrid_needs_both_sides(words_db):
    db, _, _ = words_db
    with pytest.raises(UsageError, match="hybrid"):
        search(db, words="red", hybrid=True)
    with pytest.raises(UsageError, match="hybrid"):
        search(db, like=3, hybrid=True)
    with pytest.raises(UsageError, match="rank_constant"):
        search(db, like=3, words="red", hybrid=True, rank_constant=-1)


def test_http_words_alone_filter_and_hybrid(words_db):
    pytest.importorskip("fastapi")
    import httpx

    from laion_search.web.app import create_app

    db, caps, _ = words_db
    app = create_app(db, model=None)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            a = await c.post("/api/search", json={"words": "red car", "words_mode": "phrase", "k": 50})
            b = await c.get("/api/search", params={"words": "watercolor", "like": 3, "k": 5, "hybrid": "true"})
            e = await c.post("/api/search", json={"words": "'; --", "k": 5})
            h = await c.post("/api/search", json={"words": "red", "hybrid": True, "k": 5})
            return a, b, e, h

    a, b, e, h = asyncio.run(go())
    assert a.status_code == 200
    assert [r["id"] for r in a.json()["results"]] == [r["id"] for r in search(db, words="red car", words_mode="phrase",
                                                                              k=50)]
    assert b.status_code == 200 and all("found_by" in r for r in b.json()["results"])
    assert e.status_code == 400 and "--words" in e.json()["error"]
    assert h.status_code == 400 and "hybrid" in h.json()["error"]


def test_cli_index_create_status_search_drop(words_db, tmp_path):
    from .conftest import run_cli

    _, _, root = words_db
    db = str(tmp_path / "db")
    run_cli("ingest", str(root / "s"), "--shards", "0", "--db", db, "--text-index", check=True)
    st = json.loads(run_cli("index", "status", "--db", db, "--json", check=True).stdout)
    assert [x["name"] for x in st] == ["caption_index"] and st[0]["parts_covered"] == st[0]["parts"]
    out = json.loads(run_cli("search", "--words", "Red CAR", "--words-mode", "all", "-k", "3", "--db", db, "--json",
                             check=True).stdout)
    assert out["results"] and all({"red", "car"} <= set(tokenize(r["caption"])) for r in out["results"])
    bad = run_cli("search", "--words", "?!", "--db", db)
    assert bad.returncode != 0 and "--words" in bad.stderr
    assert "caption_index: dropped" in run_cli("index", "drop", "--kind", "text", "--db", db, check=True).stdout
    built = run_cli("index", "create", "--kind", "text", "--db", db, check=True).stdout
    assert "caption_index" in built and "B/row" in built


def test_server_gives_the_embedded_answers(words_db, server_url):
    db, _, root = words_db
    cases = [dict(words="red car", words_mode="all", k=20), dict(like=7, words="vintage", k=10, exact=True),
             dict(like=7, words="red vintage car", k=10, exact=True, hybrid=True)]
    want = [[(r["id"], r.get("found_by")) for r in search(db, **c)] for c in cases]
    with connect(server_url) as remote:
        remote.ingest(root / "s")
        create_text_index(remote)
        assert text_index_status(remote)[0]["parts_covered"] >= 2
        got = [[(r["id"], r.get("found_by")) for r in search(remote, **c)] for c in cases]
    assert got == want
