"""Hostile queries and fuzzing, through the Python API, the CLI and the HTTP API.

* every user value reaches the engine as a query parameter: the SQL text the engine receives
  (recorded by a spy on the session) never contains a payload;
* each payload is a literal value: the rows a search returns are those a Python reference finds
  with the payload taken literally (none for "caption equals it", the nearest for "differs from it");
* SQL-injection payloads, bad k, bad vectors, unknown ids, empty and 1 MB text, non-images,
  decompression bombs, path traversal: a clear 4xx / UsageError / exit 2, never a crash or a
  traceback, and the table is unchanged (row count + a hash of every value of every column);
* hypothesis: query builders (WHERE clauses only ever hold fixed tokens), parameter round trips
  through the engine, searches with generated filters;
* schemathesis: generated requests (valid and invalid) for every operation in the server's
  OpenAPI schema through ``call_and_validate``: zero 5xx, every answer as the schema documents it,
  valid requests answered 2xx and invalid ones 4xx, search answers checked against the table
  (≥ 1,000 requests; 5,000+ with LAION_SLOW_TESTS=1).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import struct
import zlib

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("torch")

from laion_search import connect  # noqa: E402
from laion_search.ingest import ingest  # noqa: E402
from laion_search.errors import EncoderError, LaionError, UsageError  # noqa: E402
from laion_search.schema import WHERE_TYPES  # noqa: E402
from laion_search.search import Filters, SearchOptions, build_where, search  # noqa: E402
from laion_search.sources.synth import synth  # noqa: E402
from laion_search.clip.tiny import make_clip_model  # noqa: E402
from laion_search.web.app import create_app  # noqa: E402

from .conftest import free_port, run_cli  # noqa: E402
from .crash_harness import record_figures, slow  # noqa: E402

ROWS, DIM = 300, 16

PAYLOADS = [
    "'; DROP TABLE laion; --",
    "' OR '1'='1",
    "1 OR 1=1",
    "x') OR 1=1 --",
    "\\'; DROP TABLE laion; --",
    "\\",
    "{evil:String}",
    "{q:Array(Float32)}) --",
    "}) UNION ALL SELECT name FROM system.tables --",
    "`; SYSTEM SHUTDOWN; `",
    "laion WHERE 1=1; TRUNCATE TABLE laion",
    "/* comment */ SELECT 1",
    "tab\there\nnewline\r\nnul\0byte",
    "\u202eRTL override \u4e50\u9ad8 \U0001f431",
    "%s %d %(x)s ${x} $(rm -rf /)",
    "' || file('/etc/passwd') || '",
    "x" * 5000,
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("queries")
    model = str(make_clip_model(root / "tiny", "tiny"))
    synth(root / "shards", [0], ROWS, dim=DIM, seed=41)
    store = connect(root / "db")
    try:
        ingest(store, root / "shards")
        yield store, model, root
    finally:
        store.close()


def checksum(store):
    """The table's content: its row count and a hash of every value of every column, and the
    shards' bookkeeping."""
    main = store.rows("SELECT count() AS n, sum(cityHash64(*)) AS h, groupBitXor(cityHash64(*)) AS x FROM laion")[0]
    return {**main, "shards": store.rows("SELECT * FROM laion_shards FINAL ORDER BY shard")}


