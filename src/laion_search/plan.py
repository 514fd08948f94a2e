"""Capacity plan for a LAION-sized ``laion`` table: disk, RAM, build and load time, cluster shape.

Pure arithmetic (no engine), from first principles plus figures we measured ourselves; every
figure is below with where it came from, and ``laion plan --json`` prints them with the result.

* **Disk per row** (measured: 100,000 synth rows, 512-d, vectors from float16 as in LAION's
  shards, one merged part, ``system.columns.data_compressed_bytes``):

  - ``f32-none`` — our schema, ``Array(Float32) CODEC(NONE)``: 2,056 B per 512-d vector
    (2,048 B of floats + 8 B of array offsets); fastest loads and exact scans;
  - ``f32-lz4`` — the guide's schema (default LZ4): 1,210 B per vector, because float32 values
    that were float16 have 13 zero mantissa bits that LZ4 finds;
  - ``bf16`` — ``Array(BFloat16) CODEC(NONE)``: 1,032 B per vector (halves disk and scan
    bandwidth; exact distances then carry bf16 rounding).

  Vector bytes scale with the dimension. Metadata (caption, url, NSFW, sizes, license, ids):
  26 B/row measured on synth rows (34-char captions, 40-char urls); real LAION captions and urls
  are longer, so the plan assumes ``META_BYTES = 120`` B/row compressed (overridable).
* **HNSW index memory** (ClickHouse's sizing rule for ``vector_similarity``): rows × dim ×
  bytes per value of the quantization + rows × M × 8 bytes of links. Our bench measured 0.95× of
  it (100,000 rows, bf16: 109.9 MB at M=16, 146.5 MB at M=64). On disk the index took 0.59–0.74×
  its memory; the plan counts it 1× (upper bound). The index must fit in
  ``vector_similarity_index_cache_size`` (server setting, default 5 GiB) to be fast.
* **Index build** (``laion bench search``, 2-core dev machine, 512-d, bf16): 4,367 vectors/s at
  the default M=32, ef_construction=64 (1M realistic rows) and 870 vectors/s at the guide's
  M=64/256 (same 1M rows, same store); 1,536 vectors/s at (16, 128) (100K rows). Assumed to scale
  linearly with cores (parts build in parallel) and inversely with the dimension.
* **Ingest** (``laion bench ingest``, 2 cores): 69,105 rows/s for one ``laion ingest`` process,
  i.e. 34,550 rows/s per core, 512-d; bytes per row scale with the dimension. On a cluster
  one ingest process per cluster shard runs in parallel (a LAION shard touches one node), each
  capped by the network (``NETWORK_BYTES_S`` = 1.25 GB/s, 10 GbE) at the row's Arrow size.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from laion_search.errors import UsageError
from laion_search.schema import DEFAULT_IVF_CODES

#: Bytes per 512-d vector on disk, measured (see the module docstring).
VECTOR_BYTES_512 = {"f32-none": 2056.0, "f32-lz4": 1210.0, "bf16": 1032.0}
#: The caption text index (``laion index create --kind text``), measured by ``laion bench words`` at 1M
#: rows of real package-summary captions (~60 characters): 20.6 B/row on disk, built in 10.7 s on
#: 2 busy cores (~47K rows/s per core). Longer LAION captions hold more words: it scales with them.
TEXT_INDEX_BYTES_PER_ROW = 20.6
TEXT_INDEX_ROWS_PER_CORE_S = 47_000.0
META_BYTES = 120.0            # per row, assumption for real LAION metadata (26 B measured on synth)
META_BYTES_MEASURED_SYNTH = 26.0
QUANT_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "i8": 1.0, "b1": 0.125}
#: HNSW build speed per core at 512-d, measured (vectors/s on 2 cores / 2).
BUILD_PER_CORE_512 = {(32, 64): 4367 / 2, (16, 128): 1536 / 2, (64, 256): 870 / 2}
#: the two settings other ones are interpolated between (both measured on the same 1M rows)
BUILD_FIT_POINTS = ((32, 64), (64, 256))
INGEST_ROWS_PER_CORE_512 = 69_105 / 2
ARROW_BYTES_PER_ROW_512 = 2 * 512 * 4 + 200   # what one row weighs on the wire (Arrow, float32)
NETWORK_BYTES_S = 1.25e9
RAM_USABLE = 0.6              # share of a node's RAM given to vector index caches
DISK_USABLE = 0.7             # share of a node's disk filled (merges need headroom)
EMBEDDED_MAX_ROWS = 100_000_000   # beyond this one box gets impractical (build days, TBs on one disk)

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: str | int | float) -> int:
    """``400M`` → 400,000,000; ``5.85B``, ``100K``, ``1e6``, ``413_000_000`` too."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9][0-9_,]*(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([KMBGT]?)\s*", str(text), re.I)
        if not m:
            raise UsageError(f"expected a count like 400M, 5.85B or 1000000, got {text!r}")
        value = float(m.group(1).replace("_", "").replace(",", "")) * _SUFFIX[m.group(2).upper()]
    if value < 1:
        raise UsageError(f"count must be at least 1, got {text!r}")
    return int(round(value))


