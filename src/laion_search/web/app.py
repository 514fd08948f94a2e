"""HTTP API and web page (``laion serve``), with a clip-retrieval compatible back end.

Our API (JSON, OpenAPI docs at ``/docs``):

* ``GET /health`` — liveness, never needs the token;
* ``GET /api/status`` — rows, shards, indexes, the embeddings the table has (``modalities``:
  ``["image", "text"]``, or ``["image"]`` for an image-only source) and their CLIP ``model``;
* ``POST /api/search`` — ``{text | image (base64) | vector | like, k, modality, exact, metric,
  nsfw, min_similarity, caption_contains, where, columns, ef_search, …}``;
* ``POST /api/search/upload`` — multipart image upload plus the same fields as form fields;
* ``GET /api/search`` — every field as a query parameter (lists repeated), for links;
* ``POST /api/sql`` — only with ``--allow-sql``: ``{"query": "SELECT …"}``, one read-only SELECT
  within the limits of :mod:`laion_search.sql`, answered as JSON.

clip-retrieval's back end, so its ``ClipClient`` and front end work: ``POST /knn-service``,
``GET /indices-list``, ``POST /metadata``. Fields we cannot honour (``use_violence_detector``,
``aesthetic_score``, ``aesthetic_weight``, ``use_mclip``) are accepted and ignored;
``use_safety_model`` maps to the NSFW filter and ``deduplicate`` drops near-identical results
(embedding inner product ≥ 0.94, :data:`DEDUP_THRESHOLD`). ``image_url`` fetching is off unless enabled.

Every bad input is a 4xx JSON ``{"error": "…"}``; unexpected failures are a 500 with a generic
message, never a traceback. The page at ``/`` is one static HTML file, no build step.
"""

import base64
import binascii
import collections.abc
import dataclasses
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.config import JsonDict, JsonValue
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from laion_search.web.admission import AdmissionGate
from laion_search.web.cache import LRUCache, request_key
from laion_search.errors import (EncoderError, EncoderUnavailable, LaionError, Overloaded, QueryError, ServeError,
                                 ShuttingDown, UsageError)
from laion_search.schema import COLUMNS, DEFAULT_COLUMNS, MAX_K, MODALITIES, TABLE
from laion_search.query import SearchQuery, describe_query, query_fields
from laion_search.search import DEDUP_THRESHOLD, fitting_model, model_mismatch, search, table_model  # noqa: F401
from laion_search.sql import SQL_MAX_CHARS, SqlLimits, check_read_only_sql, run_read_only_sql
from laion_search.store import Store

log = logging.getLogger("laion_search.web")

MAX_BODY_BYTES = 16 * 1024 * 1024
#: Linux nice of an exact scan's engine threads in a server: the kernel then runs indexed searches
#: first when both want a core (``laion bench serve --mixed`` measures it)
SCAN_NICE = 19
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_TEXT_CHARS = 10_000
#: clip-back's default ``columns_to_return`` (url, image_path, caption, NSFW) that our table has
CLIP_BACK_COLUMNS = [c for c in ("url", "image_path", "caption", "NSFW") if c in COLUMNS]
METADATA_COLUMNS = CLIP_BACK_COLUMNS
#: what /knn-service's search reads beyond /api/search's own columns (id, caption, url)
KNN_EXTRA = tuple(c for c in METADATA_COLUMNS if c not in DEFAULT_COLUMNS)
#: seconds a text/image request waits for a start-up encoder check still running
ENCODER_WAIT = 10.0
#: picture files ``/local/...`` serves from the image root
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".gif": "image/gif"}


#: SearchQuery fields the HTTP API does not take from clients: the server's --model encodes, and
#: its --scan-threads and --scan-nice hold exact scans back.
SERVER_SIDE = frozenset(f.name for f in dataclasses.fields(SearchQuery) if f.metadata["knob"].server_side)
#: SearchBody fields the library does not take: the server fetches ``image_url`` (only when started
#: with --allow-image-url) and searches with the picture as ``image``.
HTTP_ONLY = frozenset({"image_url"})


#: JSON Schema bounds of the engine's Int64 and Float32 (ids; vector values); bounds exact as doubles,
#: as the OpenAPI document may hold them
INT64_MIN, INT64_END = -(2**63), 2**63
INT64: JsonDict = {"minimum": INT64_MIN, "exclusiveMaximum": INT64_END}
FLOAT32: JsonDict = {"minimum": -3.4028234663852886e38, "maximum": 3.4028234663852886e38}
#: a text query is not all whitespace (said as "not blank" rather than "has a non-space", which a
#: fuzzer can only negate by filtering)
#: (Python's whitespace, which the server strips: str.split's set, not JSON Schema's \s, which
#: lacks \x1c-\x1f and \x85 and has \ufeff)
NOT_BLANK: JsonDict = {"not": {"pattern": "^[\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029"
                                          "\u202f\u205f\u3000]*$"}}
#: "Exactly one query", as JSON Schema: a branch per query field, that one given and the others null
#: or left out (the branches exclude each other: anyOf says oneOf, and fuzzers draw it without filtering)
_QUERIES = {"text": "string", "image": "string", "image_url": "string", "vector": "array", "like": "integer"}
_ONE: list[JsonValue] = [
    {"required": [name], "properties": {name: {"type": kind}, **{o: {"type": "null"} for o in _QUERIES if o != name}}}
    for name, kind in _QUERIES.items()]
