"""The one model of a search: :class:`SearchQuery`, its fields' metadata (:class:`Knob`: help,
group, choices, bounds), its validation (:meth:`SearchQuery.check`) and its resolution against a
store (:meth:`SearchQuery.plan` → :class:`SearchPlan`: column, distance, index or scan, WHERE
clause). :mod:`laion_search.search` executes plans; the faces derive their options from here:
``laion search``'s flags, the HTTP API's ``SearchBody``, the page's defaults
(``GET /api/search/fields``).

Light on purpose (no numpy, no engine): the CLI builds its options from it at start-up.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from laion_search.errors import UsageError
from laion_search.schema import (COLUMNS, DEFAULT_COLUMNS, FILTER_STRATEGIES, MAX_K, MAX_WORDS_CHARS, METRICS, MODALITIES,
                                 NSFW_MODES, WHERE_TYPES, WORDS_MODES)

if TYPE_CHECKING:
    from laion_search.store import Store

_WHERE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(==|=|!=|<>|<=|>=|<|>|~)\s*(.*?)\s*$", re.S)
_OPS = {"=": "=", "==": "=", "!=": "!=", "<>": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}



def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, int)):
        try:
            k = int(str(k))
        except ValueError:
            raise UsageError(f"k must be an integer, got {k!r}") from None
    k = int(k)
    if not 1 <= k <= MAX_K:
        raise UsageError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


@dataclass(frozen=True)
class Knob:
    """What the faces need to know about one :class:`SearchQuery` field: its help text, its bounds
    and choices (checked by :meth:`SearchQuery.check`, published in the HTTP schema, printed in
    the CLI's help), which group it belongs to, and whether clients may set it over HTTP."""

    help: str
    group: str = "option"                  # query | output | filter | option
    flags: tuple[str, ...] = ()            # the CLI's names (default: --field-name)
    choices: tuple[str, ...] | None = None
    ge: float | None = None                # bounds of a number, or of each item of a list of numbers
    le: float | None = None
    max_length: int | None = None          # the most characters (items) a request over HTTP may carry: a
                                           # transport limit; the library takes any (a long text is cut
                                           # to the model's context)
    label: str | None = None               # the name errors use (default: the field's)
    pattern: str | None = None             # a string's JSON Schema pattern over HTTP (the library says why)
    server_side: bool = False              # set by the server's own flags, not by an HTTP client


def knob(default: Any, help: str, **spec: Any) -> Any:
    """A :class:`SearchQuery` field: its default and its :class:`Knob`."""
    return field(default=default, metadata={"knob": Knob(help, **spec)})


INT64 = (-(2**63), 2**63 - 1)
#: clip-back's deduplication: results whose embeddings have an inner product ≥ this (after
#: L2 normalisation) are one connected component, of which only the best-ranked result is kept
DEDUP_THRESHOLD = 0.94
#: Reciprocal rank fusion's rank constant: Cormack et al.'s 60, the default of Elasticsearch's
#: ``rrf`` retriever, Qdrant's ``rrf`` and LanceDB's RRF reranker.
RRF_RANK_CONSTANT = 60
#: nprobe's bound (an IVF index has at most 65,536 lists; more probes than lists probe them all)
MAX_NPROBE = 1_048_576


@dataclass
class SearchQuery:
    """One search — the single model of a query. The library takes it, and the faces are derived
    from its fields and their :class:`Knob` metadata: ``laion search``'s options, the HTTP API's
    ``/api/search`` body, query string and upload form, and the page's defaults (``GET
    /api/search/fields``). A new search option is a field here and the code that executes it.

    The query is exactly one of ``text``, ``image`` (a path, bytes or PIL image; base64 over HTTP),
    ``vector`` or ``like`` (a row id: its stored embedding). ``model`` picks the CLIP encoder for
    text and images (over HTTP the server's ``--model`` does)."""

    text: str | None = knob(None, "Text query, encoded with CLIP (text→image by default).", group="query",
                            flags=("--text", "-t"), max_length=10_000)
    image: Any = knob(None, "Image query, encoded with CLIP: a file (CLI), base64 (HTTP), bytes or a PIL image.",
                      group="query", flags=("--image", "-i"))
    vector: Any = knob(None, "Query vector: .npy or .json file (CLI), list of numbers (HTTP, Python); as many "
                             "values as the table's dimension.", group="query")
    like: int | None = knob(None, "Search with the stored embedding of this row id (\"more like this\").",
                            group="query", ge=INT64[0], le=INT64[1])
    k: int = knob(10, "Number of results.", group="output", flags=("--k", "-k"), ge=1, le=MAX_K)
    modality: str = knob("image", "Which embeddings to search.", group="query", flags=("--modality", "-m"),
                         choices=tuple(MODALITIES))
    exact: bool = knob(False, "Brute force: ignore vector indexes.", group="query")
    metric: str = knob("cosine", "Distance: dot is the negative inner product (exact or through an IVF index; "
                                 "an HNSW index serves the cosine or l2 it was built for).", group="query",
                       choices=tuple(METRICS))
    model: str | None = knob(None, "CLIP model for text and image queries (default: $LAION_CLIP_MODEL, else the "
                                   "model the table records).", group="query", server_side=True)
    columns: Sequence[str] = knob((), "Extra result columns.", group="output", flags=("--column", "-c"),
                                  choices=COLUMNS, max_length=len(COLUMNS))
    deduplicate: bool = knob(False, "Drop near-duplicates of better-ranked results, as clip-retrieval does "
                                    f"(embeddings with a cosine ≥ {DEDUP_THRESHOLD} are one; fewer than k may "
                                    "remain; `duplicates` counts those dropped).", group="output")
    nsfw: str = knob("any", "exclude drops NSFW and UNSURE rows; only keeps NSFW ones.", group="filter",
                     choices=NSFW_MODES)
    min_similarity: float | None = knob(None, "Minimum LAION image-text similarity.", group="filter")
    caption_contains: str | None = knob(None, "Case-insensitive caption substring.", group="filter",
                                        max_length=1000)
    where: Sequence[str] = knob((), "COLUMN OP VALUE on an allowed column, e.g. width>=512, LICENSE!=?, "
                                    "url~flickr (repeatable, ANDed).", group="filter", max_length=16)
    exclude_ids: Sequence[int] = knob((), "Leave this row id out of the results (repeatable).", group="filter",
                                      flags=("--exclude-id",), ge=INT64[0], le=INT64[1], max_length=MAX_K)
    words: str | None = knob(None, "Caption words (lower-cased, split on ASCII non-alphanumerics, as the text index "
                                   "splits captions): with a vector query a filter, alone a keyword ranking, with "
                                   "hybrid fused with the vector ranking.", group="filter", flags=("--words", "-w"),
                             max_length=MAX_WORDS_CHARS, pattern=r"[^\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]")
    words_mode: str = knob("any", "any: a caption with one of the words; all: with every word; phrase: the words "
                                  "in order, adjacent.", group="filter", choices=WORDS_MODES)
    hybrid: bool = knob(False, "Fuse the keyword ranking (words) and the vector ranking by reciprocal rank fusion "
                               "(needs words and a query).", group="fusion")
    rank_constant: int = knob(RRF_RANK_CONSTANT, "hybrid: RRF's rank constant c in weight / (c + rank).",
                              group="fusion", ge=0, le=10_000)
    vector_weight: float = knob(1.0, "hybrid: weight of the vector ranking.", group="fusion", ge=0.0, le=1000.0)
    words_weight: float = knob(1.0, "hybrid: weight of the keyword ranking.", group="fusion", ge=0.0, le=1000.0)
    ef_search: int | None = knob(None, "HNSW candidate list size at query time (default: the value `laion "
                                       "index tune` stored, else the engine's 256).", ge=1, le=100_000)
    rescoring: bool = knob(False, "Re-rank index candidates with exact distances.")
    filter_strategy: str = knob("auto", "Filtered searches through an index: auto post-filters, then evaluates "
                                        "the filter first if short of k.", choices=FILTER_STRATEGIES,
                                label="filter strategy")
    fetch_multiplier: float = knob(4.0, "Index candidates fetched per wanted row when filtering or rescoring.",
                                   ge=1, le=1000)
    verify_checksums: bool = knob(False, "Exact scans: verify each data block's checksum as it is read (off by "
                                         "default: ~20% slower; parts are checked when written and merged).")
    nprobe: int | None = knob(None, "IVF lists to probe (searches through the IVF index; default: the value "
                                    "`laion index tune` stored, else 32).", ge=1, le=MAX_NPROBE)
    scan_threads: int | None = knob(None, "Exact scans: use at most this many engine threads.", ge=1,
                                    server_side=True)
    scan_nice: int | None = knob(None, "Exact scans: run the engine's threads at this Linux nice "
                                       "(os_thread_priority; needs CAP_SYS_NICE, else ignored).", ge=0, le=19,
                                 server_side=True)

    @classmethod
    def build(cls, vector: Any = None, *, filters: Any = None, options: Any = None, **fields: Any) -> "SearchQuery":
        """From keyword arguments, with filters and options given field by field or as
        :class:`Filters` / :class:`SearchOptions`."""
        parts = {**(filters.__dict__ if filters else {}), **(options.__dict__ if options else {})}
        return cls(vector=vector, **{**parts, **fields})

    @property
    def filters(self) -> Any:
        """The ``filter`` fields, as :class:`Filters`."""
        return Filters(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Filters)})

    @property
    def options(self) -> Any:
        """The ``option`` fields, as :class:`SearchOptions`."""
        return SearchOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SearchOptions)})

    def check(self) -> "SearchQuery":
        """Everything that can be checked without the store, with a one-line reason; returns self.
        The bounds and choices come from the fields' :class:`Knob`; a query checked once is not
        checked again (:func:`search` and :meth:`plan` call this)."""
        if self.__dict__.get("_checked"):
            return self
        given = [x is not None for x in (self.vector, self.like, self.text, self.image)]
        if sum(given) > 1 or (sum(given) == 0 and self.words is None):
            raise UsageError("give exactly one query: a text, an image, a vector or like=<row id> (or words alone)")
        if self.hybrid and (self.words is None or not any(given)):
            raise UsageError("hybrid fuses a keyword ranking with a vector ranking: give words and a text, image, "
                             "vector or like query")
        if self.vector is not None:
            from laion_search.vectors import as_vector

            as_vector(self.vector, source="query vector")  # finite, fits float32 (its length needs the store)
        check_k(self.k)
        _columns(self.columns)
        for f in dataclasses.fields(self):
            _check_knob(f.name, f.metadata["knob"], getattr(self, f.name))
        build_where(self.filters)
        self.__dict__["_checked"] = True
        return self

    def plan(self, store: Store) -> "SearchPlan":
        """The query resolved against ``store``: which column and distance, how it will be answered
        (``hnsw``, ``ivf``, ``exact``; ``words`` for keywords alone, ``hybrid`` for keywords fused
        with a vector route), the WHERE clause and its parameters. :func:`search` runs a
        plan, and a server admits a query by its :attr:`SearchPlan.scans` — one decision for both."""
        self.check()
        if self.modality != "image":
            store.require_modality(self.modality)  # e.g. text on an image-only table (ClickHouse LAION-5B, SISAP)
        column = MODALITIES[self.modality]
        func = METRICS[self.metric]
        filters = self.filters
        if self.like is not None:
            filters = Filters(**{**filters.__dict__, "exclude_ids": [*filters.exclude_ids, int(self.like)]})
        where, params = build_where(filters)
        settings = _index_settings(self.options, filtered=bool(where))
        hnsw = (column, func) in store.vector_indexes()
        from laion_search.index import ivf

        served = None if self.exact else ivf.state(store).served.get(self.modality)
        if self.nprobe is not None and served is None and not self.exact:
            raise UsageError(f"nprobe is for an IVF index, and {column} has none: laion index create --kind ivf "
                             f"--column {self.modality}")
        vector_query = any(x is not None for x in (self.vector, self.like, self.text, self.image))
        if not vector_query:  # words alone: a keyword ranking, answered from the text index
            from laion_search.index import text

            return SearchPlan(self, column, func, "words", filters, where, params, settings,
                              scan=not text.has_text_index(store))
        if self.exact:
            route = "exact"
        elif served is not None and (self.nprobe is not None or not hnsw):
            route = "ivf"  # chosen by --nprobe, or because it is the only index of the column
        elif hnsw:
            route = "hnsw"
        else:
            route = "exact"  # no index serves this column and metric: the engine would scan anyway
        return SearchPlan(self, column, func, "hybrid" if self.hybrid else route, filters, where, params, settings,
                          served, unindexed=route == "exact" and not self.exact, scan=route == "exact")


