"""Synthetic LAION-400M-format shards with realistic structure, for tests, demos and benchmarks.

What makes them realistic enough for recall figures to mean something:

* image vectors are drawn around a few hundred topic centres (clustered, like real CLIP
  embeddings), with per-topic sub-clusters, so nearest neighbours are not uniform noise;
* each text vector is correlated with its image vector (cosine ≈ 0.3, LAION's typical CLIP
  similarity) and with its topic, so text→image search finds the right topic;
* both are L2-normalised and stored as float16, like LAION's ``img_emb_N.npy``;
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
          progress: ProgressFn | None = None, images: bool = False) -> list[Path]:
    """Write ``len(shards)`` shards of ``rows`` rows each under ``out``; return the files written.

    ``layout`` is ``"flat"`` (the guide's) or ``"folders"`` (``img_emb/ text_emb/ metadata/``);
    ``pad`` zero-pads shard numbers in file names (LAION-5B style uses 4). ``images`` also
    writes a picture per row (see the module docstring); those files are not in the list.
    """
    if layout not in ("flat", "folders"):
        raise ValueError("layout must be 'flat' or 'folders'")
    if rows < 0 or dim < 2:
        raise ValueError("rows must be >= 0 and dim >= 2")
    root = Path(out)
    dirs = {k: (root / k if layout == "folders" else root) for k in ("img_emb", "text_emb", "metadata")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    space = _Space(dim, seed, topics)
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


class _Space:
    """Topic centres and sub-centres shared by all shards of one seed."""

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
