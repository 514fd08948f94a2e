"""The web page end to end in real headless Chromium (Debian's /usr/bin/chromium via Playwright).

The server runs in this process on 127.0.0.1 (uvicorn in a thread). A screenshot of the page
with results is saved to tests/artifacts/search-page.png."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")
playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium missing: `make test` installs it")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from laion_search import connect
    from laion_search.ingest import ingest
    from laion_search.sources.synth import synth
    from laion_search.clip.tiny import make_clip_model
    from laion_search.web.app import create_app

    root = tmp_path_factory.mktemp("browser")
    model = str(make_clip_model(root / "tiny", "tiny"))
    synth(root / "shards", [0, 1], 200, dim=16, seed=12)
    store = connect(root / "db")
    ingest(store, root / "shards")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(store, model=model), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}", root
    srv.should_exit = True
    thread.join(timeout=10)
    store.close()


@pytest.fixture(scope="module")
def page(server):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu",
                                          "--disable-background-networking", "--disable-component-update",
                                          "--no-first-run", "--disable-sync"])
        pg = browser.new_page(viewport={"width": 1100, "height": 800})
        yield pg
        browser.close()


def _cards(page):
    return page.locator("#grid .card")


def test_type_query_see_grid_toggle_safe_mode_and_more_like_this(server, page):
    base, _ = server
    page.goto(base + "/")
    page.fill("#q", "a dog and a cat")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 20")
    status = page.inner_text("#status")
    assert "20 results" in status and "ms" in status
    assert "q=a+dog+and+a+cat" in page.url and "safe=1" in page.url  # shareable URL
    page.wait_for_selector("#grid .card .placeholder")  # offline: images fall back to the placeholder
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "search-page.png"), full_page=False)
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


def test_keyboard_and_shared_url(server, page):
    base, _ = server
    page.goto(base + "/?like=1000000005&k=7&modality=text&safe=0")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 7")
    assert page.input_value("#modality") == "text" and not page.is_checked("#safe")
    page.focus("#grid .card >> nth=2")
    target = page.get_attribute("#grid .card >> nth=2", "data-id")
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.getElementById('status').textContent.includes('more like #{target}')")


def test_upload_image_and_phone_width(server, page, tmp_path):
    from PIL import Image

    base, _ = server
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
