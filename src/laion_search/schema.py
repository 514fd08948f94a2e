"""The schema: every table, column, modality, metric and index name in one place.

The ``laion`` table keeps the guide's columns and types exactly, so the guide's SQL runs
verbatim, and adds LAION metadata columns plus the shard bookkeeping:

* ``id = shard * ID_STRIDE + row`` (unique, stable, readable: id 3000000042 is shard 3, row 42);
* ``PARTITION BY shard`` so that a shard becomes visible in one atomic step
  (``REPLACE PARTITION`` from a staging table) and re-ingesting it replaces it;
* embeddings stored with ``CODEC(NONE)``: CLIP vectors do not compress, and skipping the
  codec makes both inserts and exact scans faster (see the benchmarks in the README);
* ``index_granularity = 1024`` instead of the guide's 8192: a vector search fetches caption and
  url for its k hits only, and smaller granules make that read ~40 % cheaper (13 → 8 ms for 10
  rows), which is most of an indexed query's cost;
* compressed blocks of 4–16 KiB instead of 64 KiB–1 MiB: reading one row decompresses the block
  that holds it, so small blocks make the k-row reads of a search cheaper again (an indexed
  query returning id, caption and url: 17.5 → 13.7 ms at 100K rows) at ~15 % more bytes for the
  text columns; scans are not slower (the embeddings are stored uncompressed anyway).

Nothing here runs a statement: :mod:`laion_search.store` creates the tables, :mod:`laion_search.index`
builds indexes, :mod:`laion_search.search` queries them — all from these names.
"""

from __future__ import annotations

import re
from typing import Any

from laion_search.errors import UsageError

TABLE = "laion"
SHARDS_TABLE = "laion_shards"
STAGE_PREFIX = "laion_stage_"

#: MergeTree settings of the ``laion`` table (and of its staging and cluster-local tables)
TABLE_SETTINGS = "index_granularity = 1024, min_compress_block_size = 4096, max_compress_block_size = 16384"

TABLE_DDL = """
CREATE TABLE IF NOT EXISTS {table}
(
    `id` Int64,
    `url` String,
    `caption` String,
    `NSFW` String,
    `similarity` Float32,
    `image_embedding` Array(Float32) CODEC(NONE),
    `text_embedding` Array(Float32) CODEC(NONE),
    `shard` UInt32,
    `shard_row` UInt32,
    `key` String,
    `width` Int32,
    `height` Int32,
    `original_width` Int32,
    `original_height` Int32,
    `LICENSE` String
)
ENGINE = MergeTree
PARTITION BY shard
ORDER BY id
SETTINGS """ + TABLE_SETTINGS + "\n"

SHARDS_DDL = """
CREATE TABLE IF NOT EXISTS {table}
(
    `shard` UInt32,
    `rows` UInt64,
    `dim` UInt32,
    `source` String,
    `fingerprint` String,
    `renormalised` UInt64,
    `loaded_at` DateTime64(3),
    `dropped` UInt64 DEFAULT 0,
    `text_repaired` UInt64 DEFAULT 0,
    `format` String DEFAULT 'laion',
    `modalities` String DEFAULT 'image,text',
    `model` String DEFAULT '',
    `name` String DEFAULT ''
)
ENGINE = ReplacingMergeTree(loaded_at)
ORDER BY shard
"""

#: ef_search defaults measured by `laion index tune`, per embedding column (created on first use)
TUNING_TABLE = "laion_index_tuning"
TUNING_DDL = """
CREATE TABLE IF NOT EXISTS {table}
(
    `column` String,
    `index_type` String,
    `ef_search` UInt32,
    `recall` Float64,
    `target` Float64,
    `k` UInt32,
    `queries` UInt32,
    `p50_ms` Float64,
    `tuned_at` DateTime64(3)
)
ENGINE = ReplacingMergeTree(tuned_at)
ORDER BY column
"""

#: Columns that searches and ``--where`` may name; everything else is refused.
COLUMNS = ("id", "url", "caption", "NSFW", "similarity", "shard", "shard_row", "key", "width", "height",
           "original_width", "original_height", "LICENSE")


