"""ROI masks: stored values to a boolean mask, the same rule in restructuring and extraction.

CBIS-DDSM stores masks as 8-bit 0/255 images the size of the full mammogram, with the lesion in a few percent of
the rows; a few are not two-valued. :func:`mask_from_pixels` binarises over the lesion's rows only and finds the
lesion's bounding box on the way, so that nobody scans a full-size mask twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mammoseg.io.dicom import read_stored_pixels

__all__ = ["MaskRead", "binary_fraction", "mask_from_pixels", "read_mask"]


@dataclass(frozen=True)
class MaskRead:
    """A binary ROI mask and what had to be done to make it binary.

    Attributes
    ----------
    mask : np.ndarray of bool, shape (rows, cols)
    note : str
        Empty for a clean 0/max mask; otherwise a readable remark (``empty mask``, or the threshold applied to a
        non-binary mask, e.g. ``thresholded non-binary mask at 127.5 (max=255, 37 distinct values)``).
    bbox : (r0, c0, r1, c1) or None
        Bounding box of the foreground in pixels, ``r1``/``c1`` exclusive (as
        :func:`mammoseg.patches.geometry.mask_bbox`); None when nothing is foreground. Found while binarising, from the
        rows that hold the lesion, so that nobody has to scan a full-size mask again.
    """

    mask: np.ndarray
    note: str = ""
    bbox: tuple[int, int, int, int] | None = None


def binary_fraction(pixels: np.ndarray, tolerance: float = 0.05) -> float:
    """Fraction of pixels within ``tolerance`` x (max - min) of the minimum or the maximum value.

    1.0 for a clean two-valued mask (or a constant array), close to 1 for a mask with JPEG ringing along its
    edges, much lower for a greyscale crop. Used to tell a mask from a cropped ROI image by content.
    """
    if pixels.size == 0:
        return 1.0
    low, high = pixels.min(), pixels.max()
    if high == low:
        return 1.0
    band = tolerance * (float(high) - float(low))
    if pixels.dtype.kind in "ui":
        # integer bounds: the same pixels as the float comparison, without a float copy of the whole image
        near = (pixels <= int(np.floor(float(low) + band))) | (pixels >= int(np.ceil(float(high) - band)))
    else:
        values = pixels.astype(np.float32, copy=False)
        near = (values <= float(low) + band) | (values >= float(high) - band)
    return float(np.count_nonzero(near)) / pixels.size


def _distinct_values(pixels: np.ndarray) -> int:
    """Number of distinct values; a histogram for 8/16-bit integers (np.unique sorts the whole image)."""
    if pixels.dtype.kind == "u" and pixels.dtype.itemsize <= 2:
        counts = np.zeros(1 << (8 * pixels.dtype.itemsize), dtype=np.int64)
        flat = pixels.reshape(-1)
        for start in range(0, flat.size, 1 << 20):  # bincount widens to int64: bound the temporary
            chunk = np.bincount(flat[start:start + (1 << 20)], minlength=counts.size)
            counts += chunk
        return int(np.count_nonzero(counts))
    return int(np.unique(pixels).size)


def _band_bbox(band_mask: np.ndarray, row_offset: int) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(band_mask.any(axis=1))
    if rows.size == 0:
        return None
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(band_mask[r0:r1].any(axis=0))
    return r0 + row_offset, int(cols[0]), r1 + row_offset, int(cols[-1]) + 1


def mask_from_pixels(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 8) -> MaskRead:
    """Binarise stored mask values: foreground = above half the maximum (after MONOCHROME1 inversion).

    Parameters
    ----------
    pixels : np.ndarray, shape (rows, cols), the stored values (unsigned integers in CBIS-DDSM)
    photometric : the file's PhotometricInterpretation; MONOCHROME1 masks are inverted over the stored range
    bits_stored : bits per stored value (the range MONOCHROME1 is inverted over)

    The mask is clean (note ``""``) when every pixel is either the maximum or a background value at or below half
    of it, and that background is not negative.
    """
    if photometric.upper() == "MONOCHROME1":
        # MONOCHROME1: 0 is white; invert over the stored range, not the data range, so a uniform mask stays uniform
        pixels = (2 ** int(bits_stored) - 1) - pixels.astype(np.int64)
    if pixels.size == 0 or pixels.ndim != 2:
        return MaskRead(np.zeros(pixels.shape, dtype=bool), "empty mask")
    # Row extremes are two cheap contiguous reductions. Rows whose maximum is the background are background only,
    # so the comparisons and counts run over the band of rows that hold the lesion: a few percent of a full-size
    # mask, which np.zeros leaves as untouched zero pages elsewhere.
    row_max, row_min = pixels.max(axis=1), pixels.min(axis=1)
    top, background = row_max.max(), row_min.min()
    if top <= 0:
        return MaskRead(np.zeros(pixels.shape, dtype=bool), "empty mask")
    # For integers v > top/2 <=> v > top // 2: an integer comparison, 6x faster than against a float (NumPy would
    # convert every pixel to float64).
    cut = top // 2 if pixels.dtype.kind in "ui" else top / 2
    rows, cols = pixels.shape
    if top == background:  # uniform and positive: all foreground
        return MaskRead(np.ones(pixels.shape, dtype=bool), "", (0, 0, rows, cols))
    busy = np.flatnonzero(row_max != background)
    r0, r1 = int(busy[0]), int(busy[-1]) + 1
    band = pixels[r0:r1]
    mask = np.zeros(pixels.shape, dtype=bool) if background <= cut else np.ones(pixels.shape, dtype=bool)
    np.greater(band, cut, out=mask[r0:r1])
    bbox = _band_bbox(mask[r0:r1], r0) if background <= cut else (0, 0, rows, cols)
    # two-valued check by counting (O(n)); np.unique sorts and costs 4x the decode of a full-size mask
    clean = (0 <= background <= cut
             and np.count_nonzero(band == top) + np.count_nonzero(band == background) == band.size)
    if clean:
        return MaskRead(mask, "", bbox)
    return MaskRead(mask, f"thresholded non-binary mask at {float(top) / 2:g} (max={top}, "
                          f"{_distinct_values(pixels)} distinct values)", bbox)


def read_mask(path: str | Path, *, allow_raster: bool = False) -> MaskRead:
    """Read an ROI mask as a boolean array; values above half the maximum are foreground.

    Parameters
    ----------
    path : a DICOM file, or with ``allow_raster`` a JPEG/PNG (the Kaggle copy)
    allow_raster : read ``.jpg``/``.jpeg``/``.png`` through Pillow; otherwise they are ``not_dicom``

    Returns
    -------
    MaskRead
        ``mask``: bool (rows, cols). ``note``: ``""`` for a clean two-valued mask, ``"empty mask"`` when nothing
        is foreground, else the threshold applied to a non-binary mask. ``bbox``: the foreground's box.

    Raises
    ------
    DicomReadError
        The file and the reason it cannot be read.
    """
    stored = read_stored_pixels(path, allow_raster=allow_raster)
    return mask_from_pixels(stored.pixels, stored.photometric, stored.bits_stored)
