"""Named sources of real LAION embeddings (``laion sources``, ``laion download --source NAME``).

Facts gathered 2026-12-01 (see docs/real-data.md); sizes marked ``~`` are estimates from rows ×
dimension × bytes per value, not measured downloads.

* ``laion400m`` — the guide's shards (``img_emb_N.npy``, ``text_emb_N.npy``, ``metadata_N.parquet``)
  under ``deploy.laion.ai``. That URL has been reported answering 404 since 2024 (ClickHouse issue
  #61351): LAION withdrew LAION-400M/5B in December 2023 and re-released them, filtered, as
  Re-LAION on Hugging Face (gated). A 404 from it prints :data:`LAION400M_GONE`.
* ``laion5b-100m`` — ClickHouse's LAION-5B subset (the data set of its vector-search docs): 10
  Parquet parts of 10M rows, 768-d CLIP ViT-L/14 image embeddings in a ``vector`` column.
* ``sisap-300k`` … ``sisap-100m`` — the SISAP 2024 indexing challenge's LAION2B-en subsets (HDF5
  ``emb``, float16 × 768), with the 10k public queries and the gold standard (``knns``, 1-based).

A single-file source downloads as parts (a Parquet part or an ``.h5`` is one file) through
:func:`laion_search.sources.fetch.download_files`; ``laion400m`` through the shard downloader.
``base_url`` replaces every file's prefix (a mirror, or a loopback server in tests).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from laion_search.errors import UsageError

LAION400M_URL = "https://deploy.laion.ai/8f83b608504d46bb81708ec86e912220/embeddings"
CLICKHOUSE_LAION5B_URL = "https://clickhouse-datasets.s3.amazonaws.com/laion-5b"
SISAP_DATA_URL = "https://sisap-23-challenge.s3.amazonaws.com/SISAP23-Challenge"
SISAP_2024_URL = "https://ingeotec.mx/~sadit/sisap2024-data"
SISAP_QUERIES = "public-queries-2024-laion2B-en-clip768v2-n=10k.h5"

LAION400M_GONE = (
    "the guide's LAION-400M URL (deploy.laion.ai) has answered 404 since 2024 (ClickHouse issue #61351): "
    "LAION withdrew LAION-400M/5B in December 2023. Use instead: `laion download --source laion5b-100m 1` "
    "(ClickHouse's LAION-5B subset, 10M rows per part, 768-d), `laion download --source sisap-300k` "
    "(SISAP's LAION2B-en subset with queries and gold standard), or Re-LAION on Hugging Face "
    "(gated: set HF_TOKEN) or a mirror of the shards with --base-url. `laion sources` lists them all.")

VIT_B32 = "OpenAI CLIP ViT-B/32"
VIT_L14 = "OpenAI CLIP ViT-L/14"


@dataclass(frozen=True)
class SourceFile:
    part: int
    role: str           #: data, queries or gold
    name: str           #: file name, locally and at the end of the URL
    url: str
    kind: str           #: verification kind: parquet, h5
    rows: int | None
    size_bytes: int | None


@dataclass(frozen=True)
class Source:
    name: str
    title: str
    layout: str                 #: files (single-file parts) or shards (img_emb/text_emb/metadata per shard)
    rows: int
    size_bytes: int
    size_estimated: bool
    dim: int
    model: str
    encoder: str                #: the Hugging Face id of the matching CLIP model
    modalities: tuple[str, ...]
    ids: str
    licence: str
    note: str
    base_url: str
    files: tuple[SourceFile, ...] = ()
    shards: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        d["files"] = [asdict(f) for f in self.files]
        return d

    def parts(self, spec: str | None) -> list[int]:
        """``"1-3,5"``, role names (``data,queries,gold``) or None (all) → part numbers."""
        valid = [f.part for f in self.files] if self.layout == "files" else list(range(self.shards))
        if spec is None or not spec.strip():
            return valid
        from laion_search.sources.naming import parse_shard_spec

        roles = {f.role: f.part for f in self.files}
        out: set[int] = set()
        for item in spec.split(","):
            item = item.strip()
            if item in roles and self.layout == "files" and not item.isdigit():
                out.add(roles[item])
            else:
                try:
                    out.update(parse_shard_spec(item) or [])
                except UsageError:
                    names = ", ".join(roles) if len(set(roles)) > 1 else ""
                    raise UsageError(f"{self.name}: invalid part {item!r}: expected numbers like 1-3"
                                     + (f" or {names}" if names else "")) from None
        bad = sorted(out - set(valid))
        if bad:
            span = f"{valid[0]}-{valid[-1]}" if valid else "none"
            raise UsageError(f"{self.name} has no part {bad[0]} (its parts are {span})")
        return sorted(out)


def _ch_parts() -> tuple[SourceFile, ...]:
    return tuple(SourceFile(i, "data", f"laion5b_100m_part_{i}_of_10.parquet",
                            f"{CLICKHOUSE_LAION5B_URL}/laion5b_100m_part_{i}_of_10.parquet", "parquet",
                            10_000_000, None) for i in range(1, 11))


def _sisap(label: str, rows: int) -> Source:
    data = f"laion2B-en-clip768v2-n={label}.h5"
    gold = f"gold-standard-dbsize={label}--{SISAP_QUERIES}"
    size = rows * 768 * 2
    return Source(
        name=f"sisap-{label.lower()}", title=f"SISAP 2024 indexing challenge, LAION2B-en {label} subset",
        layout="files", rows=rows, size_bytes=size + 31_000_000 + 77_000_000, size_estimated=True, dim=768,
        model=VIT_L14, encoder="openai/clip-vit-large-patch14", modalities=("image",),
        ids="1-based row number (= the gold knns)",
        licence="research benchmark data of the SISAP indexing challenge; derived from LAION-2B-en "
                "(CC-BY 4.0 metadata, images remain their owners'); LAION withdrew LAION-5B in Dec 2023",
        note="HDF5 'emb' float16 rows × 768 (image embeddings only, no captions or URLs); 10k public queries "
             "(emb) and gold standard (knns int32 from 1, dists = dot products, 1,000 per query)",
        base_url=SISAP_DATA_URL,
        files=(SourceFile(1, "data", data, f"{SISAP_DATA_URL}/{data}", "h5", rows, None),
               SourceFile(2, "queries", SISAP_QUERIES, f"{SISAP_2024_URL}/{SISAP_QUERIES}", "h5", 10_000, None),
               SourceFile(3, "gold", gold, f"{SISAP_2024_URL}/{gold}", "h5", 10_000, None)))


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source(
        name="laion400m", title="LAION-400M, the guide's shards (img_emb, text_emb, metadata)",
        layout="shards", rows=413_000_000, size_bytes=410 * 2_200_000_000, size_estimated=True, dim=512,
        model=VIT_B32, encoder="openai/clip-vit-base-patch32", modalities=("image", "text"),
        ids="shard × 10⁹ + row", licence="LAION-400M: CC-BY 4.0 metadata, images remain their owners'; "
        "withdrawn by LAION in Dec 2023 (re-released, filtered, as Re-LAION)",
        note="410 shards of ~1M rows (float16 npy + parquet); the URL has answered 404 since 2024 — "
             "use a mirror with --base-url", base_url=LAION400M_URL, shards=410),
    Source(
        name="laion5b-100m", title="ClickHouse's LAION-5B subset (vector-search docs), 10 Parquet parts",
        layout="files", rows=100_000_000, size_bytes=10 * 10_000_000 * (768 * 4 + 250), size_estimated=True,
        dim=768, model=VIT_L14, encoder="openai/clip-vit-large-patch14", modalities=("image",),
        ids="the file's id column", licence="LAION-5B subset published by ClickHouse: CC-BY 4.0 metadata, "
        "images remain their owners'; LAION withdrew LAION-5B in Dec 2023",
        note="10 parts × 10M rows; columns id, url, caption, NSFW, similarity, LICENSE, key, width, height, "
             "…, vector Array(Float32) (image embeddings only, no text embedding)",
        base_url=CLICKHOUSE_LAION5B_URL, files=_ch_parts()),
    _sisap("300K", 300_000),
    _sisap("10M", 10_000_000),
    _sisap("30M", 30_000_000),
    _sisap("100M", 100_000_000),
)}


def list_sources() -> list[Source]:
    return list(SOURCES.values())


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise UsageError(f"unknown source {name!r}: one of {', '.join(SOURCES)}") from None


def plan_source(source: Source, parts: list[int], to: str | os.PathLike[str], base_url: str | None = None) -> list:
    """FileJobs for a single-file source's parts: one file each, saved as ``to/NAME``."""
    from laion_search.sources.fetch import FileJob

    if source.layout != "files":
        raise UsageError(f"{source.name} is a shard source: download it with its shard numbers")
    root = Path(to)
    if base_url is not None:
        _check_base(base_url)
    out = []
    for f in source.files:
        if f.part in parts:
            url = f"{base_url.rstrip('/')}/{f.name}" if base_url else f.url
            out.append(FileJob(f.part, f.kind, url, f.name, root / f.name))
    return out


