"""HTTP API in-process (httpx.ASGITransport), clip-retrieval compatibility, limits and safety."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from laion_search import connect  # noqa: E402
from laion_search.ingest import ingest  # noqa: E402
from laion_search.sources.synth import synth  # noqa: E402
from laion_search.clip.tiny import make_clip_model  # noqa: E402
from laion_search.web.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def web_store(tmp_path_factory):
    """300 synth rows with 16-d vectors (the tiny CLIP's dimension); rows 1 and 2 duplicate row 0."""
    root = tmp_path_factory.mktemp("web")
    model = str(make_clip_model(root / "tiny", "tiny"))
    shards = root / "shards"
    synth(shards, [0], 300, dim=16, seed=4)
    img = np.load(shards / "img_emb_0.npy")
    img[1] = img[0]
    img[2] = img[0]
    np.save(shards / "img_emb_0.npy", img)
    store = connect(root / "db")
    ingest(store, shards)
    yield store, model, root
    store.close()


def call(app, method: str, url: str, **kw) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.request(method, url, **kw)

    return asyncio.run(go())


def png_bytes(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, "PNG")
    return buf.getvalue()


def test_health_status_and_openapi(web_store):
    store, model, _ = web_store
    app = create_app(store, model=model)
    assert call(app, "GET", "/health").json() == {"status": "ok"}
    st = call(app, "GET", "/api/status").json()
    assert st["rows"] == 300 and st["dim"] == 16 and st["shards"][0]["shard"] == 0
    spec = call(app, "GET", "/openapi.json").json()
    assert {"/api/search", "/knn-service", "/metadata", "/indices-list", "/api/status"} <= set(spec["paths"])
    assert store.scalar("SELECT getSetting('max_execution_time')") == 30  # every query is time-bounded
    page = call(app, "GET", "/")
    assert page.status_code == 200 and "laion-search" in page.text and "<script>" in page.text


def test_search_every_query_kind(web_store):
    store, model, _ = web_store
    app = create_app(store, model=model)
    vec = np.load(web_store[2] / "shards" / "img_emb_0.npy")[10].astype(float).tolist()
    r = call(app, "POST", "/api/search", json={"vector": vec, "k": 5, "exact": True})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == 10 and len(r.json()["results"]) == 5
    r = call(app, "POST", "/api/search", json={"like": 10, "k": 3, "columns": ["NSFW", "width"]})
    assert r.status_code == 200 and 10 not in [x["id"] for x in r.json()["results"]]
    assert "width" in r.json()["results"][0]
    r = call(app, "POST", "/api/search", json={"text": "a dog and a cat", "k": 4, "nsfw": "exclude"})
    assert r.status_code == 200 and len(r.json()["results"]) == 4
    r = call(app, "GET", "/api/search", params={"text": "red car", "k": 2, "modality": "text"})
    assert r.status_code == 200 and r.json()["modality"] == "text"
    b64 = base64.b64encode(png_bytes()).decode()
    r = call(app, "POST", "/api/search", json={"image": "data:image/png;base64," + b64, "k": 3})
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    r = call(app, "POST", "/api/search/upload", files={"file": ("x.png", png_bytes(), "image/png")},
             data={"k": "2", "nsfw": "exclude"})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


@pytest.mark.parametrize("body,status,message", [
    ({"like": 1, "k": 0}, 400, "k must be between 1 and 1000"),
    ({"like": 1, "k": 100000}, 400, "k must be between"),
    ({"vector": [0.1, 0.2], "k": 3}, 400, "has 2 values"),
    ({"vector": [0.0] * 16}, 400, "all zeros"),
    ({"like": 987654321}, 400, "no row with id"),
    ({"text": "  "}, 400, "empty"),
    ({"text": "x" * 20000}, 422, "text"),
    ({}, 400, "exactly one query"),
    ({"like": 1, "text": "x"}, 400, "exactly one query"),
    ({"image": "%%%notbase64"}, 400, "not valid base64"),
    ({"image": base64.b64encode(b"GIF89a not really").decode()}, 400, "not a readable image"),
    ({"like": 1, "where": ["image_embedding=1"]}, 400, "not filterable"),
    ({"like": 1, "modality": "audio"}, 400, "modality"),
    ({"like": "1; DROP TABLE laion"}, 422, "like"),
])
def test_bad_input_is_a_json_4xx(web_store, body, status, message):
    store, model, _ = web_store
    app = create_app(store, model=model)
    r = call(app, "POST", "/api/search", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"] and "Traceback" not in r.text
    assert store.scalar("SELECT count() FROM laion") == 300


def test_upload_limits_and_types(web_store):
    store, model, _ = web_store
    app = create_app(store, model=model, max_body_bytes=100_000)
    r = call(app, "POST", "/api/search/upload", files={"file": ("a.txt", b"hello", "text/plain")})
    assert r.status_code == 400 and "not a readable image" in r.json()["error"]
    r = call(app, "POST", "/api/search/upload", files={"file": ("big.bin", b"0" * 200_000, "image/png")})
    assert r.status_code == 413
    r = call(app, "POST", "/api/search/upload", files={"file": ("e.png", b"", "image/png")})
    assert r.status_code == 400 and "empty" in r.json()["error"]


def test_clip_retrieval_knn_service(web_store):
    store, model, root = web_store
    app = create_app(store, model=model)
    assert call(app, "GET", "/indices-list").json() == ["laion"]
    vec = np.load(root / "shards" / "img_emb_0.npy")[0].astype(float).tolist()
    body = {"text": None, "image": None, "image_url": None, "embedding_input": vec, "modality": "image",
            "num_images": 5, "num_result_ids": 50, "indice_name": "laion", "deduplicate": False,
            "use_safety_model": False, "use_violence_detector": False, "aesthetic_score": "", "aesthetic_weight": "0.5",
            "use_mclip": False}
    r = call(app, "POST", "/knn-service", json=body)
    assert r.status_code == 200, r.text
    rows = r.json()
    assert {"id", "similarity", "url", "caption"} <= set(rows[0])
    assert {0, 1, 2} <= {x["id"] for x in rows[:3]} and rows[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    deduped = call(app, "POST", "/knn-service", json={**body, "deduplicate": True}).json()
    assert len(deduped) == 5 and len({0, 1, 2} & {x["id"] for x in deduped}) == 1
    api = call(app, "POST", "/api/search", json={"vector": vec, "k": 10, "deduplicate": True}).json()
    assert api["duplicates"] == 2 and len(api["results"]) == 8 and api["results"][0]["id"] in (0, 1, 2)
    assert len({0, 1, 2} & {x["id"] for x in api["results"]}) == 1
    assert [x["rank"] for x in api["results"]] == list(range(1, 9))
    assert "duplicates" not in call(app, "POST", "/api/search", json={"vector": vec, "k": 10}).json()
    safe = call(app, "POST", "/knn-service", json={**body, "num_images": 40, "use_safety_model": True}).json()
    meta = call(app, "POST", "/metadata", json={"indice_name": "laion", "ids": [x["id"] for x in safe]}).json()
    assert len(meta) == len(safe) and all(m["metadata"]["NSFW"] == "UNLIKELY" for m in meta)
    assert call(app, "POST", "/knn-service", json={"text": "a cat", "num_images": 3}).status_code == 200
    r = call(app, "POST", "/knn-service", json={"image_url": "http://127.0.0.1:9/x.png"})
    assert r.status_code == 400 and "disabled" in r.json()["error"]
    r = call(app, "POST", "/knn-service", json={"text": "a", "indice_name": "../../etc/passwd"})
    assert r.status_code == 400
    r = call(app, "POST", "/metadata", json={"ids": ["1 OR 1=1"]})
    assert r.status_code == 400


def test_image_url_when_enabled(web_store, tmp_path):
    import http.server
    import threading

    store, model, _ = web_store
    (tmp_path / "cat.png").write_bytes(png_bytes((10, 200, 10)))
    (tmp_path / "huge.png").write_bytes(b"0" * (11 * 1024 * 1024))
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        app = create_app(store, model=model, allow_image_url=True)
        r = call(app, "POST", "/knn-service", json={"image_url": base + "/cat.png", "num_images": 3})
        assert r.status_code == 200 and len(r.json()) == 3
        r = call(app, "POST", "/knn-service", json={"image_url": base + "/huge.png"})
        assert r.status_code == 400 and "over" in r.json()["error"]
        r = call(app, "POST", "/knn-service", json={"image_url": base + "/missing.png"})
        assert r.status_code == 400 and "HTTP 404" in r.json()["error"]
        r = call(app, "POST", "/knn-service", json={"image_url": "file:///etc/passwd"})
        assert r.status_code == 400 and "http(s)" in r.json()["error"]
        # /api/search takes image_url too (the page's search by image URL): the same answer as the upload
        assert call(app, "GET", "/api/status").json()["capabilities"]["image_url"]["ok"] is True
        by_url = call(app, "POST", "/api/search", json={"image_url": base + "/cat.png", "k": 4})
        assert by_url.status_code == 200, by_url.text
        upload = call(app, "POST", "/api/search/upload", data={"k": "4"},
                      files={"file": ("cat.png", png_bytes((10, 200, 10)), "image/png")}).json()
        assert [x["id"] for x in by_url.json()["results"]] == [x["id"] for x in upload["results"]]
        r = call(app, "GET", "/api/search", params={"image_url": base + "/cat.png", "k": 2})
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        r = call(app, "POST", "/api/search", json={"image_url": base + "/cat.png", "text": "a cat"})
        assert r.status_code == 400 and "exactly one query" in r.json()["error"]
        off = create_app(store, model=model)  # the default: no fetching, and /api/status says so
        assert call(off, "GET", "/api/status").json()["capabilities"]["image_url"]["ok"] is False
        r = call(off, "POST", "/api/search", json={"image_url": base + "/cat.png"})
        assert r.status_code == 400 and "disabled" in r.json()["error"]
    finally:
        httpd.shutdown()


def test_token_cors_and_sql_switches(web_store):
    store, model, _ = web_store
    app = create_app(store, model=model, token="s3cret")
    assert call(app, "GET", "/health").status_code == 200
    assert call(app, "GET", "/api/status").status_code == 401
    assert call(app, "GET", "/api/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert call(app, "GET", "/api/status", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert call(app, "GET", "/api/status?token=s3cret").status_code == 200
    # odd credentials are a 401, never a 500: a lower-case scheme works, non-ASCII does not match
    assert call(app, "GET", "/api/status", headers={"Authorization": "bearer s3cret"}).status_code == 200
    assert call(app, "GET", "/api/status?token=%C3%A9").status_code == 401
    assert call(app, "GET", "/api/status", headers={"Authorization": "Bearer s3cr\u00e9t".encode()}).status_code == 401
    assert call(app, "GET", "/api/status", headers={"Authorization": "Basic s3cret"}).status_code == 401
    big = call(app, "POST", "/api/search", headers={"Authorization": "Bearer s3cret", "Content-Length": "x"},
               content=b"{}")
    assert big.status_code in (400, 422)
    r = call(app, "GET", "/api/status", headers={"Authorization": "Bearer s3cret", "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers  # CORS off by default
    plain = create_app(store, model=model)
    assert call(plain, "POST", "/api/sql", json={"query": "SELECT 1"}).status_code == 404
    sql_app = create_app(store, model=model, allow_sql=True)
    ok = call(sql_app, "POST", "/api/sql", json={"query": "SELECT count() AS n FROM laion"})
    assert ok.status_code == 200 and ok.json()["rows"] == [{"n": 300}]
    # the url column is not the url() table function
    r = call(sql_app, "POST", "/api/sql", json={"query": "SELECT count() AS n FROM laion WHERE url != ''"})
    assert r.status_code == 200 and r.json()["rows"] == [{"n": 300}]
    cors = create_app(store, model=model, cors_origins=["https://ok.example"])
    r = call(cors, "GET", "/health", headers={"Origin": "https://ok.example"})
    assert r.headers.get("access-control-allow-origin") == "https://ok.example"


TABLE_CHECKSUM = ("SELECT count(), groupBitXor(cityHash64(id, url, caption, NSFW, similarity, image_embedding, "
                  "text_embedding)) FROM laion")

#: hostile statements and the reason each gets (all 400, the table unchanged)
HOSTILE_SQL = [
    ("SELECT count() FROM numbers(1e12) SETTINGS max_execution_time=0", "a SETTINGS clause is not allowed"),
    ("SELECT * FROM (SELECT count() FROM system.numbers SETTINGS max_rows_to_read=0)", "a SETTINGS clause is not allowed"),
    ("SELECT count() FROM numbers(1e12)", "would read more than 1,000,000,000 rows"),
    # endless sources are stopped by whichever limit they reach first: 1e9 rows, or the time limit
    # (1 s here) on a busy machine
    ("SELECT count() FROM system.numbers", ("would read more than 1,000,000,000 rows", "time limit (1 s)")),
    ("SELECT count() FROM generateRandom('a Int8')", ("would read more than 1,000,000,000 rows", "time limit (1 s)")),
    ("SELECT count() FROM zeros(10)", "the SQL endpoint is read-only"),
    ("SELECT 1 FORMAT JSON", "a FORMAT clause is not allowed (FORMAT JSON)"),
    ("SELECT id FROM laion LIMIT 1 FORMAT CSV;", "a FORMAT clause is not allowed (FORMAT CSV)"),
    ("SELECT 1; DROP TABLE laion", "one statement at a time"),
    ("SELECT 1; SELECT 2;", "one statement at a time"),
    ("INSERT INTO laion (id) VALUES (1)", "only SELECT statements (or WITH … SELECT) are allowed, not INSERT"),
    ("DROP TABLE laion", "not DROP"),
    ("ALTER TABLE laion DELETE WHERE 1", "not ALTER"),
    ("SELECT * FROM file('/etc/passwd', LineAsString)", "the table function file() is not allowed"),
    ("SELECT * FROM url/**/('http://127.0.0.1:9/', CSV)", "the table function url() is not allowed"),
    ("SELECT name FROM system.users", "system.users is not readable"),
    ("SELECT 1 INTO/* x */OUTFILE 'sql-out.csv'", "INTO OUTFILE is not allowed"),
    ("SELECT $$'$$ AS x SETTINGS readonly=0 -- '", "a SETTINGS clause is not allowed"),  # a heredoc is no string start
    ("SELECT 'unterminated", "unterminated quote"),
]


def test_sql_endpoint_keeps_its_limits(web_store, tmp_path, monkeypatch):
    """/api/sql: each hostile statement gets its own reason (400) and the table does not change;
    system tables and odd types answer JSON; the engine's read-only session holds the limits even
    for a statement that got past the token checks; the time limit is the server's."""
    store, model, _ = web_store
    monkeypatch.chdir(tmp_path)
    before = store.rows(TABLE_CHECKSUM)
    app = create_app(store, model=model, allow_sql=True, query_timeout=1)
    for query, reason in HOSTILE_SQL:
        r = call(app, "POST", "/api/sql", json={"query": query})
        reasons = reason if isinstance(reason, tuple) else (reason,)
        assert r.status_code == 400 and any(x in r.json()["error"] for x in reasons), (query, r.text)
    assert not (tmp_path / "sql-out.csv").exists()
    assert store.rows(TABLE_CHECKSUM) == before
    r = call(app, "POST", "/api/sql", json={"query": "SELECT name FROM system.tables WHERE database = currentDatabase()"})
    assert r.status_code == 200 and {"laion", "laion_shards"} <= {x["name"] for x in r.json()["rows"]}
    r = call(app, "POST", "/api/sql", json={"query": "SELECT toInt64(9223372036854775807) AS big, [1.5, nan] AS a, "
                                                     "'a\\xff' AS s, getSetting('readonly') AS ro"})
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [{"big": 2**63 - 1, "a": [1.5, None], "s": "a\ufffd", "ro": 1}]
    assert r.json()["types"] == ["Int64", "Array(Float64)", "String", "UInt8"]
    r = call(app, "POST", "/api/sql", json={"query": "SELECT number FROM numbers(20000)"})
    assert r.status_code == 200 and len(r.json()["rows"]) == 10_000 and r.json()["truncated"] is True
    r = call(app, "POST", "/api/sql", json={"query": "SELECT sleepEachRow(0.5) FROM numbers(5)"})
    assert r.status_code == 400 and "time limit (1 s)" in r.json()["error"]
    r = call(app, "POST", "/api/sql", json={"sql": "SELECT 1"})
    assert r.status_code == 422 and "query" in r.json()["error"]
    spec = call(app, "GET", "/openapi.json").json()
    body = spec["components"]["schemas"]["SqlBody"]
    assert body["required"] == ["query"] and body["properties"]["query"]["maxLength"] == 20_000
    # past the token checks, the engine's read-only session still refuses a settings change
    from laion_search.errors import QueryError
    from laion_search.sql import SqlLimits

    with pytest.raises(QueryError, match="Cannot modify 'max_execution_time' setting in readonly mode"):
        store.backend.query_raw("SELECT count() FROM laion SETTINGS max_execution_time = 0",
                                settings=SqlLimits(seconds=1).settings(), readonly=True)
    assert store.scalar("SELECT getSetting('readonly')") == 0  # the pool's sessions are not read-only
    assert store.rows(TABLE_CHECKSUM) == before


def test_engine_failure_is_a_clean_500(web_store, monkeypatch):
    store, model, _ = web_store
    app = create_app(store, model=model)

    def boom(*a, **kw):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr("laion_search.web.routes.search", boom)
    r = call(app, "POST", "/api/search", json={"like": 1})
    assert r.status_code == 500 and r.json() == {"error": "internal error"}
    assert "secret" not in r.text




def test_knn_service_is_one_statement_like_api_search(web_store, monkeypatch):
    """/knn-service reads clip-back's metadata (and, to deduplicate, the embeddings) in the search's
    own statement: it runs as many engine statements as /api/search for the same query."""
    store, model, root = web_store
    app = create_app(store, model=model, cache_size=0)
    vec = np.load(root / "shards" / "img_emb_0.npy")[0].astype(float).tolist()
    statements: list[str] = []
    real = store.backend.query_arrow

    def counting(sql, *args, **kw):
        statements.append(sql)
        return real(sql, *args, **kw)

    call(app, "POST", "/api/search", json={"vector": vec, "k": 5})  # caches of the store's shape, warm
    monkeypatch.setattr(store.backend, "query_arrow", counting)
    for route, body in (("/api/search", {"vector": vec, "k": 20, "nsfw": "exclude"}),
                        ("/knn-service", {"embedding_input": vec, "num_images": 20, "use_safety_model": True}),
                        ("/knn-service", {"embedding_input": vec, "num_images": 20, "deduplicate": True})):
        statements.clear()
        r = call(app, "POST", route, json=body)
        assert r.status_code == 200, r.text
        assert len(statements) == 1, (route, body, statements)
    rows = r.json()
    assert {"url", "caption", "NSFW", "id", "similarity"} <= set(rows[0]) and len({x["id"] for x in rows}) == len(rows)
    meta = {m["id"]: m["metadata"] for m in call(app, "POST", "/metadata", json={"ids": [x["id"] for x in rows]}).json()}
    assert all({c: x[c] for c in ("url", "caption", "NSFW")} == meta[x["id"]] for x in rows)
