"""`laion bench serve` end to end on a tiny store (the 100K / 1M runs are by hand, see README)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")


def test_bench_serve_small_load_has_no_errors(tmp_path):
    from laion_search.bench.serve import run

    result = run(rows=500, clients=3, seconds=2, workdir=tmp_path)
    assert result["requests"] > 0 and result["errors"] == 0
    assert set(result["per_kind"]) == {"indexed", "exact", "filtered", "like"}
    assert result["rss_after"] > 0 and "QPS" in result["markdown"]
