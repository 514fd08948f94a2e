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


#: One-sided 95 % normal quantile: a stored setting must reach the target at the sample's lower
#: confidence bound (mean − 1.645 · sd/√n of the per-query recalls), not merely on average, so that
#: it holds on fresh queries too (a mean of 0.970 on 200 queries gave 0.965 on held-out ones).
CONFIDENCE_Z = 1.645


@dataclass
class TuneResult:
    column: str
    index: str
    index_type: str
    target: float
    k: int
    queries: int
    met: bool
    ef_search: int | None          # HNSW: the smallest ef_search meeting the target (None when none did)
    recall: float                  # mean recall@k measured at the chosen value (or at the best value tried)
    p50_ms: float
    curve: list[dict[str, float]] = field(default_factory=list)  # every value tried, in order
    recommendation: str | None = None
    stored: bool = False
    kind: str = "hnsw"             # hnsw (knob: ef_search) or ivf (knob: nprobe)
    nprobe: int | None = None      # IVF: the smallest nprobe meeting the target
    recall_lower: float = 0.0      # the lower confidence bound of recall at the chosen value
    mix: str = "mixed"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def value(self) -> int | None:
        return self.nprobe if self.kind == "ivf" else self.ef_search


def lower_bound(recalls: list[float]) -> float:
    """Mean − z·sd/√n of per-query recalls (see :data:`CONFIDENCE_Z`)."""
    if len(recalls) < 2:
        return float(np.mean(recalls)) if recalls else 0.0
    return float(np.mean(recalls) - CONFIDENCE_Z * np.std(recalls, ddof=1) / np.sqrt(len(recalls)))


