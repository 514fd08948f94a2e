"""The one ``.npy`` header parser: shape, dtype string and data offset, read from the header alone
(no numpy at import: ``laion download`` verifies files before it imports anything heavy; only
:func:`read_npy_header`, which names what is wrong with a file that fails the quick check, loads it).

Both the shard readers and the downloader's verification use this module, so it sits below them
and imports neither (the downloader must not reach up into the readers: see the architecture test).
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from laion_search.errors import ShardError, ShardValidationError
from laion_search.sources.files import check_regular_file

if TYPE_CHECKING:
    import numpy as np

MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 1 << 16


@dataclass(frozen=True)
class NpyHeader:
    descr: str             #: numpy dtype string, e.g. ``<f2``
    fortran_order: bool
    shape: tuple[int, ...]
    offset: int            #: where the array's bytes start
    file_size: int


def parse_npy_header(path: str | os.PathLike[str]) -> NpyHeader:
    """Read and check an ``.npy`` file's header. Raises :class:`ShardValidationError` naming the
    file and what is wrong (bad magic bytes, unknown version, corrupt header), or
    :class:`ShardError` when the file cannot be read."""
    p = str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ShardValidationError("empty file (0 bytes): an .npy file starts with a header", path=p)
            if len(head) < 8 or head[:6] != MAGIC:
                raise ShardValidationError("not an .npy file (bad magic bytes)", path=p)
            version = (head[6], head[7])
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise ShardValidationError(f"unsupported .npy format version {version}", path=p)
            width = 2 if version == (1, 0) else 4
            if len(head) < 8 + width:
                raise ShardValidationError("corrupt .npy header: the file ends inside the header", path=p)
            hlen = int.from_bytes(head[8:8 + width], "little")
            if hlen > MAX_HEADER_BYTES:
                raise ShardValidationError(f"corrupt .npy header: {hlen} header bytes", path=p)
            f.seek(8 + width)
            raw = f.read(hlen)
    except OSError as exc:
        raise ShardError(f"cannot read: {exc.strerror or exc}", path=p) from None
    if len(raw) < hlen:
        raise ShardValidationError("corrupt .npy header: the file ends inside the header", path=p)
    try:
        meta = ast.literal_eval(raw.decode("utf-8" if version == (3, 0) else "latin1"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeDecodeError) as exc:
        raise ShardValidationError(f"corrupt .npy header: {type(exc).__name__}: {exc}", path=p) from None
    if not isinstance(meta, dict) or set(meta) != {"descr", "fortran_order", "shape"}:
        raise ShardValidationError("corrupt .npy header: expected the keys descr, fortran_order and shape", path=p)
    shape, descr, fortran = meta["shape"], meta["descr"], meta["fortran_order"]
    if not isinstance(shape, tuple) or not all(type(x) is int and x >= 0 for x in shape):
        raise ShardValidationError(f"corrupt .npy header: shape {shape!r} is not a tuple of sizes", path=p)
    if not isinstance(fortran, bool) or not isinstance(descr, (str, list)):
        raise ShardValidationError("corrupt .npy header: bad descr or fortran_order", path=p)
    return NpyHeader(descr=descr if isinstance(descr, str) else repr(descr), fortran_order=fortran,
                     shape=shape, offset=8 + width + hlen, file_size=size)


#: Little-endian float16 / float32, the embedding dtypes we take, and their item sizes.
EMBEDDING_ITEMSIZE = {"<f2": 2, "<f4": 4}


def embedding_rows(path: str | os.PathLike[str]) -> int | None:
    """Row count of a well-formed embeddings ``.npy`` (2-D, C order, little-endian float16/32,
    exactly header + rows × dim × itemsize bytes); None for anything else, which
    :func:`read_npy_header` then examines and names."""
    try:
        h = parse_npy_header(Path(path))
    except ShardError:
        return None
    itemsize = EMBEDDING_ITEMSIZE.get(h.descr)
    if h.fortran_order or itemsize is None or len(h.shape) != 2:
        return None
    if h.file_size != h.offset + h.shape[0] * h.shape[1] * itemsize:
        return None
    return h.shape[0]


@dataclass(frozen=True)
class NpyInfo:
    path: Path
    dtype: np.dtype
    rows: int
    dim: int
    offset: int


def read_npy_header(path: Path) -> NpyInfo:
    """Read and check an embeddings ``.npy`` header without loading the array."""
    import numpy as np

    check_regular_file(path)
    header = parse_npy_header(path)
    fortran, shape, offset = header.fortran_order, header.shape, header.offset
    try:
        dtype = np.dtype(header.descr)
    except TypeError as exc:
        raise ShardValidationError(f"corrupt .npy header: dtype {header.descr!r}: {exc}", path=str(path)) from None
    if fortran:
        raise ShardValidationError("Fortran-ordered arrays are not supported; save with C order", path=str(path))
    if len(shape) != 2:
        raise ShardValidationError(f"expected a 2-D array (rows × dim), found shape {shape}", path=str(path))
    if dtype not in tuple(np.dtype(d) for d in EMBEDDING_ITEMSIZE):
        hint = ""
        if dtype.kind == "f" and dtype.byteorder == ">":
            hint = " (big-endian; convert with arr.astype('<f2'))"
        elif dtype.kind == "f":
            hint = " (convert with arr.astype('float16') or 'float32')"
        raise ShardValidationError(
            f"dtype {dtype.str} is not supported: embeddings must be little-endian float16 or float32{hint}",
            path=str(path))
    rows, dim = int(shape[0]), int(shape[1])
    expected = offset + rows * dim * dtype.itemsize
    size = header.file_size
    if size < expected:
        raise ShardValidationError(
            f"truncated: header promises {rows} × {dim} {dtype.name} ({expected} bytes) but the file has {size}",
            path=str(path))
    if size > expected:
        raise ShardValidationError(f"{size - expected} unexpected trailing bytes after the array", path=str(path))
    return NpyInfo(path, dtype, rows, dim, offset)
