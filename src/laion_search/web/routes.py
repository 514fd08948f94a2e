"""The server's own routes (``/health``, ``/api/status``, ``/api/search``, ``/api/sql``,
``/local/...``, the page at ``/``) as module-level routers. Each reads the server's state from
``request.app.state``, which :func:`laion_search.web.app.create_app` builds: ``store``,
``encoder``, ``results_cache``, ``text_cache``, ``scan_gate``, ``encode_gate``, ``image_root``,
``index_preload``, ``shutting_down`` and ``options`` (:class:`ServerOptions`)."""

import dataclasses
import logging
import time
from importlib import resources
from typing import Any, Optional

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from laion_search.errors import ShuttingDown, UsageError
from laion_search.query import SearchQuery, describe_query
from laion_search.search import search
from laion_search.sql import SqlLimits, check_read_only_sql, run_read_only_sql
from laion_search.web.cache import request_key
from laion_search.web.encoding import json_response
from laion_search.web.images import IMAGE_TYPES, decode_base64_image, fetch_image_url, safe_image_path
from laion_search.web.models import (HTTP_ONLY, MAX_IMAGE_BYTES, SearchAnswer, SearchBody, SqlAnswer, SqlBody,
                                     StatusAnswer, answers, search_body_from_params)

log = logging.getLogger("laion_search.web")


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """What ``create_app`` was told, as the routes need it."""

    allow_image_url: bool
    image_url_timeout: float
    #: engine threads and Linux nice of an exact scan (and of /api/sql)
    scan_threads: int
    scan_nice: int
    #: /api/sql's limits; None when the server was started without --allow-sql
    sql_limits: SqlLimits | None


def image_url_bytes(state: Any, url: str) -> bytes:
    """The picture at ``url``, when this server fetches image URLs (--allow-image-url)."""
    options: ServerOptions = state.options
    if not options.allow_image_url:
        raise UsageError("image_url fetching is disabled on this server (its operator can allow it: "
                         "laion serve --allow-image-url)")
    return fetch_image_url(url, timeout=options.image_url_timeout)


