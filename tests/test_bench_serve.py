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


def test_bench_serve_mixed_accounts_for_every_indexed_search(tmp_path):
    from laion_search.bench.serve import run_mixed

    result = run_mixed(rows=600, scan_clients=2, rate=10, seconds=2, idle_requests=10, workdir=tmp_path)
    assert result["indexed_sent"] == 20
    assert result["indexed_answered"] + result["indexed_errors"] == 20 and result["indexed_errors"] == 0
    assert result["scans_done"] > 0 and result["scan_errors"] == 0
    assert result["idle_p50_ms"] > 0 and result["indexed_p99_ms"] >= result["indexed_p50_ms"]
    assert "idle p50" in result["markdown"] and ("target met" in result["markdown"] or "NOT met" in result["markdown"])