# words alone: a keyword search (no vector query, so no hybrid)
_ONE.append({"required": ["words"], "properties": {"words": {"type": "string"}, "hybrid": {"const": False},
                                                   **{o: {"type": "null"} for o in _QUERIES}}})
# hybrid fuses the words' ranking with the query's: it needs words
_HYBRID_NEEDS_WORDS: JsonValue = {"if": {"required": ["hybrid"], "properties": {"hybrid": {"const": True}}},
                                  "then": {"required": ["words"], "properties": {"words": {"type": "string"}}}}
ONE_QUERY: JsonDict = {"anyOf": _ONE, "allOf": [_HYBRID_NEEDS_WORDS]}


#: How HTTP carries the query fields whose Python form it cannot: an image as base64 text, a
#: vector as a JSON array (its values within float32), ids within Int64, a text not blank.
_HTTP_FORMS: dict[str, tuple[Any, JsonDict]] = {
    "text": (Optional[str], NOT_BLANK),
    "image": (Optional[str], {"contentEncoding": "base64", "contentMediaType": "image/*"}),
    "vector": (Optional[list[float]], {"minItems": 1, "items": {"type": "number", **FLOAT32}}),
    "like": (Optional[int], INT64),
    "exclude_ids": (list[Annotated[int, Field(ge=INT64_MIN, lt=INT64_END)]], {}),
}


class _SearchBodyBase(BaseModel):
    model_config = ConfigDict(json_schema_extra=ONE_QUERY)

    def queries(self) -> list[str]:
        """The query fields given (exactly one is valid)."""
        return [name for name in _QUERIES if getattr(self, name) is not None]


def _search_body() -> type[BaseModel]:
    """:class:`~laion_search.search.SearchQuery` over HTTP (JSON body, query string or form), made
    from the query model: each field's default, help, choices and bounds (the choices and bounds
    as JSON Schema, so the OpenAPI document says which requests succeed; the library still
    refuses the others with a 400 and its reason). The server-side fields (its --model and scan
    limits) are left out; ``image_url`` (:data:`HTTP_ONLY`) is added: the server fetches it."""
    import typing

    hints = typing.get_type_hints(SearchQuery)
    fields: dict[str, Any] = {}
    for f in query_fields(http=True):
        kb = f.metadata["knob"]
        kind, extra = _HTTP_FORMS.get(f.name, (None, {}))
        if kind is None:
            kind = hints[f.name]
            if typing.get_origin(kind) in (collections.abc.Sequence, list, tuple):
                kind = list[typing.get_args(kind)[0]]  # type: ignore[misc]
        extra = dict(extra)
        if kb.choices is not None:
            choices = {"enum": list(kb.choices)}
            extra.update({"items": {"type": "string", **choices}} if f.name == "columns" else choices)
        if kb.pattern is not None:
            extra["pattern"] = kb.pattern
        if kb.ge is not None and f.name not in ("like", "exclude_ids"):
            extra["minimum"] = kb.ge
        if kb.le is not None and f.name not in ("like", "exclude_ids"):
            extra["maximum"] = kb.le
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        spec: dict[str, Any] = {"description": kb.help, "json_schema_extra": extra or None}
        if kb.max_length is not None:
            spec["max_length"] = kb.max_length
        if f.name == "vector":
            spec["max_length"] = 4096
        fields[f.name] = (kind, Field(default_factory=list, **spec) if isinstance(default, list)
                          else Field(default, **spec))
        if f.name == "like":  # the HTTP-only query beside the model's four
            fields["image_url"] = (Optional[str], Field(None, max_length=2048, description=(
                "An http(s) image URL the server fetches (10 MB, its --image-url-timeout): only where `/api/status`'s "
                "`capabilities.image_url.ok` is true (the server was started with --allow-image-url); else a 400.")))
    from pydantic import create_model

    return create_model("SearchBody", __base__=_SearchBodyBase, __doc__=_search_body.__doc__, **fields)


SearchBody: Any = _search_body()


_LIST_FIELDS = {"columns", "where", "exclude_ids"}


def search_body_from_params(items: list[tuple[str, str]]) -> Any:
    """A query string or form (``?text=dog&k=5&where=width>=512&where=height>=512``) as a SearchBody."""
    data: dict[str, Any] = {}
    for key, value in items:
        if key in _LIST_FIELDS:
            data.setdefault(key, []).append(value)
        elif key in SearchBody.model_fields:
            if key in data:  # one value, not the last of several
                raise UsageError(f"search parameter {key!r} given more than once "
                                 f"(only {', '.join(sorted(_LIST_FIELDS))} repeat)")
            data[key] = value
        elif key != "token":
            raise UsageError(f"unknown search parameter {key!r}")
    return SearchBody.model_validate(data)


#: clip-back's query, as JSON Schema: a non-empty text, an image, an image_url or an embedding_input
KNN_QUERY: JsonDict = {"anyOf": [{"required": ["text"], "properties": {"text": {"type": "string", "minLength": 1,
                                                                                **NOT_BLANK}}},
                                 {"required": ["image"], "properties": {"image": {"type": "string"}}},
                                 {"required": ["image_url"], "properties": {"image_url": {"type": "string"}}},
                                 {"required": ["embedding_input"],
                                  "properties": {"embedding_input": {"type": "array"}}}]}


