"""The web page end to end in real headless Chromium (Debian's /usr/bin/chromium via Playwright).

The server runs in this process on 127.0.0.1 (uvicorn in a thread). Every request the page makes
to another host is aborted and recorded: the page must work without any. A screenshot of the
demo grid with its pictures is taken; with LAION_UPDATE_SCREENSHOT=1 it replaces docs/search-page.png
(a test run never writes into the checkout otherwise)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")
playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "search-page.png"
from .conftest import serve_in_thread  # noqa: E402

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium missing: `make test` installs it")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo's data: synth shards with pictures (laion synth --images), served same-origin."""
    from laion_search import connect
    from laion_search.ingest import ingest
    from laion_search.sources.synth import synth
    from laion_search.clip.tiny import make_clip_model
    from laion_search.web.app import create_app

    root = tmp_path_factory.mktemp("browser")
    model = str(make_clip_model(root / "tiny", "tiny"))
    synth(root / "shards", [0, 1], 200, dim=16, seed=12, images=True, topics=12)
    store = connect(root / "db")
    ingest(store, root / "shards")
    with serve_in_thread(create_app(store, model=model, image_root=root / "shards")) as base, \
            serve_in_thread(create_app(store, model=str(root / "no-clip-model"), image_root=root / "shards")) as nomodel:
        # nomodel: the same store without a CLIP model, what the page shows when text/image search is off
        yield base, root, store, nomodel
    store.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--headless", "--no-sandbox", "--disable-gpu",
                                    "--disable-background-networking", "--disable-component-update",
                                    "--no-first-run", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def blocked():
    return []


@pytest.fixture
def page(browser, blocked):
    """A fresh page whose requests to any host but 127.0.0.1 are aborted (and recorded)."""
    ctx = browser.new_context(viewport={"width": 1100, "height": 800})
    pg = ctx.new_page()

    def only_loopback(route):
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    pg.route("**/*", only_loopback)
    yield pg
    ctx.close()


def _pictures_loaded(page) -> None:
    page.wait_for_function("[...document.querySelectorAll('#grid .card img')].length > 0 && "
                           "[...document.querySelectorAll('#grid .card img')].every(i => i.complete && i.naturalWidth > 0)")


def _cards(page):
    return page.locator("#grid .card")


def test_type_query_see_grid_toggle_safe_mode_and_more_like_this(server, page, blocked):
    base, *_ = server
    page.goto(base + "/")
    page.fill("#q", "a dog and a cat")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 20")
    status = page.inner_text("#status")
    assert "20 results" in status and "ms" in status
    assert "q=a+dog+and+a+cat" in page.url and "safe=1" in page.url  # shareable URL
    _pictures_loaded(page)  # the demo's own pictures, from this server
    srcs = page.eval_on_selector_all("#grid .card img", "els => els.map(e => e.src)")
    assert len(srcs) == 20 and all(s.startswith(base + "/local/images/") for s in srcs)
    assert page.locator("#grid .card .placeholder").count() == 0
    assert page.is_hidden("#notice") and page.is_enabled("#q")
    safe_ids = [int(i) for i in page.eval_on_selector_all("#grid .card", "els => els.map(e => e.dataset.id)")]
    meta = page.request.post(base + "/metadata", data={"ids": safe_ids}).json()
    assert len(meta) == 20 and all(m["metadata"]["NSFW"] == "UNLIKELY" for m in meta)  # safe mode held
    with page.expect_request("**/api/search") as req:
        page.uncheck("#safe")  # safe mode off: the search reruns without the NSFW filter
    assert '"nsfw":"any"' in req.value.post_data
    page.wait_for_function("new URLSearchParams(location.search).get('safe') === '0'")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 20")
    first = _cards(page).first
    clicked = first.get_attribute("data-id")
    first.click()
    page.wait_for_function(f"document.getElementById('status').textContent.includes('more like #{clicked}')")
    assert f"like={clicked}" in page.url
    assert clicked not in page.eval_on_selector_all("#grid .card", "els => els.map(e => e.dataset.id)")
    assert blocked == []  # nothing outside 127.0.0.1 was asked for


def test_demo_grid_pictures_look_alike_screenshot(server, page, blocked, tmp_path):
    base, *_ = server
    page.goto(base + "/?like=5&k=12&safe=0")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 12")
    _pictures_loaded(page)
    shot = DOCS_SCREENSHOT if os.environ.get("LAION_UPDATE_SCREENSHOT") == "1" else tmp_path / "search-page.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000 and blocked == []


