"""clip-retrieval's own ``ClipClient``, unmodified, against ``laion serve``'s clip-back API.

The client comes from PyPI (``pip install clip-retrieval --no-deps``; ``make test`` does it).
Its package ``__init__`` imports the whole clip-back server (flask, faiss, torch hub …), which
we do not install, so the package object is created without running ``__init__`` and then
``clip_retrieval.clip_client`` is imported from the installed file as it is.

The server is uvicorn on 127.0.0.1 in a thread; the client speaks real HTTP to it with
``requests`` (JSON body without a JSON content type, as the client sends it).
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")
pytest.importorskip("requests")
if importlib.util.find_spec("clip_retrieval") is None:
    pytest.skip("clip-retrieval missing: pip install clip-retrieval --no-deps (make test does)",
                allow_module_level=True)

from PIL import Image  # noqa: E402

from laion_search import connect  # noqa: E402
from laion_search.ingest import ingest  # noqa: E402
from laion_search.clip.tiny import make_clip_model  # noqa: E402
from laion_search.search import Filters, search  # noqa: E402
from laion_search.sources.synth import synth  # noqa: E402
from laion_search.web.app import create_app  # noqa: E402

from .conftest import serve_in_thread  # noqa: E402

#: clip-back's default columns_to_return (url, image_path, caption, NSFW) that exist here, then id, similarity
FIELDS = ["url", "caption", "NSFW", "id", "similarity"]


def _import_clip_client():
    spec = importlib.util.find_spec("clip_retrieval")
    if "clip_retrieval" not in sys.modules:
        pkg = types.ModuleType("clip_retrieval")
        pkg.__path__ = list(spec.submodule_search_locations)  # a package, its __init__ not run
        sys.modules["clip_retrieval"] = pkg
    return importlib.import_module("clip_retrieval.clip_client")


clip_client = _import_clip_client()
ClipClient, Modality = clip_client.ClipClient, clip_client.Modality


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """400 rows, 16-d (tiny CLIP); rows 1 and 2 duplicate row 0's image embedding."""
    root = tmp_path_factory.mktemp("clipclient")
    model = str(make_clip_model(root / "tiny", "tiny"))
    shards = root / "shards"
    synth(shards, [0], 400, dim=16, seed=21)
    img = np.load(shards / "img_emb_0.npy")
    img[1] = img[0]
    img[2] = img[0]
    np.save(shards / "img_emb_0.npy", img)
    store = connect(root / "db")
    ingest(store, shards)
    with serve_in_thread(create_app(store, model=model)) as base:
        yield base, store, model, root
    store.close()


def client(base: str, **kw) -> "ClipClient":
    opts = dict(indice_name="laion", num_images=10, deduplicate=False, use_safety_model=False,
                use_violence_detector=False)
    opts.update(kw)
    return ClipClient(url=base + "/knn-service", **opts)


def check_shape(rows: list[dict]) -> None:
    assert rows and all(list(r) == FIELDS for r in rows), rows[:2]
    sims = [r["similarity"] for r in rows]
    assert sims == sorted(sims, reverse=True)
    assert all(isinstance(r["id"], int) and isinstance(r["url"], str) for r in rows)


def expected(store, model, **query) -> list[tuple[int, float]]:
    res = search(store, model=model, k=query.pop("k"), **query)
    return [(r["id"], 1.0 - r["distance"]) for r in res.rows]


def test_text_query_matches_the_library(served):
    base, store, model, _ = served
    rows = client(base).query(text="a cat sleeping on a sofa")
    check_shape(rows)
    assert len(rows) == 10
    want = expected(store, model, text="a cat sleeping on a sofa", k=10)
    assert [r["id"] for r in rows] == [i for i, _ in want]
    assert [r["similarity"] for r in rows] == pytest.approx([s for _, s in want], abs=1e-5)
    meta = {r["id"]: r for r in store.rows("SELECT id, url, caption, NSFW FROM laion")}
    assert all(meta[r["id"]]["caption"] == r["caption"] and meta[r["id"]]["url"] == r["url"] for r in rows)


def test_image_file_query(served, tmp_path):
    base, store, model, _ = served
    path = tmp_path / "query.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    rows = client(base, num_images=7).query(image=str(path))
    check_shape(rows)
    want = expected(store, model, image=path.read_bytes(), k=7)
    assert [r["id"] for r in rows] == [i for i, _ in want]