#: Searchable embedding columns, by modality (``--modality``).
MODALITIES = {"image": "image_embedding", "text": "text_embedding"}
#: Distance functions, by the name users give (``--metric``). ``dot`` ranks by inner product, largest
#: first (SISAP's gold standard ranks so); its distance is the negative inner product (as pgvector's
#: ``<#>``), so that every metric sorts ascending. :func:`distance_sql` writes the expression.
METRICS = {"cosine": "cosineDistance", "l2": "L2Distance", "dot": "dotProduct"}
#: The metrics ClickHouse's ``vector_similarity`` (HNSW) index can rank by: L2Distance and
#: cosineDistance only. A ``dot`` search scans exactly, or goes through an IVF index.
INDEX_METRICS = ("cosine", "l2")


def distance_sql(func: str, a: str, b: str) -> str:
    """The SQL distance between ``a`` and ``b`` for a :data:`METRICS` function: smaller is nearer."""
    return f"negate(dotProduct({a}, {b}))" if func == "dotProduct" else f"{func}({a}, {b})"
NSFW_MODES = ("any", "exclude", "only")
FILTER_STRATEGIES = ("auto", "postfilter", "prefilter")
DEFAULT_COLUMNS = ("id", "caption", "url")
#: caption keyword queries (laion_search.index.text): any: a caption with at least one of the
#: words; all: with every word (any order); phrase: the words next to each other, in order
WORDS_MODES = ("any", "all", "phrase")
#: characters of a keyword query
MAX_WORDS_CHARS = 2000
MAX_K = 1000  # ClickHouse's max_limit_for_vector_search_queries default

#: Column types for ``--where`` values (the allow-list).
WHERE_TYPES = {
    "id": "Int64", "url": "String", "caption": "String", "NSFW": "String", "similarity": "Float32",
    "shard": "UInt32", "shard_row": "UInt32", "key": "String", "width": "Int32", "height": "Int32",
    "original_width": "Int32", "original_height": "Int32", "LICENSE": "String",
}

#: ``vector_similarity`` index quantizations, and bytes per value each keeps in memory.
QUANTIZATIONS = ("bf16", "f16", "f32", "i8", "b1")
QUANT_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "i8": 1.0, "b1": 0.125}
#: Index name and embedding column per modality (the guide's names).
INDEX_NAMES = {"image": ("image_index", "image_embedding"), "text": ("text_index", "text_embedding")}
#: Suffix of the bf16 copy of an embedding column that exact scans read (``image_embedding_bf16``).
SCAN_SUFFIX = "_bf16"
#: ``id = shard * ID_STRIDE + row`` for LAION shards.
ID_STRIDE = 1_000_000_000
MAX_SHARD = (2**63 - 1) // ID_STRIDE - 1

#: The CLIP model behind LAION's published embeddings, by dimension: LAION-400M (the guide's
#: shards) is OpenAI ViT-B/32; LAION-5B, ClickHouse's LAION-5B subset and SISAP's LAION2B-en
#: are OpenAI ViT-L/14. A search by text or image encodes with the model the table records.
MODELS_BY_DIM = {512: "openai/clip-vit-base-patch32", 768: "openai/clip-vit-large-patch14"}


def model_for_dim(dim: int | None) -> str:
    """The model LAION used for ``dim``-d embeddings, or "" when none is known."""
    return MODELS_BY_DIM.get(int(dim), "") if dim else ""


def parse_index_type(type_full: str) -> dict[str, Any]:
    """``vector_similarity('hnsw', 'cosineDistance', 512, 'bf16', 64, 256)`` → its parameters."""
    args = [a.strip().strip("'") for a in re.sub(r"^[^(]*\(|\)$", "", type_full).split(",")]
    out: dict[str, Any] = {"method": args[0] if args else None}
    if len(args) >= 3:
        out["distance"] = args[1]
        out["dim"] = int(args[2])
    if len(args) >= 6:
        out.update(quantization=args[3], m=int(args[4]), ef_construction=int(args[5]))
    return out