def _json_int(value: Any) -> Any:
    """JSON's integers, 3.0 included (JSON Schema's "integer"); never a bool or a string."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: an integer as JSON Schema has it, in a strict model: 711.0 is 711; false and "7" are refused
_JsonInt = Annotated[int, Field(ge=INT64_MIN, lt=INT64_END), BeforeValidator(_json_int)]


class KnnBody(BaseModel):
    """clip-back's ``/knn-service`` request (its defaults where it has them). The query is the
    first of text (non-empty), image, image_url and embedding_input that is given."""

    # strict: JSON's types as the schema says them (lax mode took false for num_images, 0.0 for use_mclip)
    model_config = ConfigDict(json_schema_extra=KNN_QUERY, strict=True)

    text: Optional[str] = Field(None, max_length=MAX_TEXT_CHARS)
    image: Optional[str] = Field(None, json_schema_extra={"contentEncoding": "base64", "contentMediaType": "image/*"})
    image_url: Optional[str] = Field(None, max_length=2048, description=(
        "An http(s) URL the server fetches: only on servers started with --allow-image-url."))
    # the bounds are checked even when an earlier query wins (text), as the schema states them
    embedding_input: Optional[list[Annotated[float, Field(ge=FLOAT32["minimum"], le=FLOAT32["maximum"])]]] = Field(
        None, min_length=1, max_length=4096, description=(
            "Query embedding: as many values as the table's dimension, not all zero."))
    modality: str = Field("image", json_schema_extra={"enum": list(MODALITIES)})
    # any integer is accepted and clamped to 1-MAX_K, as clip-back does; the schema states the
    # range a JSON integer can carry here
    num_images: _JsonInt = 40
    num_result_ids: Optional[_JsonInt] = None  # clip-back: num_images when absent
    indice_name: Optional[str] = Field(None, json_schema_extra={"enum": [TABLE, "", None]})
    deduplicate: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: Optional[Any] = None
    aesthetic_weight: Optional[Any] = None
    use_mclip: bool = False


# -- answers, as the OpenAPI schema documents them (the routes build plain dicts) -----------------------
class ErrorBody(BaseModel):
    """Every refusal (4xx) and failure (5xx): one line that says why."""

    error: str


#: the error answers every route may give (bad request, token, body size, validation, overload,
#: unavailable encoder or store, internal error)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what} for code, what in (
        (400, "Bad request: the reason"), (401, "Missing or wrong bearer token"), (413, "Request body too large"),
        (422, "Malformed request"), (429, "Overloaded: retry after Retry-After seconds"),
        (500, "Internal error"), (503, "The CLIP model or the store is unavailable, or the server is stopping"))}


class SearchRow(BaseModel):
    """One result: its rank, distance, id, caption, url and the extra ``columns`` asked for."""

    model_config = ConfigDict(extra="allow")

    rank: int = Field(ge=1)
    distance: Optional[float] = Field(None, description=(
        "The vector distance (absent for a keyword search alone; null in a hybrid row the words found alone)."))
    id: int
    caption: str
    url: str
    words_score: Optional[float] = Field(None, description="Keyword searches: distinct query words the caption "
                                                           "holds, plus 1 / (1 + its word count).")
    rrf_score: Optional[float] = Field(None, description="hybrid: the row's reciprocal rank fusion score.")
    found_by: Optional[Literal["words", "vector", "both"]] = Field(None, description="hybrid: which ranking held it.")
    vector_rank: Optional[int] = Field(None, ge=1, description="hybrid: its rank in the vector ranking.")
    words_rank: Optional[int] = Field(None, ge=1, description="hybrid: its rank in the keyword ranking.")


class SearchAnswer(BaseModel):
    model_config = ConfigDict(extra="allow")

    k: int
    modality: str
    metric: str
    exact: bool
    strategy: str
    seconds: float
    results: list[SearchRow]
    cached: bool
    total_seconds: float


class KnnRow(BaseModel):
    """clip-back's answer row: id, similarity and the metadata columns."""

    model_config = ConfigDict(extra="allow")

    id: int
    similarity: float


class MetadataRow(BaseModel):
    id: int
    metadata: dict[str, Any]


class SqlBody(BaseModel):
    """``POST /api/sql``'s body: one read-only statement (:mod:`laion_search.sql`)."""

    query: str = Field(..., max_length=SQL_MAX_CHARS, description="One SELECT (or WITH … SELECT) statement, "
                       "without SETTINGS or FORMAT clauses; answered as JSON.",
                       examples=["SELECT count() AS n FROM laion"])


class SqlAnswer(BaseModel):
    model_config = ConfigDict(extra="allow")

    columns: list[str]
    types: list[str]
    rows: list[dict[str, Any]]
    rows_read: int
    truncated: bool


class StatusAnswer(BaseModel):
    model_config = ConfigDict(extra="allow")

    rows: int
    parts: int
    dim: Optional[int]
    modalities: list[str]
    shards: list[dict[str, Any]]
    indexes: list[dict[str, Any]]
    version: Any
    capabilities: dict[str, Any]
    encoder: dict[str, Any]


def answers(model: Any = None) -> dict[int | str, dict[str, Any]]:
    """A route's documented answers: ``model`` for 200, :data:`ERROR_RESPONSES` for the rest."""
    return {**({200: {"model": model}} if model is not None else {}), **ERROR_RESPONSES}


