"""Recall-driven tuning of an HNSW index's ``ef_search`` (``laion index tune``).

An HNSW index answers from a candidate list of ``ef_search`` entries: more candidates, more
recall, more time. The right value depends on the data and the graph, so we measure it, the way
autofaiss tunes faiss indexes, but inside the engine:

1. draw a sample of queries, in equal parts: stored vectors of the column (each left out of its
   own results), the same vectors perturbed by a little noise (queries that are not in the table),
   and the same rows' vectors of the other modality (captions searching images: LAION's use,
   and the hardest of the three for a graph index; ``queries="same-modality"`` leaves them out,
   ``queries="cross-modal"`` uses only them: the workload of a table searched by text → image);
2. take their exact top-k with an exact search (:func:`laion_search.search.search`, ``exact=True``);
3. search through the index with ``ef_search`` = 16, 32, 64, … (doubling) until recall@k reaches
   the target, then bisect between the last two values for the smallest one that does;
4. store it, with the recall and median latency measured, in ``laion_index_tuning``: searches
   through that index use it when no ``ef_search`` is given (the row names the index type, so a
   rebuilt index with other parameters falls back to the engine default until tuned again).

When even the largest ``ef_search`` tried misses the target, the graph itself is the limit: the
result says so and recommends a rebuild with a larger ``M`` / ``ef_construction``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from laion_search.errors import UsageError
from laion_search.schema import INDEX_NAMES, TUNING_TABLE, parse_index_type
from laion_search.store import Store

MAX_EF_SEARCH = 4096
START_EF_SEARCH = 16
#: perturbed queries: unit noise of this norm added to a stored vector, then renormalised
PERTURBATION = 0.1
#: the sample's query kinds, by name: ``mixed`` (default), ``same-modality`` (no other-modality
#: vectors), ``cross-modal`` (only the other modality's vectors: a text → image workload, the
#: hardest for a graph built on the image side; on real text at 250K rows the (32, 64) graph needed
#: ef_search 832 for 0.95 on a cross-modal sample where the mixed sample was satisfied at 288)
QUERY_MIXES: dict[str, tuple[str, ...]] = {
    "mixed": ("stored", "perturbed", "cross"),
    "same-modality": ("stored", "perturbed"),
    "cross-modal": ("cross",),
}

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class TuneResult:
    column: str
    index: str
    index_type: str
    target: float
    k: int
    queries: int
    met: bool
    ef_search: int | None          # the smallest ef_search meeting the target (None when none did)
    recall: float                  # measured at ef_search (or at the best value tried)
    p50_ms: float
    curve: list[dict[str, float]] = field(default_factory=list)  # every ef_search tried, in order
    recommendation: str | None = None
    stored: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tune(store: Store, column: str = "image", *, recall: float = 0.95, k: int = 10, sample: int = 200,
         seed: int = 0, max_ef_search: int = MAX_EF_SEARCH, save: bool = True, cross_modal: bool = True,
         queries: str | None = None, progress: ProgressFn | None = None) -> TuneResult:
    """Find the smallest ``ef_search`` whose recall@k meets ``recall`` on the index of ``column``,
    and (``save``) store it as that index's default. ``queries``: the sample's mix, one of
    :data:`QUERY_MIXES` (default ``mixed``, or ``same-modality`` when ``cross_modal`` is false).
    See the module docstring."""
    from laion_search.search import SearchOptions, check_k, search

    emit = progress or (lambda e: None)
    if column not in INDEX_NAMES:
        raise UsageError(f"column must be image or text, got {column!r}")
    if not 0.0 < float(recall) <= 1.0:
        raise UsageError(f"recall target must be in (0, 1], got {recall}")
    k = check_k(k)
    if not 2 <= int(sample) <= 100_000:
        raise UsageError("sample must be between 2 and 100000")
    name, emb = INDEX_NAMES[column]
    index = next((i for i in store.list_indexes() if i["name"] == name), None)
    if index is None:
        raise UsageError(f"no {name} to tune: build it first (laion index create --column {column})")
    info = parse_index_type(index["type_full"])
    if info.get("distance") != "cosineDistance":
        raise UsageError(f"{name} uses {info.get('distance')}; tuning measures cosine indexes only")
    rows = int(store.scalar("SELECT count() FROM laion") or 0)
    if rows <= k + 1:
        raise UsageError(f"the table has {rows} rows: too few to measure recall@{k}")
    mix = queries or ("mixed" if cross_modal else "same-modality")
    if mix not in QUERY_MIXES:
        raise UsageError(f"queries must be one of {', '.join(QUERY_MIXES)}, got {mix!r}")
    sample_queries = _queries(store, emb, int(sample), seed, kinds=QUERY_MIXES[mix])
    emit({"event": "tune_truth", "queries": len(sample_queries)})
    truth = []
    for qid, vec in sample_queries:
        got = search(store, vec, k=k + 1, exact=True, modality=column, columns=["id"]).rows
        truth.append([r["id"] for r in got if r["id"] != qid][:k])

    measured: dict[int, tuple[float, float]] = {}

    def measure(ef: int) -> float:
        if ef not in measured:
            hits, lat = [], []
            for (qid, vec), want in zip(sample_queries, truth):
                t = time.perf_counter()
                got = search(store, vec, k=k + 1, modality=column, columns=["id"],
                             options=SearchOptions(ef_search=ef)).rows
                lat.append(time.perf_counter() - t)
                ids = [r["id"] for r in got if r["id"] != qid][:k]
                hits.append(len(set(ids) & set(want)) / max(len(want), 1))
            measured[ef] = (float(np.mean(hits)), statistics.median(lat) * 1000)
            emit({"event": "tune_step", "ef_search": ef, "recall": measured[ef][0], "p50_ms": measured[ef][1]})
        return measured[ef][0]

    ef = max(START_EF_SEARCH, k)
    if ef > max_ef_search:
        raise UsageError(f"max_ef_search ({max_ef_search}) must be at least {ef} (k and the first value tried)")
    lo, hi = k - 1, None  # an ef_search below k cannot return k rows
    while ef <= max_ef_search:
        if measure(ef) >= recall:
            hi = ef
            break
        lo = ef
        ef *= 2
    if hi is None and lo < max_ef_search:  # the last doubling overshot the cap: try the cap itself
        hi = max_ef_search if measure(max_ef_search) >= recall else None
        lo = max_ef_search if hi is None else lo
    if hi is not None:
        while hi - lo > max(1, lo // 8):  # bisect to within 1/8: finer steps are below the noise of the sample
            mid = (lo + hi) // 2
            if measure(mid) >= recall:
                hi = mid
            else:
                lo = mid
    curve = [{"ef_search": e, "recall": r, "p50_ms": p} for e, (r, p) in sorted(measured.items())]
    result = TuneResult(column, name, index["type_full"], float(recall), k, len(sample_queries), hi is not None, hi,
                        measured[hi][0] if hi is not None else max(r for r, _ in measured.values()),
                        measured[hi][1] if hi is not None else measured[max(measured)][1], curve)
    if hi is None:
        best = max(measured.items(), key=lambda kv: kv[1][0])
        m, efc = info.get("m", 16), info.get("ef_construction", 64)
        result.recommendation = (
            f"no ef_search up to {max_ef_search} reaches recall@{k} {recall:g} (best {best[1][0]:.3f} at "
            f"ef_search {best[0]}): the graph is the limit; rebuild with more links and a wider build search, "
            f"e.g. laion index create --column {column} --m {min(2 * m, 128)} --ef-construction "
            f"{min(max(2 * efc, 128), 1024)} --replace, then tune again")
    elif save:
        save_default(store, result)
        result.stored = True
    return result


def _queries(store: Store, emb: str, sample: int, seed: int,
             kinds: tuple[str, ...] = QUERY_MIXES["mixed"]) -> list[tuple[int | None, np.ndarray]]:
    """``(id to leave out or None, unit vector)``, in turn: a stored vector of the column (its own
    row is left out of its results), the same vector perturbed, and — ``cross_modal`` — the row's
    vector of the *other* modality (a caption searching images: LAION's text→image search, whose
    queries lie off the indexed set and need a larger ef_search than the first two kinds)."""
    other = next(e for _, e in INDEX_NAMES.values() if e != emb)
    t = store.sql(f"SELECT id, {emb} AS v, {other} AS o FROM laion ORDER BY cityHash64(id, {{seed:UInt64}}) "
                  "LIMIT {n:UInt64}", {"seed": int(seed), "n": int(sample)})
    rng = np.random.default_rng(seed)
    out: list[tuple[int | None, np.ndarray]] = []
    for i, (rid, v, o) in enumerate(zip(t.column("id").to_pylist(), t.column("v").to_pylist(), t.column("o").to_pylist())):
        kind = kinds[i % len(kinds)]
        v = np.asarray(o if kind == "cross" else v, dtype=np.float32)
        v = v / (np.linalg.norm(v) or 1.0)
        if kind == "stored":
            out.append((int(rid), v))
        elif kind == "perturbed":
            noise = rng.standard_normal(len(v)).astype(np.float32)
            w = v + PERTURBATION * noise / np.linalg.norm(noise)
            out.append((None, w / np.linalg.norm(w)))
        else:
            out.append((None, v))
    return out


def save_default(store: Store, result: TuneResult) -> None:
    store.ensure_tuning_table()
    store.backend.command(
        f"INSERT INTO {TUNING_TABLE} (column, index_type, ef_search, recall, target, k, queries, p50_ms, tuned_at) "
        "VALUES ({c:String}, {t:String}, {ef:UInt32}, {r:Float64}, {target:Float64}, {k:UInt32}, {q:UInt32}, "
        "{p:Float64}, now64(3))",
        {"c": result.column, "t": result.index_type, "ef": int(result.ef_search or 0), "r": result.recall,
         "target": result.target, "k": result.k, "q": result.queries, "p": result.p50_ms})
    store.forget_dim()


def tuned_defaults(store: Store) -> dict[str, dict[str, Any]]:
    """``column → {ef_search, recall, target, k, queries, p50_ms, index_type, tuned_at}`` for
    each tuned index whose type is still the one tuned."""
    return store.tuning()
