"""`laion bench serve` end to end on a tiny store (the 100K / 1M runs are by hand, see README)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")


def test_bench_serve_small_load_has_no_errors(tmp_path):
    from laion_search.bench.serve import run

    result = run(rows=500, clients=3, requests=12, workdir=tmp_path)  # bounded by count, not by a window
    assert result["errors"] == 0 and result["sent"] == 36
    assert result["requests"] + result["shed"] == 36  # every request sent was answered (200) or shed (429)
    assert set(result["per_kind"]) == {"indexed", "exact", "filtered", "like"}
    assert all(v["requests"] + v["shed"] > 0 for v in result["per_kind"].values()), result["per_kind"]
    assert result["rss_after"] > 0 and "QPS" in result["markdown"]


def test_bench_serve_mixed_accounts_for_every_indexed_search(tmp_path):
    from laion_search.bench.serve import run_mixed

    result = run_mixed(rows=600, scan_clients=2, rate=10, seconds=2, idle_requests=10, workdir=tmp_path)
    assert result["indexed_sent"] == 20
    assert result["indexed_answered"] + result["indexed_errors"] == 20 and result["indexed_errors"] == 0
    # the load phase lasts until each scan client had an answer (an event, not the 2 s): 2 at least
    assert result["scans_done"] + result["scans_shed"] >= 2 and result["scans_done"] > 0 and result["scan_errors"] == 0
    assert result["idle_p50_ms"] > 0 and result["indexed_p99_ms"] >= result["indexed_p50_ms"]
    assert "idle p50" in result["markdown"] and ("target met" in result["markdown"] or "NOT met" in result["markdown"])


def test_bench_serve_indexed_only_on_an_existing_store(tmp_path):
    """--kinds indexed --db: the load on a store the user has (queries are its own stored vectors)."""
    from laion_search.bench.serve import run

    run(rows=400, clients=1, requests=2, workdir=tmp_path)  # leaves tmp_path/db with an image index
    both = run(clients=1, requests=6, kinds=("indexed", "knn"), db=tmp_path / "db", workdir=tmp_path / "w")
    assert set(both["per_kind"]) == {"indexed", "knn"} and both["errors"] == 0  # the clients' seeded picks hold both
    assert both["requests"] + both["shed"] == 6 and both["knn_vs_indexed_p50"] > 0
    assert "/knn-service p50 is" in both["markdown"]
    result = run(clients=2, requests=5, kinds=("indexed",), db=tmp_path / "db", workdir=tmp_path / "w")
    assert set(result["per_kind"]) == {"indexed"} and result["kinds"] == ["indexed"]
    assert result["rows"] == 400 and result["requests"] + result["shed"] == 10 and result["errors"] == 0
    assert result["per_kind"]["indexed"]["requests"] > 0
    assert "indexed queries only" in result["markdown"]
    with pytest.raises(ValueError, match="query kinds"):
        run(kinds=("indexed", "nope"), db=tmp_path / "db")
    from laion_search.api import connect

    with connect(tmp_path / "bare") as store:
        store.sql("SELECT 1")
    with pytest.raises(RuntimeError, match="empty"):
        run(kinds=("indexed",), db=tmp_path / "bare", workdir=tmp_path / "w2")
