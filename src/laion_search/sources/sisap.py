"""The SISAP indexing challenge's LAION2B-en subsets: one HDF5 file, dataset ``emb``.

``laion2B-en-clip768v2-n=300K.h5`` (and ``n=10M``, ``30M``, ``100M``) hold ``emb``: float16,
rows × 768, CLIP ViT-L/14 image embeddings and nothing else (no captions, no urls, no text
embeddings). The challenge's gold standards (``knns``) number the database rows from 1, so a
row's id here is its **1-based row number**: search results compare directly with ``knns``.

The dataset is read ``batch_rows`` rows at a time (a hyperslab per batch), so memory does not
grow with the file. h5py is an optional dependency (``pip install 'laion-search[sources]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from laion_search.errors import ShardError, ShardValidationError
from laion_search.sources.inputs import Input
from laion_search.sources.shards import SingleFileReader, _one_line, rows_table

FORMAT = "sisap-h5"
DATASET = "emb"
INSTALL_HINT = "pip install 'laion-search[sources]'  (h5py)"
#: the first bytes of an HDF5 file (its superblock may also start at 512, 1024, 2048 … bytes)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise ShardError(f"reading SISAP .h5 files needs h5py: {INSTALL_HINT}") from None
    return h5py


@dataclass(kw_only=True)
class SisapReader(SingleFileReader):
    """A checked SISAP ``.h5`` file, ready to stream. Create with :func:`open_h5`."""

    h5: Any  # the open h5py.File

    format = FORMAT

    def close(self) -> None:
        try:
            self.h5.close()
        finally:
            super().close()

    def batches(self, batch_rows: int = 32768, *, ring: int = 0) -> Iterator[pa.Table]:
        """Arrow tables of at most ``batch_rows`` rows: id = row number + 1, image embedding,
        everything else the table's defaults."""
        self._start(ring)
        path = self.input.display
        ds = self.h5[DATASET]
        for pos in range(0, self.rows, batch_rows):
            n = min(batch_rows, self.rows - pos)
            block = self._buffer(n)
            try:
                if ds.dtype == np.float32:
                    ds.read_direct(block, np.s_[pos:pos + n])
                else:
                    np.copyto(block, ds[pos:pos + n])  # float16 → float32, one copy
            except (OSError, ValueError, RuntimeError) as exc:
                raise ShardValidationError(f"cannot read rows {pos}–{pos + n - 1} of {DATASET!r} "
                                           f"(truncated or corrupt?): {_one_line(exc)}", path=path,
                                           shard=self.shard) from None
            image, bad = self._check_block(block, pos, path, self.shard)
            rows = np.arange(pos, pos + n, dtype=np.int64)
            if bad is not None:
                keep = self._drop(pos, n, bad, None)
                image, rows = image[keep], rows[keep]
            if len(rows):
                yield rows_table(self.shard, None, rows + 1, rows, image, None)


def open_h5(inp: Input, *, dim: int | None = None, skip_bad_rows: bool = False) -> SisapReader:
    """Open and check a SISAP ``.h5`` file (no rows read) and return a reader.

    Raises :class:`ShardValidationError` naming the file and the problem: not HDF5 or
    truncated, no ``emb`` dataset (naming the datasets it has), not 2-D, a dtype other than
    float16/float32, a dimension that differs from the table's."""
    h5py = _h5py()
    path = inp.display
    try:
        f = h5py.File(inp.target, "r")
    except (OSError, ValueError) as exc:
        raise ShardValidationError(f"not a readable HDF5 file (truncated or corrupt?): {_one_line(exc)}",
                                   path=path) from None
    try:
        ds = f.get(DATASET)
        if ds is None or not isinstance(ds, h5py.Dataset):
            have = sorted(f.keys())
            hint = ""
            if "knns" in have:
                hint = " — this is a SISAP gold-standard file (knns, dists); ingest the database file (n=…)"
            raise ShardValidationError(f"no dataset {DATASET!r} (found: {', '.join(have) or 'nothing'}){hint}",
                                       path=path)
        if ds.ndim != 2:
            raise ShardValidationError(f"dataset {DATASET!r} has shape {ds.shape}, expected rows × dim", path=path)
        dtype = np.dtype(ds.dtype)
        if dtype.kind != "f" or dtype.itemsize not in (2, 4):  # either byte order: HDF5 converts on read
            raise ShardValidationError(f"dataset {DATASET!r} has dtype {dtype.name}; SISAP files hold float16 "
                                       "(float32 also accepted); convert with emb.astype('float16')", path=path)
        rows, d = int(ds.shape[0]), int(ds.shape[1])
        if d < 2:
            raise ShardValidationError(f"dataset {DATASET!r} has {d}-d rows; embeddings need at least 2", path=path)
        if dim is not None and d != dim:
            raise ShardValidationError(f"{d}-d vectors, but the table holds {dim}-d embeddings", path=path)
        if rows >= 2**32:
            raise ShardValidationError(f"{rows} rows is more than one file may hold ({2**32 - 1})", path=path)
    except BaseException:
        f.close()
        raise
    return SisapReader(input=inp, h5=f, rows=rows, dim=d, skip_bad_rows=skip_bad_rows)
