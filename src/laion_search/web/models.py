"""The HTTP API's request and answer models: :data:`SearchBody` made from the query model,
clip-back's :class:`KnnBody`, the answers the OpenAPI document describes, and the bodies the
routes read by hand (:func:`hand_read_bodies`)."""

import collections.abc
import dataclasses
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.config import JsonDict, JsonValue

from laion_search.errors import UsageError
from laion_search.query import SearchQuery, query_fields
from laion_search.schema import MAX_K, MODALITIES, TABLE
from laion_search.sql import SQL_MAX_CHARS

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_TEXT_CHARS = 10_000

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


