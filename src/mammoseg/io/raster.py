"""The 8-bit JPEG/PNG images of the Kaggle copy of CBIS-DDSM (layout D), read through Pillow.

Only callers that expect such files read them (restructuring and extraction of a Kaggle set); everywhere else a
JPEG or PNG is refused as ``not_dicom`` by :mod:`mammoseg.io.dicom`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mammoseg.io.errors import DicomReadError

__all__ = ["RASTER_SUFFIXES", "is_raster", "raster_record", "read_raster"]

#: File suffixes read through Pillow instead of pydicom (the Kaggle JPEG copy, PNG exports), lower case.
RASTER_SUFFIXES = (".jpg", ".jpeg", ".png")

#: Pillow modes kept as they are; anything else (RGB, palette, ...) is converted to 8-bit grey.
_GREY_MODES = ("L", "I", "I;16", "I;16B")


def is_raster(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a JPEG/PNG file (by its suffix, as the Kaggle layout names them)."""
    return os.fspath(path).lower().endswith(RASTER_SUFFIXES)


def _check_not_empty(path: str | os.PathLike) -> None:
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise DicomReadError(path, "unreadable", f"cannot stat file: {exc.strerror or exc}") from None
    if size == 0:
        raise DicomReadError(path, "zero_byte", "empty file (0 bytes)")


def read_raster(path: str | os.PathLike) -> np.ndarray:
    """Decode a JPEG/PNG image to grey values.

    Returns
    -------
    np.ndarray, shape (rows, cols): uint8 (8-bit grey; colour images converted to grey), or the 16/32-bit integers
    of a 16-bit PNG.

    Raises
    ------
    DicomReadError
        ``zero_byte``, ``unreadable`` (cannot stat), ``undecodable`` (not an image Pillow can decode).
    """
    from PIL import Image, UnidentifiedImageError

    _check_not_empty(path)
    try:
        with Image.open(path) as image:
            if image.mode not in _GREY_MODES:
                image = image.convert("L")
            return np.asarray(image)
    except (UnidentifiedImageError, OSError) as exc:
        raise DicomReadError(path, "undecodable", f"cannot decode image: {exc}") from None


def raster_record(path: str | os.PathLike) -> dict[str, Any]:
    """Image size and bit depth from a JPEG/PNG's own header, without decoding it.

    Returns
    -------
    dict with ``Rows``, ``Columns`` (pixels), ``BitsStored`` (8, or 16 for Pillow's integer modes) and
    ``PhotometricInterpretation`` (``MONOCHROME2``: bright = dense, as in the Kaggle copy).

    Raises
    ------
    DicomReadError
        ``zero_byte``, ``unreadable``, ``not_dicom`` (neither DICOM nor an image Pillow recognises).
    """
    from PIL import Image, UnidentifiedImageError

    _check_not_empty(path)
    try:
        with Image.open(path) as image:
            cols, rows = image.size
            mode = image.mode
    except (UnidentifiedImageError, OSError):
        raise DicomReadError(path, "not_dicom", "neither DICOM nor a readable JPEG/PNG image") from None
    bits = 16 if mode.startswith("I") else 8
    return {"Rows": rows, "Columns": cols, "BitsStored": bits, "PhotometricInterpretation": "MONOCHROME2"}

