"""What the ``bench_*`` modules share."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


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


def bench_shard(root: Path, rows: int, data: str, *, corpus: Any = None, log: Callable[[str], Any] | None = None,
                name: str | None = None) -> Path:
    """The one LAION-layout shard a search benchmark runs on: ``real-text`` (built and cached by
    :mod:`laion_search.bench.real_text`), or synth under ``root/name`` (``synth``: realistic geometry,
    ``synth-hard``: isotropic), written once and reused."""
    say = log or (lambda m: None)
    if data == "real-text":
        from laion_search.bench.real_text import build

        return build(rows, corpus=corpus, log=say)
    from laion_search.sources.synth import synth

    shard_dir = root / (name or f"shards-{data}")
    if not (shard_dir / "img_emb_0.npy").exists():
        say(f"synth ({data}): {rows:,} rows")
        synth(shard_dir, [0], rows, seed=3, geometry="hard" if data == "synth-hard" else "realistic")
    return shard_dir
