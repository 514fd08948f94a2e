"""One source file, local or remote, as the readers see it: a name, a size, a fingerprint, and
something :mod:`pyarrow.parquet` and :mod:`h5py` can open (a path, or a seekable binary file).

A URL (``https://…``, ``hf://…``) is opened by :func:`laion_search.sources.remote.open_input`,
which returns a seekable, readable binary file object with a ``.name``; everything here works on
such an object as it does on a local path, so remote ingest needs nothing else from the readers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from laion_search.sources.files import check_regular_file
from laion_search.sources.remote import is_remote, open_input


@dataclass
class Input:
    """A source file. ``display`` is what the user gave (path or URL), for messages and
    ``laion_shards.source``; ``name`` is its file name, the key of its partition."""

    display: str
    name: str
    path: Path | None = None
    file: Any = None  # a seekable binary file object (remote), when path is None

    @property
    def target(self) -> str | BinaryIO:
        """What to hand to ``pq.ParquetFile`` / ``h5py.File``."""
        if self.path is not None:
            return str(self.path)
        self.file.seek(0)
        return self.file

    def size(self) -> int:
        if self.path is not None:
            return self.path.stat().st_size
        size = getattr(self.file, "size", None)
        if isinstance(size, int):
            return size
        pos = self.file.tell()
        try:
            return self.file.seek(0, os.SEEK_END)
        finally:
            self.file.seek(pos)

    def head(self, n: int = 16) -> bytes:
        if self.path is not None:
            with open(self.path, "rb") as f:
                return f.read(n)
        self.file.seek(0)
        try:
            return self.file.read(n)
        finally:
            self.file.seek(0)

    def fingerprint(self) -> str:
        """Changes when the file is replaced: size and mtime locally; a remote file's own
        ``fingerprint`` (e.g. its ETag) when it has one, else its size."""
        if self.path is not None:
            st = self.path.stat()
            return f"{self.name}:{st.st_size}:{st.st_mtime_ns}"
        own = getattr(self.file, "fingerprint", None)
        own = own() if callable(own) else own
        return f"{self.name}:{own or self.size()}"

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except Exception:  # noqa: BLE001 - closing a half-broken remote handle must not mask the real error
                pass


def as_input(source: str | os.PathLike[str] | BinaryIO) -> Input:
    """A local path, a URL, or an already opened seekable binary file (with ``.name``)."""
    if hasattr(source, "read") and hasattr(source, "seek"):
        raw = str(getattr(source, "name", "") or "stream")
        return Input(raw, _basename(raw), file=source)
    if is_remote(str(source)):
        f = open_input(str(source))
        return Input(str(source), _basename(str(source)), file=f)
    path = Path(source)
    check_regular_file(path)
    return Input(str(path), path.name, path=path)


def _basename(text: str) -> str:
    return text.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or text


