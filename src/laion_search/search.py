"""Nearest-neighbour search over the ``laion`` table: by vector, by an existing row, or (with an
encoder) by text or image — exact (brute force) or through the ``vector_similarity`` index.

Every search is one SQL statement built from fixed pieces; the query vector, ids, thresholds
and filter values are query parameters. The statement has the guide's shape
(``ORDER BY cosineDistance(image_embedding, {q:Array(Float32)}) LIMIT k``), which is what lets
ClickHouse answer it from the HNSW index when one exists for that column and metric.

Filtered searches through an index are post-filtered by the engine (the index returns
candidates, then the WHERE clause drops some), which can leave fewer than k rows. We fetch
more candidates (``fetch_multiplier``) and, if still short, re-run the query pre-filtered
(exact over the matching rows), so a filtered search returns k rows whenever k rows match.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from laion_search.backends import settings_sql
from laion_search.errors import QueryError, UsageError
from laion_search.index import ivf
from laion_search.schema import (COLUMNS, DEFAULT_COLUMNS, FILTER_STRATEGIES, MAX_K, METRICS, MODALITIES, NSFW_MODES,
                                 SCAN_SUFFIX, TABLE, WHERE_TYPES, distance_sql, model_for_dim)
from laion_search.store import Store
from laion_search.vectors import as_vector

_WHERE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(==|=|!=|<>|<=|>=|<|>|~)\s*(.*?)\s*$", re.S)
_OPS = {"=": "=", "==": "=", "!=": "!=", "<>": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


@dataclass
class Filters:
    """Row filters, combined with AND."""

    nsfw: str = "any"                    # any | exclude (drop NSFW and UNSURE) | only (NSFW only)
    min_similarity: float | None = None  # LAION's image-text CLIP similarity
    caption_contains: str | None = None  # case-insensitive substring
    where: Sequence[str] = ()            # "width>=512", "LICENSE=?", "caption~lego" (allow-listed columns)
    exclude_ids: Sequence[int] = ()

    def is_empty(self) -> bool:
        return (self.nsfw == "any" and self.min_similarity is None and not self.caption_contains
                and not self.where and not self.exclude_ids)


@dataclass
class SearchOptions:
    """Query-time knobs; defaults suit most searches."""

    ef_search: int | None = None          # HNSW candidate list at query time (default: the value
                                          # `laion index tune` stored for the index, else the engine's 256)
    rescoring: bool = False               # re-rank index candidates with exact distances
    filter_strategy: str = "auto"         # auto: post-filter, then pre-filter if short of k
    fetch_multiplier: float = 4.0         # candidates per wanted row when post-filtering
    verify_checksums: bool = False        # exact scans: check each block's checksum as it is read
    nprobe: int | None = None             # IVF lists probed (default: the value `laion index tune` stored, else 32)
    scan_threads: int | None = None       # exact scans: cap the engine's threads (max_threads)
    scan_nice: int | None = None          # exact scans: Linux nice of the engine's threads (0-19)


@dataclass
class SearchResult:
    """The rows of one search, nearest first: iterate over it for row dicts (``rank``,
    ``distance``, ``id``, ``caption``, ``url`` and any extra columns asked for)."""

    rows: list[dict[str, Any]]
    k: int
    modality: str
    metric: str
    exact: bool
    strategy: str
    seconds: float
    sql: str = field(repr=False, default="")
    params: dict[str, Any] = field(repr=False, default_factory=dict)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def to_records(self) -> list[dict[str, Any]]:
        return self.rows

    def to_pandas(self):  # pragma: no cover - optional dependency
        import pandas as pd

        return pd.DataFrame(self.rows)

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, "modality": self.modality, "metric": self.metric, "exact": self.exact,
                "strategy": self.strategy, "seconds": round(self.seconds, 6), "results": self.rows}


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        try:
            k = int(str(k))
        except ValueError:
            raise UsageError(f"k must be an integer, got {k!r}") from None
    k = int(k)
    if not 1 <= k <= MAX_K:
        raise UsageError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


def fitting_model(store: Store) -> str | None:
    """The CLIP model that made the table's vectors: as its shards record it, else the model LAION
    used for the table's dimension (ViT-B/32 for 512-d, ViT-L/14 for 768-d); None when unknown."""
    return store.model() or model_for_dim(store.dim()) or None