@dataclass
class SearchPlan:
    """A :class:`SearchQuery` resolved against a store (:meth:`SearchQuery.plan`)."""

    query: SearchQuery
    column: str                 # image_embedding | text_embedding
    func: str                   # cosineDistance | L2Distance
    route: str                  # hnsw | ivf | exact | words (keywords alone) | hybrid (fused with a vector route)
    filters: Any                # Filters, with a like query's own row excluded
    where: str                  # the filters as a WHERE expression over fixed names
    params: dict[str, Any]      # its values
    settings: dict[str, Any]    # the index knobs as engine settings
    ivf: Any = None             # the IVF generation that serves the column (route ivf)
    unindexed: bool = False     # exact because no index serves the column, not because asked
    scan: bool = False          # it reads every row: a vector scan, or keywords without a text index

    @property
    def scans(self) -> bool:
        """Whether it reads every row (a server queues such queries behind a gate)."""
        return self.scan

    def replace(self, **fields: Any) -> "SearchPlan":
        """The same plan for the query with ``fields`` changed (e.g. the vector a server encoded,
        or its scan limits) — fields that do not change how it is answered."""
        q = dataclasses.replace(self.query, **fields)
        q.__dict__["_checked"] = True
        return dataclasses.replace(self, query=q)


def _check_knob(name: str, spec: Knob, value: Any) -> None:
    if value is None:
        return
    label = spec.label or name
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if spec.choices is not None and isinstance(value, (list, tuple)):
        return  # list choices (columns) have their own message: _columns
    if spec.choices is not None:
        if not isinstance(value, str) or value not in spec.choices:
            raise UsageError(f"{label} must be one of {', '.join(spec.choices)}, got {value!r}")
    if spec.ge is None and spec.le is None:
        return
    ids = (spec.ge, spec.le) == INT64  # row ids: the engine would wrap one outside Int64 (2**63 → -2**63)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (ids and isinstance(v, float)
                                                                      and not v.is_integer()):
            try:
                if isinstance(v, bool) or (ids and isinstance(v, float)):
                    raise ValueError
                v = float(v) if isinstance(spec.ge, float) else int(str(v))
            except (TypeError, ValueError):
                if ids:
                    raise UsageError(f"{label}: {v!r} is not a row id: an id must be an integer") from None
                kind = "a number" if isinstance(spec.ge, float) else "an integer"
                raise UsageError(f"{label} must be {kind}, got {v!r}") from None
        if ids and not INT64[0] <= v <= INT64[1]:
            raise UsageError(f"{label}: {v} is out of range (row ids are 64-bit signed integers)")
        if (spec.ge is not None and not v >= spec.ge) or (spec.le is not None and not v <= spec.le):
            lo = "" if spec.ge is None else f"{spec.ge:g}" if isinstance(spec.ge, float) else str(spec.ge)
            hi = "" if spec.le is None else f"{spec.le:g}" if isinstance(spec.le, float) else str(spec.le)
            bounds = f"between {lo} and {hi}" if lo and hi else f"at least {lo}" if lo else f"at most {hi}"
            raise UsageError(f"{label} must be {bounds}, got {v}")


