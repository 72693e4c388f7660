"""Reading DICOM pixels and headers the same way in every stage.

Never imports TensorFlow. Restructuring, extraction and inference all read pixels through
:func:`read_mammogram` and :func:`read_mask`, so an image means the same thing to every stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

__all__ = ["MaskRead", "read_header", "read_mammogram", "read_mask", "safe_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_LENGTH = 120


@dataclass(frozen=True)
class MaskRead:
    """A binary ROI mask and what had to be done to make it binary.

    Attributes
    ----------
    mask : np.ndarray of bool, shape (rows, cols)
    note : str
        Empty for a clean 0/max mask; otherwise a readable remark (e.g. thresholded values).
    """

    mask: np.ndarray
    note: str = ""


def read_header(path: str | Path) -> pydicom.Dataset:
    """Read a DICOM header without its pixel data (fast: stops before PixelData)."""
    return pydicom.dcmread(str(path), stop_before_pixels=True)


def read_mammogram(path: str | Path) -> np.ndarray:
    """Read a mammogram's pixels as float32, bright = dense.

    Parameters
    ----------
    path : path to a DICOM file (any transfer syntax pydicom can decode with the pylibjpeg plugins).

    Returns
    -------
    np.ndarray of float32, shape (rows, cols)
        Modality LUT (rescale slope/intercept) applied; MONOCHROME1 inverted so that larger values are brighter.
        No VOI windowing: every patch is min-max normalised later, which makes windowing irrelevant.
    """
    ds = pydicom.dcmread(str(path))
    pixels = ds.pixel_array
    if pixels.ndim != 2:
        raise ValueError(f"{path}: expected a single-frame greyscale image, got pixel array of shape {pixels.shape}")
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        values = values.max() + values.min() - values
    return values


def read_mask(path: str | Path) -> MaskRead:
    """Read an ROI mask as a boolean array; values above half the maximum are foreground."""
    ds = pydicom.dcmread(str(path))
    pixels = np.asarray(ds.pixel_array)
    if pixels.ndim != 2:
        raise ValueError(f"{path}: expected a single-frame mask, got pixel array of shape {pixels.shape}")
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        pixels = pixels.max() - pixels
    top = int(pixels.max()) if pixels.size else 0
    if top == 0:
        return MaskRead(np.zeros(pixels.shape, dtype=bool), "empty mask")
    mask = pixels > top / 2
    distinct = np.unique(pixels)
    note = "" if distinct.size <= 2 else f"thresholded non-binary mask at {top / 2:g} ({distinct.size} distinct values)"
    return MaskRead(mask, note)


def safe_name(text: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """Make a header value safe to use as one file-name component.

    Anything outside ``[A-Za-z0-9._-]`` (slashes, NUL, spaces, ``..``) becomes ``_``; leading dots are removed so
    that the name can never be ``.``/``..`` or hidden. Raises ``ValueError`` when nothing usable is left.
    """
    cleaned = _UNSAFE.sub("_", str(text)).strip("._-")
    cleaned = re.sub(r"\.{2,}", "_", cleaned)[:max_length]
    if not cleaned:
        raise ValueError(f"no usable file name can be made from {text!r}")
    return cleaned