class EncoderState:
    """The server's one start-up check of its CLIP encoder (:func:`check_encoder`), run in a
    background thread so the server answers at once; text and image requests wait for it a
    little, then get a 503 that says why and how to fix it — never a model-hub retry."""

    def __init__(self, store: Store, model: str | None):
        self.store = store
        self.given = model
        #: the model this server encodes with: resolved once, as the CLI resolves it (:func:`table_model`)
        self.model = table_model(store, model)
        self.result: Any = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._run, name="laion-encoder-check", daemon=True).start()

    def _run(self) -> None:
        from laion_search.clip.encoders import EncoderCheck, check_encoder

        try:
            fits = fitting_model(self.store)
            self.result = check_encoder(self.model, fits=fits)
            wrong = model_mismatch(self.store, self.result.model, self.result.dim) if self.result.ok else None
            if wrong:  # it loads, but its vectors cannot be compared with the table's
                reason, _, fix = wrong.rpartition(": ")
                self.result = EncoderCheck(self.result.model, False, self.result.dim, reason=reason,
                                           fix=f"restart with --model {fits}" if fits else fix)
        except Exception as exc:  # noqa: BLE001 - anything unexpected still ends the check
            log.exception("encoder check failed")
            self.result = EncoderCheck(self.model, False, reason=f"cannot load the CLIP model ({exc})",
                                       fix="see the server log")
        if self.result.ok:
            log.info("CLIP model %s loaded (dim %s): text and image search on", self.result.model, self.result.dim)
        else:
            log.warning("text and image search off: %s. Fix: %s", self.result.reason, self.result.fix)
        self._done.set()

    def wait(self, timeout: float) -> Any:
        self.start()
        self._done.wait(timeout)
        return self.result

    def require(self, what: str) -> Any:
        """The encoder, or :class:`EncoderUnavailable` at once when the check failed."""
        result = self.wait(ENCODER_WAIT)
        if result is None:
            raise EncoderUnavailable(f"{what} search: the CLIP model is still loading; retry shortly", retry_after=5)
        if not result.ok:
            raise EncoderUnavailable(f"{what} search is unavailable: {result.reason}. Fix: {result.fix}")
        from laion_search.clip.encoders import get_encoder

        return get_encoder(result.model)

    def as_dict(self) -> dict[str, Any]:
        if self.result is None:
            return {"state": "checking", "ok": False, "model": self.model}
        return {"state": "ready" if self.result.ok else "failed", **self.result.as_dict()}


