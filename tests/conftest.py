"""Shared fixtures. Every dataset is generated here, in temp dirs; nothing touches the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from laion_search import connect
from laion_search.synth import synth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shards_flat(tmp_path_factory) -> Path:
    """3 shards × 600 rows, 512-d, the guide's flat layout."""
    out = tmp_path_factory.mktemp("flat")
    synth(out, [0, 1, 2], 600, seed=7)
    return out


@pytest.fixture(scope="session")
def shards_folders(tmp_path_factory) -> Path:
    """2 shards × 400 rows in img_emb/ text_emb/ metadata/ with zero-padded numbers (0003, 0010)."""
    out = tmp_path_factory.mktemp("folders")
    synth(out, [3, 10], 400, seed=8, layout="folders", pad=4)
    return out


@pytest.fixture
def store(tmp_path):
    s = connect(tmp_path / "db")
    try:
        yield s
    finally:
        s.close()


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = False,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `laion` entry point in a subprocess (its own chDB engine)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "laion_search.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"laion {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