class Spy:
    """Records the SQL text and parameters of every statement any chDB session receives."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []


@pytest.fixture
def spy(env, monkeypatch):
    import chdb.session

    s = Spy()
    original = chdb.session.Session.query

    def query(self, sql, fmt="CSV", *args, **kw):
        s.calls.append((sql, dict(kw.get("params") or {})))
        return original(self, sql, fmt, *args, **kw)

    monkeypatch.setattr(chdb.session.Session, "query", query)
    return s


def _assert_only_params(spy: Spy, payload: str) -> None:
    for sql, params in spy.calls:
        # a payload may share a short piece with the fixed SQL ("1", "x"): check the distinctive ones
        if len(payload) >= 6:
            assert payload not in sql, f"payload reached SQL text: {sql[:300]}"
    from laion_search.backends import format_param

    sent = [str(v) for _, params in spy.calls for v in params.values()]
    assert any(payload in v or format_param(payload) in v for v in sent) or len(payload) < 6


# -- what a search with hostile filters must return, worked out here from the table's rows ------------------
def _literal(value: str) -> str:
    """A --where value as the grammar reads it: surrounding blanks dropped, then one pair of quotes."""
    value = value.strip()
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value


def _expected_ids(table_rows: list[dict], like: int, k: int, *, contains: str | None = None,
                  equal: dict[str, str] | None = None, differ: dict[str, str] | None = None,
                  substr: dict[str, str] | None = None) -> list[int]:
    """The ids an exact search "more like row ``like``" must return when every payload is taken as
    a literal value: the rows that pass, nearest first (numpy), at most ``k``."""
    by_id = {r["id"]: r for r in table_rows}
    q = np.asarray(by_id[like]["image_embedding"], np.float64)

    def ok(r: dict) -> bool:
        return (r["id"] != like and (not contains or contains.lower() in r["caption"].lower())
                and all(r[c] == v for c, v in (equal or {}).items())
                and all(r[c] != v for c, v in (differ or {}).items())
                and all(v.lower() in r[c].lower() for c, v in (substr or {}).items()))

    def dist(r: dict) -> float:
        v = np.asarray(r["image_embedding"], np.float64)
        return 1 - v @ q / (np.linalg.norm(v) * np.linalg.norm(q))

    return [r["id"] for r in sorted((r for r in table_rows if ok(r)), key=dist)[:k]]


# -- Python API ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_python_api_payloads_are_parameters(env, spy, table_rows, payload):
    """Each payload reaches the engine as a parameter and means what it says, no more: the rows
    returned are exactly those a Python reference finds with the payload as a literal value (none
    for "caption equals / contains it"; the nearest for "caption differs from it"), and the table's
    content is unchanged."""
    store = env[0]
    before = checksum(store)
    res = search(store, like=5, k=5, exact=True,
                 filters=Filters(caption_contains=payload, where=[f"caption={payload}", f"url~{payload}",
                                                                  f"LICENSE!={payload}"]))
    assert [r["id"] for r in res.rows] == _expected_ids(
        table_rows, 5, 5, contains=payload, equal={"caption": _literal(payload)},
        substr={"url": _literal(payload)}, differ={"LICENSE": _literal(payload)})
    _assert_only_params(spy, payload)
    spy.calls.clear()
    res = search(store, like=5, k=5, exact=True, filters=Filters(caption_contains=payload))  # as plain text
    assert [r["id"] for r in res.rows] == _expected_ids(table_rows, 5, 5, contains=payload)
    _assert_only_params(spy, payload)
    spy.calls.clear()
    # a payload that matches nothing, negated: every row passes, so the answer is the plain nearest 5
    res = search(store, like=5, k=5, exact=True, filters=Filters(where=[f"caption!={payload}", f"LICENSE<>{payload}"]))
    want = _expected_ids(table_rows, 5, 5, differ={"caption": _literal(payload), "LICENSE": _literal(payload)})
    assert [r["id"] for r in res.rows] == want and len(want) == 5
    _assert_only_params(spy, _literal(payload))  # only --where values: as the grammar reads them
    assert checksum(store) == before
    record_figures("hostile query", via="python", case=f"payload {payload[:40]!r}")


@pytest.mark.parametrize("kwargs,message", [
    ({"like": 5, "k": 0}, "k must be between 1 and 1000"),
    ({"like": 5, "k": -3}, "k must be between 1 and 1000"),
    ({"like": 5, "k": 10**12}, "k must be between 1 and 1000"),
    ({"like": 5, "k": "5; DROP TABLE laion"}, "k must be an integer"),
    ({"like": 5, "k": 2.5}, "k must be an integer"),
    ({"like": 5, "k": None}, "k must be an integer"),
    ({"like": 5, "k": True}, "k must be an integer"),
    ({"vector": [], "k": 3}, "is empty"),
    ({"vector": [0.1] * 5}, "has 5 values, the table holds 16-d"),
    ({"vector": [float("nan")] * DIM}, "contains NaN or Inf"),
    ({"vector": [float("inf")] + [0.0] * (DIM - 1)}, "contains NaN or Inf"),
    ({"vector": [0.0] * DIM}, "all zeros"),
    ({"vector": ["a"] * DIM}, "must be a list of numbers"),
    ({"vector": [[0.1] * DIM]}, "1-D"),
    ({"like": 987654321}, "no row with id 987654321"),
    ({"like": 2**70}, "out of range"),
    ({"like": -(2**63) - 1}, "out of range"),
    ({"like": "7 OR 1=1"}, "id must be an integer"),
    ({"like": 5, "modality": "image_embedding); DROP TABLE laion; --"}, "modality must be one of"),
    ({"like": 5, "metric": "cosineDistance"}, "metric must be one of"),
    ({"like": 5, "filters": Filters(nsfw="'; DROP TABLE laion")}, "nsfw must be one of"),
    ({"like": 5, "filters": Filters(where=["width>=1 OR 1=1"])}, "width is a number"),
    ({"like": 5, "filters": Filters(where=["id; DROP TABLE laion=1"])}, "expected COLUMN OP VALUE"),
    ({"like": 5, "filters": Filters(where=["image_embedding=1"])}, "not filterable"),
    ({"like": 5, "filters": Filters(where=["width>=99999999999"])}, "out of range for width"),
    ({"like": 5, "filters": Filters(where=["similarity>nan"])}, "must be finite"),
    ({"like": 5, "filters": Filters(min_similarity=float("inf"))}, "finite"),
    ({"like": 5, "columns": ["id; DROP TABLE laion"]}, "unknown column"),
    ({"like": 5, "columns": ["image_embedding"]}, "unknown column"),
    ({"like": 5, "options": SearchOptions(filter_strategy="x'")}, "filter strategy"),
    ({"text": ""}, "empty"),
    ({"text": "   "}, "empty"),
    ({"image": b"not an image at all"}, "not a readable image"),
    ({"image": b""}, "not a readable image"),
])
def test_python_api_bad_values(env, kwargs, message):
    store, model, _ = env
    before = checksum(store)
    with pytest.raises((UsageError, EncoderError), match=re.escape(message)):
        search(store, model=model, **kwargs)
    assert checksum(store) == before
    record_figures("hostile query", via="python", case=message)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width × height pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    idat = zlib.compress(b"\0" * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def real_bomb() -> bytes:
    """A real one: 9000 × 9000 1-bit PNG of zeros, ~10 KB compressed, 81 megapixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def test_text_and_image_extremes(env):
    store, model, _ = env
    before = checksum(store)
    big = "a dog and a cat " * 65536  # 1 MB: truncated to the model's context, not an error
    assert len(big) >= 1_000_000
    assert len(search(store, text=big, model=model, k=3).rows) == 3
    assert len(search(store, text="\0\x1b[31m\u202e", model=model, k=3).rows) == 3
    for bomb in (png_claiming(100_000, 100_000), real_bomb()):
        assert len(bomb) < 200_000
        with pytest.raises(EncoderError, match="pixels is over the limit|decompression bomb"):
            search(store, image=bomb, model=model)
    record_figures("hostile query", via="python", case="1 MB text, control characters, 2 bombs, missing path", n=5)
    with pytest.raises(EncoderError, match="cannot read"):
        search(store, image="/nonexistent/../../etc/shadow-not-here.png", model=model)
    assert checksum(store) == before


# -- CLI -------------------------------------------------------------------------------------------------
def test_cli_hostile_values(env, tmp_path):
    store, model, root = env
    # the CLI runs in its own process: it needs the store to itself, so this test works on a copy
    db = tmp_path / "db"
    run_cli("ingest", str(root / "shards"), "--db", str(db), check=True)
    base = ["--db", str(db)]
    ok = run_cli("search", "--like", "5", "--k", "3", "--json", "--caption-contains", PAYLOADS[0],
                 "--where", f"caption={PAYLOADS[1]}", "--where", f"url~{PAYLOADS[8]}", *base)
    assert ok.returncode == 0, ok.stderr
    bad = {
        ("search", "--like", "5", "--k", "-5"): "k must be between",
        ("search", "--like", "5", "--k", "0"): "k must be between",
        ("search", "--like", "5", "--where", "width>=1 OR 1=1"): "is a number",
        ("search", "--like", "5", "--column", "id;DROP TABLE laion"): "unknown column",
        ("search", "--like", "987654321"): "no row with id",
        ("search", "--vector", "/etc/passwd"): "not valid JSON",
        ("search", "--vector", str(tmp_path / "../../nope.npy")): "cannot read vector file",
    }
    for args, message in bad.items():
        p = run_cli(*args, *base)
        assert p.returncode in (1, 2), (args, p.stderr)
        assert message in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
        assert "root:x:0:0" not in p.stderr + p.stdout
    vec = tmp_path / "nan.json"
    vec.write_text("[NaN" + ", 0.1" * (DIM - 1) + "]")
    p = run_cli("search", "--vector", str(vec), *base)
    assert p.returncode == 2 and "contains NaN or Inf" in p.stderr
    record_figures("hostile query", via="cli", case="payloads, k, where, column, modality, vector/image files",
                   n=len(bad) + 2)
    count = run_cli("sql", "SELECT count() AS n FROM laion", "--format", "json", *base, check=True)
    assert f'"n": {ROWS}' in count.stdout.replace('"n":{ROWS}', f'"n": {ROWS}'), count.stdout


