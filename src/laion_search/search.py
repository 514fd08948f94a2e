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

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from laion_search.backends import settings_sql
from laion_search.errors import QueryError, UsageError
from laion_search.index import ivf
from laion_search.index import text as words_index
from laion_search.schema import INDEX_NAMES, IVF_ROW_COLUMNS, MAX_K, MODALITIES, SCAN_SUFFIX, TABLE, distance_sql, model_for_dim
from laion_search.store import Store
# the query model lives in laion_search.query (light, for the CLI's start-up); its names are re-exported here
from laion_search.query import (DEDUP_THRESHOLD, INT64, MAX_NPROBE, RRF_RANK_CONSTANT, Filters, Knob, SearchOptions, SearchPlan, SearchQuery,  # noqa: F401
                                 _column, _columns, _metric, build_where, check_k, describe_query, knob, query_fields)
from laion_search.vectors import as_vector

#: Hybrid search fuses each side's top ``max(k, HYBRID_WINDOW)`` (at most MAX_K) rows.
HYBRID_WINDOW = 100
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
    #: results dropped as near-duplicates (``deduplicate``); None when not asked
    duplicates: int | None = None

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
        out = {"k": self.k, "modality": self.modality, "metric": self.metric, "exact": self.exact,
               "strategy": self.strategy, "seconds": round(self.seconds, 6), "results": self.rows}
        if self.duplicates is not None:
            out["duplicates"] = self.duplicates
        return out


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


