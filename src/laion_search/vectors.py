"""Query vectors: read them from files, check them, and turn ``name=value`` pairs into parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from laion_search.errors import UsageError

MAX_VECTOR_FILE_BYTES = 64 * 1024 * 1024


def load_vector_file(path: str | Path) -> np.ndarray:
    """Read one vector from ``.npy`` (1-D, or the first row of 2-D) or ``.json`` (a list of numbers)."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise UsageError(f"{p}: cannot read vector file ({exc.strerror or exc})") from None
    if size > MAX_VECTOR_FILE_BYTES:
        raise UsageError(f"{p}: vector file is too large ({size} bytes)")
    if p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UsageError(f"{p}: not a readable .npy file ({exc})") from None
        if arr.ndim == 2 and arr.shape[0] >= 1:
            arr = arr[0]
        return as_vector(arr, source=str(p))
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{p}: not valid JSON ({exc})") from None
    if isinstance(data, dict):
        for key in ("vector", "embedding", "target"):
            if key in data:
                data = data[key]
                break
    if isinstance(data, list) and data and isinstance(data[0], list):
        data = data[0]
    return as_vector(data, source=str(p))


def as_vector(value: Any, *, dim: int | None = None, source: str = "vector") -> np.ndarray:
    """Check a query vector (1-D, numeric, finite, non-zero, right length) and return float32."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise UsageError(f"{source}: must be a list of numbers") from None
    if arr.ndim != 1:
        raise UsageError(f"{source}: must be a 1-D list of numbers, got shape {arr.shape}")
    if arr.size == 0:
        raise UsageError(f"{source}: is empty")
    if dim is not None and arr.size != dim:
        raise UsageError(f"{source}: has {arr.size} values, the table holds {dim}-d embeddings")
    if not np.isfinite(arr).all():
        raise UsageError(f"{source}: contains NaN or Inf")
    if not np.any(arr):
        raise UsageError(f"{source}: is all zeros (no direction to search)")
    with np.errstate(over="ignore"):  # checked right below
        out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise UsageError(f"{source}: values overflow float32")
    return out


def parse_params(pairs: Iterable[str]) -> dict[str, Any]:
    """``name=value`` pairs → query parameters. ``name=@file.json|.npy`` reads a vector file,
    ``name=@file`` (other) reads the file's text."""
    params: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--param {pair!r}: expected name=value or name=@file")
        name, value = pair.split("=", 1)
        name = name.strip()
        if not name.isidentifier():
            raise UsageError(f"--param {pair!r}: {name!r} is not a valid parameter name")
        if value.startswith("@"):
            path = Path(value[1:])
            if path.suffix.lower() in (".npy", ".json"):
                params[name] = load_vector_file(path).tolist() if path.suffix.lower() == ".npy" \
                    else _json_param(path)
            else:
                try:
                    params[name] = path.read_text(encoding="utf-8").rstrip("\n")
                except OSError as exc:
                    raise UsageError(f"--param {name}: cannot read {path} ({exc.strerror or exc})") from None
        else:
            params[name] = value
    return params


def _json_param(path: Path) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not readable JSON ({exc})") from None
    if isinstance(data, (list, int, float, str)):
        return data
    raise UsageError(f"{path}: a JSON parameter must be a list, number or string")
