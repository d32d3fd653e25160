"""Reading an image file a user or a dataset names, so that no file can end a run or a chat.

:func:`read_image` is the one place training data, ``mllmkit chat`` (``--image``, ``:image``) and
the web UI's upload check open pictures. Pillow reads untrusted bytes and fails in many ways (a
corrupt chunk is a ``SyntaxError``, a header declaring a huge picture a ``DecompressionBombError``,
a name longer than the file system allows an ``OSError`` from the existence check); each becomes
one :class:`ImageUnreadable` (or :class:`ImageMissing`) naming the file and the cause. Pictures
above :data:`MAX_IMAGE_PIXELS` are refused from their header, before any pixel is decoded.
"""

from __future__ import annotations

import pathlib
from typing import Any

from mllmkit.errors import UserError

__all__ = ["MAX_IMAGE_PIXELS", "ImageMissing", "ImageUnreadable", "read_image"]

MAX_IMAGE_PIXELS = 8192 * 8192
"""The largest picture read (67 megapixels, 192 MiB as RGB): a header declaring more is refused
before decoding. Vision encoders resize to a few hundred pixels a side, so no real dataset image
comes near it; raise it here if yours does."""


class ImageMissing(UserError):
    """The image file is not there."""


class ImageUnreadable(UserError):
    """The file is there but is not a picture this reader accepts."""


def read_image(image: Any):
    """A PIL RGB image from a path or a PIL image; raises :class:`ImageMissing` or :class:`ImageUnreadable`."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = pathlib.Path(image)
    try:
        there = path.is_file()
    except OSError as exc:  # e.g. ENAMETOOLONG: the name cannot even be looked up
        raise ImageMissing(f"image not found: {_short(path)} ({exc.strerror or exc})") from None
    if not there:
        raise ImageMissing(f"image not found: {path}")
    try:
        with Image.open(path) as handle:
            width, height = handle.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageUnreadable(f"cannot read image {path}: its header declares {width}×{height} pixels, "
                                      f"more than the limit of {MAX_IMAGE_PIXELS} "
                                      f"(mllmkit.data.images.MAX_IMAGE_PIXELS)")
            return handle.convert("RGB")
    except ImageUnreadable:
        raise
    except Image.DecompressionBombError:
        raise ImageUnreadable(f"cannot read image {path}: its header declares more pixels than the limit of "
                              f"{MAX_IMAGE_PIXELS} (mllmkit.data.images.MAX_IMAGE_PIXELS)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types (SyntaxError, DecompressionBombError, ...)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageUnreadable(f"cannot read image {path}: {detail}") from None


def _short(path: pathlib.Path, limit: int = 120) -> str:
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}…{text[-limit // 2:]} ({len(text)} characters)"