def query_fields(*, group: str | None = None, http: bool = False) -> list[dataclasses.Field]:
    """:class:`SearchQuery`'s fields (of one ``group``; ``http``: those an HTTP client may set), in order."""
    return [f for f in dataclasses.fields(SearchQuery)
            if (group is None or f.metadata["knob"].group == group) and not (http and f.metadata["knob"].server_side)]


def describe_query() -> list[dict[str, Any]]:
    """The query model as data (``GET /api/search/fields``, the docs): each field's name, default,
    help, group, choices and bounds."""
    out = []
    for f in query_fields(http=True):
        kb: Knob = f.metadata["knob"]
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        entry = {"name": f.name, "default": default, "help": kb.help, "group": kb.group}
        entry.update({k: v for k, v in (("choices", list(kb.choices) if kb.choices else None), ("minimum", kb.ge),
                                        ("maximum", kb.le), ("max_length", kb.max_length)) if v is not None})
        out.append(entry)
    return out


def _view(name: str, group: str, doc: str) -> Any:
    """A dataclass of the fields of one group of :class:`SearchQuery`, with the same defaults."""
    fields_ = [(f.name, f.type, field(default=f.default, metadata=f.metadata)) for f in query_fields(group=group)]
    cls = dataclasses.make_dataclass(name, fields_, namespace={"__doc__": doc, "__module__": __name__})
    return cls


