"""clip-retrieval's back end, so its ``ClipClient`` and front end work: ``POST /knn-service``,
``GET /indices-list``, ``POST /metadata`` (:data:`router`), over :func:`~laion_search.web.routes.run_search`."""

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from laion_search.errors import UsageError
from laion_search.schema import COLUMNS, DEFAULT_COLUMNS, MAX_K, TABLE
from laion_search.store import Store
from laion_search.web.encoding import _jsonable, json_response
from laion_search.web.images import decode_base64_image
from laion_search.web.models import KnnBody, KnnRow, MetadataRow, SearchBody, answers
from laion_search.web.routes import image_url_bytes, run_search

#: clip-back's default ``columns_to_return`` (url, image_path, caption, NSFW) that our table has
CLIP_BACK_COLUMNS = [c for c in ("url", "image_path", "caption", "NSFW") if c in COLUMNS]
METADATA_COLUMNS = CLIP_BACK_COLUMNS
#: what /knn-service's search reads beyond /api/search's own columns (id, caption, url)
KNN_EXTRA = tuple(c for c in METADATA_COLUMNS if c not in DEFAULT_COLUMNS)

router = APIRouter()


@router.get("/indices-list", tags=["clip-retrieval"], responses=answers())
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


def knn(state: Any, body: KnnBody) -> list[dict[str, Any]]:
    """clip-back's search: its query precedence, its k clamps and its answer rows."""
    if body.indice_name not in (None, "", TABLE):
        raise UsageError(f"unknown indice_name {body.indice_name!r}; this server has {TABLE!r}")
    # clip-back's precedence: text, then image, then image_url, then embedding_input
    text = body.text if body.text is not None and body.text.split() else None  # blank: no text query
    image_bytes = vector = None
    if text is None and body.image is not None:
        image_bytes = decode_base64_image(body.image)
    elif text is None and body.image_url is not None:
        image_bytes = image_url_bytes(state, body.image_url)
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
    rows = run_search(state, sb, image_bytes, extra=KNN_EXTRA)["results"][:k]
    return [{**{c: _jsonable(r[c]) for c in METADATA_COLUMNS}, "id": r["id"], "similarity": 1.0 - float(r["distance"])}
            for r in rows]


@router.post("/knn-service", tags=["clip-retrieval"], response_model=None, responses=answers(list[KnnRow]))
async def knn_service(request: Request) -> Response:
    data = await json_body(request)
    if not isinstance(data, dict):
        raise UsageError("the request body must be a JSON object")
    body = KnnBody.model_validate(data)
    return json_response(await run_in_threadpool(knn, request.app.state, body))  # encoded once, as /api/search


@router.post("/metadata", tags=["clip-retrieval"], response_model=None, responses=answers(list[MetadataRow]))
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
    found = await run_in_threadpool(_metadata, request.app.state.store, ids)
    return [{"id": i, "metadata": found[i]} for i in ids if i in found]


def _metadata(store: Store, ids: list[int]) -> dict[int, dict[str, Any]]:
    """clip-back's metadata columns of these rows, by id."""
    if not ids:
        return {}
    cols = ", ".join(f"`{c}`" for c in METADATA_COLUMNS)
    rows = store.rows(f"SELECT id, {cols} FROM {TABLE} WHERE id IN {{ids:Array(Int64)}}", {"ids": ids})
    return {r["id"]: _jsonable({c: r[c] for c in METADATA_COLUMNS}) for r in rows}