# -- HTTP API -------------------------------------------------------------------------------------------
def call(app, method, url, **kw) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://test") as c:
            return await c.request(method, url, **kw)
    return asyncio.run(go())


def _hostile_requests(root):
    vec = np.load(root / "shards" / "img_emb_0.npy")[3].astype(float).tolist()
    reqs = []
    for p in PAYLOADS:
        reqs += [
            ("POST", "/api/search", {"json": {"like": 3, "caption_contains": p, "where": [f"caption={p}"]}}),
            ("POST", "/api/search", {"json": {"like": 3, "where": [p]}}),
            ("POST", "/api/search", {"json": {"like": 3, "columns": [p]}}),
            ("POST", "/api/search", {"json": {"like": 3, "modality": p, "metric": p, "nsfw": p}}),
            ("POST", "/api/search", {"json": {"text": p[:10000]}}),
            ("GET", "/api/search", {"params": {"text": p[:10000], "caption_contains": p}}),
            ("GET", "/api/search", {"params": {"like": p}}),
            ("POST", "/knn-service", {"json": {"text": p[:10000], "indice_name": p}}),
            ("POST", "/metadata", {"json": {"ids": [p]}}),
        ]
    nan_body = '{"vector": [NaN' + ", 0.1" * (DIM - 1) + '], "k": 3}'
    inf_body = '{"vector": [Infinity' + ", 0.1" * (DIM - 1) + '], "k": 3}'
    reqs += [
        ("POST", "/api/search", {"json": {"like": 3, "k": k}}) for k in (0, -1, -(2**63), 10**6, 2**64, "5")
    ] + [
        ("POST", "/api/search", {"json": {"vector": v, "k": 3}}) for v in ([], [0.1] * 3, [0.0] * DIM, ["x"] * DIM,
                                                                          [[0.1] * DIM], vec * 200)
    ] + [
        ("POST", "/api/search", {"content": nan_body, "headers": {"content-type": "application/json"}}),
        ("POST", "/api/search", {"content": inf_body, "headers": {"content-type": "application/json"}}),
        ("POST", "/api/search", {"json": {"like": 987654321}}),
        ("POST", "/api/search", {"json": {"like": 2**70}}),
        ("POST", "/api/search", {"json": {"like": 3, "ef_search": -5}}),
        ("POST", "/api/search", {"json": {"text": ""}}),
        ("POST", "/api/search", {"json": {"text": "x" * 1_000_000}}),
        ("GET", "/api/search", {"params": {"text": "x" * 20000}}),
        ("POST", "/api/search", {"json": {"image": "/etc/passwd"}}),
        ("POST", "/api/search", {"json": {"image": "file:///etc/passwd"}}),
        ("POST", "/api/search", {"json": {"image": "Li4vLi4vZXRjL3Bhc3N3ZA=="}}),  # "../../etc/passwd"
        ("POST", "/api/search", {"json": {"image": base64.b64encode(png_claiming(100_000, 100_000)).decode()}}),
        ("POST", "/api/search", {"json": {"image": base64.b64encode(real_bomb()).decode()}}),
        ("POST", "/api/search", {"content": b"\xff\xfe{not json", "headers": {"content-type": "application/json"}}),
        ("POST", "/api/search", {"content": b"[1, 2, 3]", "headers": {"content-type": "application/json"}}),
        ("POST", "/api/search", {"content": b"like=3", "headers": {"content-type": "text/plain"}}),
        ("POST", "/api/search/upload", {"files": {"file": ("../../../etc/passwd", b"root:x:0:0", "image/png")}}),
        ("POST", "/api/search/upload", {"files": {"file": ("bomb.png", real_bomb(), "image/png")}}),
        ("POST", "/api/search/upload", {"files": {"file": ("x.png", png_claiming(70_000, 70_000), "image/png")}}),
        ("POST", "/api/search/upload", {"files": {"file": ("a.txt", b"plain text", "text/plain")}}),
        ("POST", "/api/search/upload", {"files": {"file": ("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                                           "image/svg+xml")}}),
        ("POST", "/api/search/upload", {"data": {"k": "3"}}),
        ("POST", "/api/search/upload", {"files": {"file": ("x.png", b"\x89PNG\r\n\x1a\n", "image/png")},
                                        "data": {"k": "-1"}}),
        ("POST", "/knn-service", {"json": {"text": "a", "num_images": -5, "num_result_ids": 10**9}}),
        ("POST", "/knn-service", {"json": {"text": "a", "num_images": 10**9}}),
        ("POST", "/knn-service", {"json": {"image_url": "file:///etc/passwd"}}),
        ("POST", "/knn-service", {"json": {"embedding_input": [float("1e39")] * DIM}}),
        ("POST", "/metadata", {"json": {"ids": [2**70]}}),
        ("POST", "/metadata", {"json": {"ids": list(range(5000))}}),
        ("POST", "/metadata", {"json": {"ids": "1,2,3"}}),
        ("POST", "/metadata", {"json": [1, 2]}),
        ("POST", "/api/sql", {"json": {"query": "DROP TABLE laion"}}),
        ("GET", "/../../etc/passwd", {}),
        ("GET", "/%2e%2e/%2e%2e/etc/passwd", {}),
        ("GET", "/static/..%2f..%2f..%2fetc%2fpasswd", {}),
        ("GET", "/docs/../../etc/passwd", {}),
        ("GET", "/api/search", {"params": {"like": "3", "k": "nan"}}),
        ("DELETE", "/api/search", {}),
        ("PUT", "/metadata", {"json": {"ids": [1]}}),
    ]
    return reqs


def _check_hostile_answer(method: str, url: str, kw: dict, r: httpx.Response) -> None:
    assert r.status_code < 500, (method, url, str(kw)[:200], r.status_code, r.text[:300])
    assert "Traceback" not in r.text and "root:x:0:0" not in r.text and 'File "' not in r.text, r.text[:300]
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        assert isinstance(r.json().get("error", r.json().get("detail")), str), r.text[:300]


def test_http_hostile_requests(env):
    store, model, root = env
    app = create_app(store, model=model, max_body_bytes=16 * 1024 * 1024)
    before = checksum(store)
    reqs = _hostile_requests(root)
    statuses: dict[int, int] = {}
    for method, url, kw in reqs:
        r = call(app, method, url, **kw)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        _check_hostile_answer(method, url, kw, r)
    assert checksum(store) == before
    assert sum(v for k, v in statuses.items() if k >= 400) >= len(reqs) // 2, statuses
    record_figures("hostile query", via="http", case="hostile requests", n=len(reqs), statuses=statuses)


def test_http_payloads_are_parameters(env, spy, table_rows):
    """Over HTTP too, each payload is a literal value: no row matches "caption equals / contains it",
    every row matches "caption differs from it" (the answer is then the plain nearest rows, as a
    Python reference computes them), and the table's content is unchanged."""
    store, model, _ = env
    app = create_app(store, model=model)
    before = checksum(store)
    for p in PAYLOADS:
        spy.calls.clear()
        p = p[:1000]  # the API's limit for caption_contains
        r = call(app, "POST", "/api/search", json={"like": 3, "k": 3, "exact": True, "caption_contains": p,
                                                   "where": [f"caption={p}", f"LICENSE~{p}"]})
        assert r.status_code == 200, r.text
        assert [x["id"] for x in r.json()["results"]] == _expected_ids(
            table_rows, 3, 3, contains=p, equal={"caption": _literal(p)}, substr={"LICENSE": _literal(p)})
        _assert_only_params(spy, p)
        spy.calls.clear()
        r = call(app, "POST", "/api/search", json={"like": 3, "k": 3, "exact": True, "where": [f"caption!={p}"]})
        want = _expected_ids(table_rows, 3, 3, differ={"caption": _literal(p)})
        assert r.status_code == 200 and [x["id"] for x in r.json()["results"]] == want and len(want) == 3, r.text
        _assert_only_params(spy, _literal(p))
    assert checksum(store) == before


# -- hypothesis: query builders and the parameter path ------------------------------------------------------
_PLACEHOLDER = re.compile(r"\{[a-z_0-9]+:(String|Float32|Int32|Int64|UInt32|Array\(Int64\))\}")
_ALLOWED = re.compile(r"^(?:\s|AND|NOT|IN|NSFW|similarity|positionCaseInsensitiveUTF8|caption|id|P|\(|\)|,|>|<|=|!|"
                      r"'NSFW'|'UNSURE'|0|`[A-Za-z_]+`)*$")
ALLOWED_COLS = {f"`{c}`" for c in WHERE_TYPES}

text_values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


# hypothesis leans towards the ends of an integer range; a list draws its items evenly
ONE_IN_TEN = st.sampled_from([False] * 9 + [True])
ONE_IN_FIVE = st.sampled_from([False] * 4 + [True])


@st.composite
def where_exprs(draw):
    """Hostile expressions that are mostly well-formed: an allow-listed column with a value of its
    type most of the time (its text is still anything), garbage otherwise."""
    col = draw(st.text(max_size=12) if draw(ONE_IN_TEN) else st.sampled_from(sorted(WHERE_TYPES)))
    if col in WHERE_TYPES and not draw(ONE_IN_TEN):
        kind = WHERE_TYPES[col]
        if kind == "String":
            op = draw(st.sampled_from(["=", "==", "!=", "<>", "<", "<=", ">", ">=", "~", " ~ "]))
            value = draw(text_values)
        else:
            op = draw(st.sampled_from(["=", "==", "!=", "<>", "<", "<=", ">", ">="]))
            value = str(draw(st.floats(-1e6, 1e6)) if kind.startswith("Float") else draw(st.integers(0, 2**31 - 1)))
        return f"{col}{op}{value}"
    op = draw(st.sampled_from(["=", "==", "!=", "<>", "<", "<=", ">", ">=", "~", "=>", " LIKE "]))
    value = draw(st.one_of(text_values, st.integers().map(str), st.floats().map(str)))
    return f"{col}{op}{value}"


@st.composite
def _nsfw(draw):
    return draw(st.text(max_size=8) if draw(ONE_IN_TEN) else st.sampled_from(["any", "exclude", "only"]))


filters_strategy = st.builds(
    Filters,
    nsfw=_nsfw(),
    min_similarity=st.one_of(st.none(), st.floats(-1, 1), st.floats(-1, 1), st.floats()),
    caption_contains=st.one_of(st.none(), text_values),
    where=st.lists(where_exprs(), max_size=3),
    exclude_ids=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
)

FUZZ = {"builder": 2000 if slow() else 400, "roundtrip": 600 if slow() else 150, "engine": 300 if slow() else 60}
FUZZ_DONE = {"builder": 0, "roundtrip": 0, "engine": 0}


@pytest.fixture(scope="module", autouse=True)
def _fuzz_figures():
    """The fuzz counts for scripts/reliability_report.py, once the module's tests have run."""
    yield
    record_figures("query fuzz", **FUZZ_DONE)


def test_build_where_only_emits_fixed_tokens():
    tally = {"accepted": 0, "rejected": 0}

    @hyp_seed(7)
    @settings(max_examples=FUZZ["builder"], deadline=None, database=None)
    @given(filters=filters_strategy)
    def run(filters):
        FUZZ_DONE["builder"] += 1
        try:
            clause, params = build_where(filters)
        except UsageError as exc:
            assert str(exc), "a refusal says why"
            tally["rejected"] += 1
            return
        tally["accepted"] += 1
        skeleton = _PLACEHOLDER.sub("P", clause)
        assert _ALLOWED.match(skeleton), clause
        assert set(re.findall(r"`[^`]*`", skeleton)) <= ALLOWED_COLS
        assert len(_PLACEHOLDER.findall(clause)) == len(params)  # one parameter per placeholder
        for v in params.values():  # every value went out as a parameter, typed
            assert isinstance(v, (str, int, float, list))

    run()
    assert tally["accepted"] >= tally["rejected"], tally  # the generator mostly builds valid filters


@hyp_seed(8)
@settings(max_examples=FUZZ["roundtrip"], deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=text_values, arr=st.lists(text_values, max_size=4),
       vec=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=8))
def test_parameters_round_trip_through_the_engine(env, s, arr, vec):
    FUZZ_DONE["roundtrip"] += 1
    store = env[0]
    got = store.rows("SELECT {s:String} AS s, {a:Array(String)} AS a, {v:Array(Float32)} AS v",
                     {"s": s, "a": arr, "v": vec})[0]
    assert got["s"] == s and got["a"] == arr
    assert np.array_equal(np.array(got["v"], np.float32), np.array(vec, np.float32))


# -- generated searches: mostly valid filters, with bad pieces mixed in; each accepted search is
#    checked against the same filters evaluated here in Python, each rejection must have a cause
_NUM_OPS = ["=", "==", "!=", "<>", "<", "<=", ">", ">="]


@pytest.fixture(scope="module")
def table_rows(env):
    store = env[0]
    rows = store.rows("SELECT id, image_embedding, text_embedding, " + ", ".join(f"`{c}`" for c in WHERE_TYPES if c != "id")
                      + " FROM laion ORDER BY id")
    return rows


@st.composite
def where_pieces(draw, rows):
    """(expression, valid): a column/op/value drawn from the table's own values, or a bad piece."""
    if draw(ONE_IN_TEN):  # something the parser must refuse
        bad = draw(st.sampled_from(["nocolumn=1", "width=wide", "similarity~x", "width=99999999999", "=5",
                                    "similarity=inf", "shard_row>-1"]))
        return bad, False
    col = draw(st.sampled_from(sorted(WHERE_TYPES)))
    value = draw(st.sampled_from(rows))[col]
    if WHERE_TYPES[col] == "String":
        op = draw(st.sampled_from([*_NUM_OPS, "~"]))
        text = str(value)
        if op == "~" and text:
            a = draw(st.integers(0, len(text) - 1))
            text = text[a:a + draw(st.integers(1, 8))]
        text = text.strip().replace("'", "").replace('"', "")
        return f"{col}{op}{text}", True
    op = draw(st.sampled_from(_NUM_OPS))
    if WHERE_TYPES[col].startswith("Float"):
        value = float(np.float32(value) + np.float32(draw(st.sampled_from([0.0, -0.01, 0.01]))))
        return f"{col}{op}{value!r}", True
    number = int(value) + draw(st.sampled_from([0, -1, 1]))
    return f"{col} {op} {number}", not (WHERE_TYPES[col].startswith("UInt") and number < 0)  # -1: out of range


def _python_match(row: dict, f: Filters) -> bool:
    """The filters' meaning, written again independently of build_where."""
    if f.nsfw == "exclude" and row["NSFW"] in ("NSFW", "UNSURE"):
        return False
    if f.nsfw == "only" and row["NSFW"] != "NSFW":
        return False
    if f.min_similarity is not None and not np.float32(row["similarity"]) >= np.float32(f.min_similarity):
        return False
    if f.caption_contains and f.caption_contains.lower() not in row["caption"].lower():
        return False
    if getattr(f, "words", None) is not None:  # the reference tokenizer (checked against the engine's in test_words)
        from laion_search.index.text import matches, tokenize

        want = tokenize(f.words)
        if not matches(row["caption"], want if f.words_mode == "phrase" else list(dict.fromkeys(want)), f.words_mode):
            return False
    if row["id"] in f.exclude_ids:
        return False
    for expr in f.where:
        m = re.match(r"^\s*(\w+)\s*(==|=|!=|<>|<=|>=|<|>|~)\s*(.*?)\s*$", expr)
        col, op, raw = m.group(1), m.group(2), m.group(3)
        have = row[col]
        if op == "~":
            ok = raw.lower() in str(have).lower()
        else:
            kind = WHERE_TYPES[col]
            want = raw if kind == "String" else np.float32(raw) if kind.startswith("Float") else int(raw)
            if kind.startswith("Float"):
                have = np.float32(have)
            ok = {"=": have == want, "==": have == want, "!=": have != want, "<>": have != want, "<": have < want,
                  "<=": have <= want, ">": have > want, ">=": have >= want}[op]
        if not ok:
            return False
    return True


def test_generated_searches_return_what_their_filters_allow(env, table_rows):
    store = env[0]
    by_id = {r["id"]: r for r in table_rows}
    ids = sorted(by_id)
    tally = {"accepted": 0, "rejected": 0, "rows_checked": 0}

    @hyp_seed(9)
    @settings(max_examples=FUZZ["engine"], deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.data(), exact=st.booleans(), modality=st.sampled_from(["image", "text"]))
    def run(data, exact, modality):
        FUZZ_DONE["engine"] += 1
        where = data.draw(st.lists(where_pieces(table_rows), max_size=3))
        nsfw = data.draw(st.sampled_from(["any", "exclude", "only"]))
        min_sim = data.draw(st.one_of(st.none(), st.floats(0.0, 0.6)))
        contains = data.draw(st.one_of(st.none(), st.sampled_from([r["caption"].split()[0] for r in table_rows[:20]]),
                                       st.sampled_from(["a", "e", "zzzz"])))
        k = data.draw(st.one_of(st.integers(1, 60), st.integers(1, ROWS + 20)))
        like = data.draw(st.sampled_from(ids))
        excluded = data.draw(st.lists(st.sampled_from(ids), max_size=3))
        # one search in five gets one bad knob, on top of the bad where pieces
        spoil = "" if not data.draw(ONE_IN_FIVE) else data.draw(st.sampled_from(["k", "modality", "nsfw",
                                                                                   "min_similarity"]))
        if spoil == "k":
            k = data.draw(st.sampled_from([0, -3, 1001]))
        elif spoil == "modality":
            modality = "audio"
        elif spoil == "nsfw":
            nsfw = "maybe"
        elif spoil == "min_similarity":
            min_sim = float("nan")
        f = Filters(nsfw=nsfw, min_similarity=min_sim, caption_contains=contains, where=[w for w, _ in where],
                    exclude_ids=excluded)
        valid = all(ok for _, ok in where) and not spoil
        try:
            res = search(store, like=like, k=k, exact=exact, modality=modality, filters=f)
        except LaionError as exc:
            assert isinstance(exc, UsageError), f"{type(exc).__name__}: {exc}"
            assert not valid, f"a valid search was refused: {exc} ({f}, k={k}, {modality})"
            tally["rejected"] += 1
            return
        assert valid, f"an invalid search was accepted: {f}, k={k}, {modality}"
        tally["accepted"] += 1
        allowed = {i for i in ids if i != like and _python_match(by_id[i], f)}
        got = [r["id"] for r in res.rows]
        assert set(got) <= allowed, f"rows outside the filters: {set(got) - allowed} for {f}"
        assert len(got) == len(set(got)) == min(k, len(allowed)), (len(got), k, len(allowed))
        col = "image_embedding" if modality == "image" else "text_embedding"
        q = np.asarray(by_id[like][col], np.float64)

        def cos(i):
            v = np.asarray(by_id[i][col], np.float64)
            return 1 - v @ q / (np.linalg.norm(v) * np.linalg.norm(q))

        dists = [r["distance"] for r in res.rows]
        assert dists == sorted(dists)
        np.testing.assert_allclose(dists, [cos(i) for i in got], atol=1e-5)
        if got:  # nothing allowed and left out is nearer than the last row returned
            rest = [cos(i) for i in allowed - set(got)]
            assert not rest or min(rest) >= dists[-1] - 1e-5
        tally["rows_checked"] += len(got)

    run()
    assert tally["accepted"] >= tally["rejected"], tally  # at least half the generated searches ran
    assert tally["rows_checked"] > 0


# -- schemathesis: the OpenAPI schema, fuzzed ------------------------------------------------------------
SCHEMA_STATS = {"requests": 0, "5xx": 0, "by_status": {}, "answers_checked": 0}
SEARCH_ROUTES = {"POST /api/search", "GET /api/search", "POST /api/search/upload"}


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _steer(label: str, case, data, ids: list[int], table_rows: list[dict]) -> None:
    """What a positive request needs and the OpenAPI schema cannot say, drawn from the table: an
    existing row id (``like``), a decodable image, a vector of the table's dimension that is not all
    zeros, where-expressions over the table's values, exactly one query among GET's ``text`` / ``like``
    (OpenAPI has no "one of these parameters"), no ``image_url`` (this server runs without
    --allow-image-url: a vector instead) and no ``nprobe`` (the table has no IVF index). Everything else is as
    schemathesis generated it."""
    def vector():
        v = data.draw(st.lists(st.floats(-1, 1, width=32), min_size=DIM, max_size=DIM))
        return v if any(v) else [1.0] + v[1:]

    def image():
        raw = base64.b64encode(_png(data.draw(st.integers(0, 3)))).decode()
        return data.draw(st.sampled_from([raw, "data:image/png;base64," + raw]))

    body = case.body if isinstance(case.body, dict) else None
    if label in ("POST /api/search", "POST /api/search/upload") and body is not None:
        body.pop("nprobe", None)  # this table has no IVF index (an nprobe then needs exact)
    if label == "POST /api/search" and body is not None:
        if body.pop("image_url", None) is not None:
            body["vector"] = vector()  # the query it was, as a vector
        if body.get("like") is not None:
            body["like"] = data.draw(st.sampled_from(ids))
        if body.get("image") is not None:
            body["image"] = image()
        if body.get("vector") is not None:
            body["vector"] = vector()
    elif label == "GET /api/search":
        query = dict(case.query or {})
        if query.get("like") is not None or not query.get("text"):
            query.pop("text", None)
            query["like"] = data.draw(st.sampled_from(ids))
        case.query = query
    elif label == "POST /api/search/upload" and body is not None:
        body["file"] = _png(data.draw(st.integers(0, 3)))
    if label in ("POST /api/search", "POST /api/search/upload") and body is not None and body.get("where"):
        pieces = [data.draw(where_pieces(table_rows).filter(lambda p: p[1])) for _ in body["where"]]
        body["where"] = [w for w, _ in pieces]
    elif label == "POST /knn-service" and body is not None:
        if body.get("image") is not None:
            body["image"] = image()
        body.pop("image_url", None)
        if body.get("embedding_input") is not None or (not body.get("text") and body.get("image") is None):
            body["embedding_input"] = vector()


#: the texts a form field may carry for a boolean (pydantic's, as forms commonly send them)
_FORM_BOOLS = {**dict.fromkeys(("1", "on", "t", "true", "y", "yes"), True),
               **dict.fromkeys(("0", "off", "f", "false", "n", "no"), False)}


def _same_on_the_wire(label: str, case) -> bool:
    """A "negative" form that is the same bytes as a valid one. A form is text: a list is the field
    repeated (a scalar field as a list of no or one item is that field left out, or sent once), and
    every value is its text (null for the free-text caption_contains is the text "null"; 0 for a
    boolean is "0", a boolean's text). Read back as the form's schema types it, such a form is valid."""
    if label != "POST /api/search/upload" or not isinstance(case.body, dict):
        return False
    import jsonschema_rs  # schemathesis's validator

    from laion_search.web.app import UPLOAD_FORM

    def text(v) -> str:
        return v if isinstance(v, str) else json.dumps(v)

    def typed(t: str, prop: dict):
        kind = prop.get("type")
        if kind == "integer" and re.fullmatch(r"[+-]?[0-9]+", t):
            return int(t)
        if kind == "number":
            try:
                return float(t) if np.isfinite(float(t)) else t
            except ValueError:
                return t
        if kind == "boolean":
            return _FORM_BOOLS.get(t.lower(), t)
        return t

    read: dict = {}
    for name, v in case.body.items():
        prop = UPLOAD_FORM["properties"].get(name)
        if name == "file":  # a file part, whatever its bytes (a non-text value is no file: left as it is)
            read[name] = "" if isinstance(v, (str, bytes)) or type(v).__name__ == "Binary" else v
        elif prop is None:
            read[name] = v
        elif prop.get("type") == "array":
            read[name] = [typed(text(x), prop["items"]) for x in (v if isinstance(v, list) else [v])]
        elif isinstance(v, list) and len(v) <= 1:
            if v:
                read[name] = typed(text(v[0]), prop)
        else:
            read[name] = typed(text(v), prop) if not isinstance(v, list) else v
    return jsonschema_rs.validator_for(UPLOAD_FORM).is_valid(read)


def _check_answer(label: str, case, resp, by_id: dict[int, dict]) -> None:
    """A search route's 200: ids that exist, no id twice, min(k, matches) rows (matches: the rows the
    request's filters allow, by the Python reference), sorted distances (similarities for clip-back)."""
    body = case.body if isinstance(case.body, dict) else {}
    if label == "GET /api/search":
        body = dict(case.query or {})
    # a form or query string may carry a one-value list where JSON has the value itself
    body = {n: (v[0] if isinstance(v, list) and len(v) == 1 and n not in ("where", "exclude_ids", "columns",
                                                                             "embedding_input", "vector") else v)
            for n, v in body.items()}
    answer = resp.json()
    if label == "POST /knn-service":
        rows, k = answer, max(1, min(int(body.get("num_images", 40)), 1000))
        fetch = body.get("num_result_ids")
        k = min(k, max(1, min(int(fetch), 1000))) if fetch is not None else k
        f, like = Filters(nsfw="exclude" if body.get("use_safety_model") else "any"), None
        scores = [-r["similarity"] for r in rows]
    else:
        rows, k = answer["results"], int(body.get("k", 10))
        assert answer["k"] == k, (answer["k"], k)
        f = Filters(nsfw=body.get("nsfw", "any"), min_similarity=body.get("min_similarity"),
                    caption_contains=body.get("caption_contains"), where=list(body.get("where", [])),
                    exclude_ids=list(body.get("exclude_ids", [])), words=body.get("words"),
                    words_mode=body.get("words_mode", "any"))
        like = body.get("like")
        like = int(like) if like is not None else None
        hybrid = body.get("hybrid")
        if (_FORM_BOOLS.get(hybrid.lower(), False) if isinstance(hybrid, str) else hybrid):
            # fused rankings: rows of the table, none twice, at most k (each side has its own matches)
            got = [r["id"] for r in rows]
            assert set(got) <= set(by_id) and len(got) == len(set(got)) and len(got) <= k, got
            assert all(r["found_by"] in ("words", "vector", "both") for r in rows), rows
            SCHEMA_STATS["answers_checked"] += 1
            return
        # (an upload's file is its query: words there filter the picture's search)
        words_alone = label != "POST /api/search/upload" and f.words is not None and all(
            body.get(q) is None for q in ("text", "image", "image_url", "vector", "like"))
        # a keyword ranking: best words score first (negated, to read as a distance)
        scores = [-r["words_score"] for r in rows] if words_alone else [r["distance"] for r in rows]
        assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1)), rows
    got = [r["id"] for r in rows]
    assert set(got) <= set(by_id), f"ids not in the table: {set(got) - set(by_id)}"
    assert len(got) == len(set(got)), f"an id twice: {got}"
    with np.errstate(over="ignore"):  # min_similarity beyond float32 is ±inf, as for the engine
        matches = sum(1 for i, row in by_id.items() if i != like and _python_match(row, f))
    dedup = body.get("deduplicate")
    if isinstance(dedup, str):  # a form's text
        dedup = _FORM_BOOLS.get(dedup.lower(), False)
    if dedup:
        assert len(got) <= min(k, matches), (len(got), k, matches)
    else:
        assert len(got) == min(k, matches), (len(got), k, matches, f)
    assert scores == sorted(scores), scores
    for r in rows:
        if "caption" in r:
            assert (r["caption"], r["url"]) == (by_id[r["id"]]["caption"], by_id[r["id"]]["url"]), r
    SCHEMA_STATS["answers_checked"] += 1


def test_schemathesis_answers_conform_and_valid_requests_succeed(env, table_rows):
    """Generated requests (valid and invalid) for every operation of the OpenAPI schema, each through
    ``call_and_validate``: no 5xx, every answer (status, content type, body) as the schema documents
    it, every schema-valid request answered 2xx and every invalid one refused with a 4xx; each search
    answer checked against the table; the table's content checksum unchanged at the end."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import Phase
    from schemathesis.generation import GenerationMode

    store, model, _ = env
    by_id = {r["id"]: r for r in table_rows}
    ids = sorted(by_id)
    before = checksum(store)
    app = create_app(store, model=model)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    from schemathesis.python import asgi

    client = asgi.get_client(app).__enter__()  # one client for the run (schemathesis makes one per call)
    per_op = 500 if slow() else 110
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 8, [o.label for o in ops]
    for i, op in enumerate(ops):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            # every valid upload is a CLIP image encoding (~60 ms of CPU here): fewer of those
            n = per_op * 4 // 11 if (op.label, mode) == ("POST /api/search/upload", GenerationMode.POSITIVE) else per_op

            @hyp_seed(1000 + i)
            @settings(max_examples=n, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode), data=st.data())
            def run(case, data):
                if mode == GenerationMode.POSITIVE:  # noqa: B023
                    _steer(op.label, case, data, ids, table_rows)  # noqa: B023
                elif _same_on_the_wire(op.label, case):  # noqa: B023
                    reject()
                try:
                    resp = case.call_and_validate(session=client)  # noqa: B023
                finally:
                    SCHEMA_STATS["requests"] += 1
                code = resp.status_code
                SCHEMA_STATS["by_status"][code] = SCHEMA_STATS["by_status"].get(code, 0) + 1
                assert "Traceback" not in resp.text, resp.text[:300]
                if code == 200 and (op.label in SEARCH_ROUTES or op.label == "POST /knn-service"):  # noqa: B023
                    _check_answer(op.label, case, resp, by_id)  # noqa: B023

            try:
                run()
            except Exception as exc:  # noqa: BLE001 - a generation problem for one mode is not a server error
                if "Unsatisfiable" not in type(exc).__name__ and "unsatisfiable" not in str(exc).lower():
                    raise
    assert checksum(store) == before  # the content, not only the row count
    record_figures("schemathesis", **SCHEMA_STATS)
    print(f"schemathesis: {SCHEMA_STATS['requests']} requests over {len(ops)} operations, "
          f"{SCHEMA_STATS['answers_checked']} search answers checked; statuses {SCHEMA_STATS['by_status']}")
    assert SCHEMA_STATS["requests"] >= 1000, SCHEMA_STATS
    assert SCHEMA_STATS["answers_checked"] >= 200, SCHEMA_STATS


# -- the same, through a real `laion serve` process on 127.0.0.1 ---------------------------------------------
_CHECKSUM_CODE = """
import json, sys
from laion_search import connect
with connect(sys.argv[1], create=False) as s:
    main = s.rows("SELECT count() AS n, sum(cityHash64(*)) AS h, groupBitXor(cityHash64(*)) AS x FROM laion")[0]
    print(json.dumps({**main, "shards": s.rows("SELECT * FROM laion_shards FINAL ORDER BY shard")}, default=str))
"""


def _checksum_in_subprocess(db) -> dict:
    """The table's content checksum, read by another process (chDB: one store per process)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CHECKSUM_CODE, str(db)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def served(env, tmp_path):
    """A real `laion serve` subprocess on 127.0.0.1 over a copy of the test table (the same shards
    ingested by the CLI into another store), its tiny CLIP model loaded. Yields (base URL, the
    process, the table's checksum before serving, a function that stops the server and returns
    the checksum after)."""
    import subprocess
    import sys
    import time

    store, model, root = env
    db = tmp_path / "served-db"
    run_cli("ingest", str(root / "shards"), "--db", str(db), check=True)
    before = _checksum_in_subprocess(db)
    assert before["n"] == ROWS
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "laion_search.cli", "serve", "--db", str(db), "--port", str(port),
                             "--model", model], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"

    def stop_and_checksum() -> dict:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
        return _checksum_in_subprocess(db)

    try:
        # readiness: /api/status answers and the CLIP model is loaded (text requests would otherwise
        # wait for it); the deadline only fails the test, it never ends a wait early
        deadline = time.monotonic() + 300
        while True:
            try:
                status = httpx.get(base + "/api/status", timeout=30)
                if status.status_code == 200 and status.json()["encoder"]["state"] != "checking":
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise AssertionError(f"laion serve exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, "laion serve was not ready (status, model loaded) in 300 s"
            time.sleep(0.1)
        assert status.json()["encoder"]["state"] == "ready", status.json()["encoder"]
        yield base, proc, before, stop_and_checksum
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def test_real_server_hostile_requests_and_schemathesis(env, served, table_rows):
    """The hostile-request corpus and a small schemathesis run through a real `laion serve` on a
    loopback socket (uvicorn, HTTP parsing, body limits, real multipart): no 5xx, no leak, every
    answer as the schema documents it, valid requests answered and checked, table content unchanged."""
    schemathesis = pytest.importorskip("schemathesis")
    import requests
    from hypothesis import Phase
    from schemathesis.generation import GenerationMode

    _, _, root = env
    base, proc, before, stop_and_checksum = served
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=base, timeout=120) as c:
        reqs = _hostile_requests(root)
        for method, url, kw in reqs:
            r = c.request(method, url, **kw)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            _check_hostile_answer(method, url, kw, r)
    assert sum(v for k, v in statuses.items() if k >= 400) >= len(reqs) // 2, statuses

    by_id = {r["id"]: r for r in table_rows}
    ids = sorted(by_id)
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    session = requests.Session()
    stats = {"requests": 0, "checked": 0}
    ops = [o.ok() for o in schema.get_all_operations()]
    assert len(ops) >= 8, [o.label for o in ops]
    for i, op in enumerate(ops):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @hyp_seed(2000 + i)
            @settings(max_examples=8, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode), data=st.data())
            def run(case, data):
                if mode == GenerationMode.POSITIVE:  # noqa: B023
                    _steer(op.label, case, data, ids, table_rows)  # noqa: B023
                elif _same_on_the_wire(op.label, case):  # noqa: B023
                    reject()
                resp = case.call_and_validate(base_url=base, session=session)
                stats["requests"] += 1
                assert "Traceback" not in resp.text, resp.text[:300]
                if resp.status_code == 200 and (op.label in SEARCH_ROUTES or op.label == "POST /knn-service"):  # noqa: B023
                    _check_answer(op.label, case, resp, by_id)  # noqa: B023
                    stats["checked"] += 1

            try:
                run()
            except Exception as exc:  # noqa: BLE001 - a generation problem for one mode is not a server error
                if "Unsatisfiable" not in type(exc).__name__ and "unsatisfiable" not in str(exc).lower():
                    raise
    assert proc.poll() is None
    print(f"real socket: {len(reqs)} hostile requests {statuses}; schemathesis {stats}")
    assert stats["requests"] >= 60 and stats["checked"] >= 10, stats
    assert stop_and_checksum() == before  # content, not only the row count


