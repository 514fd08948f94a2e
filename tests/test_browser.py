"""The web page end to end in real headless Chromium (Debian's /usr/bin/chromium via Playwright).

The server runs in this process on 127.0.0.1 (uvicorn in a thread). Every request the page makes
to another host is aborted and recorded: the page must work without any. A screenshot of the
demo grid with its pictures is taken; with LAION_UPDATE_SCREENSHOT=1 it replaces docs/search-page.png
(a test run never writes into the checkout otherwise)."""

from __future__ import annotations

import json
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
    with serve_in_thread(create_app(store, model=model, image_root=root / "shards", allow_image_url=True)) as base, \
            serve_in_thread(create_app(store, model=str(root / "no-clip-model"), image_root=root / "shards")) as nomodel:
        # base fetches image URLs (here: its own pictures, on 127.0.0.1); nomodel: the same store without
        # a CLIP model, what the page shows when text/image search is off
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


def _ready(page) -> None:
    page.wait_for_selector("body[data-status=ready]")


def _cards(page):
    return page.locator("#grid .card")


def test_type_query_see_grid_toggle_safe_mode_and_more_like_this(server, page, blocked):
    base, *_ = server
    page.goto(base + "/")
    _ready(page)
    assert page.input_value("#k") == "10"  # the query model's default k (GET /api/search/fields), as the CLI's and the API's
    page.fill("#q", "a dog and a cat")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 10")
    status = page.inner_text("#status")
    assert "10 results" in status and "ms" in status
    assert "q=a+dog+and+a+cat" in page.url and "safe=1" in page.url  # shareable URL
    _pictures_loaded(page)  # the demo's own pictures, from this server
    srcs = page.eval_on_selector_all("#grid .card img", "els => els.map(e => e.src)")
    assert len(srcs) == 10 and all(s.startswith(base + "/local/images/") for s in srcs)
    assert page.locator("#grid .card .placeholder").count() == 0
    assert page.is_hidden("#notice") and page.is_enabled("#q")
    safe_ids = [int(i) for i in page.eval_on_selector_all("#grid .card", "els => els.map(e => e.dataset.id)")]
    meta = page.request.post(base + "/metadata", data={"ids": safe_ids}).json()
    assert len(meta) == 10 and all(m["metadata"]["NSFW"] == "UNLIKELY" for m in meta)  # safe mode held
    with page.expect_request("**/api/search") as req:
        page.uncheck("#safe")  # safe mode off: the search reruns without the NSFW filter
    assert '"nsfw":"any"' in req.value.post_data
    page.wait_for_function("new URLSearchParams(location.search).get('safe') === '0'")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 10")
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
    _ready(page)  # the file input is disabled until the server's status is known
    page.set_input_files("#file", str(img))
    page.wait_for_function("document.getElementById('status').textContent.includes('results for image')")
    assert _cards(page).count() == 10  # the default k
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 380  # no horizontal scrolling on a phone
    page.set_input_files("#file", str(tmp_path / "query.png"))
    (tmp_path / "bad.png").write_bytes(b"nope")
    page.set_input_files("#file", str(tmp_path / "bad.png"))
    page.wait_for_function("document.getElementById('status').className === 'error'")
    assert "not a readable image" in page.inner_text("#status")


# -- clip-front's features and the page's own (issue 24) ---------------------------------------------------
def _posted(page, what: str):
    """The JSON body of the next /api/search POST that ``what()`` causes."""
    with page.expect_request(lambda r: r.url.endswith("/api/search") and r.method == "POST") as req:
        what()
    return json.loads(req.value.post_data)


def _ids(page) -> list[int]:
    return [int(i) for i in page.eval_on_selector_all("#grid .card", "els => els.map(e => e.dataset.id)")]


@pytest.fixture(scope="module")
def plain(server):
    """The same store served with a CLIP model but without --allow-image-url (the default)."""
    from laion_search.web.app import create_app

    _, root, store, _ = server
    model = str(root / "tiny")
    with serve_in_thread(create_app(store, model=model, image_root=root / "shards")) as base:
        yield base