def tune(store: Store, column: str = "image", *, recall: float = 0.95, k: int = 10, sample: int = 200,
         seed: int = 0, max_ef_search: int = MAX_EF_SEARCH, save: bool = True, cross_modal: bool = True,
         queries: str | None = None, progress: ProgressFn | None = None, kind: str = "auto") -> TuneResult:
    """Find the smallest ``ef_search`` (HNSW) or ``nprobe`` (IVF) whose recall@k meets ``recall`` at
    the sample's lower confidence bound on the index of ``column``, and (``save``) store it as that
    index's default. ``kind``: ``auto`` (the HNSW index if the column has one, else its IVF index),
    ``hnsw`` or ``ivf``. ``queries``: the sample's mix, one of :data:`QUERY_MIXES` (default ``mixed``,
    or ``same-modality`` when ``cross_modal`` is false). See the module docstring."""
    from laion_search.index import ivf
    from laion_search.search import SearchOptions, check_k, search

    emit = progress or (lambda e: None)
    if column not in INDEX_NAMES:
        raise UsageError(f"column must be image or text, got {column!r}")
    if not 0.0 < float(recall) <= 1.0:
        raise UsageError(f"recall target must be in (0, 1], got {recall}")
    k = check_k(k)
    if not 2 <= int(sample) <= 100_000:
        raise UsageError("sample must be between 2 and 100000")
    if kind not in ("auto", "hnsw", "ivf"):
        raise UsageError(f"kind must be auto, hnsw or ivf, got {kind!r}")
    name, emb = INDEX_NAMES[column]
    index = next((i for i in store.list_indexes() if i["name"] == name), None)
    served = ivf.state(store).served.get(column)
    if kind == "auto":
        kind = "hnsw" if index is not None or served is None else "ivf"
    if kind == "hnsw" and index is None:
        raise UsageError(f"no {name} to tune: build it first (laion index create --column {column})")
    if kind == "ivf" and served is None:
        raise UsageError(f"no IVF index on {emb} to tune: build it first (laion index create --kind ivf --column {column})")
    info = parse_index_type(index["type_full"]) if index is not None and kind == "hnsw" else {"distance": "cosineDistance"}
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

    knob = "nprobe" if kind == "ivf" else "ef_search"
    measured: dict[int, tuple[float, float, float]] = {}

    def measure(value: int) -> float:
        if value not in measured:
            hits, lat = [], []
            opts = SearchOptions(nprobe=value) if kind == "ivf" else SearchOptions(ef_search=value)
            for (qid, vec), want in zip(sample_queries, truth):
                t = time.perf_counter()
                got = search(store, vec, k=k + 1, modality=column, columns=["id"], options=opts).rows
                lat.append(time.perf_counter() - t)
                ids = [r["id"] for r in got if r["id"] != qid][:k]
                hits.append(len(set(ids) & set(want)) / max(len(want), 1))
            measured[value] = (float(np.mean(hits)), lower_bound(hits), statistics.median(lat) * 1000)
            emit({"event": "tune_step", knob: value, "knob": knob, "value": value, "recall": measured[value][0],
                  "recall_lower": measured[value][1], "p50_ms": measured[value][2]})
        return measured[value][1]

    if kind == "ivf":
        assert served is not None
        start, cap, lo = 1, served.lists, 0
    else:
        start, cap, lo = max(START_EF_SEARCH, k), max_ef_search, k - 1  # an ef_search below k cannot return k rows
        if start > cap:
            raise UsageError(f"max_ef_search ({cap}) must be at least {start} (k and the first value tried)")
    hi = _smallest(measure, recall, start, cap, lo)
    curve = [{knob: v, "recall": r, "recall_lower": lb, "p50_ms": p} for v, (r, lb, p) in sorted(measured.items())]
    best = hi if hi is not None else max(measured, key=lambda v: measured[v][1])
    if kind == "hnsw":
        assert index is not None
        label, type_full = name, index["type_full"]
    else:
        assert served is not None
        label, type_full = served.table, f"ivf(lists={served.lists}, codes={served.codes})"
    result = TuneResult(column, label, type_full,
                        float(recall), k, len(sample_queries), hi is not None, hi if kind == "hnsw" else None,
                        measured[best][0], measured[best][2], curve, kind=kind,
                        nprobe=hi if kind == "ivf" else None, recall_lower=measured[best][1], mix=mix)
    if hi is None and served is not None and kind == "ivf":
        result.recommendation = (
            f"no nprobe up to all {served.lists} lists reaches recall@{k} {recall:g} at the lower bound (best "
            f"{measured[best][1]:.3f} at nprobe {best}): the candidates are the limit; a larger --sample narrows the "
            "bound, or search exactly")
    elif hi is None:
        m, efc = info.get("m", 16), info.get("ef_construction", 64)
        result.recommendation = (
            f"no ef_search up to {max_ef_search} reaches recall@{k} {recall:g} at the lower bound (best "
            f"{measured[best][1]:.3f} at ef_search {best}): the graph is the limit; rebuild with more links and a "
            f"wider build search, e.g. laion index create --column {column} --m {min(2 * m, 128)} --ef-construction "
            f"{min(max(2 * efc, 128), 1024)} --replace, then tune again")
    elif save:
        if served is not None and kind == "ivf":
            ivf.save_tuning(store, served, result)
        else:
            save_default(store, result)
        result.stored = True
    return result


def _smallest(measure: Callable[[int], float], target: float, start: int, cap: int, lo: int) -> int | None:
    """The smallest value in [start, cap] whose measure meets ``target``: doubling, then bisection
    to within 1/8 (finer steps are below the noise of the sample). None when even ``cap`` misses."""
    value, hi = start, None
    while value <= cap:
        if measure(value) >= target:
            hi = value
            break
        lo = value
        value *= 2
    if hi is None and lo < cap:  # the last doubling overshot the cap: try the cap itself
        hi = cap if measure(cap) >= target else None
        lo = cap if hi is None else lo
    if hi is not None:
        while hi - lo > max(1, lo // 8):
            mid = (lo + hi) // 2
            if measure(mid) >= target:
                hi = mid
            else:
                lo = mid
    return hi


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
    store.run_ddl(
        f"INSERT INTO {TUNING_TABLE} (column, index_type, ef_search, recall, target, k, queries, p50_ms, tuned_at) "
        "VALUES ({c:String}, {t:String}, {ef:UInt32}, {r:Float64}, {target:Float64}, {k:UInt32}, {q:UInt32}, "
        "{p:Float64}, now64(3))",
        {"c": result.column, "t": result.index_type, "ef": int(result.ef_search or 0), "r": result.recall,
         "target": result.target, "k": result.k, "q": result.queries, "p": result.p50_ms})


def tuned_defaults(store: Store) -> dict[str, dict[str, Any]]:
    """``column → {ef_search, recall, target, k, queries, p50_ms, index_type, tuned_at}`` for
    each tuned index whose type is still the one tuned."""
    return store.tuning()
