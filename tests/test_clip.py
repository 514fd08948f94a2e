"""CLIP encoders, search by text/image, `laion embed`, and the guide's UDFs through the engine —
all with a tiny CLIP-architecture model the tests create, loaded by the same code as the real one."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from laion_search import EncoderError, connect  # noqa: E402
from laion_search.ingest import ingest  # noqa: E402
from laion_search.clip.embed import embed  # noqa: E402
from laion_search.clip.encoders import HFClipEncoder, get_encoder  # noqa: E402
from laion_search.search import search  # noqa: E402
from laion_search.clip.tiny import make_clip_model  # noqa: E402
from laion_search.clip.udf import format_vector, install_udfs, tsv_unescape  # noqa: E402

from .conftest import run_cli  # noqa: E402

CAPTIONS = {"red_lego_car.png": (200, 30, 30), "blue_beach_sunset.png": (20, 40, 220),
            "green_cat_photo.png": (30, 200, 60), "a_dog_and_a_cat.png": (120, 120, 20),
            "house_of_friends.png": (90, 10, 160)}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return str(make_clip_model(tmp_path_factory.mktemp("clip") / "tiny", "tiny"))


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, colour in CAPTIONS.items():
        arr = np.clip(np.array(colour) + rng.integers(-20, 20, size=(48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / name)
    return d


def test_encoder_is_deterministic_normalised_and_cached(tiny_model):
    enc = get_encoder(tiny_model)
    assert get_encoder(tiny_model) is enc  # loaded once per process
    texts = ["a dog and a cat", "LEGO Friends set 41304", "\u4e00\u53ea\u72d7\u548c\u4e00\u53ea\u732b", "x" * 5000]
    a = enc.encode_text(texts, batch_size=2)
    b = enc.encode_text(texts[::-1])[::-1]
    assert a.shape == (4, 16) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert np.allclose(a, b, atol=1e-5)  # batching and order do not change vectors
    fresh = HFClipEncoder(tiny_model)  # a second load of the saved files gives the same vectors
    assert np.allclose(fresh.encode_text(texts[:1]), a[:1], atol=1e-6)
    assert not np.allclose(a[0], a[1])


def test_images_formats_exif_alpha_and_errors(tiny_model, tmp_path):
    enc = get_encoder(tiny_model)
    base = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    base.save(tmp_path / "a.jpg", quality=95)
    rotated = base.rotate(90, expand=True)  # what a viewer shows for EXIF orientation 8
    exif = Image.Exif()
    exif[0x0112] = 8
    base.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    rotated.save(tmp_path / "upright.jpg", quality=95)
    v = enc.encode_image([tmp_path / "rot.jpg", tmp_path / "upright.jpg", tmp_path / "a.jpg"])
    assert np.dot(v[0], v[1]) > np.dot(v[0], v[2])  # EXIF orientation applied
    rgba = Image.new("RGBA", (30, 30), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    Image.new("RGB", (30, 30), (255, 255, 255)).save(tmp_path / "white.png")
    Image.new("L", (30, 30), 128).save(tmp_path / "grey.png")
    w = enc.encode_image([tmp_path / "clear.png", tmp_path / "white.png", tmp_path / "grey.png"])
    assert np.allclose(w[0], w[1], atol=1e-5)  # transparent pixels composite on white
    assert np.isfinite(w).all()
    (tmp_path / "fake.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(EncoderError, match="fake.png: not a readable image"):
        enc.encode_image([tmp_path / "fake.png"])
    with pytest.raises(EncoderError, match="missing.png: cannot read"):
        enc.encode_image([tmp_path / "missing.png"])
    Image.new("L", (9000, 9000)).save(tmp_path / "bomb.png")
    with pytest.raises(EncoderError, match="over the limit|decompression bomb"):
        enc.encode_image([tmp_path / "bomb.png"])


def test_missing_dependency_gives_install_hint(monkeypatch, tiny_model):
    import laion_search.clip.encoders as encoders

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(EncoderError, match=r"pip install 'laion-search\[clip\]'"):
        encoders.HFClipEncoder(tiny_model)


def test_unloadable_model_is_explained(tmp_path):
    with pytest.raises(EncoderError, match="cannot load CLIP model.*--model"):
        get_encoder(str(tmp_path / "no-such-model"))


@pytest.fixture(scope="module")
def embedded_store(tmp_path_factory, tiny_model, image_dir):
    """`laion embed` output ingested into a store that has the UDFs installed."""
    root = tmp_path_factory.mktemp("embedded")
    shards = root / "shards"
    report = embed(image_dir, shards, model=tiny_model, shard_size=3)
    assert report.images == 5 and report.shards_written == [0, 1]
    install_udfs(root / "db" / "udf", model=tiny_model)
    store = connect(root / "db")
    ingest(store, shards)
    yield store, root
    store.close()


def test_text_query_finds_its_caption_and_image_query_its_image(embedded_store, tiny_model, image_dir):
    store, _ = embedded_store
    for caption in ("red lego car", "a dog and a cat"):
        res = search(store, text=caption, modality="text", model=tiny_model, k=3, exact=True)
        assert res.rows[0]["caption"] == caption and res.rows[0]["distance"] < 1e-5
    res = search(store, image=image_dir / "green_cat_photo.png", model=tiny_model, k=2)
    assert res.rows[0]["url"].endswith("green_cat_photo.png") and res.rows[0]["distance"] < 1e-3
    res = search(store, text="blue beach sunset", model=tiny_model, k=5)  # text→image: all rows ranked
    assert len(res.rows) == 5


def test_guide_udf_sql_runs_verbatim_on_the_embedded_store(embedded_store, tiny_model, image_dir):
    store, _ = embedded_store
    enc = get_encoder(tiny_model)
    got = np.array(store.scalar("SELECT encode_text('a dog and a cat')"), np.float32)
    assert np.allclose(got, enc.encode_text(["a dog and a cat"])[0], atol=1e-6)
    urls = store.rows("SELECT url FROM laion ORDER BY cosineDistance(text_embedding, encode_text('a dog and a cat')) "
                      "ASC LIMIT 10")
    assert urls[0]["url"].endswith("a_dog_and_a_cat.png") and len(urls) == 5
    path = image_dir / "red_lego_car.png"
    rows = store.rows(f"SELECT url, caption FROM laion ORDER BY cosineDistance(image_embedding, encode_image('{path}')) "
                      "ASC LIMIT 10")
    assert rows[0]["caption"] == "red lego car"
    assert len(store.scalar("SELECT encode_text('\u4e00\u53ea\u72d7\u548c\u4e00\u53ea\u732b')")) == 16


def test_udf_script_speaks_tab_separated(tmp_path, tiny_model):
    files = install_udfs(tmp_path, model=tiny_model)
    script = tmp_path / "encode_text.py"
    assert script in files and (tmp_path / "encode_text_function.xml").read_text().count("executable_pool") == 1
    assert script.read_text().startswith(f"#!{sys.executable}\n")
    proc = subprocess.run([str(script)], input="a dog\\tand a cat\nred lego car\n", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = np.array([json.loads(line) for line in proc.stdout.splitlines()], np.float32)
    want = get_encoder(tiny_model).encode_text(["a dog\tand a cat", "red lego car"])
    assert got.shape == (2, 16) and np.allclose(got, want, atol=1e-5)
    assert format_vector(want[0]).startswith("[") and json.loads(format_vector(want[0])) == want[0].tolist()
    bad = subprocess.run([str(tmp_path / "encode_image.py")], input="/nonexistent.png\n", capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "cannot read" in bad.stderr
    assert tsv_unescape("a\\tb\\\\n\\n") == "a\tb\\n\n"


def test_cli_search_text_image_and_embed(embedded_store, tiny_model, image_dir, tmp_path):
    store, root = embedded_store
    store.close()  # the CLI needs the store's lock (last test using this module's store)
    db = str(root / "db")
    out = run_cli("search", "--text", "house of friends", "--modality", "text", "--model", tiny_model, "--k", "2",
                  "--db", db, "--json", check=True)
    assert json.loads(out.stdout)["results"][0]["caption"] == "house of friends"
    out = run_cli("search", "--image", str(image_dir / "blue_beach_sunset.png"), "--db", db, "--json", "--k", "1",
                  env={"LAION_CLIP_MODEL": tiny_model}, check=True)
    assert json.loads(out.stdout)["results"][0]["url"].endswith("blue_beach_sunset.png")
    (tmp_path / "notimage.jpg").write_text("hello")
    bad = run_cli("search", "--image", str(tmp_path / "notimage.jpg"), "--model", tiny_model, "--db", db)
    assert bad.returncode == 1 and "not a readable image" in bad.stderr and "Traceback" not in bad.stderr
    (image_dir.parent / "caps.csv").write_text("path,caption\nred_lego_car.png,\"A red car, \"\"LEGO\"\"\"\n")
    shards = tmp_path / "cli-shards"
    out = run_cli("embed", str(image_dir), str(shards), "--captions", str(image_dir.parent / "caps.csv"),
                  "--model", tiny_model, "--json", check=True)
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert events[-1]["images"] == 5 and events[-1]["shards_written"] == [0]
    import pyarrow.parquet as pq

    meta = pq.read_table(shards / "metadata_0.parquet").to_pylist()
    assert {m["image_path"]: m["caption"] for m in meta}["red_lego_car.png"] == 'A red car, "LEGO"'
    again = run_cli("embed", str(image_dir), str(shards), "--model", tiny_model, "--json", check=True)
    assert json.loads(again.stdout.splitlines()[-1])["shards_skipped"] == [0]  # resumable: nothing redone


def test_bench_clip_end_to_end(tmp_path, tiny_model):
    from laion_search.bench.clip import run

    result = run(rows=300, model=tiny_model, repeat=3, images=3, workdir=tmp_path)
    assert result["encode_ms"] > 0 and result["text_search_ms"] > 0 and result["udf_pooled_ms"] > 0
    assert result["udf_first_call_ms"] > 0
    assert result["embed_images_per_second"] > 0
    assert "text search / encode" in result["markdown"]


def test_udf_install_takes_the_model_that_fits_the_table(tmp_path):
    """Without --model, `laion udf install` writes the model the table records (ViT-L/14 for a
    768-d store), as searches and the server resolve it; --model still wins."""
    run_cli("synth", str(tmp_path / "shards"), "--rows", "30", "--dim", "768", check=True)
    run_cli("ingest", str(tmp_path / "shards"), "--db", str(tmp_path / "db"), check=True)
    env = {"LAION_CLIP_MODEL": ""}
    out = json.loads(run_cli("udf", "install", "--db", str(tmp_path / "db"), "--json", env=env, check=True).stdout)
    assert out["model"] == "openai/clip-vit-large-patch14" and out["model_from"] == "the table"
    script = (tmp_path / "db" / "udf" / "encode_text.py").read_text()
    assert "serve('text', 'openai/clip-vit-large-patch14')" in script
    out = json.loads(run_cli("udf", "install", "--db", str(tmp_path / "db"), "--model", "./elsewhere", "--json",
                             env=env, check=True).stdout)
    assert out["model"] == "./elsewhere" and out["model_from"] == "--model"
