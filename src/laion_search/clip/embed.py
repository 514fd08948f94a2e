"""``laion embed``: turn a folder of your own images into LAION-format shards.

Output per shard ``N`` (flat layout, float16 like LAION): ``img_emb_N.npy`` (CLIP image
vectors), ``text_emb_N.npy`` (CLIP vectors of the captions), ``metadata_N.parquet`` (``url`` as a
``file://`` URI, ``image_path`` relative to the folder, ``caption``, ``key``, ``width``,
``height``, ``similarity`` = cosine of the pair, ``NSFW`` empty = not classified). Then
``laion ingest OUT`` loads them like any LAION shard.

Captions come from a CSV (``path,caption``; paths relative to the folder) or, by default, from
file names (``red_lego-car.jpg`` → "red lego car"). Images are sorted by path and cut into
shards of ``shard_size``; a shard whose three files exist for the same image list is skipped,
so an interrupted run resumes. Unreadable images are skipped and reported, not fatal.
"""

from __future__ import annotations

import csv
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_search.errors import EncoderError, UsageError
from laion_search.sources.naming import KINDS, shard_file_name

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class EmbedReport:
    images: int = 0
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "shards_written": self.shards_written, "shards_skipped": self.shards_skipped,
                "failed": [{"path": p, "error": e} for p, e in self.failed], "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 2)}


def caption_from_filename(path: Path) -> str:
    return re.sub(r"[_\-.]+", " ", path.stem).strip() or path.stem


def read_captions(csv_path: Path) -> dict[str, str]:
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = {name.lower(): name for name in reader.fieldnames or []}
            key = next((fields[n] for n in ("path", "file", "filename", "image", "image_path") if n in fields), None)
            cap = fields.get("caption") or fields.get("text")
            if key is None or cap is None:
                raise UsageError(f"{csv_path}: needs a 'path' (or file/filename/image) and a 'caption' column")
            return {row[key]: row[cap] or "" for row in reader}
    except OSError as exc:
        raise UsageError(f"{csv_path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{csv_path}: not a readable UTF-8 CSV ({exc})") from None


def list_images(root: Path) -> list[Path]:
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def embed(images_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, captions: str | None = None,
          model: str | None = None, shard_size: int = 10_000, batch_size: int = 32, start_shard: int = 0,
          progress: ProgressFn | None = None) -> EmbedReport:
    from laion_search.clip.encoders import get_encoder
    from laion_search.clip.images import load_image

    emit = progress or (lambda e: None)
    root, out = Path(images_dir), Path(out)
    if shard_size < 1 or batch_size < 1:
        raise UsageError("shard_size and batch_size must be positive")
    files = list_images(root)
    if not files:
        raise UsageError(f"{root}: no images found ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    caps = read_captions(Path(captions)) if captions else None
    out.mkdir(parents=True, exist_ok=True)
    enc = get_encoder(model)
    report = EmbedReport()
    t0 = time.perf_counter()
    emit({"event": "start", "images": len(files)})
    for s_index, start in enumerate(range(0, len(files), shard_size)):
        shard = start_shard + s_index
        chunk = files[start:start + shard_size]
        rel = [str(p.relative_to(root)) for p in chunk]
        if _complete(out, shard, rel):
            report.shards_skipped.append(shard)
            emit({"event": "shard_skipped", "shard": shard, "images": len(chunk)})
            continue
        kept, sizes, img_vecs = [], [], []
        for b in range(0, len(chunk), batch_size):
            batch, batch_rel = [], []
            for p, r in zip(chunk[b:b + batch_size], rel[b:b + batch_size]):
                try:
                    im = load_image(p, name=r)
                except EncoderError as exc:
                    report.failed.append((r, str(exc)))
                    continue
                batch.append(im)
                batch_rel.append(r)
                sizes.append(im.size)
            if batch:
                img_vecs.append(enc.encode_image(batch, batch_size=batch_size))
                kept += batch_rel
            report.images += len(batch)
            emit({"event": "batch", "images_done": report.images, "images": len(files),
                  "seconds": time.perf_counter() - t0})
        if not kept:
            continue
        texts = [(caps.get(r, "") if caps is not None else caption_from_filename(Path(r))) for r in kept]
        text_vecs = enc.encode_text([t if t.strip() else Path(r).stem for t, r in zip(texts, kept)],
                                    batch_size=max(batch_size, 64))
        image = np.concatenate(img_vecs).astype(np.float16)
        text = text_vecs.astype(np.float16)
        _write_shard(out, shard, root, kept, texts, sizes, image, text)
        report.shards_written.append(shard)
        emit({"event": "shard_done", "shard": shard, "images": len(kept)})
    report.seconds = time.perf_counter() - t0
    emit({"event": "done", **report.as_dict()})
    return report


def _complete(out: Path, shard: int, rel: list[str]) -> bool:
    paths = [out / shard_file_name(kind, shard) for kind in KINDS]
    if not all(p.exists() for p in paths):
        return False
    try:
        done = pq.read_table(paths[2], columns=["image_path"]).column(0).to_pylist()
    except Exception:
        return False
    # images that failed to load are absent from a complete shard: compare as a subset in order
    return set(done) <= set(rel) and len(done) > 0


def _write_shard(out: Path, shard: int, root: Path, rel: list[str], captions: list[str], sizes: list[tuple[int, int]],
                 image: np.ndarray, text: np.ndarray) -> None:
    sim = np.einsum("ij,ij->i", image.astype(np.float32), text.astype(np.float32))
    meta = pa.table({
        "image_path": rel,
        "caption": captions,
        "NSFW": [""] * len(rel),
        "similarity": sim.astype(np.float64),
        "LICENSE": [""] * len(rel),
        "url": [(root / r).resolve().as_uri() for r in rel],
        "key": [f"{shard:05d}{i:04d}" for i in range(len(rel))],
        "width": pa.array([w for w, _ in sizes], pa.int64()),
        "height": pa.array([h for _, h in sizes], pa.int64()),
    })
    targets = {"img": out / shard_file_name("img_emb", shard), "text": out / shard_file_name("text_emb", shard),
               "meta": out / shard_file_name("metadata", shard)}
    tmp = {k: v.with_name(v.name + ".tmp") for k, v in targets.items()}
    with open(tmp["img"], "wb") as f:
        np.save(f, image)
    with open(tmp["text"], "wb") as f:
        np.save(f, text)
    pq.write_table(meta, tmp["meta"])
    for k in ("img", "text", "meta"):  # metadata last: its presence marks the shard complete
        os.replace(tmp[k], targets[k])
