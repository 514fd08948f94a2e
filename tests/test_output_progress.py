"""output.Progress: one progress pattern for every command — a rich bar on a terminal, plain lines
otherwise, JSON lines (or nothing) with --json — and bench_common.scratch_dir."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from laion_search.cli import output
from laion_search.bench.common import scratch_dir

INDEX_EVENTS = [{"event": "index_start", "index": "image_hnsw", "parts": 4},
                {"event": "index_progress", "index": "image_hnsw", "parts_done": 2, "parts": 4},
                {"event": "index_progress", "index": "image_hnsw", "parts_done": 4, "parts": 4}]
EMBED_EVENTS = [{"event": "start", "images": 3}, {"event": "batch", "images_done": 3, "seconds": 1.0},
                {"event": "shard_done", "shard": 0, "images": 3}]


@pytest.fixture
def term(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(output, "err", Console(file=buf, force_terminal=False, width=120))
    return buf


@pytest.mark.parametrize("mode", ["bar", "plain", "json"])
def test_each_command_renders_by_mode(mode, term, capsys):
    with output.IndexProgress(mode) as p:
        for e in INDEX_EVENTS:
            p(e)
        assert (p._progress is not None) == (mode == "bar")
    with output.EmbedProgress(mode) as p:
        for e in EMBED_EVENTS:
            p(e)
    with output.CountProgress(mode, "synth", 10) as p:
        p.count(5, 10)
        p.count(10, 10)
    stdout = capsys.readouterr().out
    if mode == "json":  # index and synth print one JSON document at the end; embed streams its events
        assert [json.loads(line)["event"] for line in stdout.splitlines()] == ["start", "shard_done"]
        assert term.getvalue() == ""
    elif mode == "plain":
        assert stdout == ""
        assert term.getvalue().splitlines() == ["image_hnsw: 2/4 parts", "image_hnsw: 4/4 parts",
                                                "shard 0: 3 images written"]
    else:
        assert stdout == "" and "image_hnsw" in term.getvalue() and "synth" in term.getvalue()


def test_plain_lines_are_not_rich_markup(term):
    with output.IngestProgress("plain") as p:
        p({"event": "shard_skipped", "shard": 3, "reason": "already loaded [bold]x[/bold]"})
    assert term.getvalue() == "shard 3: skipped (already loaded [bold]x[/bold])\n"


def test_scratch_dir(tmp_path):
    with scratch_dir(None, "laion-test-") as root:
        assert root.is_dir() and root.name.startswith("laion-test-")
        (root / "f").write_text("x")
    assert not root.exists()  # a temporary one is removed
    with pytest.raises(RuntimeError):
        with scratch_dir(None, "laion-test-") as root:
            raise RuntimeError("boom")
    assert not root.exists()  # even on error
    keep = tmp_path / "work" / "dir"
    with scratch_dir(keep, "laion-test-") as root:
        assert root == keep and root.is_dir()
        (root / "f").write_text("x")
    assert (keep / "f").read_text() == "x"  # --dir is kept for the next run
