"""A mistyped store path is an error, not a new empty store: the read-only commands (and
``connect(path, create=False)``) on a path that holds no store fail with one line naming the
path and how to create one, exit non-zero, and leave nothing behind; only the commands that load
or build create a store."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from laion_search import StoreError, connect
from laion_search.cli.main import app
from laion_search.sources.synth import synth

READ_ONLY = [
    ("status",),
    ("status", "--json"),
    ("search", "--like", "1"),
    ("search", "--vector", "{tmp}/v.npy", "--k", "2"),
    ("sql", "SELECT 1"),
    ("index", "status"),
    ("index", "tune", "--sample", "4"),
    ("index", "drop"),
    ("bench", "search", "--queries", "{tmp}/v2.npy", "--gold", "{tmp}/gold.npy"),
]


def cli(*args: str, env: dict[str, str] | None = None):
    from laion_search.cli import output

    for name in ("out", "err"):  # the consoles are made on first use: make them for this run
        output.__dict__.pop(name, None)
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "400", **(env or {})}, catch_exceptions=False)


@pytest.fixture
def inputs(tmp_path):
    np.save(tmp_path / "v.npy", np.ones(16, np.float32))
    np.save(tmp_path / "v2.npy", np.ones((2, 16), np.float32))
    np.save(tmp_path / "gold.npy", np.zeros((2, 10), np.int64))
    return tmp_path


def _tree(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("args", READ_ONLY, ids=[" ".join(a[:2]) for a in READ_ONLY])
def test_read_only_commands_on_a_missing_store_fail_and_create_nothing(args, inputs):
    missing = inputs / "mistyped-db"
    argv = [a.replace("{tmp}", str(inputs)) for a in args]
    r = cli(*argv, "--db", str(missing))
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 1 and len(lines) == 1, (r.exit_code, r.stdout, r.stderr)
    assert lines[0] == (f"error: no laion-search store at {missing}: create one with `laion ingest SHARDS --db "
                        f"{missing}` (or an empty one with `laion init --db {missing}`)")
    assert not missing.exists()


def test_a_folder_that_is_not_a_store_is_refused_and_left_as_it_was(tmp_path):
    shards = tmp_path / "shards"  # e.g. --db given the shard folder by mistake
    synth(shards, [0], 20, dim=16, seed=1)
    before = _tree(shards)
    r = cli("status", "--db", str(shards))
    assert r.exit_code == 1 and f"no laion-search store at {shards}" in r.stderr
    assert _tree(shards) == before  # the engine never started in it


def test_the_default_store_is_named_with_how_to_pick_another(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "LAION_DB": "", "LAION_URL": ""}
    r = cli("status", env=env)
    default = tmp_path / "data" / "laion-search" / "db"
    assert r.exit_code == 1, r.stderr
    assert f"no laion-search store at {default} (the default store; pass --db PATH or set LAION_DB" in r.stderr
    assert "`laion ingest SHARDS`" in r.stderr and not (tmp_path / "data").exists()


def test_library_connect_without_create(tmp_path):
    missing = tmp_path / "nope" / "db"
    with pytest.raises(StoreError, match=f"no laion-search store at {missing}: create one with `laion ingest"):
        connect(missing, create=False)
    assert not (tmp_path / "nope").exists()
    with connect(tmp_path / "db") as store:  # the default creates
        assert store.scalar("SELECT count() FROM laion") == 0
    with connect(tmp_path / "db", create=False) as store:  # and an existing store opens without it
        assert store.has_table() and store.status().rows == 0


def test_only_the_commands_that_load_or_build_create_a_store(tmp_path):
    synth(tmp_path / "shards", [0], 30, dim=16, seed=2)
    r = cli("init", "--db", str(tmp_path / "a"), "--json")
    assert r.exit_code == 0 and (tmp_path / "a" / "metadata").is_dir()
    assert json.loads(cli("status", "--db", str(tmp_path / "a"), "--json").stdout)["rows"] == 0
    r = cli("ingest", str(tmp_path / "shards"), "--db", str(tmp_path / "b"), "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(cli("status", "--db", str(tmp_path / "b"), "--json").stdout)["rows"] == 30


def test_a_server_database_without_the_tables_is_not_given_them(server_url):
    r = cli("status", "--url", server_url)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no laion-search store at clickhouse://" in r.stderr and "`laion init --url " in r.stderr
    assert "p@ss" not in r.stderr  # the password stays out of the message
    with connect(server_url, create=False) as admin:
        assert not admin.has_table()


def test_serve_on_a_missing_store_exits_1_with_one_line(tmp_path):
    from .conftest import free_port, run_cli

    missing = tmp_path / "db"
    r = run_cli("serve", "--db", str(missing), "--port", str(free_port()), env={"LAION_CLIP_MODEL": os.devnull})
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: no laion-search store at {missing}") and not missing.exists()
