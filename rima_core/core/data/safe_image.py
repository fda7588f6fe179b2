"""The hardened 2-D image reader (png, jpg, ...): the pixel count checked from the header before
any pixel is decoded.

Split from :mod:`rima_core.core.data.safe_read` (which re-exports :func:`read_image`; its
docstring states the rules) so each file format's reader reads on its own.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np

from rima_core.core.data.safe_files import DEFAULT_MAX_IMAGE_PIXELS, UnsafeInputError, _opened

_CONVERT_TO_RGB = ("P", "PA", "CMYK", "YCbCr", "RGBA")
_CONVERT_TO_L = ("1", "LA")


def read_image(
    path: str | Path,
    *,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    mode: str | None = None,
    root: str | Path | None = None,
) -> np.ndarray:
    """Decode one png/jpg/... fully, refusing more than ``max_pixels`` before decoding.

    The pixel count is checked from the header (``Image.open`` reads no pixel data); PIL's own
    ``MAX_IMAGE_PIXELS`` guard stays on as a second line, and its DecompressionBomb warning or
    error becomes an :class:`UnsafeInputError`. ``mode`` converts (e.g. ``"L"``, ``"RGB"``);
    without it palette/CMYK/alpha images become RGB and 1-bit/LA images grey.
    """
    from PIL import Image, UnidentifiedImageError

    limit = max_pixels if max_pixels is not None else DEFAULT_MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _opened(path, root) as fp, Image.open(fp) as img:
                width, height = img.size
                if width * height > limit:
                    raise UnsafeInputError(
                        path,
                        f"image of {width}×{height} pixels is over the limit of {limit} "
                        "(prepare.max_image_pixels)",
                    )
                img.load()
                if mode is not None and img.mode != mode:
                    img = img.convert(mode)
                elif img.mode in _CONVERT_TO_RGB:
                    img = img.convert("RGB")
                elif img.mode in _CONVERT_TO_L:
                    img = img.convert("L")
                return np.asarray(img)
    except UnsafeInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnsafeInputError(path, f"decompression bomb refused: {exc}") from exc
    except (
        OSError,
        UnidentifiedImageError,
        SyntaxError,
        ValueError,
        EOFError,
        TypeError,
        struct.error,
        zlib.error,
        MemoryError,
        IndexError,
        KeyError,
    ) as exc:
        raise UnsafeInputError(path, f"unreadable or truncated image: {exc}") from exc
