"""The package type-checks: mypy on src/laion_search (settings in pyproject.toml's [tool.mypy])."""

from __future__ import annotations

from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is in the test extra: `make test` installs it")

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_is_clean():
    out, err, status = mypy_api.run(["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
                                     str(ROOT / ".mypy_cache"), str(ROOT / "src" / "laion_search")])
    assert status == 0, out + err
    assert "Success" in out


def test_no_undefined_or_unused_names():
    """pyflakes' checks (ruff's F rules) on the package and the tests: undefined names, unused
    imports and variables, shadowed imports."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is in the test extra: `make test` installs it")
    proc = subprocess.run([ruff, "check", "--no-cache", "--select", "F", "src", "tests", "scripts"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