def test_model_still_loading_is_a_503_with_retry_after(env, monkeypatch):
    """While the CLIP model loads, a text or image request gets 503 + Retry-After (over a real
    socket), the status says "checking", a vector search still answers; once the load ends, text
    search answers. The load is held on an event through a hook in the encoder loader, so the
    test sees the loading state for certain, not by racing a clock."""
    import threading

    import laion_search.clip.encoders as encoders
    import laion_search.web.app as web_app

    from .conftest import serve_in_thread

    store, model, _ = env
    release, entered = threading.Event(), threading.Event()
    real = encoders.check_encoder

    def held_check(name, **kw):
        entered.set()
        assert release.wait(300), "never released"
        return real(name, **kw)

    monkeypatch.setattr(encoders, "check_encoder", held_check)
    monkeypatch.setattr(web_app, "ENCODER_WAIT", 0.05)  # how long a request waits for a load that is held
    app = create_app(store, model=model)
    try:
        with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=120) as c:
            r = c.post("/api/search", json={"text": "a dog", "k": 3})
            assert entered.is_set()
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "5" and "still loading" in r.json()["error"], (r.headers, r.text)
            r = c.get("/api/search", params={"text": "a dog"})
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            png = base64.b64encode(png_claiming(4, 4)).decode()
            r = c.post("/api/search", json={"image": png, "k": 3})
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            assert c.get("/api/status").json()["encoder"]["state"] == "checking"
            assert c.post("/api/search", json={"like": 3, "k": 3}).status_code == 200  # no model needed
            release.set()
            monkeypatch.setattr(web_app, "ENCODER_WAIT", 600.0)  # now the request awaits the load's end
            r = c.post("/api/search", json={"text": "a dog", "k": 3})
            assert r.status_code == 200 and len(r.json()["results"]) == 3, r.text
            assert c.get("/api/status").json()["encoder"]["state"] == "ready"
    finally:
        release.set()