#: Row filters, combined with AND: :class:`SearchQuery`'s ``filter`` fields, same names and defaults.
Filters = _view("Filters", "filter", "Row filters, combined with AND (the ``filter`` fields of SearchQuery).")


def _no_filter(self: Any) -> bool:
    """Whether no filter is set (every field at its default; an empty list counts as none)."""
    return all((not getattr(self, f.name)) if f.default in ((), None) else getattr(self, f.name) == f.default
               for f in dataclasses.fields(self))


Filters.is_empty = _no_filter
#: Query-time knobs: :class:`SearchQuery`'s ``option`` fields, same names and defaults.
SearchOptions = _view("SearchOptions", "option", "Query-time knobs; defaults suit most searches (the "
                                                  "``option`` fields of SearchQuery).")


def build_where(filters: Any) -> tuple[str, dict[str, Any]]:
    """Filters → a WHERE expression over fixed column names, with every value a parameter."""
    clauses: list[str] = []
    params: dict[str, Any] = {}
    if filters.nsfw not in NSFW_MODES:
        raise UsageError(f"nsfw must be one of {', '.join(NSFW_MODES)}")
    if filters.nsfw == "exclude":
        clauses.append("NSFW NOT IN ('NSFW', 'UNSURE')")
    elif filters.nsfw == "only":
        clauses.append("NSFW = 'NSFW'")
    if filters.min_similarity is not None:
        v = float(filters.min_similarity)
        if not math.isfinite(v):
            raise UsageError("min_similarity must be a finite number")
        clauses.append("similarity >= {min_similarity:Float32}")
        params["min_similarity"] = v
    if filters.caption_contains:
        clauses.append("positionCaseInsensitiveUTF8(caption, {caption_contains:String}) > 0")
        params["caption_contains"] = str(filters.caption_contains)
    for i, expr in enumerate(filters.where):
        clause, value = _where_clause(expr, f"w{i}")
        clauses.append(clause)
        params[f"w{i}"] = value
    if filters.exclude_ids:
        clauses.append("id NOT IN {exclude_ids:Array(Int64)}")
        params["exclude_ids"] = [int(x) for x in filters.exclude_ids]
    words = getattr(filters, "words", None)
    if words is not None:
        from laion_search.index import text  # the tokenizer the index uses

        tokens = text.query_words(words, filters.words_mode)
        clauses.append(text.words_clause(filters.words_mode))
        params.update(text.words_params(tokens, filters.words_mode))
    return " AND ".join(clauses), params


