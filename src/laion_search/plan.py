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

#: Bytes per 512-d vector on disk, measured (see the module docstring).
VECTOR_BYTES_512 = {"f32-none": 2056.0, "f32-lz4": 1210.0, "bf16": 1032.0}
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
                   "ingest_rows_per_s_per_process": ingest_rate_1},
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
             f"| verdict | {e['verdict']} | vector_similarity_index_cache_size ≥ "
             f"{human(c['vector_similarity_index_cache_size'])} per node |"]
    return "\n".join(lines)
