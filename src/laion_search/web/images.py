"""Pictures in and out of the server: a base64 or fetched ``image_url`` query image (bounded in
size and time), and the files ``/local/...`` serves from the image root."""

import base64
import binascii
import re
import time
from pathlib import Path

from laion_search.errors import UsageError
from laion_search.web.models import MAX_IMAGE_BYTES

#: picture files ``/local/...`` serves from the image root
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".gif": "image/gif"}


def decode_base64_image(data: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise UsageError("image must be a non-empty base64 string")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise UsageError(f"image over {MAX_IMAGE_BYTES} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("image is not valid base64") from None
    if not raw:
        raise UsageError("image is empty")
    return raw


def fetch_image_url(url: str, *, timeout: float = 5.0, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Fetch an image for ``image_url`` (only when the server allows it): http(s) only, bounded
    size and time."""
    import httpx

    if not re.match(r"^https?://", url, re.I):
        raise UsageError("image_url must be an http(s) URL")
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=False) as r:
            if r.status_code != 200:
                raise UsageError(f"image_url answered HTTP {r.status_code}")
            buf = bytearray()
            deadline = time.monotonic() + timeout
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) > max_bytes:
                    raise UsageError(f"image_url body over {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise UsageError("image_url took too long")
            return bytes(buf)
    except httpx.HTTPError as exc:
        raise UsageError(f"cannot fetch image_url ({type(exc).__name__})") from None


def safe_image_path(root: Path, path: str) -> Path | None:
    """``root/path`` when it is a picture file inside ``root`` (after resolving links), else None:
    no absolute paths, no ``..`` escapes, no NUL bytes, only picture suffixes."""
    if not path or "\0" in path or "\\" in path or path.startswith("/") or Path(path).is_absolute():
        return None
    try:
        candidate = (root / path).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if not candidate.is_relative_to(root) or candidate.suffix.lower() not in IMAGE_TYPES or not candidate.is_file():
        return None
    return candidate