def table_model(store: Store, model: str | None = None) -> str:
    """The one model resolution of the CLI, the server, the UDFs and the page: ``model`` if given,
    else ``$LAION_CLIP_MODEL``, else :func:`fitting_model`, else the default (ViT-B/32)."""
    import os

    from laion_search.clip.encoders import DEFAULT_MODEL, ENV_MODEL

    return str(model) if model else os.environ.get(ENV_MODEL) or fitting_model(store) or DEFAULT_MODEL


def model_mismatch(store: Store, name: str, dim: int) -> str | None:
    """Why model ``name`` (making ``dim``-d vectors) cannot search this table, naming the model
    that fits; None when it can."""
    have = store.dim()
    if have is None or int(dim) == have:
        return None
    right = fitting_model(store)
    hint = f"use --model {right}" if right else "use a CLIP model with that dimension"
    return (f"CLIP model {name!r} makes {dim}-d vectors but the table holds {have}-d embeddings"
            f"{f' (made with {right})' if right else ''}: {hint}")


def encoder_for(store: Store, model: str | None = None) -> Any:
    """The CLIP encoder for searches of this table (:func:`table_model`). A model whose vectors
    have another dimension than the table's is a :class:`UsageError` naming the model that fits."""
    from laion_search.clip.encoders import get_encoder

    enc = get_encoder(table_model(store, model))
    wrong = model_mismatch(store, enc.name, int(enc.dim))
    if wrong:
        raise UsageError(wrong)
    return enc


def row_vector(store: Store, row_id: Any, modality: str = "image") -> np.ndarray:
    """The stored embedding of row ``row_id`` (for "more like this")."""
    column = _column(modality)
    try:
        rid = int(row_id)
    except (TypeError, ValueError):
        raise UsageError(f"id must be an integer, got {row_id!r}") from None
    if not -(2**63) <= rid < 2**63:
        raise UsageError(f"id {rid} is out of range")
    t = store.sql(f"SELECT {column} FROM {TABLE} WHERE id = {{id:Int64}} LIMIT 1", {"id": rid})
    if t.num_rows == 0:
        raise UsageError(f"no row with id {rid}")
    return np.asarray(t.column(0)[0].as_py(), dtype=np.float32)


def will_scan(store: Store, modality: str = "image", metric: str = "cosine", exact: bool = False) -> bool:
    """Whether such a search reads every row (exact, or no vector index serves its column and
    metric) rather than walking an index: servers class and admit queries by it."""
    if exact:
        return True
    return (_column(modality), _metric(metric)) not in store.vector_indexes() and modality not in ivf.state(store).served


@dataclass
class SearchQuery:
    """One search: the model the library, the CLI (``laion search``) and the HTTP API (``/api/search``
    as a JSON body, a query string or an upload form) all take, so a knob exists in all or in none.

    The query is exactly one of ``text``, ``image`` (a path, bytes or PIL image; base64 over HTTP),
    ``vector`` or ``like`` (a row id: its stored embedding). ``model`` picks the CLIP encoder for
    text and images (over HTTP the server's ``--model`` does)."""

    text: str | None = None
    image: Any = None
    vector: Any = None
    like: int | None = None
    k: int = 10
    modality: str = "image"           # which embeddings to search: image | text
    exact: bool = False               # brute force, ignoring vector indexes
    metric: str = "cosine"            # cosine | l2 | dot (inner product, largest first; exact or IVF)
    model: str | None = None
    columns: Sequence[str] = ()       # result columns besides id, caption, url
    # filters (see Filters)
    nsfw: str = "any"
    min_similarity: float | None = None
    caption_contains: str | None = None
    where: Sequence[str] = ()
    exclude_ids: Sequence[int] = ()
    # index and scan knobs (see SearchOptions)
    ef_search: int | None = None
    rescoring: bool = False
    filter_strategy: str = "auto"
    fetch_multiplier: float = 4.0
    verify_checksums: bool = False
    nprobe: int | None = None         # IVF: lists probed (given: search through the IVF index)
    scan_threads: int | None = None   # exact scans: cap the engine's threads (a server sets it)
    scan_nice: int | None = None      # exact scans: run the engine's threads at this nice (a server sets it)

    @classmethod
    def build(cls, vector: Any = None, *, filters: Filters | None = None, options: SearchOptions | None = None,
              **fields: Any) -> "SearchQuery":
        """From keyword arguments, with filters and options given field by field or as
        :class:`Filters` / :class:`SearchOptions`."""
        parts = {**(filters.__dict__ if filters else {}), **(options.__dict__ if options else {})}
        return cls(vector=vector, **{**parts, **fields})

    @property
    def filters(self) -> Filters:
        return Filters(nsfw=self.nsfw, min_similarity=self.min_similarity, caption_contains=self.caption_contains,
                       where=tuple(self.where or ()), exclude_ids=tuple(self.exclude_ids or ()))

    @property
    def options(self) -> SearchOptions:
        return SearchOptions(ef_search=self.ef_search, rescoring=self.rescoring, filter_strategy=self.filter_strategy,
                             fetch_multiplier=self.fetch_multiplier, verify_checksums=self.verify_checksums,
                             nprobe=self.nprobe, scan_threads=self.scan_threads, scan_nice=self.scan_nice)

    def check(self) -> "SearchQuery":
        """Everything that can be checked without the store, with a one-line reason; returns self."""
        given = [x is not None for x in (self.vector, self.like, self.text, self.image)]
        if sum(given) != 1:
            raise UsageError("give exactly one query: a text, an image, a vector or like=<row id>")
        if self.vector is not None:
            as_vector(self.vector, source="query vector")  # finite, fits float32 (its length needs the store)
        check_k(self.k)
        _column(self.modality)
        _metric(self.metric)
        _columns(self.columns)
        if self.filter_strategy not in FILTER_STRATEGIES:
            raise UsageError(f"filter strategy must be one of {', '.join(FILTER_STRATEGIES)}")
        _index_settings(self.options, filtered=True)
        build_where(self.filters)
        return self


