"""Checks on a source file before it is opened, with errors that name it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from laion_search.errors import ShardError


def check_regular_file(path: Path) -> None:
    """A readable regular file (a symlink to one is fine), else a :class:`ShardError` naming the
    file and why: not found, a broken symlink, not a regular file, not readable."""
    try:
        st = path.stat()  # follows symlinks
    except FileNotFoundError:
        raise ShardError("broken symlink" if path.is_symlink() else "file not found", path=str(path)) from None
    except OSError as exc:
        raise ShardError(f"cannot stat: {exc.strerror or exc}", path=str(path)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ShardError("not a regular file", path=str(path))
    if not os.access(path, os.R_OK):
        raise ShardError("not readable (permission denied)", path=str(path))