def search(store: Store, vector: Any = None, *, query: SearchQuery | None = None, plan: SearchPlan | None = None,
           filters: Any = None, options: Any = None, **fields: Any) -> SearchResult:
    """Find the k rows nearest to one query in one modality's embeddings: a :class:`SearchQuery`,
    or its fields as keyword arguments (``search(store, text="a dog", k=5, nsfw="exclude")``).

    ``modality="image"`` searches image embeddings — so ``text=`` is LAION's text→image search;
    ``modality="text"`` searches caption embeddings. Text and images are encoded with the CLIP
    ``model`` (default: ``$LAION_CLIP_MODEL``, else the model the table's shards record — ViT-B/32
    for LAION-400M, ViT-L/14 for LAION-5B, ClickHouse's subset and SISAP).

    A :class:`SearchPlan` (:meth:`SearchQuery.plan`) runs as resolved: a server decides how to
    admit a query from its plan, then runs that plan.
    """
    if plan is None:
        if query is None:
            query = SearchQuery.build(vector, filters=filters, options=options, **fields)
        elif vector is not None or filters is not None or options is not None or fields:
            raise UsageError("give a SearchQuery or keyword arguments, not both")
        plan = query.plan(store)  # checks the query (once) and decides how it is answered
    elif query is not None or vector is not None or filters is not None or options is not None or fields:
        raise UsageError("give a SearchPlan, a SearchQuery or keyword arguments, not several")
    q = plan.query
    k, column, func, filters, where = int(q.k), plan.column, plan.func, plan.filters, plan.where
    if plan.route == "hybrid":
        return _search_hybrid(store, q)
    if plan.route == "words":
        return _search_words(store, q)
    options = q.options
    vector = q.vector
    if q.text is not None or q.image is not None:
        enc = encoder_for(store, q.model)
        vector = enc.encode_text([q.text])[0] if q.text is not None else enc.encode_image([q.image])[0]
    if q.like is not None:
        vector = row_vector(store, q.like, q.modality)
    modality, metric, exact = q.modality, q.metric, q.exact
    dim = store.dim()
    if dim is None:
        return SearchResult([], k, modality, metric, exact, "empty", 0.0)
    qv = as_vector(vector, dim=dim, source="query vector")
    cols = _columns(q.columns)
    params = {**plan.params, "q": qv}
    settings = dict(plan.settings)
    select = ", ".join(f"`{c}`" for c in cols)
    if q.deduplicate:  # the embeddings come along in the same statement (only the k rows read them)
        select += f", {column} AS {_DEDUP_VECTOR}"
    sql = (f"SELECT {select}, {distance_sql(func, column, '{q:Array(Float32)}')} AS distance FROM {TABLE}"
           f"{' WHERE ' + where if where else ''} ORDER BY distance ASC LIMIT {k}")
    t0 = time.perf_counter()
    strategy = "exact" if exact else "index"
    words_prefilter = False
    if filters.words is not None and options.filter_strategy == "auto" and plan.route in ("hnsw", "ivf"):
        # a selective keyword filter: the text index counts its rows from the posting lists (no
        # rows read); few enough, and an exact search over them beats walking the vector index
        # for candidates that mostly fail the filter (bench words: 150 → 9 ms at 20K rows)
        words_prefilter = _words_rows(store, filters) <= WORDS_PREFILTER_ROWS
        if words_prefilter:
            options = dataclasses.replace(options, filter_strategy="prefilter")
    if plan.route == "ivf":
        rows, sql, strategy = _search_ivf(store, plan.ivf, qv, k, func, select, cols, where, params, filters, options,
                                          vectors=q.deduplicate)
        strategy = "words→prefilter" if words_prefilter else strategy
    elif plan.route == "exact":
        # also without a vector index for this column and metric (the engine would scan anyway):
        # the exact path scans faster (dot product or the bf16 copy, then re-ranking)
        copy = column + SCAN_SUFFIX
        scan = copy if (func == "cosineDistance" and store.layout.cluster is None and copy in store.columns()) else None
        sql = _exact_sql(select, column, func, where, k, scan, verify_checksums=options.verify_checksums,
                         cluster=store.layout.cluster is not None, max_threads=options.scan_threads,
                         nice=options.scan_nice, words=filters.words is not None)
        strategy = ("exact-bf16" if scan else "exact") + (" (no index)" if plan.unindexed else "")
        rows = store.rows(sql, params)
    else:
        if options.filter_strategy == "prefilter" and where:
            settings["vector_search_filter_strategy"] = "prefilter"
            strategy = "words→prefilter" if words_prefilter else "prefilter"
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
    duplicates = None
    if q.deduplicate:
        kept = deduplicate([r[_DEDUP_VECTOR] for r in rows])
        duplicates = len(rows) - len(kept)
        rows = [rows[i] for i in kept]
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    ordered = [{"rank": r["rank"], "distance": r["distance"], **{c: r[c] for c in cols}} for r in rows]
    return SearchResult(ordered, k, modality, metric, exact, strategy, seconds, sql, params, duplicates)


_DEDUP_VECTOR = "_dedup_vector"


def deduplicate(vectors: Sequence[Any], threshold: float = DEDUP_THRESHOLD) -> list[int]:
    """clip-back's deduplication over ranked results' embeddings: the positions kept, in order.
    Results whose L2-normalised embeddings have an inner product ≥ ``threshold`` are linked; of
    each connected component only the best-ranked (first) stays."""
    if not len(vectors):
        return []
    raw = np.asarray(np.stack([np.asarray(v, np.float32) for v in vectors]), np.float32)
    m = raw / np.where((n := np.linalg.norm(raw, axis=1, keepdims=True)) == 0, 1, n)
    linked = (m @ m.T) >= threshold
    parent = list(range(len(vectors)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(linked, 1))):
        a, b = find(int(i)), find(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)  # the best-ranked member is the component's root
    return [i for i in range(len(vectors)) if find(i) == i]


#: A vector search filtered by words goes straight to the prefilter (exact over the matching rows,
#: which the text index finds) when at most this many rows match (``filter_strategy="auto"``).
WORDS_PREFILTER_ROWS = 100_000


def _words_rows(store: Store, filters: Any) -> int:
    """Rows holding the words: the engine answers from the text index alone (a trivial count)."""
    words = words_index.query_words(filters.words, filters.words_mode)
    sql = f"SELECT count() FROM {TABLE} WHERE {words_index.words_clause(filters.words_mode)}"
    return int(store.scalar(sql, words_index.words_params(words, filters.words_mode)) or 0)