def search(store: Store, vector: Any = None, *, query: SearchQuery | None = None, filters: Filters | None = None,
           options: SearchOptions | None = None, **fields: Any) -> SearchResult:
    """Find the k rows nearest to one query in one modality's embeddings: a :class:`SearchQuery`,
    or its fields as keyword arguments (``search(store, text="a dog", k=5, nsfw="exclude")``).

    ``modality="image"`` searches image embeddings — so ``text=`` is LAION's text→image search;
    ``modality="text"`` searches caption embeddings. Text and images are encoded with the CLIP
    ``model`` (default: ``$LAION_CLIP_MODEL``, else the model the table's shards record — ViT-B/32
    for LAION-400M, ViT-L/14 for LAION-5B, ClickHouse's subset and SISAP).
    """
    if query is None:
        query = SearchQuery.build(vector, filters=filters, options=options, **fields)
    elif vector is not None or filters is not None or options is not None or fields:
        raise UsageError("give a SearchQuery or keyword arguments, not both")
    q = query.check()
    k = check_k(q.k)
    column = _column(q.modality)
    func = _metric(q.metric)
    filters = q.filters
    options = q.options
    vector = q.vector
    if q.modality != "image":
        store.require_modality(q.modality)  # e.g. text on an image-only table (ClickHouse LAION-5B, SISAP)
    if q.text is not None or q.image is not None:
        enc = encoder_for(store, q.model)
        vector = enc.encode_text([q.text])[0] if q.text is not None else enc.encode_image([q.image])[0]
    if q.like is not None:
        vector = row_vector(store, q.like, q.modality)
        filters = Filters(**{**filters.__dict__, "exclude_ids": [*filters.exclude_ids, int(q.like)]})
    modality, metric, exact, columns = q.modality, q.metric, q.exact, q.columns
    dim = store.dim()
    if dim is None:
        return SearchResult([], k, modality, metric, exact, "empty", 0.0)
    qv = as_vector(vector, dim=dim, source="query vector")
    cols = _columns(columns)
    where, params = build_where(filters)
    params["q"] = qv
    select = ", ".join(f"`{c}`" for c in cols)
    sql = (f"SELECT {select}, {distance_sql(func, column, '{q:Array(Float32)}')} AS distance FROM {TABLE}"
           f"{' WHERE ' + where if where else ''} ORDER BY distance ASC LIMIT {k}")
    t0 = time.perf_counter()
    strategy = "exact" if exact else "index"
    # without a vector index for this column and metric the engine would scan anyway: take
    # the exact path, which scans faster (dot product or the bf16 copy, then re-ranking)
    settings = _index_settings(options, filtered=bool(where))  # validates the knobs on every path
    hnsw = (column, func) in store.vector_indexes()
    served = None if exact else ivf.state(store).served.get(modality)
    if options.nprobe is not None and served is None and not exact:
        raise UsageError(f"nprobe is for an IVF index, and {column} has none: laion index create --kind ivf "
                         f"--column {modality}")
    unindexed = not exact and not hnsw and served is None
    if served is not None and (options.nprobe is not None or not hnsw):
        # the IVF index: chosen by --nprobe, or because it is the only index of the column
        rows, sql, strategy = _search_ivf(store, served, qv, k, func, select, cols, where, params, filters, options)
        params = {**params, "q": qv}
    elif exact or unindexed:
        copy = column + SCAN_SUFFIX
        scan = copy if (func == "cosineDistance" and store.layout.cluster is None and copy in store.columns()) else None
        sql = _exact_sql(select, column, func, where, k, scan, verify_checksums=options.verify_checksums,
                         cluster=store.layout.cluster is not None, max_threads=options.scan_threads,
                         nice=options.scan_nice)
        strategy = ("exact-bf16" if scan else "exact") + (" (no index)" if unindexed else "")
        rows = store.rows(sql, params)
    else:
        if options.filter_strategy == "prefilter" and where:
            settings["vector_search_filter_strategy"] = "prefilter"
            strategy = "prefilter"
        if options.ef_search is None:
            # the ef_search that `laion index tune` measured for this index, if any
            tuned = store.tuning().get(modality)
            if tuned and func in tuned["index_type"]:
                settings = {"hnsw_candidate_list_size_for_search": int(tuned["ef_search"]), **settings}
        base = sql
        sql = base + settings_sql(settings)
        rows = store.rows(sql, params)
        if where and len(rows) < k and options.filter_strategy == "auto":
            # post-filtering dropped too many candidates: evaluate the filter first instead
            settings["vector_search_filter_strategy"] = "prefilter"
            sql = base + settings_sql(settings)
            rows = store.rows(sql, params)
            strategy = "postfilter→prefilter"
    seconds = time.perf_counter() - t0
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    ordered = [{"rank": r["rank"], "distance": r["distance"], **{c: r[c] for c in cols}} for r in rows]
    return SearchResult(ordered, k, modality, metric, exact, strategy, seconds, sql, params)