@pytest.fixture(scope="module")
def dup_shard(server, tmp_path_factory):
    """Shard 8: 12 rows with one image embedding (near-duplicates of each other) and 4 urls among
    them (the demo's own pictures), two captions that CSV must quote or defuse."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laion_search.ingest import ingest
    from laion_search.sources.synth import synth

    _, _, store, _ = server
    d = tmp_path_factory.mktemp("dups")
    synth(d, [8], 12, dim=16, seed=30)
    img = np.load(d / "img_emb_8.npy")
    img[:] = img[0]
    np.save(d / "img_emb_8.npy", img)
    meta = pq.read_table(d / "metadata_8.parquet")
    captions = [f"duplicate {r}" for r in range(12)]
    captions[1], captions[2] = 'a "quoted", caption', '=HYPERLINK("http://evil.example")'
    meta = meta.set_column(meta.schema.get_field_index("url"), "url", pa.array([f"images/0/{r % 4}.jpg" for r in range(12)]))
    meta = meta.set_column(meta.schema.get_field_index("caption"), "caption", pa.array(captions))
    pq.write_table(meta, d / "metadata_8.parquet")
    ingest(store, d)
    return captions


def test_search_box_waits_for_the_status(server, page, blocked):
    """Nothing can be typed or searched before /api/status has answered; a link's query runs after it."""
    base, *_ = server
    held, searches = [], []
    page.on("request", lambda r: searches.append(r.url) if "/api/search" in r.url and "/fields" not in r.url else None)
    page.route("**/api/status", lambda route: held.append(route))
    page.goto(base + "/?q=a+dog&k=4")
    page.wait_for_function("document.readyState === 'complete'")
    while not held:  # the page's status request, held by the route above
        page.wait_for_event("request", timeout=30_000)
    assert page.is_disabled("#q") and page.is_disabled("button[type=submit]") and page.is_disabled("#file")
    assert page.get_attribute("#q", "placeholder") == "Loading…" and searches == []
    held[0].continue_()
    _ready(page)
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 4")
    assert page.is_enabled("#q") and len(searches) == 1 and blocked == []
    # a status that cannot be read: a banner that says so, and the box stays off
    page.unroute("**/api/status")
    page.route("**/api/status", lambda route: route.fulfill(status=500, content_type="application/json",
                                                            body='{"error": "internal error"}'))
    page.goto(base + "/")
    page.wait_for_selector("body[data-status=failed]")
    assert "Search is unavailable" in page.inner_text("#notice") and "internal error" in page.inner_text("#notice")
    assert page.is_disabled("#q") and page.is_disabled("button[type=submit]")


def test_search_by_image_url(server, plain, page, blocked):
    """A pasted image URL searches by that picture (as clip-front) where the server fetches URLs;
    the results are those of uploading the same file, and the link repeats the search."""
    base, root, *_ = server
    picture = base + "/local/images/0/3.jpg"
    page.goto(base + "/?k=6&safe=0")
    _ready(page)
    assert "paste its URL" in page.get_attribute("#q", "placeholder")
    page.fill("#q", picture)
    body = _posted(page, lambda: page.keyboard.press("Enter"))
    assert body["image_url"] == picture and "text" not in body
    page.wait_for_function("document.getElementById('status').textContent.includes('results for image URL')")
    upload = page.request.post(base + "/api/search/upload", multipart={
        "file": {"name": "3.jpg", "mimeType": "image/jpeg", "buffer": (root / "shards/images/0/3.jpg").read_bytes()},
        "k": "6", "nsfw": "any"}).json()
    assert _ids(page) == [r["id"] for r in upload["results"]]
    assert "image_url=" in page.url
    page.goto(page.url)  # the shared link runs the same search
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 6")
    assert _ids(page) == [r["id"] for r in upload["results"]] and page.input_value("#q") == picture
    # a server that does not fetch URLs: the link's URL is not searched, and the page says so once
    sent = []
    page.on("request", lambda r: sent.append(r.post_data or "") if "/api/search" in r.url and "/fields" not in r.url else None)
    page.goto(plain + "/?image_url=" + picture + "&k=3")
    _ready(page)
    note = page.inner_text("#linknote")
    assert "does not fetch image URLs" in note and "--" not in note and sent == []
    assert "image_url" not in page.url and "URL" not in page.get_attribute("#q", "placeholder")
    page.fill("#q", picture)  # typed there, a URL is only words
    assert "text" in _posted(page, lambda: page.keyboard.press("Enter"))
    assert blocked == []


def test_click_a_caption_to_search_for_it(server, page, blocked):
    base, *_ = server
    page.goto(base + "/?like=5&k=6&safe=0")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 6")
    caption = page.inner_text("#grid .card >> nth=1 >> .caption")
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.post_data or "") if r.url.endswith("/api/search") else None)
    body = _posted(page, lambda: page.click("#grid .card >> nth=1 >> button.caption"))
    assert body["text"] == caption and "like" not in body  # the caption, not the card's more-like-this
    page.wait_for_function(f"document.getElementById('status').textContent.includes({json.dumps(caption)})")
    assert page.input_value("#q") == caption and "q=" in page.url and "like=" not in page.url
    assert len(sent) == 1 and blocked == []  # one search: the click did not reach the card