def index_memory_estimate(info: dict[str, Any], rows: int) -> int | None:
    """ClickHouse's sizing rule: rows × dim × bytes per value + rows × M × 2 × 4 bytes of links."""
    if "quantization" not in info:
        return None
    return int(rows * info["dim"] * QUANT_BYTES.get(info["quantization"], 4) + rows * info["m"] * 8)


def scan_column(column: str) -> str:
    """``image`` → ``image_embedding_bf16``: the bf16 copy exact scans read."""
    if column not in INDEX_NAMES:
        raise UsageError(f"column must be image or text, got {column!r}")
    return INDEX_NAMES[column][1] + SCAN_SUFFIX


#: ``OPTIMIZE … FINAL`` that merges or fails: it waits (as long as it takes) for the merges running
#: on the table instead of giving up after 120 s, and a merge it cannot do is an error, not a no-op.
OPTIMIZE_SETTINGS = "optimize_throw_if_noop = 1, lock_acquire_timeout = 86400"


# -- the partitioned (IVF) index: made of tables (laion_search.index.ivf) ------------------------------
#: One row per (column, generation): its state (``building`` while filled, ``ready`` once served,
#: ``dropped``), its parameters and the nprobe ``laion index tune`` stored for it. The served
#: generation of a column is its newest ``ready`` one; a rebuild fills a newer generation beside it.
IVF_META_TABLE = "laion_ivf"
IVF_META_DDL = """
CREATE TABLE IF NOT EXISTS {table}
(
    `column` String,
    `gen` UInt32,
    `state` String,
    `lists` UInt32,
    `codes` String,
    `dim` UInt32,
    `sample_rows` UInt64,
    `trained_rows` UInt64,
    `train_seconds` Float64,
    `nprobe` UInt32 DEFAULT 0,
    `fetch_multiplier` Float64 DEFAULT 0,
    `tuned_recall` Float64 DEFAULT 0,
    `tuned_k` UInt32 DEFAULT 0,
    `tuned_p50_ms` Float64 DEFAULT 0,
    `tuned_queries` String DEFAULT '',
    `updated_at` DateTime64(3)
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (column, gen)
"""
#: The centroids of each generation (unit vectors; a row's list is its nearest centroid by cosine).
IVF_CENTROIDS_TABLE = "laion_ivf_centroids"
IVF_CENTROIDS_DDL = """
CREATE TABLE IF NOT EXISTS {table}
(
    `column` String,
    `gen` UInt32,
    `list` UInt32,
    `centroid` Array(Float32) CODEC(NONE)
)
ENGINE = MergeTree
ORDER BY (column, gen, list)
"""
#: Which shards each generation's companion table holds, and from which load of the shard (its
#: ``laion_shards`` fingerprint): a shard is covered when the two agree.
IVF_SHARDS_TABLE = "laion_ivf_shards"
IVF_SHARDS_DDL = """
CREATE TABLE IF NOT EXISTS {table}
(
    `column` String,
    `gen` UInt32,
    `shard` UInt32,
    `rows` UInt64,
    `fingerprint` String,
    `updated_at` DateTime64(3)
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (column, gen, shard)
"""
#: A generation's companion table: every row's id, shard and vector, in (list, id) order, so that
#: ``WHERE list IN (…)`` reads only the probed lists (the primary key prunes the rest). Small
#: granules: a probe reads whole granules, and a list is ~500–1,000 rows at the default list count.
#: The row's default result columns come along (IVF_ROW_COLUMNS): a search that asks for no other
#: column and no filter is then one statement over the probed lists, the engine reading them for
#: the k rows it returns only (lazy materialization).
IVF_GRANULARITY = 256
IVF_TABLE_DDL = """
CREATE TABLE IF NOT EXISTS {table}
(
    `list` UInt32,
    `id` Int64,
    `shard` UInt32,
    `vec` Array(Float32) {codec}{rows}{more}
)
ENGINE = MergeTree
{partition}ORDER BY (list, id)
SETTINGS index_granularity = """ + str(IVF_GRANULARITY) + """{extra}
"""
#: ``--codes``: what the companion keeps besides the float32 vectors. ``sq8``: two more columns,
#: ``code``, each value scaled to -127..127 by the row's largest absolute value, and that ``scale``
#: (the build computes them in numpy; the column defaults compute the same in the engine for a row
#: inserted without them); a search ranks the probed rows by ``dotProduct(code, q) * scale`` (a
#: quarter of the bytes to read and multiply) and rescores the best ``k × fetch multiplier`` on ``vec``. ``int8`` and ``rabitq`` are the engine's
#: ``Quantized`` codec on ``vec`` (``vector_search_use_quantized_codes``); measured slower at 1M rows
#: (docs/indexes.md).
IVF_CODES = ("none", "sq8", "int8", "rabitq")
#: The measured default (docs/indexes.md § "Codes and the read method"): at 1M rows, where the lists
#: are read through mmap, sq8 answered as fast as float32 lists (21.9 vs 22.3 ms at nprobe 16) and
#: made the shard's pipeline 42 → 56 s; through pread (lists bigger than a quarter of memory) it
#: takes 29.5 → 25.2 ms.
DEFAULT_IVF_CODES = "none"
#: The sq8 columns: no trained parameters, so a row's code depends on its vector alone, however it
#: is inserted (a batch, a bucket moved by ``INSERT … SELECT``, a Distributed insert on a cluster).
IVF_SQ8_COLUMNS = """,
    `scale` Float32 DEFAULT arrayMax(arrayMap(x -> abs(x), vec)) / 127,
    `code` Array(Int8) DEFAULT arrayMap(x -> toInt8(round(x / greatest(scale, 1e-30))), vec) CODEC(NONE)"""