def _search_ivf(store: Store, info: Any, qv: np.ndarray, k: int, func: str, select: str, cols: list[str], where: str,
                params: dict[str, Any], filters: Filters, options: SearchOptions) -> tuple[list[dict[str, Any]], str, str]:
    """Through the IVF index (:mod:`laion_search.index.ivf`): candidates with their exact distances
    from the probed lists, the rows themselves from ``laion`` by id (filters there), the shards the
    index does not cover searched exactly. Filtered searches fetch more candidates until k rows
    pass, then, if the probed lists hold too few, search the matching rows exactly (prefilter)."""
    state = ivf.state(store)
    cents = state.centroids[(info.column, info.gen)]
    skip = state.uncovered.get((info.column, info.gen), [])
    nprobe = min(int(options.nprobe or info.nprobe or ivf.DEFAULT_NPROBE), info.lists)
    if where and options.filter_strategy == "prefilter":  # asked: the filter first, exactly over the rows it keeps
        rows = store.rows(_exact_sql(select, MODALITIES[info.column], func, where, k), {**params, "q": qv})
        return rows[:k], _exact_sql(select, MODALITIES[info.column], func, where, k), "prefilter"
    limit = k if not where else int(math.ceil(k * max(options.fetch_multiplier, ivf.FILTER_FETCH)))
    strategy = f"ivf (nprobe {nprobe})"
    while True:
        try:
            cand = ivf.candidates(store, info, cents, qv, limit=limit, nprobe=nprobe, func=func,
                                  exclude_ids=filters.exclude_ids, skip_shards=skip)
        except QueryError as exc:
            store.forget_dim()  # a rebuild may have switched generations since the state was read
            if ivf.state(store).served.get(info.column, info).gen != info.gen:
                return _search_ivf(store, ivf.state(store).served[info.column], qv, k, func, select, cols, where,
                                   params, filters, options)
            raise ivf.damaged(info, f"its lists cannot be read ({exc})") from exc
        rows = _rows_by_id(store, cand, select, cols, where, params)
        if skip:  # shards the index does not hold (yet): exact over those only
            extra = " AND ".join(x for x in (where, "shard IN {ivf_skip:Array(UInt32)}") if x)
            rows += store.rows(_exact_sql(select, MODALITIES[info.column], func, extra, k),
                               {**params, "ivf_skip": skip, "q": qv})
            strategy = f"ivf (nprobe {nprobe}) + exact over {len(skip)} uncovered shard(s)"
        rows.sort(key=lambda r: r["distance"])
        if len(rows) >= k or not where or len(cand) < limit or limit >= MAX_IVF_CANDIDATES:
            break
        limit = min(MAX_IVF_CANDIDATES, limit * 8)
    if where and len(rows) < k and options.filter_strategy != "postfilter":
        # the probed lists hold fewer than k matching rows: evaluate the filter first, exactly
        rows = store.rows(_exact_sql(select, MODALITIES[info.column], func, where, k), {**params, "q": qv})
        strategy = "ivf→prefilter"
    sql = (f"-- candidates (lists probed: {nprobe})\nSELECT id, shard, {distance_sql(func, 'vec', '{q:Array(Float32)}')} AS distance "
           f"FROM {info.table} WHERE list IN {{lists:Array(UInt32)}} ORDER BY distance ASC LIMIT {limit}")
    return rows[:k], sql, strategy


