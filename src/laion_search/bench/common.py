"""What the ``bench_*`` modules share."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def scratch_dir(workdir: str | os.PathLike[str] | None, prefix: str) -> Iterator[Path]:
    """A benchmark's scratch directory: ``workdir`` when given (created if missing and kept, so
    generated data is reused by the next run), else a fresh temporary directory named ``prefix…``
    that is removed afterwards, whatever happens."""
    if workdir is not None:
        root = Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        yield root
        return
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
