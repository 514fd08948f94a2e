"""The server's answers as bytes: JSON encoding (once, for the hot routes), the one-line
``{"error": …}`` answer, and the exception handlers that turn the library's errors into them
(:func:`install_error_handlers`)."""

import json
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from laion_search.errors import (EncoderError, EncoderUnavailable, LaionError, Overloaded, QueryError, ShuttingDown,
                                 UsageError)

log = logging.getLogger("laion_search.web")


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


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal and failure as ``{"error": …}`` with its status: 400 for bad input, 429 when
    overloaded, 503 for an unavailable encoder or store or a server shutting down, 500 (without
    details) for the rest."""

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
        if request.app.state.shutting_down:
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