def create_app(store: Store, *, model: str | None = None, token: str | None = None, allow_sql: bool = False,
               allow_image_url: bool = False, cors_origins: list[str] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, image_url_timeout: float = 5.0,
               query_timeout: float = 30.0, image_root: str | os.PathLike[str] | None = None,
               cache_size: int = 256, text_cache_size: int = 1024, max_scans: int | None = None,
               scan_queue: int = 8, scan_threads: int | None = None, encode_queue: int = 16,
               scan_nice: int = SCAN_NICE, preload_indexes: bool = False) -> Any:
    """The ASGI app over an open ``store``. All routes call library functions.

    ``query_timeout`` caps every engine query the server runs (``max_execution_time``).
    ``image_root`` is the folder whose pictures ``/local/<path>`` serves (relative ``url``
    values, e.g. those of ``laion synth --images``). ``cache_size`` / ``text_cache_size``
    bound the LRU caches of results and encoded text queries (0 turns one off).
    ``preload_indexes`` loads the vector indexes in the background at once (``laion serve`` does).

    Exact scans run at most ``max_scans`` at a time (default: a quarter of the cores, at least
    1) with ``scan_threads`` engine threads each (default: half the cores) running at Linux nice
    ``scan_nice`` (ClickHouse's ``os_thread_priority``; 0 turns it off), ``scan_queue`` more
    wait, the rest get 429 + Retry-After; encodings likewise (1 at a time, ``encode_queue``
    waiting). Indexed searches are never queued behind either (:mod:`laion_search.web.admission`)."""
    cores = os.cpu_count() or 1
    scan_gate = AdmissionGate("exact scan", max_scans or max(1, cores // 4), scan_queue)
    encode_gate = AdmissionGate("encoding", 1, encode_queue)
    scan_threads = scan_threads or max(1, cores // 2)
    if query_timeout:
        store.set_session("max_execution_time", float(query_timeout))
    # tag this server's queries, so that shutting down cancels them (and only them). Embedded
    # only: on a ClickHouse server the process's exit closes its connections instead
    tag = None
    if store.embedded:
        tag = f"laion-serve-{os.getpid()}-{id(store):x}"
        store.set_session("log_comment", tag)
    app = FastAPI(title="laion-search", version="0.1.0",
                  description="Search LAION image-text embeddings in ClickHouse. Bearer token required when the "
                              "server was started with one (all routes but /health).")
    app.state.store = store
    app.state.query_tag = tag
    app.state.shutting_down = False
    encoder = app.state.encoder = EncoderState(store, model)
    encoder.start()  # the one check, at start-up
    preload: dict[str, Any] = {"state": "loading" if preload_indexes else "off"}
    if preload_indexes:
        threading.Thread(target=warm_up_indexes, args=(store, preload), name="laion-preload-indexes",
                         daemon=True).start()
    results_cache = app.state.results_cache = LRUCache(cache_size)
    text_cache = app.state.text_cache = LRUCache(text_cache_size)
    root = Path(image_root).expanduser().resolve() if image_root else None
    if root is not None and not root.is_dir():
        raise UsageError(f"image folder {image_root} does not exist")
    app.state.image_root = root
    app.state.scan_gate, app.state.encode_gate = scan_gate, encode_gate

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    # added last, so it runs first (outside CORS): shutdown, body size and token checks
    app.add_middleware(RequestGuard, state=app.state, max_body_bytes=max_body_bytes, token=token,
                       preflight_open=bool(cors_origins))

    @app.exception_handler(UsageError)
    async def usage_error(request: Request, exc: UsageError):
        return _error(400, str(exc))

    @app.exception_handler(EncoderError)
    async def encoder_error(request: Request, exc: EncoderError):
        text = str(exc)
        if isinstance(exc, EncoderUnavailable):
            return _error(503, text, headers={"Retry-After": str(exc.retry_after)} if exc.retry_after else None)
        status = 503 if ("cannot load" in text or "need" in text) else 400
        return _error(status, text)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        return _error(429, str(exc), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request: Request, exc: ShuttingDown):
        return _error(503, str(exc), headers={"Connection": "close"})

    @app.exception_handler(LaionError)
    async def laion_error(request: Request, exc: LaionError):
        if app.state.shutting_down:
            return _error(503, "the server is shutting down; the query was cancelled", headers={"Connection": "close"})
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

    def image_url_bytes(url: str) -> bytes:
        if not allow_image_url:
            raise UsageError("image_url fetching is disabled on this server (its operator can allow it: "
                             "laion serve --allow-image-url)")
        return fetch_image_url(url, timeout=image_url_timeout)

    def run_search(body: Any, image_bytes: bytes | None = None, *,
                   extra: tuple[str, ...] = ()) -> dict[str, Any]:
        """``extra``: columns the caller needs beyond the body's own, read in the same statement."""
        t0 = time.perf_counter()
        given = len(body.queries()) + (image_bytes is not None)
        if given > 1 or (given == 0 and body.words is None):  # the model checks the rest; image_url is ours
            raise UsageError("give exactly one query: a text, an image, an image_url, a vector or like=<row id> "
                             "(or words alone)")
        if image_bytes is None:
            if body.image is not None:
                image_bytes = decode_base64_image(body.image)
            elif body.image_url is not None:
                image_bytes = image_url_bytes(body.image_url)
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
        if results_cache.size:
            key = (request_key("search", fields, blob), store.version())
            hit = results_cache.get(key)
            if hit is not None:
                return {**hit, "cached": True, "total_seconds": round(time.perf_counter() - t0, 6)}
        vector: Any = body.vector
        if text is not None:
            if not text:
                raise UsageError("text query is empty")
            assert enc is not None
            vector = text_cache.get((enc.name, text))
            if vector is None:
                with encode_gate.admit():
                    vector = enc.encode_text([text])[0]
                text_cache.put((enc.name, text), vector)
        elif image_bytes is not None:
            assert enc is not None
            with encode_gate.admit():
                vector = enc.encode_image([image_bytes])[0]
        scan = plan.scans
        log.debug("search started: %s", "exact scan" if scan else plan.route)

        def go() -> Any:
            if app.state.shutting_down:  # admitted as the signal came: the cancel would miss it
                raise ShuttingDown("the server is shutting down; the query was not started")
            return search(store, plan=plan.replace(text=None, image=None, vector=vector,
                                                   scan_threads=scan_threads if scan else None,
                                                   scan_nice=scan_nice if scan else None))

        if scan:
            with scan_gate.admit():  # bounded: shed with 429 when full
                res = go()
        else:
            res = go()  # indexed: never waits behind scans
        out = res.as_dict()
        if key is not None:
            results_cache.put(key, out)
        out = {**out, "cached": False, "total_seconds": round(time.perf_counter() - t0, 6)}
        return out

    @app.get("/health", tags=["service"], responses=answers())
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/search/fields", tags=["search"], responses=answers())
    def search_fields() -> list[dict[str, Any]]:
        """The search request's fields as data — name, default, help, group, choices, bounds — from
        the one query model the library, the CLI and this API share (the page reads its defaults here)."""
        return describe_query()

    @app.get("/api/status", tags=["service"], response_model=None, responses=answers(StatusAnswer))
    def status() -> dict[str, Any]:
        info = store.status().as_dict()
        out = {k: info[k] for k in ("rows", "parts", "bytes_on_disk", "dim", "modalities", "model", "shards",
                                    "indexes", "backend")}
        version = store.version()
        enc = encoder.as_dict()
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
                          "image_url": image_cap if allow_image_url else {
                              "ok": False, "reason": "this server does not fetch image URLs",
                              "fix": "start it with --allow-image-url"}},
            encoder=enc,
            index_preload=dict(preload),
            local_images=root is not None,
            cache={"results": results_cache.stats(), "text": text_cache.stats()},
            admission={"exact_scan": scan_gate.stats(), "encoding": encode_gate.stats(), "scan_threads": scan_threads,
                       "scan_nice": scan_nice},
        )
        return out

    @app.post("/api/search", tags=["search"], responses=answers(SearchAnswer))
    async def api_search(request: Request) -> Response:
        # the hot path, by hand: pydantic parses the body straight from its bytes and the answer
        # is encoded once (FastAPI's body dependency and response encoding cost ~1 ms per request)
        body = SearchBody.model_validate_json(await request.body() or b"null")
        from starlette.concurrency import run_in_threadpool

        return json_response(await run_in_threadpool(run_search, body))

    @app.get("/api/search", tags=["search"], response_model=None, responses=answers(SearchAnswer))
    def api_search_get(request: Request, text: Optional[str] = Query(None), like: Optional[int] = Query(None),
                       k: int = Query(10)) -> dict[str, Any]:
        """Every /api/search field as a query parameter (lists repeated: ``&where=a&where=b``);
        the common ones are listed here (their schemas are SearchBody's: one model). Give exactly one
        query (``text`` or ``like`` here)."""
        return run_search(search_body_from_params(list(request.query_params.multi_items())))

    @app.post("/api/search/upload", tags=["search"], response_model=None, responses=answers(SearchAnswer))
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
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(run_search, body, data)

    if allow_sql:
        sql_limits = SqlLimits(seconds=float(query_timeout or 0), threads=scan_threads, nice=scan_nice)

        @app.post("/api/sql", tags=["sql"], response_model=None, responses=answers(SqlAnswer))
        def api_sql(body: SqlBody) -> dict[str, Any]:
            """One read-only statement, answered as JSON: refused with its reason when it is not
            a single SELECT, sets SETTINGS or FORMAT, or reaches outside the store; run in a
            read-only session with the limits of :class:`~laion_search.sql.SqlLimits` (time, rows
            read, memory, result size), queued and niced as exact scans are."""
            text = check_read_only_sql(body.query)  # 400 with the reason, before any queueing
            with scan_gate.admit():  # a heavy query: bounded with the exact scans, 429 when full
                if app.state.shutting_down:
                    raise ShuttingDown("the server is shutting down; the query was not started")
                log.debug("sql query started")
                return run_read_only_sql(store, text, sql_limits)

    @app.get("/local/{path:path}", tags=["service"], include_in_schema=False)
    def local_image(path: str) -> FileResponse:
        """A picture under the image root (relative ``url`` values), same origin as the page."""
        if root is None:
            raise StarletteHTTPException(404, "this server has no image folder (start it with --images DIR)")
        found = safe_image_path(root, path)
        if found is None:
            raise StarletteHTTPException(404, "no such picture")
        return FileResponse(found, media_type=IMAGE_TYPES[found.suffix.lower()],
                            headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})

    # -- clip-retrieval compatible back end ----------------------------------------------------------
    @app.get("/indices-list", tags=["clip-retrieval"], responses=answers())
    def indices_list() -> list[str]:
        return [TABLE]

    async def json_body(request: Request) -> Any:
        """The body as JSON whatever its Content-Type (clip-back uses ``get_json(force=True)``,
        and clip-retrieval's ClipClient posts JSON without a JSON content type)."""
        raw = await request.body()
        try:
            return json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError):
            raise UsageError("the request body is not valid JSON") from None

    def knn(body: KnnBody) -> list[dict[str, Any]]:
        if body.indice_name not in (None, "", TABLE):
            raise UsageError(f"unknown indice_name {body.indice_name!r}; this server has {TABLE!r}")
        # clip-back's precedence: text, then image, then image_url, then embedding_input
        text = body.text if body.text is not None and body.text.split() else None  # blank: no text query
        image_bytes = vector = None
        if text is None and body.image is not None:
            image_bytes = decode_base64_image(body.image)
        elif text is None and body.image_url is not None:
            image_bytes = image_url_bytes(body.image_url)
        elif text is None:
            vector = body.embedding_input
        if text is None and image_bytes is None and vector is None:
            raise UsageError("give text, image, image_url or embedding_input")
        k = max(1, min(int(body.num_images), MAX_K))
        fetch = body.num_result_ids if body.num_result_ids is not None else body.num_images
        fetch = max(1, min(int(fetch), MAX_K))
        # one statement: the search reads clip-back's metadata columns (and, to deduplicate, the
        # embeddings) along with the nearest rows; deduplication runs over num_result_ids results
        sb = SearchBody(text=text, vector=vector, k=fetch, modality=body.modality,
                        nsfw="exclude" if body.use_safety_model else "any", deduplicate=body.deduplicate)
        rows = run_search(sb, image_bytes, extra=KNN_EXTRA)["results"][:k]
        return [{**{c: _jsonable(r[c]) for c in METADATA_COLUMNS}, "id": r["id"], "similarity": 1.0 - float(r["distance"])}
                for r in rows]

    @app.post("/knn-service", tags=["clip-retrieval"], response_model=None, responses=answers(list[KnnRow]))
    async def knn_service(request: Request) -> Response:
        data = await json_body(request)
        if not isinstance(data, dict):
            raise UsageError("the request body must be a JSON object")
        body = KnnBody.model_validate(data)
        from starlette.concurrency import run_in_threadpool

        return json_response(await run_in_threadpool(knn, body))  # encoded once, as /api/search

    @app.post("/metadata", tags=["clip-retrieval"], response_model=None, responses=answers(list[MetadataRow]))
    async def metadata(request: Request) -> list[dict[str, Any]]:
        body = await json_body(request)
        ids = body.get("ids") if isinstance(body, dict) else None
        # JSON's integers include 3.0 (JSON Schema's "integer", and pydantic's int for the other routes)
        if isinstance(ids, list):
            ids = [int(i) if isinstance(i, float) and i.is_integer() else i for i in ids]
        if not isinstance(ids, list) or len(ids) > MAX_K or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                     for i in ids):
            raise UsageError(f"ids must be a list of at most {MAX_K} integers")
        if any(not -(2**63) <= i < 2**63 for i in ids):
            raise UsageError("ids out of range")
        if "indice_name" in body and not isinstance(body["indice_name"], str):  # as the schema says
            raise UsageError("indice_name must be a string")
        from starlette.concurrency import run_in_threadpool

        found = await run_in_threadpool(_metadata, store, ids)
        return [{"id": i, "metadata": found[i]} for i in ids if i in found]

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with the bodies of the routes that read theirs by hand put in as
        written (for /docs and fuzzers): through FastAPI's own models their integer bounds would
        become doubles, and 2**63 - 1 a 2**63."""
        if app.openapi_schema is None:
            doc = FastAPI.openapi(app)
            for (path, method), (schema, media_type) in hand_read_bodies().items():
                doc["paths"][path][method]["requestBody"] = {"required": True,
                                                             "content": {media_type: {"schema": schema}}}
            props = SearchBody.model_json_schema()["properties"]
            for param in doc["paths"]["/api/search"]["get"].get("parameters", []):
                if param["name"] in props:  # the query model's schema, not a second declaration
                    prop = props[param["name"]]
                    param["schema"] = {k: v for k, v in prop.items() if k != "description"}
                    param["description"] = prop.get("description", "")
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        html = resources.files("laion_search").joinpath("web/static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    return app


def _metadata(store: Store, ids: list[int]) -> dict[int, dict[str, Any]]:
    """clip-back's metadata columns of these rows, by id."""
    if not ids:
        return {}
    cols = ", ".join(f"`{c}`" for c in METADATA_COLUMNS)
    rows = store.rows(f"SELECT id, {cols} FROM {TABLE} WHERE id IN {{ids:Array(Int64)}}", {"ids": ids})
    return {r["id"]: _jsonable({c: r[c] for c in METADATA_COLUMNS}) for r in rows}