MAX_NPROBE = 1_048_576
#: Candidates a filtered IVF search reads at most before it evaluates the filter first instead.
MAX_IVF_CANDIDATES = 100_000


def _rows_by_id(store: Store, cand: list[dict[str, Any]], select: str, cols: list[str], where: str,
                params: dict[str, Any]) -> list[dict[str, Any]]:
    """The result rows of IVF candidates, read from ``laion`` by (shard, id): the shard prunes
    partitions, the id the granules; the candidate's distance comes along."""
    if not cand:
        return []
    dist: dict[int, float] = {}
    for c in cand:
        i = int(c["id"])
        dist[i] = min(dist.get(i, math.inf), float(c["distance"]))
    clause = "shard IN {ivf_shards:Array(UInt32)} AND id IN {ivf_ids:Array(Int64)}" + (f" AND {where}" if where else "")
    got = store.rows(f"SELECT {select} FROM {TABLE} WHERE {clause}",
                     {**params, "ivf_shards": sorted({int(c["shard"]) for c in cand}), "ivf_ids": list(dist)})
    seen: set[int] = set()
    out = []
    for r in got:
        if r["id"] in seen:
            continue
        seen.add(r["id"])
        out.append({**r, "distance": dist[r["id"]]})
    return out


#: Exact cosine search ranks by dot product first (stored vectors are L2-normalised at ingest, so
#: the order is the same up to float16 rounding of their norms), keeping a margin of candidates,
#: then computes the true cosine distance for those only. dotProduct scans ~1.7× faster.
EXACT_MARGIN = 2
#: With a bf16 scan copy (``laion index create --kind scan``: unit vectors in bfloat16) a cosine
#: scan reads half the bytes and ranks by the copy's dot product; this many candidates per
#: result are re-ranked with the float32 vectors. (l2 searches scan the float32 column.)
SCAN_MARGIN = 4


#: Exact scans read every stored vector (1 GB per million rows from a bf16 copy), so they read
#: the big column files through mmap (no copy through a read buffer; the small reads of the
#: re-ranking step stay on pread) and, unless asked, skip the checksum that MergeTree otherwise
#: computes over every block it reads. Together these take ~45% off a 1M-row scan (bench: 274 →
#: 149 ms). Checksums are still verified whenever parts are written, merged or fetched, and by
#: ``CHECK TABLE``; ``verify_checksums`` (``--verify-checksums``) restores them for a search.
SCAN_READ_SETTINGS = {"local_filesystem_read_method": "mmap", "min_bytes_to_use_mmap_io": 16 << 20}


