"""`laion bench search` end to end on a tiny dataset (the 1M-row run is by hand, see README)."""

from __future__ import annotations


def test_bench_search_end_to_end(tmp_path):
    from laion_search.bench.search import run

    result = run(rows=600, queries=50, k=5, configs="8:32", threads=2, workdir=tmp_path / "w", out=tmp_path / "out")
    by = {r["method"]: r for r in result["results"]}
    assert by["numpy exact (f32 GEMV)"]["recall"] == 1.0
    assert by["laion exact (chDB)"]["recall"] == 1.0  # exact search agrees with numpy's ground truth
    assert by["laion exact, bf16 scan copy (chDB)"]["recall"] == 1.0  # so does the bf16 scan + float32 re-rank
    # the realistic synth geometry (real embeddings' shape): a light graph still finds ~all neighbours
    assert by["laion hnsw M=8 ef_c=32"]["recall"] >= 0.98 and by["laion hnsw M=8 ef_c=32"]["build_vps"] > 0
    assert "usearch M=8 ef_c=32" in by and by["usearch M=8 ef_c=32"]["recall"] >= 0.98
    assert (tmp_path / "out" / "bench-search.md").read_text().startswith("synth: 600 rows")
    assert (tmp_path / "out" / "bench-search.png").read_bytes()[:4] == b"\x89PNG"
    assert result["ratios"]["exact_vs_numpy_p50"] > 0 and result["ratios"]["exact_bf16_scan_vs_numpy_p50"] > 0