def build_rate_per_core(m: int, ef_construction: int, dim: int) -> float:
    """Vectors/s per core: measured at (32, 64), (16, 128) and (64, 256); other settings scale
    with M × ef_construction (the work per insert) between/beyond the default's and the guide's
    rates; all scale with 512/dim."""
    if (m, ef_construction) in BUILD_PER_CORE_512:
        base = BUILD_PER_CORE_512[(m, ef_construction)]
    else:
        # fit rate = a / (M × ef)^p through the two measured points
        (m1, e1), (m2, e2) = BUILD_FIT_POINTS
        r1, r2 = BUILD_PER_CORE_512[(m1, e1)], BUILD_PER_CORE_512[(m2, e2)]
        p = math.log(r1 / r2) / math.log((m2 * e2) / (m1 * e1))
        base = r1 * ((m1 * e1) / (m * ef_construction)) ** p
    return base * 512 / dim


@dataclass
class PlanInputs:
    rows: int
    dim: int = 512
    nodes: int = 3
    cores: int = 32              # per node
    ram_gib: float = 256         # per node
    disk_tib: float = 8          # per node
    storage: str = "f32-none"
    quantization: str = "bf16"
    m: int = 32                  # the index default (laion_search.index.DEFAULT_M)
    ef_construction: int = 64
    indexes: int = 2             # image and text (the guide builds both)
    replicas: int | None = None  # None: suggest
    meta_bytes: float = META_BYTES

    def check(self) -> "PlanInputs":
        if self.storage not in VECTOR_BYTES_512:
            raise UsageError(f"storage must be one of {', '.join(VECTOR_BYTES_512)}")
        if self.quantization not in QUANT_BYTES:
            raise UsageError(f"quantization must be one of {', '.join(QUANT_BYTES)}")
        for name in ("rows", "dim", "nodes", "cores", "m", "ef_construction"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be at least 1")
        if self.ram_gib <= 0 or self.disk_tib <= 0:
            raise UsageError("ram and disk per node must be positive")
        if self.indexes not in (0, 1, 2):
            raise UsageError("indexes must be 0, 1 (image) or 2 (image and text)")
        if self.replicas is not None and self.replicas < 1:
            raise UsageError("replicas must be at least 1")
        return self


def plan(inputs: PlanInputs) -> dict[str, Any]:
    """The plan, as plain data: totals, the embedded store on one node, and the cluster."""
    p = inputs.check()
    rows, dim = p.rows, p.dim
    vector_bytes = VECTOR_BYTES_512[p.storage] * dim / 512
    row_bytes = 2 * vector_bytes + p.meta_bytes
    table_bytes = rows * row_bytes
    index_bytes_per_vector = dim * QUANT_BYTES[p.quantization] + p.m * 8
    index_ram = rows * index_bytes_per_vector * p.indexes
    index_disk = index_ram  # measured 0.59–0.74× of memory; counted 1× (upper bound)
    disk_total = table_bytes + index_disk
    build_core_seconds = rows * p.indexes / build_rate_per_core(p.m, p.ef_construction, dim)
    ingest_rate_1 = min(INGEST_ROWS_PER_CORE_512 * 2 * 512 / dim,      # one ingest process, 2 cores
                        NETWORK_BYTES_S / (ARROW_BYTES_PER_ROW_512 * dim / 512))
    gib, tib = 2**30, 2**40

    # -- one machine, embedded store ----------------------------------------------------------
    node_ram, node_disk = p.ram_gib * gib, p.disk_tib * tib
    embedded: dict[str, Any] = {
        "nodes": 1,
        "disk_bytes": disk_total,
        "ram_bytes": index_ram / RAM_USABLE,
        "index_build_hours": build_core_seconds / p.cores / 3600,
        "ingest_hours": rows / ingest_rate_1 / 3600,
        "fits_ram": index_ram <= node_ram * RAM_USABLE,
        "fits_disk": disk_total <= node_disk * DISK_USABLE,
    }
    embedded["verdict"] = ("fits one machine" if embedded["fits_ram"] and embedded["fits_disk"]
                           and rows <= EMBEDDED_MAX_ROWS else "outgrows one machine: use a cluster")

    # -- cluster ----------------------------------------------------------------------------
    shards_ram = math.ceil(index_ram / (node_ram * RAM_USABLE)) if index_ram else 1
    shards_disk = math.ceil(disk_total / (node_disk * DISK_USABLE))
    shards_needed = max(1, shards_ram, shards_disk)
    if p.replicas is not None:
        replicas = p.replicas
    else:
        replicas = max(1, min(3, p.nodes // shards_needed))
    shards = max(shards_needed, p.nodes // replicas)
    nodes_needed = shards * replicas
    per_shard_rows = math.ceil(rows / shards)
    cluster = {
        "shards": shards,
        "replicas": replicas,
        "nodes_needed": nodes_needed,
        "nodes_given": p.nodes,
        "enough_nodes": nodes_needed <= p.nodes,
        "min_shards_for_ram": shards_ram,
        "min_shards_for_disk": shards_disk,
        "rows_per_shard": per_shard_rows,
        "disk_bytes_per_node": disk_total / shards,
        "index_ram_bytes_per_node": index_ram / shards,
        "ram_bytes_per_node": index_ram / shards / RAM_USABLE,
        "disk_bytes_total": disk_total * replicas,
        # every shard builds its own indexes at once; replicas fetch built parts (no rebuild)
        "index_build_hours": build_core_seconds / shards / p.cores / 3600,
        "ingest_hours": rows / (ingest_rate_1 * shards) / 3600,
        "vector_similarity_index_cache_size": int(math.ceil(index_ram / shards * 1.1)),
    }
    return {
        "inputs": asdict(p),
        "per_row": {"vector_bytes": vector_bytes, "row_bytes": row_bytes,
                    "index_bytes_per_vector": index_bytes_per_vector},
        "totals": {"table_bytes": table_bytes, "index_ram_bytes": index_ram, "index_disk_bytes": index_disk,
                   "disk_bytes": disk_total, "index_build_core_hours": build_core_seconds / 3600,
                   "build_vectors_per_core_s": build_rate_per_core(p.m, p.ef_construction, dim),
                   "ingest_rows_per_s_per_process": ingest_rate_1,
                   "text_index_bytes": rows * TEXT_INDEX_BYTES_PER_ROW,
                   "text_index_build_core_hours": rows / TEXT_INDEX_ROWS_PER_CORE_S / 3600},
        "embedded": embedded,
        "cluster": cluster,
        "assumptions": {
            "vector_bytes_512": VECTOR_BYTES_512, "meta_bytes_per_row": p.meta_bytes,
            "meta_bytes_measured_synth": META_BYTES_MEASURED_SYNTH,
            "index_memory": "rows*dim*bytes(quantization) + rows*M*8 per indexed column (ClickHouse docs)",
            "build_vectors_per_core_512": {f"{k[0]}:{k[1]}": v for k, v in BUILD_PER_CORE_512.items()},
            "ingest_rows_per_core_512": INGEST_ROWS_PER_CORE_512, "network_bytes_s": NETWORK_BYTES_S,
            "ram_usable": RAM_USABLE, "disk_usable": DISK_USABLE,
        },
    }


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    return f"{n:,.1f} PiB"


def hours(h: float) -> str:
    if h < 1:
        return f"{h * 60:,.0f} min"
    return f"{h:,.1f} h" if h < 48 else f"{h:,.0f} h ({h / 24:,.1f} days)"


def markdown(result: dict[str, Any]) -> str:
    """The plan as a markdown table (what ``laion plan`` prints and the README shows)."""
    i, t, e, c = result["inputs"], result["totals"], result["embedded"], result["cluster"]
    head = (f"{i['rows']:,} rows × {i['dim']}-d, storage {i['storage']}, {i['indexes']} HNSW index(es) "
            f"{i['quantization']} M={i['m']} ef_construction={i['ef_construction']}; "
            f"nodes of {i['cores']} cores, {i['ram_gib']:g} GiB RAM, {i['disk_tib']:g} TiB disk")
    lines = [head, "",
             "| | embedded (1 node) | cluster |",
             "|---|---:|---:|",
             f"| shape | 1 node | {c['shards']} shards × {c['replicas']} replica{'s' if c['replicas'] != 1 else ''} = {c['nodes_needed']} nodes"
             f"{'' if c['enough_nodes'] else ' (more than the ' + str(c['nodes_given']) + ' given)'} |",
             f"| table on disk | {human(t['table_bytes'])} | {human(t['table_bytes'] / c['shards'])} per node |",
             f"| HNSW index RAM | {human(t['index_ram_bytes'])} | {human(c['index_ram_bytes_per_node'])} per node |",
             f"| RAM to provision | {human(e['ram_bytes'])} | {human(c['ram_bytes_per_node'])} per node |",
             f"| disk incl. indexes | {human(e['disk_bytes'])} | {human(c['disk_bytes_per_node'])} per node, "
             f"{human(c['disk_bytes_total'])} in all |",
             f"| index build | {hours(e['index_build_hours'])} | {hours(c['index_build_hours'])} |",
             f"| ingest | {hours(e['ingest_hours'])} | {hours(c['ingest_hours'])} |",
             f"| caption text index (optional) | {human(t['text_index_bytes'])} on disk, built in "
             f"{hours(t['text_index_build_core_hours'] / i['cores'])} | {human(t['text_index_bytes'] / c['shards'])} "
             f"per node, {hours(t['text_index_build_core_hours'] / i['cores'] / c['shards'])} |",
             f"| verdict | {e['verdict']} | vector_similarity_index_cache_size ≥ "
             f"{human(c['vector_similarity_index_cache_size'])} per node |"]
    return "\n".join(lines)


# -- the IVF index (laion_search.index.ivf): lists on disk, centroids in RAM ------------------------------
#: Companion-table bytes per 512-d row on disk, by ``--codes`` (measured: 200,000 rows, one merged
#: part, ``system.parts.bytes_on_disk``): float32 vector + offsets + list/id/shard; ``int8`` adds its
#: codes (+1 byte per dimension), ``rabitq`` ~1 bit per dimension and two floats; ``sq8``: its code
#: and scale columns (1M rows: 2,580,939,665 bytes).
IVF_ROW_BYTES_512 = {"none": 2058.0, "sq8": 2581.0, "int8": 2572.0, "rabitq": 2126.0}
#: Bytes a probe *reads* per row it scans: the float32 vector, or the codes when they are scanned
#: (then k × fetch multiplier vectors are re-read to rescore, a constant per query).
IVF_SCAN_BYTES_512 = {"none": 2056.0, "sq8": 524.0, "int8": 520.0, "rabitq": 80.0}
#: Assigning rows to lists: multiply-adds per core-second in bfloat16 (torch on the CPU's matrix
#: units; measured 131,072 rows × 1,024 lists × 512-d in 0.139 s on 2 cores).
IVF_ASSIGN_MACS_PER_CORE_S = 2.4e11
#: Writing the companion rows (assignment, insert, the merge into one part per shard), rows/s per core
#: at 512-d: `laion bench ivf --rows 1000000` on a quiet machine took 42.2 s for the shard, 9 s of it the
#: ingest itself, so ~33 s for 2M companion rows on 2 cores (docs/indexes.md).
IVF_WRITE_ROWS_PER_CORE_512 = 30_000.0
#: Bytes/s one core scans from the page cache in a probe (measured at 1M rows: `sum(vec[1])` over 16 lists,
#: 32 MB in 22.5 ms; see docs/indexes.md).
IVF_SCAN_BYTES_PER_CORE_S = 1.5e9
#: Read amplification of a probe over one merged part (measured: 1.35× at ~800 rows per list).
IVF_AMPLIFICATION = 1.35
#: A query's fixed cost: choosing the lists, one statement over them that also reads the k rows' caption
#: and url (measured at 1M rows, 2,048 lists: `laion index tune` at nprobe 1, ~490 rows read, p50 5.7 ms).
#: A filtered search adds a second statement, the rows from laion by id (~5 ms).
IVF_QUERY_FIXED_MS = 5.5
ENGINE_RAM_BYTES = 4 * 2**30   # the engine's own working memory, caches at their defaults


@dataclass
class IvfPlanInputs:
    rows: int
    dim: int = 512
    cores: int = 32
    ram_gib: float = 64
    disk_tib: float = 8
    codes: str = DEFAULT_IVF_CODES
    lists: int | None = None     # None: the index default (laion_search.index.ivf.default_lists)
    nprobe: int = 32
    columns: int = 2             # image and text
    meta_bytes: float = META_BYTES

    def check(self) -> "IvfPlanInputs":
        if self.codes not in IVF_ROW_BYTES_512:
            raise UsageError(f"codes must be one of {', '.join(IVF_ROW_BYTES_512)}")
        for name in ("rows", "dim", "cores", "nprobe"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be at least 1")
        if self.columns not in (1, 2):
            raise UsageError("columns must be 1 (image) or 2 (image and text)")
        if self.ram_gib <= 0 or self.disk_tib <= 0:
            raise UsageError("ram and disk per node must be positive")
        return self


def plan_ivf(inputs: IvfPlanInputs) -> dict[str, Any]:
    """One node serving the table through IVF indexes: RAM, disk, build time and the bytes (and time)
    a query reads. The index's RAM is its centroids and primary keys; the lists stay on disk."""
    from laion_search.index.ivf import KMEANS_ROUNDS, default_lists, sample_size

    p = inputs.check()
    rows, dim, scale = p.rows, p.dim, p.dim / 512
    lists = p.lists or default_lists(rows)
    gib, tib = 2**30, 2**40
    table_bytes = rows * (2 * VECTOR_BYTES_512["f32-none"] * scale + p.meta_bytes)
    # each companion also keeps the rows' caption and url, most of their metadata: counted as all of it
    companion_bytes = rows * (IVF_ROW_BYTES_512[p.codes] * scale + p.meta_bytes) * p.columns
    centroid_bytes = lists * dim * 4 * p.columns
    # the primary keys the engine keeps in memory: (list, id) per 256-row granule of each companion
    # table, id per 1,024-row granule of the laion table
    key_bytes = rows / 256 * 12 * p.columns + rows / 1024 * 8
    ram = ENGINE_RAM_BYTES + centroid_bytes + key_bytes
    rows_per_list = rows / lists
    scanned_rows = min(rows, p.nprobe * rows_per_list * IVF_AMPLIFICATION)
    scanned_bytes = scanned_rows * IVF_SCAN_BYTES_512[p.codes] * scale
    query_ms = IVF_QUERY_FIXED_MS + scanned_bytes / (IVF_SCAN_BYTES_PER_CORE_S * min(p.cores, 2)) * 1000
    assign_s = rows * lists * dim * p.columns / (IVF_ASSIGN_MACS_PER_CORE_S * p.cores)
    sample = sample_size(lists)
    train_s = KMEANS_ROUNDS * sample * lists * dim * p.columns / (IVF_ASSIGN_MACS_PER_CORE_S * p.cores)
    write_s = rows * p.columns / (IVF_WRITE_ROWS_PER_CORE_512 / scale * p.cores)
    disk = table_bytes + companion_bytes
    return {
        "inputs": asdict(p),
        "lists": lists, "rows_per_list": rows_per_list,
        "ram_bytes": ram, "centroid_bytes": centroid_bytes, "key_bytes": key_bytes,
        "ram_bytes_per_vector": (centroid_bytes + key_bytes) / (rows * p.columns),
        "table_bytes": table_bytes, "index_disk_bytes": companion_bytes, "disk_bytes": disk,
        "build_hours": (assign_s + train_s + write_s) / 3600, "train_sample_rows": sample,
        "build_ram_bytes": sample * dim * 4 * 2,  # the sample, and its assignments' scratch
        "build_parts_hours": {"train": train_s / 3600, "assign": assign_s / 3600, "write": write_s / 3600},
        "query_rows_scanned": scanned_rows, "query_bytes_scanned": scanned_bytes,
        "query_ms_from_page_cache": query_ms,
        "page_cache_for_hot_lists_bytes": companion_bytes,
        "fits_ram": ram <= p.ram_gib * gib, "fits_disk": disk <= p.disk_tib * tib * DISK_USABLE,
        "hnsw_ram_bytes_for_comparison": rows * p.columns * (dim * 2 + 32 * 8),
        "assumptions": {"row_bytes_512": IVF_ROW_BYTES_512, "scan_bytes_512": IVF_SCAN_BYTES_512,
                        "assign_macs_per_core_s": IVF_ASSIGN_MACS_PER_CORE_S,
                        "write_rows_per_core_512": IVF_WRITE_ROWS_PER_CORE_512,
                        "scan_bytes_per_core_s": IVF_SCAN_BYTES_PER_CORE_S, "amplification": IVF_AMPLIFICATION,
                        "query_fixed_ms": IVF_QUERY_FIXED_MS, "engine_ram_bytes": ENGINE_RAM_BYTES},
    }


def markdown_ivf(r: dict[str, Any]) -> str:
    i = r["inputs"]
    cols = "image and text" if i["columns"] == 2 else "image"
    lines = [f"{i['rows']:,} rows × {i['dim']}-d, IVF on {cols}: {r['lists']:,} lists (~{r['rows_per_list']:,.0f} rows "
             f"each), codes {i['codes']}, nprobe {i['nprobe']}; one node of {i['cores']} cores, {i['ram_gib']:g} GiB RAM, "
             f"{i['disk_tib']:g} TiB disk", "",
             "| | one node |", "|---|---:|",
             f"| RAM the index needs (centroids + primary keys + the engine) | {human(r['ram_bytes'])} "
             f"({'fits' if r['fits_ram'] else 'does not fit'} {i['ram_gib']:g} GiB) |",
             f"| RAM per vector held by the index | {r['ram_bytes_per_vector']:.2f} B (HNSW: "
             f"{r['hnsw_ram_bytes_for_comparison'] / (i['rows'] * i['columns']):,.0f} B) |",
             f"| HNSW graphs' RAM, for comparison | {human(r['hnsw_ram_bytes_for_comparison'])} |",
             f"| table on disk | {human(r['table_bytes'])} |",
             f"| IVF lists on disk | {human(r['index_disk_bytes'])} |",
             f"| disk in all | {human(r['disk_bytes'])} ({'fits' if r['fits_disk'] else 'does not fit'}) |",
             f"| index build | {hours(r['build_hours'])} (k-means {hours(r['build_parts_hours']['train'])}, assign "
             f"{hours(r['build_parts_hours']['assign'])}, write {hours(r['build_parts_hours']['write'])}) |",
             f"| RAM to build (the k-means sample: {r['train_sample_rows']:,} rows) | {human(r['build_ram_bytes'])} |",
             f"| a query reads | {r['query_rows_scanned']:,.0f} rows, {human(r['query_bytes_scanned'])} |",
             f"| query time, lists in the page cache | ~{r['query_ms_from_page_cache']:,.0f} ms |",
             f"| page cache to keep every list hot | {human(r['page_cache_for_hot_lists_bytes'])} (optional: cold lists "
             "are read from disk) |"]
    return "\n".join(lines)
