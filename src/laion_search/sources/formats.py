"""Which reader a source needs, found from its content (``--format`` overrides).

=====================  ====================================================  ===========================
format                 what it is                                            ids
=====================  ====================================================  ===========================
``laion``              a folder of LAION shards: ``img_emb_N.npy``,          ``N × 10⁹ + row``
                       ``text_emb_N.npy``, ``metadata_N.parquet`` (flat or
                       in ``img_emb/ text_emb/ metadata/``; N zero-padded or
                       not; 512-d LAION-400M or 768-d LAION-5B)
``clickhouse-parquet`` ClickHouse's LAION-5B part: one Parquet file with     the file's ``id`` column
                       an ``id`` and a ``vector`` (Array(Float32)) column
``sisap-h5``           a SISAP LAION2B-en ``.h5`` file, dataset ``emb``       1-based row number (= the
                                                                             gold standard's ``knns``)
=====================  ====================================================  ===========================

Detection reads a file's first bytes: ``PAR1`` is Parquet (a ClickHouse part when it has a
``vector`` column), the HDF5 signature is a SISAP file. A folder is LAION shards when it holds
``img_emb_N.npy`` files, otherwise every ``.parquet`` / ``.h5`` file in it is detected in turn.

**Partitions of single-file sources.** A Parquet part or an ``.h5`` file is one unit of ingest,
like a shard: it is staged and swapped in whole (``REPLACE PARTITION``), and ingesting it again
replaces it. Its partition (the ``shard`` column) is a number from :data:`FILE_SHARD_BASE` up,
keyed by the file's *name* in ``laion_shards.name``: the first ingest of a name takes the next
free number, later ingests of the same name (a re-run, a newer copy, the same part from a URL)
reuse it. Ids come from the source, so they do not depend on that number; ingest refuses a file
whose ids are already held by another partition (e.g. two SISAP subsets in one table: both
number their rows from 1 — give each its own store).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, Protocol, Sequence

from laion_search.errors import ShardError, UsageError
from laion_search.sources.inputs import Input, as_input
from laion_search.sources.remote import is_remote

FORMATS = ("auto", "laion", "clickhouse-parquet", "sisap-h5")
#: partitions of single-file sources start here (LAION shard numbers stay below: 2,314 for LAION-5B)
FILE_SHARD_BASE = 1_000_000
PARQUET_MAGIC = b"PAR1"
NPY_MAGIC = b"\x93NUMPY"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_FILE_SUFFIXES = (".parquet", ".h5", ".hdf5")


class Reader(Protocol):
    """What :mod:`laion_search.ingest` consumes (see :class:`~laion_search.sources.shards.ShardReader`)."""

    shard: int
    rows: int
    dim: int
    format: str
    modalities: tuple[str, ...]
    ids_from_source: bool
    model_override: str | None
    renormalised: int
    dropped: dict
    dropped_rows: list
    text_repaired: int

    @property
    def name(self) -> str | None: ...
    @property
    def source(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def rows_loaded(self) -> int: ...
    @property
    def dropped_total(self) -> int: ...
    def fingerprint(self) -> str: ...
    def batches(self, batch_rows: int = 32768, *, ring: int = 0) -> Any: ...
    def close(self) -> None: ...


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def detect_file(inp: Input) -> str:
    """``clickhouse-parquet`` or ``sisap-h5`` for one file, from its first bytes (and, for
    Parquet, its columns); a one-line :class:`ShardError` naming the file otherwise."""
    try:
        size = inp.size()
        head = inp.head(16)
    except OSError as exc:
        raise ShardError(f"cannot read: {exc.strerror or exc}", path=inp.display) from None
    if size == 0:
        raise ShardError("empty file (0 bytes): not a LAION source", path=inp.display)
    if head.startswith(PARQUET_MAGIC):
        return "clickhouse-parquet"  # its reader names a Parquet without a vector column
    if head.startswith(HDF5_SIGNATURE) or _hdf5_user_block(inp):
        return "sisap-h5"
    if head.startswith(NPY_MAGIC):
        raise ShardError("a single .npy file: `laion ingest` takes the folder that holds a LAION shard's "
                         "img_emb_N.npy, text_emb_N.npy and metadata_N.parquet", path=inp.display)
    raise ShardError(f"not a recognised source (first bytes {head[:8]!r}): expected a folder of LAION shards, a "
                     "ClickHouse LAION-5B .parquet part or a SISAP .h5 file", path=inp.display)


def _hdf5_user_block(inp: Input) -> bool:
    """HDF5 allows a user block before the superblock: the signature may sit at 512, 1024, …"""
    if inp.path is None:
        return False
    try:
        with open(inp.path, "rb") as f:
            for off in (512, 1024, 2048, 4096):
                f.seek(off)
                if f.read(8) == HDF5_SIGNATURE:
                    return True
    except OSError:
        return False
    return False


def open_readers(source: str | os.PathLike[str] | BinaryIO, *, fmt: str = "auto", shards: Sequence[int] | None = None,
                 dim: int | None = None, skip_bad_rows: bool = False) -> list[Reader]:
    """Check a source and return a reader per unit of ingest (LAION shard, Parquet part, .h5).

    ``source``: a folder, a file, a URL, or an open seekable binary file. Every reader is
    checked (headers, columns, dimension against ``dim`` and each other) before any is returned;
    on an error those already opened are closed."""
    check_format(fmt)
    local = not (hasattr(source, "read") or is_remote(str(source)))
    if local and not Path(source).exists() and not Path(source).is_symlink():  # type: ignore[arg-type]
        raise ShardError("no such file or directory", path=str(source))
    if local and Path(source).is_dir():  # type: ignore[arg-type]
        return _open_folder(Path(source), fmt, shards, dim, skip_bad_rows)  # type: ignore[arg-type]
    if shards is not None:
        raise UsageError("--shards selects LAION shards in a folder; a single file is ingested whole")
    if fmt == "laion":
        raise ShardError("--format laion takes a folder of LAION shards (img_emb_N.npy, text_emb_N.npy, "
                         "metadata_N.parquet)", path=str(getattr(source, "name", source)))
    inp = as_input(source)
    try:
        return [_open_file(inp, fmt, dim, skip_bad_rows)]
    except BaseException:
        inp.close()
        raise


def _open_file(inp: Input, fmt: str, dim: int | None, skip_bad_rows: bool) -> Reader:
    kind = detect_file(inp) if fmt == "auto" else fmt
    if kind == "clickhouse-parquet":
        from laion_search.sources.clickhouse_parquet import open_part

        return open_part(inp, dim=dim, skip_bad_rows=skip_bad_rows)  # type: ignore[return-value]
    from laion_search.sources.sisap import open_h5

    return open_h5(inp, dim=dim, skip_bad_rows=skip_bad_rows)  # type: ignore[return-value]


def _open_folder(root: Path, fmt: str, shards: Sequence[int] | None, dim: int | None,
                 skip_bad_rows: bool) -> list[Reader]:
    from laion_search.sources.shards import discover, open_shard

    has_npy = any(root.glob("img_emb_*.npy")) or any(root.glob("img_emb/img_emb_*.npy"))
    if fmt == "laion" or (fmt == "auto" and (has_npy or shards is not None)):
        readers: list[Reader] = []
        for f in discover(root, list(shards) if shards is not None else None):
            shard = open_shard(f, dim=dim, skip_bad_rows=skip_bad_rows)
            dim = dim if dim is not None else shard.dim
            readers.append(shard)  # type: ignore[arg-type]  # its shard number is read-only
        return readers
    if shards is not None:
        raise UsageError("--shards selects LAION shards; it does not apply to --format " + fmt)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in _FILE_SUFFIXES and not p.name.startswith(".")
                   and p.is_file())
    if fmt == "clickhouse-parquet":
        files = [p for p in files if p.suffix.lower() == ".parquet"]
    elif fmt == "sisap-h5":
        files = [p for p in files if p.suffix.lower() != ".parquet"]
    if not files:
        if fmt == "auto":
            raise ShardError("no LAION shards (img_emb_N.npy …), ClickHouse LAION-5B .parquet parts or SISAP .h5 "
                             "files found", path=str(root))
        what = ".parquet" if fmt == "clickhouse-parquet" else ".h5 / .hdf5"
        hint = " (it holds LAION shards: use --format laion or auto)" if has_npy else ""
        raise ShardError(f"no {what} files for --format {fmt} found{hint}", path=str(root))
    opened: list[Reader] = []
    try:
        for p in files:
            reader = _open_file(as_input(p), fmt, dim, skip_bad_rows)
            dim = dim if dim is not None else reader.dim
            opened.append(reader)
    except BaseException:
        for reader in opened:
            reader.close()
        raise
    return opened


def assign_partitions(readers: Sequence[Reader], names: dict[str, int], taken: set[int]) -> None:
    """Give each single-file reader its partition: the one its file name had before
    (``names``: name → shard from ``laion_shards``), else the next number from
    :data:`FILE_SHARD_BASE` not in ``taken``."""
    seen: dict[str, str] = {}
    nxt = max([FILE_SHARD_BASE - 1, *(s for s in taken if s >= FILE_SHARD_BASE)]) + 1
    for r in readers:
        if not r.ids_from_source:
            continue
        name = r.name or ""
        if name in seen:
            raise UsageError(f"two sources named {name!r} ({seen[name]} and {r.source}): a file's name keys its "
                             "partition; ingest them into separate stores or rename one")
        seen[name] = r.source
        if name in names:
            r.shard = names[name]
        else:
            r.shard = nxt
            nxt += 1
        # (only single-file readers get here: theirs is settable; a LAION shard's is its number)


__all__ = ["FILE_SHARD_BASE", "FORMATS", "Reader", "assign_partitions", "check_format", "detect_file", "open_readers"]