def safe_image_path(root: Path, path: str) -> Path | None:
    """``root/path`` when it is a picture file inside ``root`` (after resolving links), else None:
    no absolute paths, no ``..`` escapes, no NUL bytes, only picture suffixes."""
    if not path or "\0" in path or "\\" in path or path.startswith("/") or Path(path).is_absolute():
        return None
    try:
        candidate = (root / path).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if not candidate.is_relative_to(root) or candidate.suffix.lower() not in IMAGE_TYPES or not candidate.is_file():
        return None
    return candidate


class RequestGuard:
    """Checks every HTTP request before routing: 503 while shutting down (``/health`` still
    answers), 400/413 for a bad or too large ``Content-Length``, 401 without the bearer token
    (header, or ``?token=``; a CORS preflight needs none when CORS is on).

    A plain ASGI middleware: Starlette's ``@app.middleware("http")`` runs each request through an
    extra task and memory streams, ~1 ms per request on this machine; this costs a dict lookup."""

    def __init__(self, app: Any, *, state: Any, max_body_bytes: int, token: str | None,
                 preflight_open: bool) -> None:
        self.app, self.state, self.max_body_bytes = app, state, max_body_bytes
        self.token, self.preflight_open = token, preflight_open

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rejection = self.check(scope)
        if rejection is not None:
            await rejection(scope, receive, send)
            return
        started = False

        async def watch(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:  # the last resort: a clean 500 without details (the log has them)
            log.exception("unhandled error")
            if not started:
                await _error(500, "internal error")(scope, receive, send)

    def check(self, scope: Any) -> JSONResponse | None:
        path = scope.get("path", "")
        if self.state.shutting_down and path != "/health":
            return _error(503, "the server is shutting down", headers={"Connection": "close"})
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                return _error(400, "invalid Content-Length")
            if too_big:
                return _error(413, f"request body over {self.max_body_bytes} bytes")
        if self.token and path != "/health" and not (self.preflight_open and scope.get("method") == "OPTIONS"):
            header = headers.get(b"authorization", b"")
            if header[:7].lower() == b"bearer ":
                supplied = header[7:]
            else:
                from urllib.parse import parse_qs

                query = parse_qs(scope.get("query_string", b"").decode("utf-8", "replace"))
                supplied = query.get("token", [""])[0].encode()
            if not supplied or not hmac.compare_digest(supplied, self.token.encode()):
                return _error(401, "missing or wrong bearer token")
        return None


def warm_up_indexes(store: Store, state: dict[str, Any]) -> None:
    """Load every vector index into the engine's cache with one search each, so that the first
    users do not pay for it (~3–4 s per index at 1M rows, every request in flight waiting on it).
    ``state`` (shown by ``/api/status`` as ``index_preload``) goes from ``loading`` to ``ready``
    or ``failed``."""
    t0 = time.perf_counter()
    try:
        dim = store.dim()
        unit = [1.0] + [0.0] * ((dim or 1) - 1)
        for column, func in sorted(store.vector_indexes()) if dim else ():
            t = time.perf_counter()
            store.rows(f"SELECT id FROM {TABLE} ORDER BY {func}({column}, {{q:Array(Float32)}}) LIMIT 1", {"q": unit})
            log.info("vector index on %s loaded in %.1f s", column, time.perf_counter() - t)
            state.setdefault("indexes", []).append(column)
        state["state"] = "ready"
    except LaionError as exc:  # a cold index is slower, not broken: searches load it themselves
        log.warning("could not preload the vector indexes: %s", exc)
        state.update(state="failed", reason=str(exc))
    state["seconds"] = round(time.perf_counter() - t0, 3)


def begin_shutdown(app: Any) -> int:
    """Stop taking requests, refuse the queued ones and cancel this server's running queries
    (SIGTERM); returns how many running queries were cancelled. Their requests, and the queued
    exact scans and encodings, answer 503 at once; a query that ends before the cancel reaches it
    answers as usual. Logs the cancellations only when there were some."""
    app.state.shutting_down = True
    for gate in (app.state.scan_gate, app.state.encode_gate):
        gate.close("the server is shutting down; the query was not started")
    if app.state.query_tag is None:
        return 0
    try:
        n = app.state.store.cancel_queries(app.state.query_tag)
    except LaionError as exc:
        log.warning("could not cancel running queries: %s", exc)
        return 0
    if n:
        log.info("shutting down: cancelled %d running quer%s", n, "y" if n == 1 else "ies")
    return n


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


def hand_read_bodies() -> dict[tuple[str, str], tuple[dict[str, Any], str]]:
    """The request bodies the routes read by hand, by (path, method): (JSON Schema, media type)."""
    json = "application/json"
    return {
        ("/api/search", "post"): (SearchBody.model_json_schema(), json),
        ("/api/search/upload", "post"): (UPLOAD_FORM, "multipart/form-data"),
        ("/knn-service", "post"): (KnnBody.model_json_schema(), json),
        ("/metadata", "post"): ({"type": "object", "required": ["ids"], "properties": {
            "ids": {"type": "array", "items": {"type": "integer", **INT64}, "maxItems": MAX_K},
            "indice_name": {"type": "string"}}}, json),
    }


def _form_field(prop: dict[str, Any]) -> dict[str, Any]:
    """A SearchBody property as a form field: a form leaves a field out rather than send null."""
    branches = [b for b in prop.get("anyOf", ()) if b.get("type") != "null"]
    rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
    return {**rest, **branches[0]} if branches else rest


#: ``/api/search/upload``'s form: the file, and SearchBody's fields but the other queries (lists repeated)
UPLOAD_FORM: dict[str, Any] = {
    "type": "object", "required": ["file"], "additionalProperties": False, "allOf": [_HYBRID_NEEDS_WORDS],
    "properties": {"file": {"type": "string", "format": "binary", "description": "The query image."},
                   **{name: _form_field(prop) for name, prop in SearchBody.model_json_schema()["properties"].items()
                      if name not in _QUERIES}}}


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def json_response(obj: Any, status: int = 200) -> Response:
    """``obj`` as a JSON response, encoded once (what FastAPI would send for it)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_default)
    return Response(text.encode(), status_code=status, media_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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


GRACEFUL_SECONDS = 3.0


def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """Bind ``host:port`` (every address the host names, as uvicorn would) before anything
    else starts, so that a taken port is one :class:`ServeError` line and the embedded engine is
    never opened for a server that cannot listen. The sockets are handed to :func:`serve`."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ServeError(f"cannot serve on {host}:{port}: unknown host ({getattr(exc, 'strerror', None) or exc})") \
            from None
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # as asyncio's create_server: a restart may take the port over from connections in TIME_WAIT
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise ServeError(_bind_error(host, port, exc)) from None
            sock.set_inheritable(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind_error(host: str, port: int, exc: OSError) -> str:
    import errno

    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return f"cannot serve on {where}: the port is in use (another server?); choose another with --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot serve on {where}: {host} is not an address of this machine (--host)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot serve on {where}: permission denied (ports below 1024 need privileges; choose another --port)"
    return f"cannot serve on {where}: {exc.strerror or exc}"


def serve(store: Store, host: str = "127.0.0.1", port: int = 8000, *, sockets: list[socket.socket] | None = None,
          **options: Any) -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM, on ``sockets`` from :func:`bind_listeners`
    (bound here when not given). On the signal it stops accepting, refuses queued queries and
    cancels its running ones (their requests answer 503) and exits within ``GRACEFUL_SECONDS``
    plus a moment, even if a request is stuck in a model."""
    import uvicorn

    if sockets is None:
        sockets = bind_listeners(host, port)
    app = create_app(store, preload_indexes=True, **options)
    stopping: list[threading.Thread] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutting down, which would kill the process
            # before the store is closed: exit normally instead (status 0)
            self._captured_signals.clear()
            if first:
                log.info("signal %s: shutting down", sig)
                stopping.append(threading.Thread(target=begin_shutdown, args=(app,), name="laion-shutdown",
                                                 daemon=True))
                stopping[0].start()

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # uvicorn says where it listens only for the sockets it bound itself
                shown = f"[{host}]" if ":" in host else host
                logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                                                        shown, port)

    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_keep_alive=5,
                            limit_concurrency=256, timeout_graceful_shutdown=int(GRACEFUL_SECONDS))
    Server(config).run(sockets=sockets)
    for thread in stopping:
        # the cancel's KILL ... SYNC may still be in the engine when the last request is answered:
        # the caller closes the store next, and its count belongs in the log
        thread.join(GRACEFUL_SECONDS)
