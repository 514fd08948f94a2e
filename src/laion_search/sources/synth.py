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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


def shard_name(kind: str, shard: int, pad: int) -> str:
    ext = ".parquet" if kind == "metadata" else ".npy"
    return f"{kind}_{shard:0{pad}d}{ext}" if pad else f"{kind}_{shard}{ext}"


def synth(out: str | os.PathLike[str], shards: list[int], rows: int, *, dim: int = 512, seed: int = 0,
          layout: str = "flat", pad: int = 0, topics: int = 200, chunk_rows: int = 65536,
          progress: ProgressFn | None = None) -> list[Path]:
    """Write ``len(shards)`` shards of ``rows`` rows each under ``out``; return the files written.

    ``layout`` is ``"flat"`` (the guide's) or ``"folders"`` (``img_emb/ text_emb/ metadata/``);
    ``pad`` zero-pads shard numbers in file names (LAION-5B style uses 4).
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
        paths = {k: dirs[k] / shard_name(k, shard, pad) for k in dirs}
        tmp = {k: p.with_name(p.name + ".tmp") for k, p in paths.items()}
        img = np.lib.format.open_memmap(tmp["img_emb"], mode="w+", dtype="<f2", shape=(rows, dim))
        txt = np.lib.format.open_memmap(tmp["text_emb"], mode="w+", dtype="<f2", shape=(rows, dim))
        writer = pq.ParquetWriter(tmp["metadata"], _SCHEMA)
        rng = np.random.default_rng([seed, shard])
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            im, tx, topic = space.sample(rng, n)
            img[start:start + n] = im
            txt[start:start + n] = tx
            sim = np.einsum("ij,ij->i", img[start:start + n].astype(np.float32), txt[start:start + n].astype(np.float32))
            writer.write_table(_metadata(rng, shard, start, n, topic, sim))
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

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        topic = rng.choice(self.topics, size=n, p=self.weights)
        sub = rng.integers(0, self.sub.shape[1], size=n)
        noise = rng.standard_normal((n, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        image = _normalise(self.sub[topic, sub] + 0.9 * noise)
        tnoise = rng.standard_normal((n, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        text = _normalise(0.55 * image + 0.45 * self.text_dir[topic] + 0.5 * self.centres[topic] + 1.1 * tnoise)
        return image.astype(np.float16), text.astype(np.float16), topic


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
              sim: np.ndarray) -> pa.Table:
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
        "url": [f"https://img.example.org/{TOPICS[t % n_topics][0]}/{shard}/{r}.jpg" for t, r in zip(topic, rows)],
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
            image, text, topic = space.sample(rng, n)
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
                   dataset: str = "emb", dtype: str = "float16", chunk_rows: int = 65536) -> Path:
    """Write a SISAP-LAION2B-format ``.h5`` file: dataset ``emb``, ``rows × dim`` unit vectors in
    float16, written in chunks (memory bounded by ``chunk_rows``). ``dataset`` and ``dtype``
    exist to write the wrong thing on purpose, for tests."""
    import h5py

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    space = _Space(dim, seed, 200)
    rng = np.random.default_rng([seed, 11])
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset(dataset, shape=(rows, dim), dtype=dtype)
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            image, _, _ = space.sample(rng, n)
            ds[start:start + n] = image.astype(dtype)
    os.replace(tmp, out)
    return out
