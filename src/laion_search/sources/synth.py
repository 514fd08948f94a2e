"""Synthetic LAION-400M-format shards with realistic structure, for tests, demos and benchmarks.

Two geometries. The default, ``"realistic"``, has the shape of real embedding sets (CLIP's, or a
sentence model's: docs/realistic-vectors.md compares it with real text embedded by a real
model), because HNSW recall and build cost depend on that shape:

* **a decaying spectrum in fewer dimensions**: each vector is a point of an
  ``intrinsic_dim``-dimensional latent space (variance of latent axis j ∝ j^(-2·decay); with the
  defaults, 256 axes of which ~20 carry half the variance, as real text embeddings' ~50 of 384)
  mapped into ``dim`` dimensions by a fixed orthonormal basis, plus isotropic ``noise`` (text
  vectors get 6× more: a caption says less than its picture, and so text→image queries lie off
  the indexed set, which is what makes them harder for HNSW than image→image ones);
* **a shared offset (anisotropy)**: every image vector leans on one common direction, so two
  random vectors have cosine ≈ ``anisotropy`` (real CLIP: ~0.2–0.5; MiniLM on package
  summaries: 0.12), and text vectors on another one (the image–text "modality gap");
* **clusters and hubs**: latent points sit around topic centres and sub-centres (like real
  CLIP embeddings), and a per-row scale with a long lower tail (``hubs``) pulls some rows
  towards the centre, where they become the neighbours of many (hubness);
* **pairs at LAION's cosine**: each text vector is its own point (from the same topic) turned
  towards its image so that their cosine — the ``similarity`` column — follows LAION's
  distribution: mean ``pair_cosine`` (0.32), kept inside [0.28, 0.45] as LAION's filter did.

``"hard"`` is the older set (topic sub-centres plus isotropic noise as large as the centre in
all dimensions): no real embedding set looks like it, and at large sizes HNSW recall on it is far
lower (1M rows: recall@10 0.750 with the default graph); keep it to stress the index.

Both geometries:

* vectors are L2-normalised and stored as float16, like LAION's ``img_emb_N.npy``;
* ``metadata_N.parquet`` has LAION-400M's columns, with captions built from the topic's words
  and, on purpose, quotes, tabs, newlines and non-ASCII text (stored verbatim by ingest);
* ``similarity`` is the real cosine of the stored pair; ``NSFW`` follows LAION's labels.

Output is deterministic for a given seed, and written in bounded chunks (1M-row shards fit in
a few hundred MB of memory).

With ``images=True`` each row also gets a small generated picture (a 64×64 JPEG of 1–3 KB)
under ``images/<shard>/<row>.jpg`` next to the shards, and its ``url`` is that relative path
(``laion serve --images <shard folder>`` serves them). A picture is drawn from the row's topic
(hue, shape) and sub-cluster (position, size, accent), so rows that are near in embedding
space look alike — "more like this" shows look-alikes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_search.errors import UsageError
from laion_search.sources.naming import shard_file_name

TOPICS = [
    ("lego", ["LEGO", "bricks", "set", "minifigure", "Friends", "castle", "Technic", "build"]),
    ("cat", ["cat", "kitten", "tabby", "whiskers", "sleeping", "cute", "paws", "fluffy"]),
    ("dog", ["dog", "puppy", "retriever", "leash", "park", "bark", "fetch", "corgi"]),
    ("beach", ["beach", "sunset", "sea", "waves", "sand", "palm", "tropical", "coast"]),
    ("car", ["car", "sedan", "engine", "wheels", "vintage", "racing", "coupe", "road"]),
    ("food", ["pizza", "burger", "salad", "recipe", "delicious", "kitchen", "dinner", "bowl"]),
    ("city", ["city", "skyline", "night", "street", "tower", "downtown", "lights", "bridge"]),
    ("shoe", ["shoe", "sneaker", "leather", "boots", "running", "heel", "sandal", "fashion"]),
    ("flower", ["flower", "rose", "tulip", "garden", "bouquet", "bloom", "petals", "spring"]),
    ("mountain", ["mountain", "snow", "peak", "hiking", "alps", "valley", "trail", "summit"]),
    ("watch", ["watch", "wrist", "chronograph", "steel", "dial", "luxury", "strap", "gold"]),
    ("book", ["book", "novel", "cover", "paperback", "author", "library", "edition", "pages"]),
]
FILLER = ["the", "a", "with", "for", "and", "new", "best", "in", "of", "on", "photo", "image", "2018", "HD",
          "free", "shipping", "sale", "vector", "illustration", "stock"]
ODD = ['Andrea\'s "Park" Performance', "caf\u00e9 cr\u00e8me \u2014 na\u00efve", "\u4e50\u9ad8\u597d\u670b\u53cb",
       "tab\there", "two\nlines", "emoji \U0001f431", "back\\slash", "semi;colon, comma"]
LICENSES = ["?", "?", "?", "creativecommons.org/licenses/by/4.0", "creativecommons.org/licenses/by-sa/3.0"]

ProgressFn = Callable[[int, int], None]


def synth(out: str | os.PathLike[str], shards: list[int], rows: int, *, dim: int = 512, seed: int = 0,
          layout: str = "flat", pad: int = 0, topics: int = 200, chunk_rows: int = 65536,
          progress: ProgressFn | None = None, images: bool = False, geometry: str = "realistic",
          intrinsic_dim: int = 256, anisotropy: float = 0.2, decay: float = 0.5, noise: float = 0.3,
          hubs: float = 0.6, pair_cosine: float = 0.32) -> list[Path]:
    """Write ``len(shards)`` shards of ``rows`` rows each under ``out``; return the files written.

    ``layout`` is ``"flat"`` (the guide's) or ``"folders"`` (``img_emb/ text_emb/ metadata/``);
    ``pad`` zero-pads shard numbers in file names (LAION-5B style uses 4). ``geometry`` is
    ``"realistic"`` (tuned by ``intrinsic_dim``, ``anisotropy``, ``decay``, ``noise``, ``hubs``,
    ``pair_cosine``: see the module docstring) or ``"hard"`` (isotropic noise; knobs unused).
    ``images`` also writes a picture per row (see the module docstring); those files are not in
    the list.
    """
    if layout not in ("flat", "folders"):
        raise UsageError("layout must be 'flat' or 'folders'")
    if rows < 0 or dim < 2:
        raise UsageError("rows must be >= 0 and dim >= 2")
    if geometry not in GEOMETRIES:
        raise UsageError(f"geometry must be one of {', '.join(GEOMETRIES)}")
    if not 1 <= intrinsic_dim:
        raise UsageError("intrinsic_dim must be >= 1")
    if not 0.0 <= anisotropy < 1.0:
        raise UsageError("anisotropy must be in [0, 1)")
    if not 0.0 <= noise <= 10.0 or not 0.0 <= decay <= 10.0 or not 0.0 <= hubs <= 3.0:
        raise UsageError("noise and decay must be in [0, 10], hubs in [0, 3]")
    if not PAIR_LOW <= pair_cosine <= PAIR_HIGH:
        raise UsageError(f"pair_cosine must be in [{PAIR_LOW}, {PAIR_HIGH}] (LAION's range)")
    root = Path(out)
    dirs = {k: (root / k if layout == "folders" else root) for k in ("img_emb", "text_emb", "metadata")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    space: _Space | _RealisticSpace = (
        _Space(dim, seed, topics) if geometry == "hard" else
        _RealisticSpace(dim, seed, topics, intrinsic_dim=intrinsic_dim, anisotropy=anisotropy, decay=decay,
                        noise=noise, hubs=hubs, pair_cosine=pair_cosine))
    total = rows * len(shards)
    done = 0
    written = []
    for shard in shards:
        paths = {k: dirs[k] / shard_file_name(k, shard, pad) for k in dirs}
        tmp = {k: p.with_name(p.name + ".tmp") for k, p in paths.items()}
        img = np.lib.format.open_memmap(tmp["img_emb"], mode="w+", dtype="<f2", shape=(rows, dim))
        txt = np.lib.format.open_memmap(tmp["text_emb"], mode="w+", dtype="<f2", shape=(rows, dim))
        writer = pq.ParquetWriter(tmp["metadata"], _SCHEMA)
        rng = np.random.default_rng([seed, shard])
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            im, tx, topic, sub = space.sample(rng, n)
            if images:
                _write_pictures(root / "images" / str(shard), start, topic, sub, seed, shard)
            img[start:start + n] = im
            txt[start:start + n] = tx
            sim = np.einsum("ij,ij->i", img[start:start + n].astype(np.float32), txt[start:start + n].astype(np.float32))
            writer.write_table(_metadata(rng, shard, start, n, topic, sim, local_images=images))
            done += n
            if progress:
                progress(done, total)
        writer.close()
        img.flush()
        txt.flush()
        del img, txt
        for k in paths:  # atomic: a shard's files appear complete or not at all
            os.replace(tmp[k], paths[k])
            written.append(paths[k])
    return written


GEOMETRIES = ("realistic", "hard")
PAIR_LOW, PAIR_HIGH = 0.28, 0.45  # LAION kept pairs above ~0.28-0.3; few are above 0.45
PAIR_SPREAD = 0.04


class _RealisticSpace:
    """A low-dimensional latent space with a decaying spectrum, placed in ``dim`` dimensions around
    a shared offset; topic centres, sub-centres and the offsets are shared by all shards of one seed."""

    SUBS = 8
    # spread of topic centres, sub-centres and rows (latent units), and the text vectors' noise
    # relative to the images' (a caption says less than its picture shows). Chosen, with the
    # defaults of synth(), so that nearest-neighbour distances and HNSW recall of text→image
    # queries sit near those of real text embedded by a real model (docs/realistic-vectors.md).
    TOPIC, SUB, ROW = 1.0, 0.5, 1.2
    TEXT_NOISE = 6.0

    def __init__(self, dim: int, seed: int, topics: int, *, intrinsic_dim: int, anisotropy: float, decay: float,
                 noise: float, hubs: float, pair_cosine: float):
        rng = np.random.default_rng([seed, 2**31, 1])
        d = max(1, min(intrinsic_dim, dim - 2)) if dim > 2 else 1
        self.dim, self.d, self.topics = dim, d, topics
        self.noise, self.hubs, self.pair_cosine = noise, hubs, pair_cosine
        self.pair_centre = _centre_for_mean(pair_cosine, PAIR_SPREAD, PAIR_LOW, PAIR_HIGH)
        q, _ = np.linalg.qr(rng.standard_normal((dim, min(dim, d + 2))))
        self.basis = q[:, :d].T.astype(np.float32)           # latent axes, orthonormal
        # the offsets are orthogonal to the latent axes (where dim leaves room); image and text
        # offsets meet at ~60°
        extra = q[:, d:d + 2] if q.shape[1] >= d + 2 else _normalise(rng.standard_normal((2, dim))).T
        off_i, off_t = extra[:, 0], 0.5 * extra[:, 0] + np.sqrt(0.75) * extra[:, 1]
        spectrum = (1.0 + np.arange(d)) ** -decay
        self.spectrum = (spectrum / np.sqrt((spectrum ** 2).sum())).astype(np.float32)  # total variance 1
        # total latent variance 1 on average over rows, hub scale included, so that the offset's
        # share — the mean cosine of two random vectors — is ``anisotropy``
        h = np.abs(np.random.default_rng(0).standard_normal(100_000))
        # (Python floats: a float64 NumPy scalar would turn the float32 arithmetic below into float64)
        self.scale = float(np.sqrt((self.TOPIC ** 2 + self.SUB ** 2 + self.ROW ** 2) * np.mean(np.exp(-2 * h * hubs))))
        self.centres = rng.standard_normal((topics, d)).astype(np.float32) * self.spectrum * self.TOPIC
        self.sub = self.centres[:, None, :] + rng.standard_normal((topics, self.SUBS, d)).astype(np.float32) \
            * self.spectrum * self.SUB
        a = np.sqrt(anisotropy)
        self.offset_img = (a * off_i).astype(np.float32)
        self.offset_txt = (a * off_t).astype(np.float32)
        self.b = float(np.sqrt(1.0 - anisotropy))
        w = 1.0 / np.arange(1, topics + 1) ** 0.6
        self.weights = w / w.sum()

    def _points(self, rng: np.random.Generator, topic: np.ndarray, sub: np.ndarray, offset: np.ndarray,
                noise: float) -> np.ndarray:
        n = len(topic)
        z = self.sub[topic, sub] + rng.standard_normal((n, self.d), dtype=np.float32) * self.spectrum * self.ROW
        # hubness: a long lower tail of latent scale pulls some rows towards the offset
        z *= np.exp(-np.abs(rng.standard_normal(n, dtype=np.float32)) * self.hubs)[:, None] / self.scale
        x = offset + self.b * (z @ self.basis)
        x += rng.standard_normal((n, self.dim), dtype=np.float32) * (noise / np.sqrt(self.dim))
        return _normalise(x)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Image and text vectors (float16), and each row's topic and image sub-centre (what
        its generated picture is drawn from)."""
        topic = rng.choice(self.topics, size=n, p=self.weights)
        sub = rng.integers(0, self.SUBS, size=n)
        image = self._points(rng, topic, sub, self.offset_img, self.noise)
        text0 = self._points(rng, topic, rng.integers(0, self.SUBS, size=n), self.offset_txt, self.noise * self.TEXT_NOISE)
        s = _truncated_normal(rng, n, self.pair_centre, PAIR_SPREAD, PAIR_LOW, PAIR_HIGH)
        # turn each text towards its image until their cosine is s: keep its own direction
        # orthogonal to the image (what makes it a different, related vector), add s of the image
        r = text0 - np.einsum("ij,ij->i", text0, image)[:, None] * image
        text = s[:, None] * image + np.sqrt(1 - s ** 2)[:, None] * _normalise(r)
        return image.astype(np.float16), _normalise(text).astype(np.float16), topic, sub


def _centre_for_mean(mean: float, sd: float, lo: float, hi: float) -> float:
    """The centre of a normal truncated to [lo, hi] whose mean is ``mean`` (cutting one tail moves the mean)."""
    from math import erf, exp, pi, sqrt

    def truncated_mean(mu: float) -> float:
        a, b = (lo - mu) / sd, (hi - mu) / sd
        pdf = lambda x: exp(-x * x / 2) / sqrt(2 * pi)  # noqa: E731
        cdf = lambda x: 0.5 * (1 + erf(x / sqrt(2)))  # noqa: E731
        return mu + sd * (pdf(a) - pdf(b)) / max(cdf(b) - cdf(a), 1e-12)

    low, high = lo - 3 * sd, hi + 3 * sd  # truncated_mean is increasing in mu: bisect
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if truncated_mean(mid) < mean else (low, mid)
    return (low + high) / 2


def _truncated_normal(rng: np.random.Generator, n: int, mean: float, sd: float, lo: float, hi: float) -> np.ndarray:
    out = rng.normal(mean, sd, n).astype(np.float32)
    bad = (out < lo) | (out > hi)
    while bad.any():  # redraw the few outside [lo, hi]: same shape inside, no pile-up at the ends
        out[bad] = rng.normal(mean, sd, int(bad.sum()))
        bad = (out < lo) | (out > hi)
    return out


class _Space:
    """The ``hard`` geometry: topic centres and sub-centres plus isotropic noise as large as the
    centre in every dimension (no real embedding set looks like this)."""

    def __init__(self, dim: int, seed: int, topics: int):
        rng = np.random.default_rng([seed, 2**31])
        self.dim = dim
        self.topics = topics
        self.centres = _normalise(rng.standard_normal((topics, dim)))
        self.sub = _normalise(self.centres[:, None, :] + 0.9 * _normalise(rng.standard_normal((topics, 8, dim))))
        self.text_dir = _normalise(rng.standard_normal((topics, dim)))
        # topic popularity follows a long tail, like real web data
        w = 1.0 / np.arange(1, topics + 1) ** 0.6
        self.weights = w / w.sum()

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        topic = rng.choice(self.topics, size=n, p=self.weights)
        sub = rng.integers(0, self.sub.shape[1], size=n)
        noise = rng.standard_normal((n, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        image = _normalise(self.sub[topic, sub] + 0.9 * noise)
        tnoise = rng.standard_normal((n, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        text = _normalise(0.55 * image + 0.45 * self.text_dir[topic] + 0.5 * self.centres[topic] + 1.1 * tnoise)
        return image.astype(np.float16), text.astype(np.float16), topic, sub


PICTURE_SIZE = 64


def _write_pictures(folder: Path, start: int, topic: np.ndarray, sub: np.ndarray, seed: int, shard: int) -> None:
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        from laion_search.errors import UsageError

        raise UsageError("synth --images needs Pillow: pip install 'laion-search[clip]'") from None
    import colorsys

    folder.mkdir(parents=True, exist_ok=True)
    size = PICTURE_SIZE
    for i, (t, s) in enumerate(zip(topic.tolist(), sub.tolist())):
        rng = np.random.default_rng([seed, shard, start + i, 7])
        hue = (t * 0.61803398875) % 1.0  # topics spread round the colour wheel
        rgb = lambda h, sat, v: tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h % 1.0, sat, v))  # noqa: E731
        img = Image.new("RGB", (size, size), rgb(hue, 0.25, 0.97))
        d = ImageDraw.Draw(img)
        # a horizon band whose height depends on the sub-cluster
        band = int(size * (0.55 + 0.05 * (s % 4)))
        d.rectangle([0, band, size, size], fill=rgb(hue + 0.08, 0.45, 0.8))
        cx = size * (0.3 + 0.2 * (s % 3)) + rng.normal(0, 1.5)
        cy = size * (0.3 + 0.15 * ((s // 3) % 3)) + rng.normal(0, 1.5)
        r = size * (0.18 + 0.04 * (s % 2)) * (1 + rng.normal(0, 0.05))
        fill = rgb(hue, 0.85, 0.55 + 0.1 * (s % 3))
        box = [cx - r, cy - r, cx + r, cy + r]
        kind = t % 4
        if kind == 0:
            d.ellipse(box, fill=fill)
        elif kind == 1:
            d.rectangle(box, fill=fill)
        elif kind == 2:
            d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        accent = rgb(hue + 0.5, 0.7, 0.9)
        ax, ay = size * (0.75 - 0.5 * ((s >> 1) % 2)), size * 0.82
        d.ellipse([ax - 5, ay - 5, ax + 5, ay + 5], fill=accent)
        img.save(folder / f"{start + i}.jpg", "JPEG", quality=80)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


_SCHEMA = pa.schema([
    ("image_path", pa.string()), ("caption", pa.string()), ("NSFW", pa.string()), ("similarity", pa.float64()),
    ("LICENSE", pa.string()), ("url", pa.string()), ("key", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
    ("original_width", pa.int64()), ("original_height", pa.int64()), ("exif", pa.string()),
])


def _metadata(rng: np.random.Generator, shard: int, start: int, n: int, topic: np.ndarray,
              sim: np.ndarray, local_images: bool = False) -> pa.Table:
    rows = np.arange(start, start + n)
    words = [w for _, ws in TOPICS for w in ws]
    n_topics = len(TOPICS)
    picks = rng.integers(0, 8, size=(n, 3))
    fill = rng.integers(0, len(FILLER), size=(n, 2))
    odd = rng.random(n) < 0.05
    odd_pick = rng.integers(0, len(ODD), size=n)
    captions = []
    for i in range(n):
        base = (topic[i] % n_topics) * 8
        c = f"{words[base + picks[i, 0]]} {FILLER[fill[i, 0]]} {words[base + picks[i, 1]]} " \
            f"{FILLER[fill[i, 1]]} {words[base + picks[i, 2]]} #{int(topic[i])}"
        if odd[i]:
            c = f"{c} {ODD[odd_pick[i]]}"
        captions.append(c)
    u = rng.random(n)
    nsfw = np.where(u < 0.9, "UNLIKELY", np.where(u < 0.97, "UNSURE", "NSFW"))
    width = rng.choice([256, 320, 400, 500, 600, 640, 800, 1024], size=n)
    height = rng.choice([256, 300, 400, 480, 600, 768, 1024], size=n)
    keys = [f"{shard:05d}{r:04d}" for r in rows]
    lic = rng.integers(0, len(LICENSES), size=n)
    return pa.table({
        "image_path": [f"{shard:05d}/{k}.jpg" for k in keys],
        "caption": captions,
        "NSFW": nsfw.tolist(),
        "similarity": sim.astype(np.float64),
        "LICENSE": [LICENSES[i] for i in lic],
        "url": ([f"images/{shard}/{r}.jpg" for r in rows] if local_images else
                [f"https://img.example.org/{TOPICS[t % n_topics][0]}/{shard}/{r}.jpg" for t, r in zip(topic, rows)]),
        "key": keys,
        "status": ["success"] * n,
        "error_message": pa.nulls(n, pa.string()),
        "width": width.astype(np.int64),
        "height": height.astype(np.int64),
        "original_width": (width * 2).astype(np.int64),
        "original_height": (height * 2).astype(np.int64),
        "exif": ["{}"] * n,
    }, schema=_SCHEMA)


#: ClickHouse's LAION-5B Parquet parts, column for column (``laion5b_100m_part_N_of_10.parquet``)
CLICKHOUSE_SCHEMA = pa.schema([
    ("id", pa.uint32()), ("image_path", pa.string()), ("caption", pa.string()), ("NSFW", pa.string()),
    ("similarity", pa.float32()), ("LICENSE", pa.string()), ("url", pa.string()), ("key", pa.string()),
    ("status", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
    ("original_height", pa.int32()), ("exif", pa.string()), ("md5", pa.string()),
    ("vector", pa.list_(pa.float32())),
])


def synth_clickhouse_parquet(path: str | os.PathLike[str], rows: int, *, dim: int = 768, seed: int = 0,
                             first_id: int = 0, row_group_rows: int = 131072) -> Path:
    """Write a ClickHouse-LAION-5B-format Parquet part of ``rows`` rows (ids ``first_id …``):
    the image embeddings in a ``vector`` list column, no text embeddings, ClickHouse's nullable
    columns with some nulls. Row groups of ``row_group_rows`` (ClickHouse writes up to 1M rows
    or 512 MiB per group); memory is bounded by one row group."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    space = _Space(dim, seed, 200)
    rng = np.random.default_rng([seed, 7])
    with pq.ParquetWriter(tmp, CLICKHOUSE_SCHEMA) as writer:
        for start in range(0, rows, row_group_rows):
            n = min(row_group_rows, rows - start)
            image, text, topic, _ = space.sample(rng, n)
            img32 = image.astype(np.float32)
            sim = np.einsum("ij,ij->i", img32, text.astype(np.float32))
            meta = _metadata(rng, 0, start, n, topic, sim)
            nulls = rng.random(n) < 0.1
            vec = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)),
                                           pa.array(img32.reshape(-1)))
            writer.write_table(pa.table({
                "id": pa.array(np.arange(first_id + start, first_id + start + n, dtype=np.uint32)),
                "image_path": meta.column("image_path"),
                "caption": meta.column("caption"),
                "NSFW": pa.array([None if z else v for z, v in zip(nulls, meta.column("NSFW").to_pylist())],
                                 pa.string()),
                "similarity": pa.array(sim.astype(np.float32)),
                "LICENSE": pa.array([None if z else v for z, v in zip(nulls, meta.column("LICENSE").to_pylist())],
                                    pa.string()),
                "url": meta.column("url"),
                "key": meta.column("key"),
                "status": meta.column("status"),
                "width": meta.column("width").cast(pa.int32()),
                "height": meta.column("height").cast(pa.int32()),
                "original_width": meta.column("original_width").cast(pa.int32()),
                "original_height": meta.column("original_height").cast(pa.int32()),
                "exif": pa.nulls(n, pa.string()),
                "md5": [f"{i:032x}" for i in range(first_id + start, first_id + start + n)],
                "vector": vec,
            }, schema=CLICKHOUSE_SCHEMA), row_group_size=row_group_rows)
    os.replace(tmp, out)
    return out


def synth_sisap_h5(path: str | os.PathLike[str], rows: int, *, dim: int = 768, seed: int = 0,
                   dataset: str = "emb", dtype: str = "float16", chunk_rows: int = 65536,
                   tail: tuple[str | os.PathLike[str], int] | None = None) -> Path:
    """Write a SISAP-LAION2B-format ``.h5`` file: dataset ``emb``, ``rows × dim`` unit vectors in
    float16, written in chunks (memory bounded by ``chunk_rows``). ``tail`` = (path, n): the next
    n rows of the same stream go to a second file of the same format (held-out queries, without
    writing the big file twice). ``dataset`` and ``dtype`` exist to write the wrong thing on
    purpose, for tests."""
    import h5py

    space = _Space(dim, seed, 200)
    rng = np.random.default_rng([seed, 11])
    out = Path(path)
    for target, n_rows in ((out, rows), *(((Path(tail[0]), int(tail[1])),) if tail else ())):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset(dataset, shape=(n_rows, dim), dtype=dtype)
            for start in range(0, n_rows, chunk_rows):
                n = min(chunk_rows, n_rows - start)
                image, _, _, _ = space.sample(rng, n)
                ds[start:start + n] = image.astype(dtype)
        os.replace(tmp, target)
    return out
