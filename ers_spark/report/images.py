"""Images inlined in the page: crop thumbnails from the stored bytes, and data URIs."""

from __future__ import annotations

import base64
import io

from PIL import Image, UnidentifiedImageError

JPEG_QUALITY = 85


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def thumbnail_jpeg(image_bytes: bytes, max_px: int) -> bytes | None:
    """A JPEG at most ``max_px`` on its longer side, or None when the bytes are not a readable image.

    Crops in the lake decoded at ingest, so None means the table holds something ingest
    would not have written; the page says so in place of the picture.
    """
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()
            thumb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    thumb.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    if max(thumb.size) < max_px:  # small crops (LFW is 25x25) are shown enlarged, pixels visible
        scale = max_px / max(thumb.size)
        size = (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale)))
        thumb = thumb.resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()