def test_hide_duplicate_urls_and_near_duplicate_images(server, dup_shard, page, blocked):
    base, *_ = server
    page.goto(base + "/?like=8000000000&k=11&safe=0")
    page.wait_for_function("document.querySelectorAll('#grid .card').length > 0")
    # on by default (clip-front): of the 11 rows, 4 urls; the best-ranked row of each url is shown
    assert page.is_checked("#hideurls") and _cards(page).count() == 4
    assert "hidden: 7 with a URL shown above" in page.inner_text("#status")
    srcs = page.eval_on_selector_all("#grid .card img", "els => els.map(e => e.getAttribute('src'))")
    assert len(set(srcs)) == 4
    page.uncheck("#hideurls")  # shown again without asking the server
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 11")
    assert "dupurls=1" in page.url
    body = _posted(page, lambda: page.check("#dedup"))  # near-duplicates: the server's deduplicate
    assert body["deduplicate"] is True and body["like"] == 8000000000
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 1")
    assert "10 near-duplicates" in page.inner_text("#status") and "dedup=1" in page.url
    page.goto(page.url)  # the link keeps both switches
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 1")
    assert page.is_checked("#dedup") and not page.is_checked("#hideurls")
    assert blocked == []


def test_download_results_as_json_and_csv(server, dup_shard, page, tmp_path):
    import csv

    base, *_ = server
    page.goto(base + "/?like=8000000000&k=11&safe=0&dupurls=1")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 11")
    shown = _ids(page)
    with page.expect_download() as dl:
        page.click("#download-json")
    data = json.loads(Path(dl.value.path()).read_text())
    assert [r["id"] for r in data["results"]] == shown and data["query"]["like"] == 8000000000
    assert {"rank", "distance", "id", "caption", "url"} <= set(data["results"][0])
    with page.expect_download() as dl:
        page.click("#download-csv")
    assert dl.value.suggested_filename.endswith(".csv")
    with open(dl.value.path(), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == shown and list(rows[0])[:5] == ["rank", "distance", "id", "caption", "url"]
    by_id = {int(r["id"]): r["caption"] for r in rows}
    assert by_id[8000000001] == dup_shard[1]  # quoted: comma and quotes survive
    assert by_id[8000000002] == "'" + dup_shard[2]  # a formula is defused
    page.check("#hideurls")  # the download is what the page shows
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 4")
    with page.expect_download() as dl:
        page.click("#download-json")
    assert [r["id"] for r in json.loads(Path(dl.value.path()).read_text())["results"]] == _ids(page)


@pytest.fixture(scope="module")
def sisap_server(tmp_path_factory):
    """A SISAP-style store (image embeddings only, no caption, no url) behind `laion serve` in its
    own process (one chDB store per process), without a CLIP model."""
    import queue
    import subprocess
    import sys
    import threading

    from laion_search.sources.synth import synth_sisap_h5

    from .conftest import free_port, run_cli

    root = tmp_path_factory.mktemp("sisap-page")
    synth_sisap_h5(root / "sisap.h5", 200, dim=16, seed=3)
    run_cli("ingest", str(root / "sisap.h5"), "--db", str(root / "db"), check=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "laion_search.cli", "serve", "--db", str(root / "db"), "--port",
                             str(port), "--model", str(root / "no-model")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    seen = []
    try:
        while not any("Uvicorn running on" in x for x in seen):
            try:
                seen.append(lines.get(timeout=120))  # a failure deadline, not a wait
            except queue.Empty:
                raise AssertionError("laion serve did not start:\n" + "".join(seen)) from None
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_image_only_store_shows_ids_and_normalises_a_text_link(sisap_server, page, blocked):
    """A SISAP-style table: cards show the row's id and distance (no caption, no url); a shared link
    asking for caption embeddings searches image embeddings, and the page says so once, in words."""
    page.goto(sisap_server + "/?like=5&k=6&modality=text&safe=0")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 6")
    assert page.input_value("#modality") == "image" and page.is_disabled("#modality option[value=text]")
    assert "modality=image" in page.url and "modality=text" not in page.url
    note = page.inner_text("#linknote")
    assert "no caption embeddings" in note and note.count("no caption embeddings") == 1
    status = page.inner_text("#status")
    assert page.get_attribute("#status", "class") != "error" and "6 results" in status
    assert "--" not in note + status  # words, not CLI flags
    captions = page.eval_on_selector_all("#grid .card .caption", "els => els.map(e => e.textContent)")
    ids = _ids(page)
    assert all(c == f"id {i} · distance " + c.rsplit(" ", 1)[-1] for c, i in zip(captions, ids))
    assert page.locator("#grid .card button.caption").count() == 0  # nothing to search for
    page.click("#grid .card >> nth=0")  # the next search: the note has been said
    page.wait_for_function("document.getElementById('status').textContent.includes('more like')")
    assert page.is_hidden("#linknote") and blocked == []


def test_keyword_box_alone_and_hybrid(server, page, blocked):
    """Caption words alone rank captions holding them; with a text query and hybrid, results say
    which side found them; a word no caption holds gives none; no CLIP model is needed for words."""
    from laion_search.index.text import tokenize

    base, _, store, nomodel = server
    word = store.rows("SELECT caption FROM laion ORDER BY id LIMIT 1")[0]["caption"].split()[0]
    page.goto(base + "/")
    _ready(page)
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
    _ready(page)
    page.fill("#words", "zzzqqqnotaword")
    page.press("#words", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('0 results')")
    assert blocked == []
