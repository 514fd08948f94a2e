"""HDF5 files (SISAP's ``.h5``) checked from their superblock alone: signature and recorded size,
without h5py (``laion download`` verifies files before anything heavy is imported)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from laion_search.errors import ShardValidationError

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def check_hdf5(path: str | os.PathLike[str]) -> None:
    """An HDF5 file's signature (at 0, 512, 1024, … as the format allows) and the end-of-file
    address its superblock records, against the file's size: a truncated or foreign file is a
    ShardValidationError naming it. Reads the superblock only."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            at = 0
            while True:
                f.seek(at)
                head = f.read(96)
                if head[:8] == _HDF5_SIGNATURE:
                    break
                at = 512 if at == 0 else at * 2
                if at >= size or at > 1 << 30:
                    raise ShardValidationError("not an HDF5 file (no HDF5 signature)", path=str(p))
    except OSError as exc:
        raise ShardValidationError(f"cannot read: {exc.strerror or exc}", path=str(p)) from None
    version = head[8]
    if version in (0, 1):
        osize = head[13]
        base_at = 24 if version == 0 else 28
    elif version in (2, 3):
        osize = head[9]
        base_at = 12
    else:
        raise ShardValidationError(f"unknown HDF5 superblock version {version}", path=str(p))
    fmt = {2: "<H", 4: "<I", 8: "<Q"}.get(osize)
    if fmt is None or len(head) < base_at + 3 * osize:
        raise ShardValidationError("malformed HDF5 superblock", path=str(p))
    base = struct.unpack_from(fmt, head, base_at)[0]
    eof = struct.unpack_from(fmt, head, base_at + 2 * osize)[0]
    undefined = (1 << (8 * osize)) - 1
    if eof != undefined and at + base + eof > size:
        raise ShardValidationError(f"truncated HDF5 file: its superblock records {at + base + eof:,} bytes, "
                                   f"the file has {size:,}", path=str(p))