def test_embedding_input_num_images_and_text_modality(served):
    base, store, model, root = served
    vec = np.load(root / "shards" / "img_emb_0.npy")[10].astype(float).tolist()
    rows = client(base, num_images=4).query(embedding_input=vec)
    check_shape(rows)
    assert len(rows) == 4 and rows[0]["id"] == 10 and rows[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert len(client(base, num_images=25).query(embedding_input=vec)) == 25
    tvec = np.load(root / "shards" / "text_emb_0.npy")[33].astype(float).tolist()
    by_text = client(base, modality=Modality.TEXT, num_images=5).query(embedding_input=tvec)
    assert by_text[0]["id"] == 33
    assert [r["id"] for r in by_text] == [i for i, _ in expected(store, model, vector=tvec, modality="text", k=5)]


def test_deduplicate_like_clip_back(served):
    base, store, _, root = served
    vec = np.load(root / "shards" / "img_emb_0.npy")[0].astype(float).tolist()
    plain = client(base, num_images=20).query(embedding_input=vec)
    deduped = client(base, num_images=20, deduplicate=True).query(embedding_input=vec)
    assert {0, 1, 2} <= {r["id"] for r in plain}
    ids = [r["id"] for r in deduped]
    # as clip-back: dedup runs over num_result_ids (= num_images from ClipClient) results, so fewer come back
    assert len({0, 1, 2} & set(ids)) == 1 and len(ids) < len(plain)
    assert ids == [r["id"] for r in plain if r["id"] in set(ids)]  # order kept, a subsequence
    vecs = {r["id"]: np.asarray(r["image_embedding"], np.float32) for r in store.rows(
        "SELECT id, image_embedding FROM laion WHERE id IN {ids:Array(Int64)}", {"ids": ids})}
    m = np.stack([vecs[i] / np.linalg.norm(vecs[i]) for i in ids])
    sims = m @ m.T
    np.fill_diagonal(sims, 0)
    assert sims.max() < 0.94  # no two kept results are clip-back duplicates


def test_safety_model_and_violence_detector(served):
    base, store, model, _ = served
    q = "a dog in the park"
    everything = client(base, num_images=60).query(text=q)
    safe = client(base, num_images=60, use_safety_model=True, use_violence_detector=True).query(text=q)
    assert any(r["NSFW"] != "UNLIKELY" for r in everything)  # the filter has something to remove
    assert safe and all(r["NSFW"] == "UNLIKELY" for r in safe)
    want = expected(store, model, text=q, k=60, filters=Filters(nsfw="exclude"))
    assert [r["id"] for r in safe] == [i for i, _ in want]
    # ClipClient's defaults (safety and violence on, dedup on, aesthetic 9/0.5) are accepted
    defaults = ClipClient(url=base + "/knn-service", indice_name="laion", num_images=8).query(text=q)
    check_shape(defaults)
    assert all(r["NSFW"] == "UNLIKELY" for r in defaults)


def test_indice_name_and_errors_reach_the_client(served):
    base, *_ = served
    import requests

    assert requests.get(base + "/indices-list", timeout=30).json() == ["laion"]
    bad = client(base, indice_name="laion_400m").query(text="x")
    assert isinstance(bad, dict) and "unknown indice_name 'laion_400m'" in bad["error"]


def test_metadata_and_knn_accept_json_whatever_the_content_type(served):
    base, store, *_ = served
    import json

    import requests

    for headers in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}):
        r = requests.post(base + "/metadata", data=json.dumps({"ids": [5, 3], "indice_name": "laion"}),
                          headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        got = r.json()
        assert [m["id"] for m in got] == [5, 3] and list(got[0]["metadata"]) == ["url", "caption", "NSFW"]
        row = store.rows("SELECT url, caption FROM laion WHERE id = 5")[0]
        assert got[0]["metadata"]["caption"] == row["caption"]
        r = requests.post(base + "/knn-service", data=json.dumps({"text": "beach", "modality": "image",
                                                                  "num_images": 3, "indice_name": "laion"}),
                          headers=headers, timeout=30)
        assert r.status_code == 200 and len(r.json()) == 3
    r = requests.post(base + "/knn-service", data=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    img = base64.b64encode(b"not an image").decode()
    r = requests.post(base + "/knn-service", data=json.dumps({"image": img, "num_images": 3}), timeout=30)
    assert r.status_code == 400 and "not a readable image" in r.json()["error"]
