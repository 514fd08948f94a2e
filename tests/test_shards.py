"""Shard discovery, header checks and batch validation: each rule has a test that breaks it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_search.errors import ShardError, ShardValidationError, UsageError
from laion_search.schema import ID_STRIDE
from laion_search.sources.naming import parse_shard_spec
from laion_search.sources.shards import discover, open_shard
from laion_search.sources.synth import synth


def test_parse_shard_spec():
    assert parse_shard_spec("0-9") == list(range(10))
    assert parse_shard_spec("3,7,12-15") == [3, 7, 12, 13, 14, 15]
    assert parse_shard_spec(" 5 ") == [5]
    assert parse_shard_spec("2,2,1") == [1, 2]
    assert parse_shard_spec(None) is None and parse_shard_spec("") is None
    for bad in ("a", "3-1", "1-x", "-4", "1;drop"):
        with pytest.raises(UsageError):
            parse_shard_spec(bad)


def test_discover_both_layouts(shards_flat, shards_folders):
    flat = discover(shards_flat)
    assert [s.shard for s in flat] == [0, 1, 2]
    assert flat[1].img_emb.name == "img_emb_1.npy"
    folders = discover(shards_folders)
    assert [s.shard for s in folders] == [3, 10]
    assert folders[0].img_emb == shards_folders / "img_emb" / "img_emb_0003.npy"
    assert folders[1].metadata == shards_folders / "metadata" / "metadata_0010.parquet"
    assert [s.shard for s in discover(shards_flat, [2])] == [2]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_discover_errors(shards_flat, tmp_path):
    with pytest.raises(ShardError, match="not a directory"):
        discover(tmp_path / "nope")
    with pytest.raises(ShardError, match="no LAION shards found"):
        discover(tmp_path)
    with pytest.raises(ShardError, match="shard 7 not found"):
        discover(shards_flat, [7])
    d = _copy(shards_flat, tmp_path / "d")
    (d / "text_emb_1.npy").unlink()
    with pytest.raises(ShardError, match="shard 1 is incomplete: text_emb missing"):
        discover(d)
    d2 = _copy(shards_flat, tmp_path / "d2")
    shutil.copy(d2 / "img_emb_0.npy", d2 / "img_emb_0000.npy")
    with pytest.raises(ShardError, match="shard 0 has two img_emb files"):
        discover(d2)


def test_open_shard_reads_clean_shard(shards_flat):
    reader = open_shard(discover(shards_flat, [1])[0])
    assert reader.rows == 600 and reader.dim == 512
    batches = list(reader.batches(256))
    assert [b.num_rows for b in batches] == [256, 256, 88]
    ids = np.concatenate([b.column("id").to_numpy() for b in batches])
    assert np.array_equal(ids, 1 * ID_STRIDE + np.arange(600))
    src = np.load(shards_flat / "img_emb_1.npy").astype(np.float32)
    got = np.concatenate([np.stack(b.column("image_embedding").to_numpy(zero_copy_only=False)) for b in batches])
    assert np.array_equal(got, src)
    assert reader.renormalised == 0


def _one_shard(tmp_path: Path, rows: int = 50, dim: int = 16) -> Path:
    d = tmp_path / "one"
    synth(d, [0], rows, dim=dim, seed=3)
    return d


def _expect(d: Path, match: str, exc=ShardValidationError):
    with pytest.raises(exc, match=match):
        reader = open_shard(discover(d)[0])
        for _ in reader.batches(16):
            pass


def test_truncated_npy(tmp_path):
    d = _one_shard(tmp_path)
    p = d / "img_emb_0.npy"
    p.write_bytes(p.read_bytes()[:-10])
    _expect(d, "truncated")


def test_bad_magic(tmp_path):
    d = _one_shard(tmp_path)
    (d / "img_emb_0.npy").write_bytes(b"NOTNUMPY" * 20)
    _expect(d, "not an .npy file")


@pytest.mark.parametrize("dtype,match", [(">f2", "big-endian"), ("<f8", "float64"), ("<i4", "int32"),
                                         ("<f2", None)])
def test_dtypes(tmp_path, dtype, match):
    d = _one_shard(tmp_path)
    arr = np.load(d / "text_emb_0.npy").astype(np.float32)
    np.save(d / "text_emb_0.npy", arr.astype(dtype))
    if match is None:
        reader = open_shard(discover(d)[0])
        assert sum(b.num_rows for b in reader.batches(16)) == 50
    else:
        _expect(d, match)


def test_wrong_shape_and_dims(tmp_path):
    d = _one_shard(tmp_path)
    np.save(d / "text_emb_0.npy", (np.ones((50, 8)) / np.sqrt(8)).astype(np.float16))
    _expect(d, "dimension mismatch: img_emb_0.npy has 16-d vectors, text_emb_0.npy has 8-d")
    np.save(d / "text_emb_0.npy", np.ones((50,), np.float16))
    _expect(d, "expected a 2-D array")


def test_row_counts_disagree(tmp_path):
    d = _one_shard(tmp_path)
    arr = np.load(d / "img_emb_0.npy")
    np.save(d / "img_emb_0.npy", arr[:40])
    _expect(d, "row counts disagree: img_emb_0.npy has 40, text_emb_0.npy has 50, metadata_0.parquet has 50")


def test_nan_inf_zero_vectors(tmp_path):
    d = _one_shard(tmp_path)
    arr = np.load(d / "img_emb_0.npy")
    arr[20, 3] = np.nan
    np.save(d / "img_emb_0.npy", arr)
    _expect(d, r"1 vector\(s\) contain NaN or Inf \(first at row 20\)")
    arr[20, 3] = np.inf
    np.save(d / "img_emb_0.npy", arr)
    _expect(d, "NaN or Inf")
    arr[20] = 0
    np.save(d / "img_emb_0.npy", arr)
    _expect(d, r"1 all-zero vector\(s\) \(first at row 20\)")


def test_non_normalised_vectors_are_repaired_and_counted(tmp_path):
    d = _one_shard(tmp_path)
    arr = np.load(d / "img_emb_0.npy").astype(np.float32)
    arr[:5] *= 3.0
    np.save(d / "img_emb_0.npy", arr.astype(np.float16))
    reader = open_shard(discover(d)[0])
    vecs = np.concatenate([np.stack(b.column("image_embedding").to_numpy(zero_copy_only=False))
                           for b in reader.batches(16)])
    assert reader.renormalised == 5
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=2e-3)


def test_metadata_columns(tmp_path):
    d = _one_shard(tmp_path)
    t = pq.read_table(d / "metadata_0.parquet")
    pq.write_table(t.drop(["caption"]), d / "metadata_0.parquet")
    _expect(d, "required column 'caption' is missing")
    pq.write_table(t.set_column(t.schema.get_field_index("similarity"), "similarity",
                                pa.array(["high"] * t.num_rows)), d / "metadata_0.parquet")
    _expect(d, "column 'similarity' has type string, expected a number")


def test_not_parquet(tmp_path):
    d = _one_shard(tmp_path)
    (d / "metadata_0.parquet").write_text("url,caption\nx,y\n")
    _expect(d, "not a readable parquet file")


def test_symlinks_followed_and_broken_ones_reported(tmp_path):
    d = _one_shard(tmp_path)
    real = tmp_path / "elsewhere.npy"
    shutil.move(d / "img_emb_0.npy", real)
    (d / "img_emb_0.npy").symlink_to(real)
    assert open_shard(discover(d)[0]).rows == 50
    real.unlink()
    _expect(d, "broken symlink", ShardError)


def test_empty_shard_is_valid(tmp_path):
    d = tmp_path / "empty"
    synth(d, [0], 0, dim=16)
    reader = open_shard(discover(d)[0])
    assert reader.rows == 0 and list(reader.batches()) == []