def _check_base(base_url: str) -> None:
    if not re.match(r"^https?://[^/]", base_url):
        raise UsageError(f"base URL must be http:// or https://, not {base_url!r}")


def download_source(name: str, parts: str | None, to: str | os.PathLike[str], *, base_url: str | None = None,
                    store: Any = None, **kw: Any):
    """Download a named source's parts (``parts``: a spec such as ``1-3``; None: all) into ``to``
    with every guarantee of ``laion download``. Returns the DownloadReport."""
    from laion_search.sources.download import Remote, download
    from laion_search.sources.fetch import download_files

    source = get_source(name)
    numbers = source.parts(parts)
    if source.layout == "shards":
        remote = Remote(base_url=base_url or source.base_url)
        return download(numbers, to, remote=remote, store=store, **kw)
    if store is not None:
        raise UsageError(f"--ingest works with shard sources; ingest {source.name}'s files with `laion ingest FILE`")
    for key in ("delete_after_ingest", "batch_rows", "ahead", "load"):
        kw.pop(key, None)
    jobs = plan_source(source, numbers, to, base_url)
    return download_files(jobs, to, source=source.name, base_url=base_url or source.base_url, **kw)


def hint_for(report: Any, base_url: str | None, source: str | None = None) -> str | None:
    """What to use instead, when LAION-400M shards (the guide's URL, or ``--source laion400m``)
    answered 404."""
    guide = (base_url or LAION400M_URL).startswith(LAION400M_URL.rsplit("/", 1)[0])
    if not guide and source != "laion400m":
        return None
    if any("HTTP 404" in str(f.get("reason", "")) for f in getattr(report, "failed", [])):
        return LAION400M_GONE
    return None


__all__ = ["LAION400M_GONE", "SOURCES", "Source", "SourceFile", "download_source", "get_source", "hint_for",
           "list_sources", "plan_source"]