def _where_clause(expr: str, name: str) -> tuple[str, Any]:
    m = _WHERE_RE.match(expr or "")
    if not m:
        raise UsageError(f"--where {expr!r}: expected COLUMN OP VALUE, e.g. width>=512 or caption~lego")
    col, op, raw = m.group(1), m.group(2), m.group(3)
    if col not in WHERE_TYPES:
        raise UsageError(f"--where {expr!r}: column {col!r} is not filterable; use one of {', '.join(WHERE_TYPES)}")
    ctype = WHERE_TYPES[col]
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        raw = raw[1:-1]
    if op == "~":
        if ctype != "String":
            raise UsageError(f"--where {expr!r}: ~ (contains) works on text columns only")
        return f"positionCaseInsensitiveUTF8(`{col}`, {{{name}:String}}) > 0", raw
    value: Any = raw
    if ctype != "String":
        try:
            value = float(raw) if ctype.startswith("Float") else int(raw)
        except ValueError:
            raise UsageError(f"--where {expr!r}: {col} is a number, got {raw!r}") from None
        if ctype.startswith("Float") and not math.isfinite(value):
            raise UsageError(f"--where {expr!r}: value must be finite")
        if not ctype.startswith("Float"):
            bits = 64 if ctype.endswith("64") else 32
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ctype.startswith("Int") else (0, 2**bits - 1)
            if not lo <= value <= hi:
                raise UsageError(f"--where {expr!r}: {value} is out of range for {col}")
    return f"`{col}` {_OPS[op]} {{{name}:{ctype}}}", value


def _column(modality: str) -> str:
    if modality not in MODALITIES:
        raise UsageError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    return MODALITIES[modality]


def _metric(metric: str) -> str:
    if metric not in METRICS:
        raise UsageError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return METRICS[metric]


def _columns(columns: Sequence[str] | None) -> list[str]:
    cols = list(DEFAULT_COLUMNS)
    for c in columns or ():
        if c not in COLUMNS:
            raise UsageError(f"unknown column {c!r}; choose from {', '.join(COLUMNS)}")
        if c not in cols:
            cols.append(c)
    return cols


def _index_settings(options: Any, filtered: bool) -> dict[str, Any]:
    """The index knobs (checked by :meth:`SearchQuery.check`) as engine settings."""
    settings: dict[str, Any] = {}
    if options.ef_search is not None:
        settings["hnsw_candidate_list_size_for_search"] = int(options.ef_search)
    if options.rescoring:
        settings["vector_search_with_rescoring"] = 1
    if filtered or options.rescoring:
        settings["vector_search_index_fetch_multiplier"] = float(options.fetch_multiplier)
    return settings