def test_dead_web_links_show_the_placeholder(server, page, blocked, tmp_path):
    """LAION URLs load lazily from the web; here the web is blocked (link rot): placeholders, and
    the page still works. Ingests a shard of http URLs into the running server's store."""
    from laion_search.ingest import ingest
    from laion_search.sources.synth import synth

    base, root, store, _ = server
    import numpy as np

    synth(tmp_path / "web", [7], 50, dim=16, seed=12, topics=12)
    img = np.load(tmp_path / "web" / "img_emb_7.npy")
    img[:] = img[3]  # the whole shard is row 3's neighbourhood: its links fill the grid
    np.save(tmp_path / "web" / "img_emb_7.npy", img)
    ingest(store, tmp_path / "web")
    page.goto(base + "/?like=7000000003&k=10&safe=0")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 10")
    page.wait_for_function("document.querySelectorAll('#grid .card .placeholder').length === 10")
    imgs = page.eval_on_selector_all("#grid .card img", "els => els.map(e => [e.loading, e.src, e.hidden])")
    assert len(imgs) == 10 and all(lazy == "lazy" and urlsplit(src).hostname == "img.example.org" and hidden
                                   for lazy, src, hidden in imgs)
    assert blocked and all(urlsplit(u).hostname == "img.example.org" for u in blocked)
    assert "10 results" in page.inner_text("#status")


def test_missing_model_disables_text_and_image_with_the_fix(server, page, blocked):
    _, _, _, nomodel = server
    page.goto(nomodel + "/")
    page.wait_for_selector("#notice:not([hidden])")
    notice = page.inner_text("#notice")
    assert "text and image search are off" in notice and "no-clip-model" in notice and "--model ./clip-b32" in notice
    assert page.is_disabled("#q") and page.is_disabled("#file")
    assert page.is_enabled("button[type=submit]")  # caption words need no CLIP model
    page.goto(nomodel + "/?q=a+cat")  # a shared text link answers at once with the reason, never hangs
    page.wait_for_function("document.getElementById('status').className === 'error'")
    assert "text search is unavailable" in page.inner_text("#status")
    page.goto(nomodel + "/?like=5&k=6")  # more like this still works
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 6")
    _pictures_loaded(page)
    assert blocked == []


def test_keyboard_and_shared_url(server, page):
    base, *_ = server
    page.goto(base + "/?like=1000000005&k=7&modality=text&safe=0")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 7")
    assert page.input_value("#modality") == "text" and not page.is_checked("#safe")
    page.focus("#grid .card >> nth=2")
    target = page.get_attribute("#grid .card >> nth=2", "data-id")
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.getElementById('status').textContent.includes('more like #{target}')")


def test_upload_image_and_phone_width(server, page, tmp_path):
    from PIL import Image

    base, *_ = server
    img = tmp_path / "query.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(img)
    page.set_viewport_size({"width": 375, "height": 740})
    page.goto(base + "/")
    page.set_input_files("#file", str(img))
    page.wait_for_function("document.getElementById('status').textContent.includes('results for image')")
    assert _cards(page).count() == 20
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 380  # no horizontal scrolling on a phone
    page.set_input_files("#file", str(tmp_path / "query.png"))
    (tmp_path / "bad.png").write_bytes(b"nope")
    page.set_input_files("#file", str(tmp_path / "bad.png"))
    page.wait_for_function("document.getElementById('status').className === 'error'")
    assert "not a readable image" in page.inner_text("#status")


def test_keyword_box_alone_and_hybrid(server, page, blocked):
    """Caption words alone rank captions holding them; with a text query and hybrid, results say
    which side found them; a word no caption holds gives none; no CLIP model is needed for words."""
    from laion_search.index.text import tokenize

    base, _, store, nomodel = server
    word = store.rows("SELECT caption FROM laion ORDER BY id LIMIT 1")[0]["caption"].split()[0]
    page.goto(base + "/")
    page.fill("#words", word)
    page.press("#words", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.includes('words: ')")
    caps = page.eval_on_selector_all("#grid .card .caption", "els => els.map(e => e.textContent)")
    assert caps and all(tokenize(word)[0] in tokenize(c) for c in caps)
    assert "words" in page.inner_text("#status")
    page.fill("#q", "a dog")
    page.check("#hybrid")
    with page.expect_request("**/api/search") as req:
        page.press("#q", "Enter")
    assert '"hybrid":true' in req.value.post_data and f'"words":"{word}"' in req.value.post_data
    page.wait_for_function("document.querySelector('#grid .card .dist') && "
                           "document.querySelector('#grid .card .dist').textContent.includes('found by')")
    page.goto(nomodel + "/")
    page.fill("#words", "zzzqqqnotaword")
    page.press("#words", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('0 results')")
    assert blocked == []