#: The result columns a companion table keeps beside the vectors (the defaults but ``id``): companions
#: built before they were added have none, and their searches read them from ``laion`` by id.
IVF_ROW_COLUMNS = tuple(c for c in DEFAULT_COLUMNS if c != "id")
IVF_ROWS_DDL = "".join(f",\n    `{c}` String" for c in IVF_ROW_COLUMNS)
IVF_COLUMN_PREFIX = "laion_ivf_"


def ivf_table(column: str, gen: int) -> str:
    """``laion_ivf_image_g3``: generation 3's companion table of the image embeddings."""
    if column not in INDEX_NAMES:
        raise UsageError(f"column must be image or text, got {column!r}")
    return f"{IVF_COLUMN_PREFIX}{column}_g{int(gen)}"


def ivf_table_ddl(table: str, codes: str, dim: int, *, bucket_lists: int = 0, rows: bool = True) -> str:
    """A companion table's DDL; ``bucket_lists`` > 0 makes a fill stage partitioned by list bucket
    (``intDiv(list, bucket_lists)``) whose outdated parts go at once (see ``ivf._move_buckets``);
    ``rows``: with the IVF_ROW_COLUMNS (False: the layout of companions built before them)."""
    if codes not in IVF_CODES:
        raise UsageError(f"codes must be one of {', '.join(IVF_CODES)}, got {codes!r}")
    partition = f"PARTITION BY intDiv(list, {int(bucket_lists)})\n" if bucket_lists > 0 else ""
    # a dropped bucket's files go within ~2 s, not the default 8 minutes (measured on chDB 26.9)
    extra = (", old_parts_lifetime = 1, cleanup_delay_period = 1, cleanup_delay_period_random_add = 0"
             if bucket_lists > 0 else "")
    if codes in ("none", "sq8"):
        return IVF_TABLE_DDL.format(table=table, codec="CODEC(NONE)", extra=extra, partition=partition,
                                    rows=IVF_ROWS_DDL if rows else "", more=IVF_SQ8_COLUMNS if codes == "sq8" else "")
    return IVF_TABLE_DDL.format(table=table, codec=f"CODEC(Quantized('{codes}', {int(dim)}))", partition=partition,
                                extra=extra + ", allow_experimental_codecs = 1, enable_quantized_codec = 1",
                                rows=IVF_ROWS_DDL if rows else "", more="")
