"""ClickHouse's LAION-5B subset: one Parquet file per 10M rows, embeddings inside the file.

The parts (``laion5b_100m_part_{1..10}_of_10.parquet`` on ClickHouse's public S3 bucket) hold
``id UInt32, image_path, caption, NSFW (nullable), similarity Float32, LICENSE (nullable), url,
key, status, width, height, original_width, original_height Int32, exif (nullable), md5,
vector Array(Float32)`` — ``vector`` is the 768-d CLIP ViT-L/14 *image* embedding; there is no
text embedding.

Ingested rows keep the file's ``id`` (so they match ClickHouse's docs and any other copy of the
data) and the LAION metadata columns the ``laion`` table has; ``image_path``, ``status``,
``exif`` and ``md5`` are not stored. ``text_embedding`` stays empty (an image-only table).

Memory: the file is read through a small buffer (``buffer_size``, no pre-buffering of whole
column chunks), ``batch_rows`` rows at a time; the list column is checked (no nulls, every list
``dim`` long) and its values copied once into a reused float32 block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_search.errors import ShardValidationError
from laion_search.sources.inputs import Input
from laion_search.sources.shards import (METADATA_COLUMNS, REQUIRED_METADATA, SingleFileReader, _one_line, _type_family,
                                        rows_table)

FORMAT = "clickhouse-parquet"
VECTOR_COLUMN = "vector"
ID_COLUMN = "id"
#: bytes read from the file at a time (pyarrow otherwise reads a whole column chunk: a row group
#: of ClickHouse's writer is up to 512 MiB of vectors)
READ_BUFFER = 4 << 20
#: rows decoded per piece (a batch is assembled from pieces)
READ_ROWS = 8192
_FLOATS = (pa.float16(), pa.float32())


@dataclass(kw_only=True)
class ClickHousePartReader(SingleFileReader):
    """A checked ClickHouse LAION-5B Parquet part, ready to stream. Create with :func:`open_part`."""

    parquet: pq.ParquetFile
    columns: list[str]

    format = FORMAT

    def batches(self, batch_rows: int = 32768, *, ring: int = 0) -> Iterator[pa.Table]:
        """Arrow tables of at most ``batch_rows`` rows in the ``laion`` table's columns (ids
        from the file, ``shard_row`` the row's position in it), each checked like a shard's.

        The file is decoded :data:`READ_ROWS` rows at a time, each piece's vectors copied
        straight into the batch's float32 block: Arrow's own buffers for a list column (values,
        offsets, levels) then stay a quarter of a batch instead of a whole one."""
        self._start(ring)
        path = self.input.display
        pos = 0  # rows read from the file
        start = 0  # file row of the batch being filled
        block = None
        ids: list[np.ndarray] = []
        metas: list[pa.RecordBatch] = []
        try:
            for piece in self.parquet.iter_batches(batch_size=min(batch_rows, READ_ROWS),
                                                   columns=self.columns + [ID_COLUMN, VECTOR_COLUMN], use_threads=False):
                while piece.num_rows:  # a piece may straddle two batches: split it
                    if pos >= self.rows:
                        raise ShardValidationError(f"parquet yielded more rows than its metadata says ({self.rows})",
                                                   path=path, shard=self.shard)
                    if block is None:
                        block = self._buffer(min(batch_rows, self.rows - pos))
                        start = pos
                    filled = pos - start
                    n = min(piece.num_rows, len(block) - filled)
                    part, piece = piece.slice(0, n), piece.slice(n)
                    ids.append(_ids(part.column(ID_COLUMN), pos, path, self.shard))
                    self._vectors(part.column(VECTOR_COLUMN), pos, n, block[filled:filled + n])
                    metas.append(part.select(self.columns))
                    pos += n
                    if pos - start == len(block):
                        yield from self._finish(block, start, ids, metas)
                        block, ids, metas = None, [], []
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise ShardValidationError(f"cannot read rows near {pos}: {_one_line(exc)}", path=path,
                                       shard=self.shard) from None
        if block is not None or pos != self.rows:
            raise ShardValidationError(f"parquet yielded {pos} rows, expected {self.rows}", path=path, shard=self.shard)

    def _finish(self, block: np.ndarray, start: int, ids: list[np.ndarray],
                metas: list[pa.RecordBatch]) -> Iterator[pa.Table]:
        n = len(block)
        image, bad = self._check_block(block, start, self.input.display, self.shard)
        all_ids = np.concatenate(ids)
        rows = np.arange(start, start + n, dtype=np.int64)
        meta = pa.Table.from_batches(metas).combine_chunks()
        if bad is not None:
            keep = self._drop(start, n, bad, None)
            meta = meta.filter(pa.array(keep))
            image, all_ids, rows = image[keep], all_ids[keep], rows[keep]
        if meta.num_rows:
            yield rows_table(self.shard, self._repair_text(meta.to_batches()[0]), all_ids, rows, image, None)

    def _vectors(self, col: pa.Array, pos: int, n: int, out: np.ndarray) -> None:
        """Check a piece's ``vector`` column (no nulls, every list ``dim`` long) and copy its
        values into ``out`` (n × dim float32)."""
        path = self.input.display
        if col.null_count:
            first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]) + pos
            raise ShardValidationError(f"{col.null_count} null vector(s) in column {VECTOR_COLUMN!r} (first at row "
                                       f"{first})", path=path, shard=self.shard)
        if not pa.types.is_fixed_size_list(col.type):
            lengths = np.diff(col.offsets.to_numpy())
            wrong = lengths != self.dim
            if wrong.any():
                i = int(np.flatnonzero(wrong)[0])
                raise ShardValidationError(
                    f"ragged {VECTOR_COLUMN!r} lists: row {pos + i} has {int(lengths[i])} values, expected {self.dim} "
                    f"(as in the first row); {int(wrong.sum())} row(s) in this batch differ", path=path, shard=self.shard)
        values = col.flatten()
        if values.null_count:
            raise ShardValidationError(f"null values inside {VECTOR_COLUMN!r} lists near row {pos}", path=path,
                                       shard=self.shard)
        np.copyto(out, values.to_numpy(zero_copy_only=False).reshape(n, self.dim))


def _ids(col: pa.Array, pos: int, path: str, shard: int) -> np.ndarray:
    if col.null_count:
        first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]) + pos
        raise ShardValidationError(f"{col.null_count} null id(s) (first at row {first})", path=path, shard=shard)
    ids = col.to_numpy(zero_copy_only=False)
    if ids.dtype == np.uint64 and ids.size and int(ids.max()) >= 2**63:
        raise ShardValidationError(f"id {int(ids.max())} does not fit the table's Int64 id (near row {pos})",
                                   path=path, shard=shard)
    return ids.astype(np.int64, copy=False)


def open_part(inp: Input, *, dim: int | None = None, skip_bad_rows: bool = False) -> ClickHousePartReader:
    """Check a part's schema and first vector (no other rows read) and return a reader.

    Raises :class:`ShardValidationError` naming the file and the problem: not Parquet, no
    ``vector`` or ``id`` column, a column of the wrong type, a dimension that differs from the
    table's."""
    path = inp.display
    try:
        pf = pq.ParquetFile(inp.target, buffer_size=READ_BUFFER, pre_buffer=False)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise ShardValidationError(f"not a readable parquet file ({_one_line(exc)})", path=path) from None
    schema = pf.schema_arrow
    names = schema.names
    if VECTOR_COLUMN not in names:
        raise ShardValidationError(f"no {VECTOR_COLUMN!r} column, so no embeddings: not a ClickHouse LAION-5B part "
                                   f"(columns: {', '.join(names)})", path=path)
    vtype = schema.field(VECTOR_COLUMN).type
    if not (pa.types.is_list(vtype) or pa.types.is_large_list(vtype) or pa.types.is_fixed_size_list(vtype)) \
            or vtype.value_type not in _FLOATS:
        raise ShardValidationError(f"column {VECTOR_COLUMN!r} has type {vtype}, expected a list of float32 "
                                   "(ClickHouse Array(Float32))", path=path)
    if ID_COLUMN not in names:
        raise ShardValidationError(f"no {ID_COLUMN!r} column: a ClickHouse LAION-5B part's ids come from it "
                                   f"(columns: {', '.join(names)})", path=path)
    if not pa.types.is_integer(schema.field(ID_COLUMN).type):
        raise ShardValidationError(f"column {ID_COLUMN!r} has type {schema.field(ID_COLUMN).type}, expected an integer",
                                   path=path)
    columns = []
    for name, family in METADATA_COLUMNS.items():
        if name not in names:
            if name in REQUIRED_METADATA:
                raise ShardValidationError(f"required column {name!r} is missing (columns: {', '.join(names)})",
                                           path=path)
            continue
        got = _type_family(schema.field(name).type)
        if got != family and got != "null":
            raise ShardValidationError(f"column {name!r} has type {schema.field(name).type}, expected a {family}",
                                       path=path)
        columns.append(name)
    rows = pf.metadata.num_rows
    if rows >= 2**32:
        raise ShardValidationError(f"{rows} rows is more than one part may hold ({2**32 - 1})", path=path)
    if pa.types.is_fixed_size_list(vtype):
        first_dim = vtype.list_size
    else:
        first_dim = _first_dim(pf, path)
    if first_dim is not None and first_dim < 2:
        raise ShardValidationError(f"the first vector has {first_dim} value(s); embeddings need at least 2", path=path)
    if dim is not None and first_dim is not None and first_dim != dim:
        raise ShardValidationError(f"{first_dim}-d vectors, but the table holds {dim}-d embeddings", path=path)
    return ClickHousePartReader(input=inp, parquet=pf, columns=columns, rows=rows, dim=first_dim or dim or 0,
                                skip_bad_rows=skip_bad_rows)


def _first_dim(pf: pq.ParquetFile, path: str) -> int | None:
    """Length of the first non-null vector (reads the first page of the column only)."""
    try:
        for batch in pf.iter_batches(batch_size=64, columns=[VECTOR_COLUMN], use_threads=False):
            col = batch.column(0)
            for i in range(len(col)):
                if col[i].is_valid:
                    return len(col[i])
            return None
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardValidationError(f"cannot read the first vector: {_one_line(exc)}", path=path) from None
    return None
