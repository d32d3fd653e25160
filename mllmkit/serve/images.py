"""Images of a request: ``data:`` URLs, local ``file://`` URLs under an allowed folder, nothing remote.

:func:`read_image_url` turns one ``image_url`` into a PIL RGB image within the server's
:class:`ImageLimits`: encoded size, and pixel count read from the header before any pixel is decoded
(a decompression bomb is refused without being inflated). ``http(s)`` and every other scheme are
refused: the server makes no outbound request. Each refusal is a 400 :class:`~mllmkit.serve.errors.APIError`
naming the message part it came from.
"""

from __future__ import annotations

import base64
import binascii
import io
import pathlib
import urllib.parse

import attrs

from mllmkit.serve.errors import APIError

__all__ = ["ImageLimits", "decode_image", "read_image_url"]


@attrs.frozen
class ImageLimits:
    """How much image a request may bring."""

    max_images: int = 8
    """Images in one request (all messages together)."""
    max_bytes: int = 10 * 1024 * 1024
    """Encoded size of one image."""
    max_pixels: int = 4096 * 4096
    """Width × height of one image, read from its header before decoding."""
    allow_dir: pathlib.Path | None = None
    """The folder ``file://`` URLs may read from (None: file URLs are refused)."""


def decode_image(data: bytes, limits: ImageLimits, param: str):
    """A PIL RGB image from encoded bytes, refused from its header when it has too many pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as handle:
            width, height = handle.size
            if width * height > limits.max_pixels:
                raise APIError(400, f"{param}: the image declares {width}×{height} pixels, more than this "
                                    f"server's limit of {limits.max_pixels} pixels", param=param, code="image_too_large")
            return handle.convert("RGB")
    except APIError:
        raise
    except Image.DecompressionBombError:
        raise APIError(400, f"{param}: the image declares more pixels than this server's limit of "
                            f"{limits.max_pixels}", param=param, code="image_too_large") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad bytes (SyntaxError, OSError, ...)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise APIError(400, f"{param}: not a readable image ({detail})", param=param, code="invalid_image") from None


def _data_url(url: str, limits: ImageLimits, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise APIError(400, f"{param}: a data URL must be base64, like data:image/png;base64,<data>", param=param,
                       code="invalid_image_url")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise APIError(400, f"{param}: the image is larger than this server's limit of {limits.max_bytes} bytes",
                       param=param, code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data URL's base64 payload does not decode", param=param,
                       code="invalid_image_url") from None


def _file_url(url: str, limits: ImageLimits, param: str) -> bytes:
    if limits.allow_dir is None:
        raise APIError(400, f"{param}: file URLs are refused; send the image as a data: URL, or start the server "
                            f"with --allow-dir DIR to serve files under DIR", param=param, code="invalid_image_url")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"{param}: a file URL names a local path (file:///path), found host {parsed.netloc!r}",
                       param=param, code="invalid_image_url")
    root = limits.allow_dir.resolve()
    path = pathlib.Path(urllib.parse.unquote(parsed.path)).resolve()
    if not path.is_relative_to(root):
        raise APIError(400, f"{param}: {path} is outside the allowed folder {root} (--allow-dir)", param=param,
                       code="invalid_image_url")
    if not path.is_file():
        raise APIError(400, f"{param}: no such file under the allowed folder: {path}", param=param,
                       code="invalid_image_url")
    if path.stat().st_size > limits.max_bytes:
        raise APIError(400, f"{param}: the image is larger than this server's limit of {limits.max_bytes} bytes",
                       param=param, code="image_too_large")
    return path.read_bytes()


def read_image_url(url: str, limits: ImageLimits, param: str):
    """The PIL RGB image an ``image_url.url`` names (``param`` names the part in error messages)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url(url, limits, param)
    elif scheme == "file":
        data = _file_url(url, limits, param)
    else:
        raise APIError(400, f"{param}: only data: URLs (and file: URLs under --allow-dir) are accepted; this server "
                            f"makes no outbound requests, so send the image itself as "
                            f"data:image/png;base64,<data>", param=param, code="invalid_image_url")
    return decode_image(data, limits, param)
