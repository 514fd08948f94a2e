"""``laion bench geometry``: the statistics that decide how an embedding set behaves under HNSW,
measured on LAION-layout shards side by side (synth ``realistic``, synth ``hard``, real-text).

* **spectrum**: eigenvalues of the covariance of the image vectors, as fractions of the total
  variance; how many axes hold 50 % / 90 % of it (low for real embeddings);
* **anisotropy**: mean cosine of two random image vectors (real CLIP / sentence models: 0.2–0.5;
  isotropic noise: 0);
* **pairs**: the image–text cosine of a row (LAION's ``similarity``) and of two random rows;
* **nearest-neighbour distance**: the cosine distance from a vector to its nearest other vector
  (median, 10th / 90th percentile), relative to the median distance to a random vector;
* **hubness**: skewness of the k-occurrence (how often a row is among others' 10 nearest);
* **recall vs ef_search**: usearch (the library inside ClickHouse's index) with a given M,
  ef_construction and quantization; text→image queries, recall@10 against numpy exact search.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

EF_SEARCH_CURVE = (16, 32, 64, 128, 256, 512)


def load(shard_dir: str | Path, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = Path(shard_dir)
    img = np.load(_one(d, "img_emb"), mmap_mode="r")
    txt = np.load(_one(d, "text_emb"), mmap_mode="r")
    n = len(img) if rows is None else min(rows, len(img))
    return _unit(np.asarray(img[:n], dtype=np.float32)), _unit(np.asarray(txt[:n], dtype=np.float32))


def _one(d: Path, kind: str) -> Path:
    for p in (d / f"{kind}_0.npy", d / kind / f"{kind}_0.npy", d / kind / f"{kind}_0000.npy"):
        if p.exists():
            return p
    raise FileNotFoundError(f"no {kind}_0.npy under {d}")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def stats(img: np.ndarray, txt: np.ndarray, *, sample: int = 1000, seed: int = 0, m: int = 16,
          ef_construction: int = 64, quantization: str = "bf16", k: int = 10,
          efs: Sequence[int] = EF_SEARCH_CURVE) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    n, dim = img.shape
    cov = np.cov(img[rng.choice(n, size=min(n, 20_000), replace=False)].T)
    ev = np.sort(np.linalg.eigvalsh(cov))[::-1]
    ev = ev / ev.sum()
    cum = np.cumsum(ev)
    a = rng.choice(n, size=min(n, 4000), replace=False)
    b = rng.choice(n, size=len(a), replace=False)
    q = rng.choice(n, size=min(n, sample), replace=False)
    sims = img[q] @ img.T
    sims[np.arange(len(q)), q] = -np.inf  # a row is not its own neighbour
    nn = 1 - sims.max(axis=1)
    rand = 1 - np.einsum("ij,ij->i", img[a], img[b])
    # k-occurrence over a subsample: how often each row is in the 10-NN lists of the others
    sub = rng.choice(n, size=min(n, 5000), replace=False)
    s2 = img[sub] @ img[sub].T
    np.fill_diagonal(s2, -np.inf)
    knn = np.argpartition(-s2, 10, axis=1)[:, :10]
    occ = np.bincount(knn.ravel(), minlength=len(sub)).astype(np.float64)
    skew = float(((occ - occ.mean()) ** 3).mean() / occ.std() ** 3)
    pair = np.einsum("ij,ij->i", img, txt)
    out: dict[str, Any] = {
        "rows": n, "dim": dim,
        "eigen_top": ev[:64].tolist(),
        "axes_50": int(np.searchsorted(cum, 0.5) + 1), "axes_90": int(np.searchsorted(cum, 0.9) + 1),
        "top1_variance": float(ev[0]), "top10_variance": float(cum[min(9, len(cum) - 1)]),
        "mean_cosine": float(np.mean(1 - rand)),
        "pair_cosine_mean": float(pair.mean()), "pair_cosine_p10": float(np.percentile(pair, 10)),
        "pair_cosine_p90": float(np.percentile(pair, 90)),
        "random_pair_cosine": float(np.einsum("ij,ij->i", img[a], txt[b]).mean()),
        "nn_distance_p10": float(np.percentile(nn, 10)), "nn_distance_p50": float(np.median(nn)),
        "nn_distance_p90": float(np.percentile(nn, 90)), "random_distance_p50": float(np.median(rand)),
        "nn_relative": float(np.median(nn) / np.median(rand)), "nn_hist": nn.tolist(),
        "hubness_skew": skew,
    }
    out["recall_curve"] = recall_curve(img, txt, rng, sample=min(sample, 200), m=m, ef_construction=ef_construction,
                                       quantization=quantization, k=k, efs=efs)
    return out


def recall_curve(img: np.ndarray, txt: np.ndarray, rng: np.random.Generator, *, sample: int, m: int,
                 ef_construction: int, quantization: str, k: int, efs: Sequence[int]) -> dict[str, Any]:
    try:
        from usearch.index import Index
    except ImportError:
        return {"missing": "usearch"}
    q = txt[rng.choice(len(txt), size=min(sample, len(txt)), replace=False)]
    truth = np.argsort(-(q @ img.T), axis=1)[:, :k]
    idx = Index(ndim=img.shape[1], metric="cos", dtype=quantization, connectivity=m, expansion_add=ef_construction)
    t = time.perf_counter()
    idx.add(np.arange(len(img)), img, threads=2)
    build = time.perf_counter() - t
    points = []
    for ef in efs:
        idx.expansion_search = ef  # type: ignore[misc]  # settable in usearch; its stub says read-only
        got = idx.search(q, k).keys
        rec = float(np.mean([len(set(g.tolist()) & set(t.tolist())) / k for g, t in zip(got, truth)]))
        points.append({"ef_search": ef, "recall": rec})
    return {"m": m, "ef_construction": ef_construction, "quantization": quantization,
            "build_vectors_per_second": len(img) / build, "points": points}


def markdown(named: dict[str, dict[str, Any]]) -> str:
    names = list(named)
    rows = [
        ("rows × dim", lambda s: f"{s['rows']:,} × {s['dim']}"),
        ("variance on top axis", lambda s: f"{s['top1_variance']:.3f}"),
        ("variance on top 10 axes", lambda s: f"{s['top10_variance']:.2f}"),
        ("axes for 50 % / 90 % of variance", lambda s: f"{s['axes_50']} / {s['axes_90']}"),
        ("mean cosine of two random images", lambda s: f"{s['mean_cosine']:.2f}"),
        ("image–text cosine of a pair: mean (p10–p90)",
         lambda s: f"{s['pair_cosine_mean']:.2f} ({s['pair_cosine_p10']:.2f}–{s['pair_cosine_p90']:.2f})"),
        ("image–text cosine of random rows", lambda s: f"{s['random_pair_cosine']:.2f}"),
        ("NN cosine distance p10 / p50 / p90",
         lambda s: f"{s['nn_distance_p10']:.3f} / {s['nn_distance_p50']:.3f} / {s['nn_distance_p90']:.3f}"),
        ("NN distance / random distance (median)", lambda s: f"{s['nn_relative']:.2f}"),
        ("hubness (k-occurrence skew, k=10)", lambda s: f"{s['hubness_skew']:.1f}"),
    ]
    curve0 = next((s["recall_curve"] for s in named.values() if "points" in s["recall_curve"]), None)
    lines = ["| statistic | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(named[n]) for n in names) + " |")
    if curve0:
        cfg = f"usearch M={curve0['m']} ef_c={curve0['ef_construction']} {curve0['quantization']}"
        for i, p in enumerate(curve0["points"]):
            lines.append(f"| recall@10 at ef_search {p['ef_search']} ({cfg}) | " + " | ".join(
                f"{named[n]['recall_curve']['points'][i]['recall']:.3f}" for n in names) + " |")
        lines.append("| build vectors/s (same) | " + " | ".join(
            f"{named[n]['recall_curve']['build_vectors_per_second']:,.0f}" for n in names) + " |")
    return "\n".join(lines)


def plot(named: dict[str, dict[str, Any]], path: str | Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, s in named.items():
        ev = np.asarray(s["eigen_top"])
        axes[0].semilogy(np.arange(1, len(ev) + 1), ev, label=name)
        axes[1].hist(s["nn_hist"], bins=40, histtype="step", density=True, label=name)
        if "points" in s["recall_curve"]:
            pts = s["recall_curve"]["points"]
            axes[2].plot([p["ef_search"] for p in pts], [p["recall"] for p in pts], marker="o", label=name)
    axes[0].set(title="eigen-spectrum (fraction of variance)", xlabel="axis", ylabel="fraction (log)")
    axes[1].set(title="cosine distance to the nearest neighbour", xlabel="distance", ylabel="density")
    axes[2].set(title="recall@10 vs ef_search (text→image)", xlabel="ef_search (log)", ylabel="recall@10")
    axes[2].set_xscale("log", base=2)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