def _search_words(store: Store, q: SearchQuery) -> SearchResult:
    """Keyword search alone: the rows matching the words (and the other filters), ranked by
    :func:`laion_search.index.text.score_sql` (distinct query words held, then shorter captions),
    ties by id."""
    k = check_k(q.k)
    cols = _columns(q.columns)
    where, params = build_where(q.filters)
    select = ", ".join(f"`{c}`" for c in cols)
    sql = (f"SELECT {select}, {words_index.score_sql()} AS words_score FROM {TABLE} WHERE {where} "
           f"ORDER BY words_score DESC, id ASC LIMIT {k}")
    indexed = words_index.has_text_index(store)
    t0 = time.perf_counter()
    rows = store.rows(sql, params)
    seconds = time.perf_counter() - t0
    ordered = [{"rank": i, "words_score": r["words_score"], **{c: r[c] for c in cols}} for i, r in enumerate(rows, 1)]
    strategy = f"words ({q.words_mode}, {'text index' if indexed else 'scan: no text index'})"
    return SearchResult(ordered, k, q.modality, "words", False, strategy, seconds, sql, params)


def rrf(rankings: Sequence[tuple[Sequence[Any], float]], rank_constant: int = RRF_RANK_CONSTANT) -> list[tuple[Any, float]]:
    """Reciprocal rank fusion: each key's score is the sum, over the rankings that hold it, of
    ``weight / (rank_constant + rank)`` (ranks from 1). Highest score first; ties by key."""
    scores: dict[Any, float] = {}
    for keys, weight in rankings:
        for rank, key in enumerate(keys, 1):
            scores[key] = scores.get(key, 0.0) + float(weight) / (rank_constant + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def _search_hybrid(store: Store, q: SearchQuery) -> SearchResult:
    """The keyword ranking and the vector ranking (each over its top ``max(k, HYBRID_WINDOW)``, the
    other filters applied to both) fused by :func:`rrf`. Each row says which side found it
    (``found_by``: words, vector or both), its rank there, and its distance / keyword score."""
    k = check_k(q.k)
    window = min(MAX_K, max(k, HYBRID_WINDOW))
    t0 = time.perf_counter()
    vec = search(store, query=dataclasses.replace(q, words=None, hybrid=False, k=window))
    excl = [*q.exclude_ids, *([int(q.like)] if q.like is not None else [])]
    kw = _search_words(store, dataclasses.replace(q, text=None, image=None, vector=None, like=None, hybrid=False,
                                                  k=window, exclude_ids=excl))
    by_vec = {r["id"]: r for r in vec.rows}
    by_kw = {r["id"]: r for r in kw.rows}
    fused = rrf([(list(by_vec), q.vector_weight), (list(by_kw), q.words_weight)], int(q.rank_constant))[:k]
    cols = _columns(q.columns)
    rows = []
    for rank, (rid, score) in enumerate(fused, 1):
        v, w = by_vec.get(rid), by_kw.get(rid)
        src = v if v is not None else w
        assert src is not None
        rows.append({"rank": rank, "rrf_score": score,
                     "found_by": "both" if v is not None and w is not None else ("vector" if v is not None else "words"),
                     "distance": v["distance"] if v is not None else None,
                     "words_score": w["words_score"] if w is not None else None,
                     "vector_rank": v["rank"] if v is not None else None,
                     "words_rank": w["rank"] if w is not None else None, **{c: src[c] for c in cols}})
    seconds = time.perf_counter() - t0
    sql = f"-- vector ranking ({vec.strategy})\n{vec.sql}\n-- keyword ranking\n{kw.sql}"
    return SearchResult(rows, k, q.modality, q.metric, q.exact, f"hybrid rrf({vec.strategy}; {kw.strategy})", seconds,
                        sql, {**vec.params, **kw.params})


def _search_ivf(store: Store, info: Any, qv: np.ndarray, k: int, func: str, select: str, cols: list[str], where: str,
                params: dict[str, Any], filters: Any, options: Any,
                vectors: bool = False) -> tuple[list[dict[str, Any]], str, str]:
    """Through the IVF index (:mod:`laion_search.index.ivf`): candidates with their exact distances
    from the probed lists, the rows themselves from ``laion`` by id (filters there), the shards the
    index does not cover searched exactly. Filtered searches fetch more candidates until k rows
    pass, then, if the probed lists hold too few, search the matching rows exactly (prefilter).
    A search with no filter that asks for the default columns only (no ``vectors``) is one statement
    over the probed lists, when the companion keeps those columns (:func:`ivf.has_rows`)."""
    state = ivf.state(store)
    cents = state.centroids[(info.column, info.gen)]
    skip = state.uncovered.get((info.column, info.gen), [])
    stale = state.stale.get((info.column, info.gen), [])
    one = (not where and not vectors and (info.column, info.gen) in state.with_rows
           and set(cols) <= {"id", *IVF_ROW_COLUMNS})
    nprobe = min(int(options.nprobe or info.nprobe or ivf.DEFAULT_NPROBE), info.lists)
    if where and options.filter_strategy == "prefilter":  # asked: the filter first, exactly over the rows it keeps
        rows = store.rows(_exact_sql(select, MODALITIES[info.column], func, where, k), {**params, "q": qv})
        return rows[:k], _exact_sql(select, MODALITIES[info.column], func, where, k), "prefilter"
    limit = k if not where else int(math.ceil(k * max(options.fetch_multiplier, ivf.FILTER_FETCH)))
    strategy = f"ivf (nprobe {nprobe})"
    while True:
        try:
            cand = ivf.candidates(store, info, cents, qv, limit=limit, nprobe=nprobe, func=func,
                                  exclude_ids=filters.exclude_ids, skip_shards=[*skip, *stale], rows=one)
        except QueryError as exc:
            store.clear_caches()  # a rebuild may have switched generations since the state was read
            if ivf.state(store).served.get(info.column, info).gen != info.gen:
                return _search_ivf(store, ivf.state(store).served[info.column], qv, k, func, select, cols, where,
                                   params, filters, options, vectors)
            raise ivf.damaged(info, f"its lists cannot be read ({exc})") from exc
        rows = _own_rows(cand, cols) if one else _rows_by_id(store, cand, select, cols, where, params)
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
    sql = (f"-- {'the rows' if one else 'candidates'} (lists probed: {nprobe})\n"
           + ivf.candidates_sql(info, func, "list IN {lists:Array(UInt32)}", limit, read=state.read_settings, rows=one))
    return rows[:k], sql, strategy


#: Candidates a filtered IVF search reads at most before it evaluates the filter first instead.
MAX_IVF_CANDIDATES = 100_000


def _own_rows(cand: list[dict[str, Any]], cols: list[str]) -> list[dict[str, Any]]:
    """Result rows straight from the companion's candidates (each id once, nearest first)."""
    seen: set[int] = set()
    out = []
    for c in cand:
        if c["id"] not in seen:
            seen.add(c["id"])
            out.append({**{name: c[name] for name in cols}, "distance": float(c["distance"])})
    return out


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
               nice: int | None = None, words: bool = False) -> str:
    where_sql = f" WHERE {where}" if where else ""
    words = words or words_index.TEXT_INDEX_EXPR in where
    # an exact scan never walks a vector index; a keyword filter does use the text index (it
    # prunes the granules the scan reads: the keyword prefilter)
    skip: dict[str, Any] = ({"ignore_data_skipping_indices": ",".join(n for n, _ in INDEX_NAMES.values())} if words
                            else {"use_skip_indexes": 0})
    settings = {**skip, **SCAN_READ_SETTINGS, **({} if verify_checksums else {"checksum_on_read": 0})}
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


