"""HTTP API and web page (``laion serve``), with a clip-retrieval compatible back end.

Our API (JSON, OpenAPI docs at ``/docs``):

* ``GET /health`` — liveness, never needs the token;
* ``GET /api/status`` — rows, shards, indexes, the embeddings the table has (``modalities``:
  ``["image", "text"]``, or ``["image"]`` for an image-only source) and their CLIP ``model``;
* ``POST /api/search`` — ``{text | image (base64) | vector | like, k, modality, exact, metric,
  nsfw, min_similarity, caption_contains, where, columns, ef_search, …}``;
* ``POST /api/search/upload`` — multipart image upload plus the same fields as form fields;
* ``GET /api/search`` — the same as query parameters (``text`` or ``like``), for links;
* ``POST /api/sql`` — only with ``--allow-sql``, and then only single read-only SELECTs.

clip-retrieval's back end, so its ``ClipClient`` and front end work: ``POST /knn-service``,
``GET /indices-list``, ``POST /metadata``. Fields we cannot honour (``use_violence_detector``,
``aesthetic_score``, ``aesthetic_weight``, ``use_mclip``) are accepted and ignored;
``use_safety_model`` maps to the NSFW filter and ``deduplicate`` drops near-identical results
(embedding cosine similarity ≥ 0.98). ``image_url`` fetching is off unless enabled.

Every bad input is a 4xx JSON ``{"error": "…"}``; unexpected failures are a 500 with a generic
message, never a traceback. The page at ``/`` is one static HTML file, no build step.
"""

import base64
import binascii
import logging
import re
import time
from importlib import resources
from typing import Any, Optional

import numpy as np
from fastapi import Body, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from laion_search.errors import EncoderError, LaionError, QueryError, UsageError
from laion_search.search import MAX_K, Filters, SearchOptions, search
from laion_search.store import COLUMNS, TABLE, Store

log = logging.getLogger("laion_search.web")

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_TEXT_CHARS = 10_000
DEDUP_THRESHOLD = 0.98
METADATA_COLUMNS = [c for c in COLUMNS if c != "id"]
_READ_ONLY_SQL = re.compile(r"^\s*(SELECT|WITH)\b", re.I)
_FORBIDDEN_SQL = re.compile(
    r"\b(INTO\s+OUTFILE|file|url|urlCluster|s3|s3Cluster|hdfs|remote|remoteSecure|mysql|postgresql|jdbc|odbc|"
    r"executable|input|cluster|clusterAllReplicas|azureBlobStorage|gcs|iceberg\w*|deltaLake\w*|hudi\w*|sqlite|"
    r"mongodb|redis|python|dictionary|system\s*\.\s*(users|grants|settings_profiles|quotas))\b\s*(\(|\.|)",
    re.I)


class SearchBody(BaseModel):
    text: Optional[str] = Field(None, max_length=MAX_TEXT_CHARS, description="Text query (CLIP-encoded).")
    image: Optional[str] = Field(None, description="Base64 image (optionally a data: URL).")
    vector: Optional[list[float]] = Field(None, max_length=4096, description="Query embedding.")
    like: Optional[int] = Field(None, description="Row id: search with its stored embedding.")
    k: int = Field(10, description=f"Results, 1-{MAX_K}.")
    modality: str = Field("image", description="image or text embeddings.")
    exact: bool = False
    metric: str = "cosine"
    nsfw: str = Field("any", description="any, exclude or only.")
    min_similarity: Optional[float] = None
    caption_contains: Optional[str] = Field(None, max_length=1000)
    where: list[str] = Field(default_factory=list, max_length=16)
    columns: list[str] = Field(default_factory=list, max_length=len(COLUMNS))
    ef_search: Optional[int] = None
    rescoring: bool = False
    filter_strategy: str = "auto"


