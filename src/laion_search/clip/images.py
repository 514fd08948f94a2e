"""Opening user images safely: common formats, EXIF orientation, RGBA/greyscale, bounded size."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

from laion_search.errors import EncoderError

#: Formats we accept (Pillow names). Anything else is refused before decoding.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
#: Larger images are refused (decompression bombs): 64 megapixels, e.g. 8000 × 8000.
MAX_PIXELS = 64_000_000
MAX_BYTES = 50 * 1024 * 1024


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:  # pragma: no cover - pillow comes with the [clip] extra
        raise EncoderError("images need Pillow: pip install 'laion-search[clip]'") from None
    return Image, ImageOps


def load_image(src: Any, *, name: str | None = None) -> Any:
    """Open ``src`` (a path, bytes, or a PIL image) as an RGB PIL image.

    Raises :class:`EncoderError` naming the file for a non-image, an unsupported format, an
    unreadable file or a decompression bomb.
    """
    Image, ImageOps = _pil()
    if isinstance(src, Image.Image):
        img = src
        label = name or "image"
    else:
        if isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
            label = name or "uploaded image"
        else:
            path = Path(src)
            label = name or str(path)
            try:
                size = path.stat().st_size
                if size > MAX_BYTES:
                    raise EncoderError(f"{label}: image file too large ({size} bytes, limit {MAX_BYTES})")
                data = path.read_bytes()
            except OSError as exc:
                raise EncoderError(f"{label}: cannot read ({exc.strerror or exc})") from None
        if len(data) > MAX_BYTES:
            raise EncoderError(f"{label}: image too large ({len(data)} bytes, limit {MAX_BYTES})")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                if img.format not in FORMATS:
                    raise EncoderError(f"{label}: unsupported image format {img.format}")
                if img.width * img.height > MAX_PIXELS:
                    raise EncoderError(f"{label}: {img.width}×{img.height} pixels is over the limit of {MAX_PIXELS}")
                if img.format == "JPEG":
                    img.draft("RGB", (1024, 1024))  # decode at reduced size: CLIP needs 224 px
                img.load()
        except EncoderError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise EncoderError(f"{label}: refused, looks like a decompression bomb ({exc})") from None
        except Exception as exc:  # PIL raises many types for broken input
            raise EncoderError(f"{label}: not a readable image ({type(exc).__name__}: {exc})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not make a good image unusable
        pass
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")