def run_search(state: Any, body: Any, image_bytes: bytes | None = None, *,
               extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One search request (a SearchBody, and the uploaded picture if any) on the server of
    ``state``: checked and planned first, then the cache, the encoder (admitted), the search
    (exact scans admitted). ``extra``: columns the caller needs beyond the body's own, read in
    the same statement."""
    t0 = time.perf_counter()
    store, encoder = state.store, state.encoder
    given = len(body.queries()) + (image_bytes is not None)
    if given > 1 or (given == 0 and body.words is None):  # the model checks the rest; image_url is ours
        raise UsageError("give exactly one query: a text, an image, an image_url, a vector or like=<row id> "
                         "(or words alone)")
    if image_bytes is None:
        if body.image is not None:
            image_bytes = decode_base64_image(body.image)
        elif body.image_url is not None:
            image_bytes = image_url_bytes(state, body.image_url)
    # one query and valid knobs, checked and resolved (index or scan) before any work (encoding, cache)
    columns = list(dict.fromkeys([*body.columns, *extra]))
    plan = SearchQuery(**{**body.model_dump(exclude=set(HTTP_ONLY)), "columns": columns, "image": image_bytes,
                          "model": encoder.model}).plan(store)
    enc = None
    if body.text is not None or image_bytes is not None:
        enc = encoder.require("text" if body.text is not None else "image")  # 503 at once without one
    text = " ".join(body.text.split()) if body.text is not None else None
    fields = body.model_dump(exclude={"image", "image_url", "vector", "text"})
    fields["text"], fields["columns"] = text, columns
    blob = image_bytes if image_bytes is not None else (
        np.asarray(body.vector, np.float32).tobytes() if body.vector is not None else None)
    key = None
    if state.results_cache.size:
        key = (request_key("search", fields, blob), store.version())
        hit = state.results_cache.get(key)
        if hit is not None:
            return {**hit, "cached": True, "total_seconds": round(time.perf_counter() - t0, 6)}
    vector = _query_vector(state, enc, body.vector, text, image_bytes)
    res = _run_plan(state, plan, vector)
    out = res.as_dict()
    if key is not None:
        state.results_cache.put(key, out)
    return {**out, "cached": False, "total_seconds": round(time.perf_counter() - t0, 6)}


def _query_vector(state: Any, enc: Any, vector: Any, text: str | None, image_bytes: bytes | None) -> Any:
    """The query's vector: the given one, or the text's (cached) or the picture's, encoded when
    the encoding gate admits it."""
    if text is not None:
        if not text:
            raise UsageError("text query is empty")
        assert enc is not None
        vector = state.text_cache.get((enc.name, text))
        if vector is None:
            with state.encode_gate.admit():
                vector = enc.encode_text([text])[0]
            state.text_cache.put((enc.name, text), vector)
    elif image_bytes is not None:
        assert enc is not None
        with state.encode_gate.admit():
            vector = enc.encode_image([image_bytes])[0]
    return vector


def _run_plan(state: Any, plan: Any, vector: Any) -> Any:
    """The planned search with its vector: an exact scan through the scan gate (429 when full),
    with the server's scan threads and nice; an indexed search at once, never behind scans."""
    options: ServerOptions = state.options
    scan = plan.scans
    log.debug("search started: %s", "exact scan" if scan else plan.route)

    def go() -> Any:
        if state.shutting_down:  # admitted as the signal came: the cancel would miss it
            raise ShuttingDown("the server is shutting down; the query was not started")
        return search(state.store, plan=plan.replace(text=None, image=None, vector=vector,
                                                     scan_threads=options.scan_threads if scan else None,
                                                     scan_nice=options.scan_nice if scan else None))

    if scan:
        with state.scan_gate.admit():  # bounded: shed with 429 when full
            return go()
    return go()  # indexed: never waits behind scans


service_router = APIRouter()


@service_router.get("/health", tags=["service"], responses=answers())
def health() -> dict[str, str]:
    return {"status": "ok"}


@service_router.get("/api/search/fields", tags=["search"], responses=answers())
def search_fields() -> list[dict[str, Any]]:
    """The search request's fields as data — name, default, help, group, choices, bounds — from
    the one query model the library, the CLI and this API share (the page reads its defaults here)."""
    return describe_query()


@service_router.get("/api/status", tags=["service"], response_model=None, responses=answers(StatusAnswer))
def status(request: Request) -> dict[str, Any]:
    state = request.app.state
    options: ServerOptions = state.options
    info = state.store.status().as_dict()
    out = {k: info[k] for k in ("rows", "parts", "bytes_on_disk", "dim", "modalities", "model", "shards",
                                "indexes", "backend")}
    version = state.store.version()
    enc = state.encoder.as_dict()
    if enc["state"] == "ready":
        text_cap = image_cap = {"ok": True}  # type: dict[str, Any]
    elif enc["state"] == "checking":
        text_cap = image_cap = {"ok": False, "reason": "the CLIP model is still loading", "fix": "wait a moment"}
    else:
        text_cap = image_cap = {"ok": False, "reason": enc["reason"], "fix": enc["fix"]}
    empty = {"ok": False, "reason": "the store is empty", "fix": "load shards: laion ingest ./shards"}
    out.update(
        version=version,
        capabilities={"text": text_cap, "image": image_cap, "vector": {"ok": True} if info["rows"] else empty,
                      "like": {"ok": True} if info["rows"] else empty,
                      "image_url": image_cap if options.allow_image_url else {
                          "ok": False, "reason": "this server does not fetch image URLs",
                          "fix": "start it with --allow-image-url"}},
        encoder=enc,
        index_preload=dict(state.index_preload),
        local_images=state.image_root is not None,
        cache={"results": state.results_cache.stats(), "text": state.text_cache.stats()},
        admission={"exact_scan": state.scan_gate.stats(), "encoding": state.encode_gate.stats(),
                   "scan_threads": options.scan_threads, "scan_nice": options.scan_nice},
    )
    return out


search_router = APIRouter()


@search_router.post("/api/search", tags=["search"], responses=answers(SearchAnswer))
async def api_search(request: Request) -> Response:
    # the hot path, by hand: pydantic parses the body straight from its bytes and the answer
    # is encoded once (FastAPI's body dependency and response encoding cost ~1 ms per request)
    body = SearchBody.model_validate_json(await request.body() or b"null")
    return json_response(await run_in_threadpool(run_search, request.app.state, body))


@search_router.get("/api/search", tags=["search"], response_model=None, responses=answers(SearchAnswer))
def api_search_get(request: Request, text: Optional[str] = Query(None), like: Optional[int] = Query(None),
                   k: int = Query(10)) -> dict[str, Any]:
    """Every /api/search field as a query parameter (lists repeated: ``&where=a&where=b``);
    the common ones are listed here (their schemas are SearchBody's: one model). Give exactly one
    query (``text`` or ``like`` here)."""
    return run_search(request.app.state, search_body_from_params(list(request.query_params.multi_items())))


@search_router.post("/api/search/upload", tags=["search"], response_model=None, responses=answers(SearchAnswer))
async def api_search_upload(request: Request) -> dict[str, Any]:
    """An image file as the query; every other /api/search field (but another query) as a form field."""
    form = await request.form()
    file = form.get("file")
    if not isinstance(file, StarletteUploadFile):
        raise RequestValidationError([{"type": "missing", "loc": ("body", "file"), "input": None,
                                       "msg": "Field required" if file is None else "expected an uploaded file"}])
    body = search_body_from_params([(k, v) for k, v in form.multi_items() if k != "file" and isinstance(v, str)])
    if body.queries():
        raise UsageError("give exactly one query: the uploaded file is the query here")
    data = await file.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise UsageError(f"image over {MAX_IMAGE_BYTES} bytes")
    if not data:
        raise UsageError("the uploaded file is empty")
    return await run_in_threadpool(run_search, request.app.state, body, data)


#: included only when the server was started with --allow-sql
sql_router = APIRouter()


@sql_router.post("/api/sql", tags=["sql"], response_model=None, responses=answers(SqlAnswer))
def api_sql(body: SqlBody, request: Request) -> dict[str, Any]:
    """One read-only statement, answered as JSON: refused with its reason when it is not
    a single SELECT, sets SETTINGS or FORMAT, or reaches outside the store; run in a
    read-only session with the limits of :class:`~laion_search.sql.SqlLimits` (time, rows
    read, memory, result size), queued and niced as exact scans are."""
    state = request.app.state
    limits = state.options.sql_limits
    assert limits is not None  # the router is included only with them
    text = check_read_only_sql(body.query)  # 400 with the reason, before any queueing
    with state.scan_gate.admit():  # a heavy query: bounded with the exact scans, 429 when full
        if state.shutting_down:
            raise ShuttingDown("the server is shutting down; the query was not started")
        log.debug("sql query started")
        return run_read_only_sql(state.store, text, limits)


local_router = APIRouter()


@local_router.get("/local/{path:path}", tags=["service"], include_in_schema=False)
def local_image(path: str, request: Request) -> FileResponse:
    """A picture under the image root (relative ``url`` values), same origin as the page."""
    root = request.app.state.image_root
    if root is None:
        raise StarletteHTTPException(404, "this server has no image folder (start it with --images DIR)")
    found = safe_image_path(root, path)
    if found is None:
        raise StarletteHTTPException(404, "no such picture")
    return FileResponse(found, media_type=IMAGE_TYPES[found.suffix.lower()],
                        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})


page_router = APIRouter()


@page_router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    html = resources.files("laion_search").joinpath("web/static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(html)
