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

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from laion_search.errors import EncoderUnavailable, LaionError, ServeError, UsageError
from laion_search.schema import TABLE
from laion_search.search import DEDUP_THRESHOLD, fitting_model, model_mismatch, search, table_model  # noqa: F401
from laion_search.sql import SqlLimits
from laion_search.store import Store
from laion_search.web.admission import AdmissionGate
from laion_search.web.cache import LRUCache
# the server's parts, importable from here as before the split
from laion_search.web.clip_back import CLIP_BACK_COLUMNS, KNN_EXTRA, METADATA_COLUMNS, router as clip_back_router  # noqa: F401
from laion_search.web.encoding import (_error, _json_default, _jsonable, install_error_handlers,  # noqa: F401
                                       json_response, storage_fault)
from laion_search.web.guard import RequestGuard
from laion_search.web.images import IMAGE_TYPES, decode_base64_image, fetch_image_url, safe_image_path  # noqa: F401
from laion_search.web.models import (ERROR_RESPONSES, FLOAT32, HTTP_ONLY, INT64, INT64_END, INT64_MIN,  # noqa: F401
                                     KNN_QUERY, MAX_BODY_BYTES, MAX_IMAGE_BYTES, MAX_TEXT_CHARS, NOT_BLANK,
                                     ONE_QUERY, SERVER_SIDE, UPLOAD_FORM, ErrorBody, KnnBody, KnnRow, MetadataRow,
                                     SearchAnswer, SearchBody, SearchRow, SqlAnswer, SqlBody, StatusAnswer, answers,
                                     hand_read_bodies, search_body_from_params)
from laion_search.web.routes import (ServerOptions, local_router, page_router, run_search,  # noqa: F401
                                     search_router, service_router, sql_router)

log = logging.getLogger("laion_search.web")

#: Linux nice of an exact scan's engine threads in a server: the kernel then runs indexed searches
#: first when both want a core (``laion bench serve --mixed`` measures it)
SCAN_NICE = 19
#: seconds a text/image request waits for a start-up encoder check still running
ENCODER_WAIT = 10.0


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
    scan_threads = scan_threads or max(1, cores // 2)
    if query_timeout:
        store.set_session("max_execution_time", float(query_timeout))
    # tag this server's queries, so that shutting down cancels them (and only them). Embedded
    # only: on a ClickHouse server the process's exit closes its connections instead
    tag = None
    if store.embedded:
        tag = f"laion-serve-{os.getpid()}-{id(store):x}"
        store.set_session("log_comment", tag)
    root = Path(image_root).expanduser().resolve() if image_root else None
    if root is not None and not root.is_dir():
        raise UsageError(f"image folder {image_root} does not exist")
    app = FastAPI(title="laion-search", version="0.1.0",
                  description="Search LAION image-text embeddings in ClickHouse. Bearer token required when the "
                              "server was started with one (all routes but /health).")
    state = app.state
    state.store, state.query_tag, state.shutting_down = store, tag, False
    state.encoder = EncoderState(store, model)
    state.encoder.start()  # the one check, at start-up
    state.index_preload = {"state": "loading" if preload_indexes else "off"}
    if preload_indexes:
        threading.Thread(target=warm_up_indexes, args=(store, state.index_preload), name="laion-preload-indexes",
                         daemon=True).start()
    state.results_cache = LRUCache(cache_size)
    state.text_cache = LRUCache(text_cache_size)
    state.image_root = root
    state.scan_gate = AdmissionGate("exact scan", max_scans or max(1, cores // 4), scan_queue)
    state.encode_gate = AdmissionGate("encoding", 1, encode_queue)
    state.options = ServerOptions(
        allow_image_url=allow_image_url, image_url_timeout=image_url_timeout, scan_threads=scan_threads,
        scan_nice=scan_nice,
        sql_limits=SqlLimits(seconds=float(query_timeout or 0), threads=scan_threads, nice=scan_nice)
        if allow_sql else None)

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    # added last, so it runs first (outside CORS): shutdown, body size and token checks
    app.add_middleware(RequestGuard, state=app.state, max_body_bytes=max_body_bytes, token=token,
                       preflight_open=bool(cors_origins))
    install_error_handlers(app)
    for router in (service_router, search_router, *([sql_router] if allow_sql else []), local_router,
                   clip_back_router, page_router):
        app.include_router(router)
    app.openapi = lambda: openapi(app)  # type: ignore[method-assign]
    return app


def openapi(app: FastAPI) -> dict[str, Any]:
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
        cancelled = app.state.store.cancel_query_ids(app.state.query_tag)
        # a query admitted just before the signal may not have reached the engine yet (its
        # session still being set up): while a scan slot is held, look again until it shows up
        # (and is cancelled) or its request ends
        deadline = time.monotonic() + GRACEFUL_SECONDS
        while app.state.scan_gate.active and time.monotonic() < deadline:
            cancelled |= app.state.store.cancel_query_ids(app.state.query_tag)
            time.sleep(0.02)
        n = len(cancelled)
    except LaionError as exc:
        log.warning("could not cancel running queries: %s", exc)
        return 0
    if n:
        log.info("shutting down: cancelled %d running quer%s", n, "y" if n == 1 else "ies")
    return n



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