class KnnBody(BaseModel):
    text: Optional[str] = Field(None, max_length=MAX_TEXT_CHARS)
    image: Optional[str] = None
    image_url: Optional[str] = Field(None, max_length=2048)
    embedding_input: Optional[list[float]] = Field(None, max_length=4096)
    modality: str = "image"
    num_images: int = 40
    num_result_ids: int = 3000
    indice_name: Optional[str] = None
    deduplicate: bool = True
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: Optional[Any] = None
    aesthetic_weight: Optional[Any] = None
    use_mclip: bool = False


def create_app(store: Store, *, model: str | None = None, token: str | None = None, allow_sql: bool = False,
               allow_image_url: bool = False, cors_origins: list[str] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, image_url_timeout: float = 5.0,
               query_timeout: float = 30.0) -> Any:
    """The ASGI app over an open ``store``. All routes call library functions.

    ``query_timeout`` caps every engine query the server runs (``max_execution_time``)."""
    if query_timeout:
        store.backend.command(f"SET max_execution_time = {float(query_timeout)!r}")
    app = FastAPI(title="laion-search", version="0.1.0",
                  description="Search LAION image-text embeddings in ClickHouse. Bearer token required when the "
                              "server was started with one (all routes but /health).")
    app.state.store = store

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > max_body_bytes
            except ValueError:
                return _error(400, "invalid Content-Length")
            if too_big:
                return _error(413, f"request body over {max_body_bytes} bytes")
        if token and request.url.path not in ("/health",):
            supplied = request.headers.get("authorization", "")
            supplied = supplied[7:] if supplied.lower().startswith("bearer ") else request.query_params.get("token")
            import hmac

            if not supplied or not hmac.compare_digest(str(supplied), token):
                return _error(401, "missing or wrong bearer token")
        try:
            return await call_next(request)
        except Exception:  # pragma: no cover - last resort; handlers below catch ours
            log.exception("unhandled error")
            return _error(500, "internal error")

    @app.exception_handler(UsageError)
    async def usage_error(request: Request, exc: UsageError):
        return _error(400, str(exc))

    @app.exception_handler(EncoderError)
    async def encoder_error(request: Request, exc: EncoderError):
        text = str(exc)
        status = 503 if ("cannot load" in text or "need" in text) else 400
        return _error(status, text)

    @app.exception_handler(LaionError)
    async def laion_error(request: Request, exc: LaionError):
        log.warning("request failed: %s", exc)
        fault = storage_fault(str(exc)) if isinstance(exc, QueryError) else None
        if fault:
            # the server's disk, not the request: 503, and no file paths for the client
            return _error(503, f"the store is unavailable ({fault}); see the server log")
        return _error(400 if isinstance(exc, QueryError) else 500, str(exc) if isinstance(exc, QueryError)
                      else "the store could not answer; see the server log")

    @app.exception_handler(ValidationError)  # a model built inside a route (GET /api/search's SearchBody)
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError | ValidationError):
        parts = []
        for e in exc.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return _error(500, "internal error")

    def run_search(body: SearchBody, image_bytes: bytes | None = None) -> dict[str, Any]:
        if body.image is not None:
            image_bytes = decode_base64_image(body.image)
        given = sum(x is not None for x in (body.text, image_bytes, body.vector, body.like))
        if given != 1:
            raise UsageError("give exactly one query: text, image, vector or like")
        t0 = time.perf_counter()
        res = search(store, body.vector, like=body.like, text=body.text, image=image_bytes, model=model, k=body.k,
                     modality=body.modality, exact=body.exact, metric=body.metric,
                     filters=Filters(nsfw=body.nsfw, min_similarity=body.min_similarity,
                                     caption_contains=body.caption_contains, where=body.where),
                     columns=body.columns, options=SearchOptions(ef_search=body.ef_search, rescoring=body.rescoring,
                                                                 filter_strategy=body.filter_strategy))
        out = res.as_dict()
        out["total_seconds"] = round(time.perf_counter() - t0, 6)
        return out

    @app.get("/health", tags=["service"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/status", tags=["service"])
    def status() -> dict[str, Any]:
        info = store.status()
        return {k: info[k] for k in ("rows", "parts", "bytes_on_disk", "dim", "modalities", "model", "shards",
                                     "indexes", "backend")}

    @app.post("/api/search", tags=["search"])
    def api_search(body: SearchBody) -> dict[str, Any]:
        return run_search(body)

    @app.get("/api/search", tags=["search"])
    def api_search_get(text: Optional[str] = None, like: Optional[int] = None, k: int = 10, modality: str = "image",
                       exact: bool = False, nsfw: str = "any", caption_contains: Optional[str] = None) -> dict[str, Any]:
        if text is not None and len(text) > MAX_TEXT_CHARS:
            raise UsageError(f"text is over {MAX_TEXT_CHARS} characters")
        return run_search(SearchBody(text=text, like=like, k=k, modality=modality, exact=exact, nsfw=nsfw,
                                     caption_contains=caption_contains))

    @app.post("/api/search/upload", tags=["search"])
    async def api_search_upload(file: UploadFile = File(...), k: int = Form(10), modality: str = Form("image"),
                                exact: bool = Form(False), nsfw: str = Form("any")) -> dict[str, Any]:
        data = await file.read(MAX_IMAGE_BYTES + 1)
        if len(data) > MAX_IMAGE_BYTES:
            raise UsageError(f"image over {MAX_IMAGE_BYTES} bytes")
        if not data:
            raise UsageError("the uploaded file is empty")
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(run_search, SearchBody(k=k, modality=modality, exact=exact, nsfw=nsfw), data)

    if allow_sql:
        @app.post("/api/sql", tags=["sql"])
        def api_sql(query: str = Body(..., embed=True, max_length=20_000)) -> dict[str, Any]:
            text = query.strip().rstrip(";")
            if ";" in text or not _READ_ONLY_SQL.match(text) or _FORBIDDEN_SQL.search(text):
                raise UsageError("only single read-only SELECT statements over the store's tables are allowed")
            result = store.sql(text)
            return {"columns": result.column_names, "rows": _jsonable(result.to_pylist()[:10_000])}

    # -- clip-retrieval compatible back end ----------------------------------------------------------
    @app.get("/indices-list", tags=["clip-retrieval"])
    def indices_list() -> list[str]:
        return [TABLE]

    @app.post("/knn-service", tags=["clip-retrieval"])
    def knn_service(body: KnnBody) -> list[dict[str, Any]]:
        if body.indice_name not in (None, "", TABLE):
            raise UsageError(f"unknown indice_name {body.indice_name!r}; this server has {TABLE!r}")
        image_bytes = None
        if body.image is not None:
            image_bytes = decode_base64_image(body.image)
        elif body.image_url is not None:
            if not allow_image_url:
                raise UsageError("image_url fetching is disabled on this server (start it with --allow-image-url)")
            image_bytes = fetch_image_url(body.image_url, timeout=image_url_timeout)
        k = max(1, min(int(body.num_images), MAX_K))
        fetch = max(k, min(int(body.num_result_ids), MAX_K)) if body.deduplicate else k
        sb = SearchBody(text=body.text, vector=body.embedding_input, k=fetch, modality=body.modality,
                        nsfw="exclude" if body.use_safety_model else "any")
        if body.text is None and image_bytes is None and body.embedding_input is None:
            raise UsageError("give text, image, image_url or embedding_input")
        res = run_search(sb, image_bytes)
        rows = res["results"]
        if body.deduplicate and rows:
            rows = deduplicate(store, rows, body.modality)
        return [{"id": r["id"], "similarity": 1.0 - float(r["distance"]), "url": r["url"], "caption": r["caption"]}
                for r in rows[:k]]

    @app.post("/metadata", tags=["clip-retrieval"])
    def metadata(body: dict = Body(...)) -> list[dict[str, Any]]:
        ids = body.get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or len(ids) > MAX_K or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                     for i in ids):
            raise UsageError(f"ids must be a list of at most {MAX_K} integers")
        if any(not -(2**63) <= i < 2**63 for i in ids):
            raise UsageError("ids out of range")
        cols = ", ".join(f"`{c}`" for c in METADATA_COLUMNS)
        found = {r["id"]: r for r in store.rows(f"SELECT id, {cols} FROM {TABLE} WHERE id IN {{ids:Array(Int64)}}",
                                                {"ids": ids})} if ids else {}
        return [{"id": i, "metadata": _jsonable({k: v for k, v in found[i].items() if k != "id"})}
                for i in ids if i in found]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        html = resources.files("laion_search").joinpath("web/static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    return app


#: Engine errors that come from the server's storage, not from the request (ClickHouse error names).
_STORAGE_FAULTS = {
    "FILE_DOESNT_EXIST": "its files are missing", "CANNOT_OPEN_FILE": "its files cannot be opened",
    "CANNOT_READ_ALL_DATA": "its files cannot be read", "CANNOT_READ_FROM_FILE_DESCRIPTOR": "its files cannot be read",
    "CORRUPTED_DATA": "its files are corrupt", "CHECKSUM_DOESNT_MATCH": "its files are corrupt",
    "NOT_ENOUGH_SPACE": "the disk is full", "CANNOT_WRITE_TO_FILE_DESCRIPTOR": "its files cannot be written",
    "CANNOT_FSYNC": "its files cannot be written",
    "No space left on device": "the disk is full", "Read-only file system": "its directory is read-only",
    "No such file or directory": "its files are missing",
}


def storage_fault(message: str) -> str | None:
    """What is wrong with the store, when an engine error is a storage fault (else None)."""
    for marker, what in _STORAGE_FAULTS.items():
        if marker in message:
            return what
    return None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return obj


def decode_base64_image(data: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise UsageError("image must be a non-empty base64 string")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise UsageError(f"image over {MAX_IMAGE_BYTES} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("image is not valid base64") from None
    if not raw:
        raise UsageError("image is empty")
    return raw


def fetch_image_url(url: str, *, timeout: float = 5.0, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Fetch an image for ``image_url`` (only when the server allows it): http(s) only, bounded
    size and time."""
    import httpx

    if not re.match(r"^https?://", url, re.I):
        raise UsageError("image_url must be an http(s) URL")
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=False) as r:
            if r.status_code != 200:
                raise UsageError(f"image_url answered HTTP {r.status_code}")
            buf = bytearray()
            deadline = time.monotonic() + timeout
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) > max_bytes:
                    raise UsageError(f"image_url body over {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise UsageError("image_url took too long")
            return bytes(buf)
    except httpx.HTTPError as exc:
        raise UsageError(f"cannot fetch image_url ({type(exc).__name__})") from None


def deduplicate(store: Store, rows: list[dict[str, Any]], modality: str) -> list[dict[str, Any]]:
    """Drop results whose embedding is near-identical (cosine ≥ 0.98) to a better-ranked one."""
    column = "image_embedding" if modality != "text" else "text_embedding"
    ids = [r["id"] for r in rows]
    vecs = {r["id"]: np.asarray(r[column], np.float32)
            for r in store.rows(f"SELECT id, {column} FROM {TABLE} WHERE id IN {{ids:Array(Int64)}}", {"ids": ids})}
    kept: list[dict[str, Any]] = []
    kept_vecs: list[np.ndarray] = []
    for r in rows:
        v = vecs.get(r["id"])
        if v is None:
            continue
        v = v / (np.linalg.norm(v) or 1.0)
        if kept_vecs and float(np.max(np.stack(kept_vecs) @ v)) >= DEDUP_THRESHOLD:
            continue
        kept.append(r)
        kept_vecs.append(v)
    return kept


def serve(store: Store, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    import uvicorn

    app = create_app(store, **options)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_keep_alive=5, limit_concurrency=256)