def _exact_sql(select: str, column: str, func: str, where: str, k: int, scan: str | None = None,
               verify_checksums: bool = False, cluster: bool = False, max_threads: int | None = None,
               nice: int | None = None) -> str:
    where_sql = f" WHERE {where}" if where else ""
    settings = {"use_skip_indexes": 0, **SCAN_READ_SETTINGS, **({} if verify_checksums else {"checksum_on_read": 0})}
    if max_threads is not None:
        settings["max_threads"] = max(1, int(max_threads))
    if nice:
        # the engine renices the query's threads for its duration (Linux; needs CAP_SYS_NICE,
        # else the engine ignores it): the scheduler then serves indexed searches first
        settings["os_thread_priority"] = min(19, max(0, int(nice)))
    if scan is not None:  # the copy holds unit vectors: its dot product ranks by cosine
        candidates = min(MAX_K * SCAN_MARGIN, k * SCAN_MARGIN + 32)
        first = f"dotProduct({scan}, CAST({{q:Array(Float32)}}, 'Array(BFloat16)')) DESC"
    elif func == "cosineDistance":
        candidates = min(MAX_K * EXACT_MARGIN, k * EXACT_MARGIN + 16)
        first = f"dotProduct({column}, {{q:Array(Float32)}}) DESC"
    else:
        return (f"SELECT {select}, {distance_sql(func, column, '{q:Array(Float32)}')} AS distance FROM {TABLE}{where_sql} "
                f"ORDER BY distance ASC LIMIT {k}{settings_sql(settings)}")
    # the candidates are ranked by the true distance and the best k kept by id; only those k rows
    # are then read whole (caption, url, …): reading them for every candidate costs more than
    # the ranking (1M rows, bf16 copy: 180 → 144 ms per query)
    top = (f"SELECT id FROM (SELECT id, {column} AS _emb FROM {TABLE}{where_sql} ORDER BY {first} "
           f"LIMIT {candidates}) ORDER BY {func}(_emb, {{q:Array(Float32)}}) ASC LIMIT {k}")
    return (f"SELECT {select}, {func}({column}, {{q:Array(Float32)}}) AS distance FROM {TABLE} "
            f"WHERE id {'GLOBAL IN' if cluster else 'IN'} ({top}) "
            f"ORDER BY distance ASC LIMIT {k}{settings_sql(settings)}")


def explain(store: Store, result: SearchResult) -> str:
    """The engine's plan for a search (``EXPLAIN indexes = 1``): shows whether the vector index is used.

    On a cluster the Distributed ``laion`` hands the whole statement to every shard, which plans
    it over its ``laion_local``; this shows that plan on the node we are connected to."""
    sql = result.sql
    if store.layout.cluster is not None:
        sql = re.sub(rf"\bFROM {TABLE}\b", f"FROM {store.data_table}", sql)
    t = store.sql("EXPLAIN indexes = 1 " + sql, result.params)
    return "\n".join(str(v) for row in t.to_pylist() for v in row.values())


def build_where(filters: Filters) -> tuple[str, dict[str, Any]]:
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
        if not np.isfinite(v):
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
        params["exclude_ids"] = [_row_id(x, "exclude_ids") for x in filters.exclude_ids]
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
        if ctype.startswith("Float") and not np.isfinite(value):
            raise UsageError(f"--where {expr!r}: value must be finite")
        if not ctype.startswith("Float"):
            bits = 64 if ctype.endswith("64") else 32
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ctype.startswith("Int") else (0, 2**bits - 1)
            if not lo <= value <= hi:
                raise UsageError(f"--where {expr!r}: {value} is out of range for {col}")
    return f"`{col}` {_OPS[op]} {{{name}:{ctype}}}", value


def _row_id(value: Any, field: str) -> int:
    """A row id as the engine's Int64 holds it: outside that range the engine would wrap it
    (2**63 → -2**63) and exclude some other row, so it is refused."""
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise UsageError(f"{field}: {value!r} is not a row id (an integer)")
    try:
        rid = int(value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{field}: {value!r} is not a row id (an integer)") from None
    if not -(2**63) <= rid < 2**63:
        raise UsageError(f"{field}: {rid} is out of range (row ids are 64-bit signed integers)")
    return rid


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


def _index_settings(options: SearchOptions, filtered: bool) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if options.ef_search is not None:
        ef = int(options.ef_search)
        if not 1 <= ef <= 100_000:
            raise UsageError("ef_search must be between 1 and 100000")
        settings["hnsw_candidate_list_size_for_search"] = ef
    if options.nprobe is not None and (isinstance(options.nprobe, bool) or not 1 <= int(options.nprobe) <= MAX_NPROBE):
        raise UsageError(f"nprobe must be between 1 and {MAX_NPROBE}")
    if options.rescoring:
        settings["vector_search_with_rescoring"] = 1
    if filtered or options.rescoring:
        mult = float(options.fetch_multiplier)
        if not 1.0 <= mult <= 1000.0:
            raise UsageError("fetch_multiplier must be between 1 and 1000")
        settings["vector_search_index_fetch_multiplier"] = mult
    return settings
