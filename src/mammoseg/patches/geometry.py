"""Patch geometry and the pre-processing shared by extraction and inference.

Everything here is NumPy only. Training patches (:mod:`mammoseg.patches.shards`) and inference windows
(:mod:`mammoseg.inference.sliding`) both go through :func:`preprocess_window`, so the network sees the same kind of
input in both stages: a block mean, then either each window min-max normalised on its own (the paper) or every
window of a mammogram mapped through that mammogram's intensity range (``patches.normalise: image``,
:func:`intensity_range_for`).

Patch geometry (Marita et al.; all coordinates are full-resolution pixels, rows first)
-------------------------------------------------------------------------------------
* The lesion's bounding box is ``(r0, c0, r1, c1)`` with ``r1``/``c1`` exclusive, as in NumPy slicing.
* Its centre is ``((r0 + r1) // 2, (c0 + c1) // 2)``: the pixel edge nearest the middle of the box, so a window
  of even side ``S`` starting at ``centre - S // 2`` has the box exactly in its middle (to within half a pixel).
* The centred window of side ``S = 2**n`` starts at ``centre - S // 2`` on each axis. **At a border** the window
  is moved (not shrunk, not padded) just far enough to lie inside the image: the start is clipped to
  ``[0, rows - S]`` (``[0, cols - S]`` for columns). The lesion then sits off-centre, nearer the border, and is
  still fully inside the window whenever its box is no larger than ``S``.
* **When S exceeds the image** in either dimension (``S > rows`` or ``S > cols``) no window can be placed; the
  paper processes a mask only when the patch is smaller than the image, so :func:`place_window` raises
  :class:`PatchLargerThanImage` and extraction records the ROI as skipped with reason
  ``patch_larger_than_image``. ``S == rows`` is allowed (the window is the whole image height).
* **Shifted copies**: each of the K extra crops draws an integer offset uniformly from
  ``[-floor(max_shift * S), +floor(max_shift * S)]`` independently on each axis, adds it to the lesion centre and
  places the window as above (so it is moved back inside the image when the shift pushes it out). The recorded
  shift is the drawn offset; the actual crop origin is recorded separately.
* The random generator of a ROI depends only on ``(seed, roi_id)`` (:func:`roi_rng`), so which shard a ROI lands
  in, and in which order ROIs are processed, never changes its patches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

__all__ = [
    "downscale_image",
    "downscale_mask",
    "downscale_mask_window",
    "IMAGE_RANGE_PERCENTILES",
    "NORMALISE_MODES",
    "image_intensity_range",
    "intensity_range_for",
    "normalise_patch",
    "preprocess_window",
    "PatchLargerThanImage",
    "Crop",
    "mask_bbox",
    "bbox_centre",
    "place_window",
    "roi_rng",
    "shift_offsets",
    "plan_crops",
    "plan_negative_windows",
    "crop",
]


def _check_divisible(shape: tuple[int, ...], factor: int) -> None:
    if factor < 1:
        raise ValueError(f"downscale factor must be >= 1, got {factor}")
    if shape[0] % factor or shape[1] % factor:
        raise ValueError(f"window of shape {shape} is not divisible by the downscale factor {factor}")


def _block_sum(array: np.ndarray, factor: int, dtype) -> np.ndarray:
    """Sum over non-overlapping ``factor x factor`` blocks, accumulated in ``dtype``.

    Strided slice additions instead of ``reshape(...).mean(axis=(1, 3))`` (NumPy reduces over inner strided axes
    slowly), rows first: every ``factor``-th row is a contiguous run, so the window is read once, sequentially,
    and the column step works on an array ``factor`` times smaller. 2.5x faster than columns first and 15x faster
    than the reshape on 1024x1024 windows. For integer-valued pixels the float32 sums are exact while
    ``factor**2 * max < 2**24`` (e.g. 16 x 65535), so the summation order does not change the result.
    """
    array = np.asarray(array)
    rows = array[0::factor].astype(dtype)  # a fresh array: the accumulator
    for k in range(1, factor):
        rows += array[k::factor]
    out = rows[:, 0::factor].copy()
    for k in range(1, factor):
        out += rows[:, k::factor]
    return out


def downscale_image(window: np.ndarray, factor: int) -> np.ndarray:
    """Downscale by an integer factor with a block mean (area anti-aliasing).

    Parameters
    ----------
    window : np.ndarray, shape (H, W), any real dtype; H and W divisible by ``factor``
    factor : int, scale factor (paper: 4)

    Returns
    -------
    np.ndarray of float32, shape (H // factor, W // factor)
        Mean of each ``factor x factor`` block (sum accumulated in float32, divided by ``factor**2``).
    """
    _check_divisible(window.shape, factor)
    sums = _block_sum(window, factor, np.float32)
    sums /= np.float32(factor * factor)
    return sums


def downscale_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Downscale a binary mask by majority vote, so it stays binary.

    Parameters
    ----------
    mask : np.ndarray, shape (H, W), bool or 0/1 integers; H and W divisible by ``factor``
    factor : int, scale factor

    Returns
    -------
    np.ndarray of uint8, shape (H // factor, W // factor), values in {0, 1}
        1 where at least half of the ``factor x factor`` block is foreground (ties count as foreground).
    """
    _check_divisible(mask.shape, factor)
    # exact integer counts; uint8 holds them while factor**2 <= 255 and is the fastest to accumulate
    mask = np.asarray(mask)
    # a bool array is read as its 0/1 bytes without a copy; anything else is compared with 0 first
    ones = mask.view(np.uint8) if mask.dtype == np.bool_ else mask != 0
    counts = _block_sum(ones, factor, np.uint8 if factor * factor <= 255 else np.int64)
    # count / factor**2 >= 0.5  <=>  count >= ceil(factor**2 / 2)
    return (counts >= (factor * factor + 1) // 2).astype(np.uint8)


def downscale_mask_window(mask: np.ndarray, row: int, col: int, size: int, factor: int,
                          bbox: tuple[int, int, int, int]) -> np.ndarray:  # fmt: skip
    """``downscale_mask(crop(mask, row, col, size), factor)`` for a mask with no foreground outside ``bbox``.

    Only the blocks that meet the box are counted; the rest of the patch is background by definition. On a
    full-size mask the 2**n window is mostly background, so this costs the lesion's area, not the window's.

    Parameters
    ----------
    mask : bool (rows, cols), foreground only inside ``bbox``
    row, col, size : the window (top-left corner and side, full-resolution pixels), inside the mask
    factor : scale factor; divides ``size``
    bbox : (r0, c0, r1, c1) half-open box holding every foreground pixel (:func:`mask_bbox`)

    Returns
    -------
    np.ndarray of uint8, shape (size // factor, size // factor), values in {0, 1}
    """
    _check_divisible((size, size), factor)
    out = np.zeros((size // factor, size // factor), dtype=np.uint8)
    window = crop(mask, row, col, size)  # checks that the window lies inside
    # the box in window pixels, widened to whole blocks
    top, bottom = max(bbox[0] - row, 0) // factor, -(-min(bbox[2] - row, size) // factor)
    left, right = max(bbox[1] - col, 0) // factor, -(-min(bbox[3] - col, size) // factor)
    if top < bottom and left < right:
        out[top:bottom, left:right] = downscale_mask(
            window[top * factor : bottom * factor, left * factor : right * factor], factor)
    return out


#: The percentiles of a mammogram's pixels that ``patches.normalise: image`` maps to 0 and 1. The low one lies in
#: the background (a mammogram is a third to a half background), the high one in the densest tissue; film labels
#: and markers above it are clipped, as is anything brighter than 99.5 % of the image.
IMAGE_RANGE_PERCENTILES = (0.5, 99.5)

#: The ``patches.normalise`` modes: ``window`` = each window min-max on its own (the paper), ``image`` = one
#: intensity range per mammogram (:func:`image_intensity_range`) for every window of it.
NORMALISE_MODES = ("window", "image")


def image_intensity_range(image: np.ndarray) -> tuple[float, float]:
    """The intensity range that ``patches.normalise: image`` maps to [0, 1] for every window of one mammogram.

    Parameters
    ----------
    image : np.ndarray, shape (rows, cols), any real dtype: the full-resolution stored pixel values

    Returns
    -------
    (low, high) : floats in the image's units, the :data:`IMAGE_RANGE_PERCENTILES` of every 4th pixel in each
        direction (1/16 of the pixels: the percentiles of a 4.5k x 2.8k mammogram in 27 ms instead of 0.24 s);
        ``high == low`` for a flat image.
    """
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {image.shape}")
    low, high = np.percentile(np.asarray(image[::4, ::4], dtype=np.float32), IMAGE_RANGE_PERCENTILES)
    return float(low), float(high)


def normalise_patch(patch: np.ndarray, intensity_range: tuple[float, float] | None = None) -> np.ndarray:
    """Normalise one patch to [0, 1] (float32).

    ``intensity_range`` None: min-max of the patch itself (the paper); a flat patch becomes all zeros.
    ``(low, high)``: ``(patch - low) / (high - low)`` clipped to [0, 1] (``patches.normalise: image``), so a
    window keeps its brightness relative to the rest of its mammogram; ``high <= low`` gives all zeros.
    """
    patch = np.asarray(patch, dtype=np.float32)
    if intensity_range is None:
        low, high = float(patch.min()), float(patch.max())
    else:
        low, high = (float(v) for v in intensity_range)
    if high <= low:
        return np.zeros_like(patch, dtype=np.float32)
    out = (patch - np.float32(low)) / np.float32(high - low)
    return out if intensity_range is None else np.clip(out, 0.0, 1.0, out=out)


def preprocess_window(window: np.ndarray, factor: int,
                      intensity_range: tuple[float, float] | None = None) -> np.ndarray:
    """What the network sees: downscale by ``factor``, then normalise to [0, 1] (float32) by
    :func:`normalise_patch` (min-max of the window, or the mammogram's ``intensity_range``)."""
    return normalise_patch(downscale_image(window, factor), intensity_range)


def intensity_range_for(image: np.ndarray, normalise: str) -> tuple[float, float] | None:
    """The ``intensity_range`` argument of :func:`preprocess_window` for every window of ``image`` under a
    ``patches.normalise`` mode: None for ``window``, :func:`image_intensity_range` for ``image``."""
    if normalise == "window":
        return None
    if normalise == "image":
        return image_intensity_range(image)
    raise ValueError(f"unknown normalisation {normalise!r}; expected one of {NORMALISE_MODES}")


# --------------------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------------------


class PatchLargerThanImage(ValueError):
    """The 2**n window does not fit in the image in at least one dimension (skip reason ``patch_larger_than_image``)."""


@dataclass(frozen=True)
class Crop:
    """One planned crop of a ROI, in full-resolution pixels.

    Attributes
    ----------
    copy_index : int
        0 for the centred crop, 1..K for the shifted copies.
    row, col : int
        Top-left corner of the window in the full image (pixels).
    size : int
        Window side ``2**n`` (pixels).
    shift_row, shift_col : int
        Offset drawn for the centre (pixels); 0 for the centred crop. The window was then moved inside the image,
        so ``row``/``col`` can differ from ``centre + shift - size // 2``.
    """

    copy_index: int
    row: int
    col: int
    size: int
    shift_row: int = 0
    shift_col: int = 0


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box of the foreground of a mask.

    Parameters
    ----------
    mask : np.ndarray, shape (rows, cols); nonzero = lesion

    Returns
    -------
    (r0, c0, r1, c1) : tuple of int, pixels; ``r1`` and ``c1`` exclusive, so ``mask[r0:r1, c0:c1]`` holds every
        foreground pixel.

    Raises
    ------
    ValueError
        If the mask is not 2-D or has no foreground pixel.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        raise ValueError("mask has no foreground pixel")
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    # columns only over the lesion's rows: on a full-size mask the column pass is the slow (strided) one
    cols = np.flatnonzero(mask[r0:r1].any(axis=0))
    return r0, int(cols[0]), r1, int(cols[-1]) + 1


def bbox_centre(bbox: tuple[int, int, int, int]) -> tuple[int, int]:
    """Centre ``((r0 + r1) // 2, (c0 + c1) // 2)`` of a half-open box (pixel-edge coordinates, rows first)."""
    r0, c0, r1, c1 = bbox
    return (r0 + r1) // 2, (c0 + c1) // 2


def place_window(centre_rc: tuple[int, int], size: int, image_shape: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a ``size x size`` window centred on ``centre_rc`` and moved to lie inside the image.

    Parameters
    ----------
    centre_rc : (row, col), pixels; may lie outside the image (a shifted centre)
    size : int, window side in pixels (``2**n``)
    image_shape : (rows, cols) of the full image, pixels

    Returns
    -------
    (r0, c0) : tuple of int with ``0 <= r0 <= rows - size`` and ``0 <= c0 <= cols - size``.

    Raises
    ------
    PatchLargerThanImage
        If ``size > rows`` or ``size > cols`` (no window fits; the paper skips such masks).
    """
    rows, cols = int(image_shape[0]), int(image_shape[1])
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    if size > rows or size > cols:
        raise PatchLargerThanImage(f"patch of {size}x{size} pixels is larger than the image ({rows}x{cols})")
    half = size // 2
    r0 = min(max(int(centre_rc[0]) - half, 0), rows - size)
    c0 = min(max(int(centre_rc[1]) - half, 0), cols - size)
    return r0, c0


def roi_rng(seed: int, roi_id: str) -> np.random.Generator:
    """A NumPy generator that depends only on ``(seed, roi_id)`` (sha256 of both; stable across runs and platforms)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{roi_id}".encode("utf-8")).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def shift_offsets(rng: np.random.Generator, count: int, size: int, max_shift: float) -> np.ndarray:
    """Draw ``count`` centre offsets, uniform integers in ``[-floor(max_shift * size), +floor(max_shift * size)]``.

    Returns
    -------
    np.ndarray of int64, shape (count, 2): (row, col) offsets in pixels.
    """
    if not 0 <= max_shift:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    limit = int(np.floor(max_shift * size))
    return rng.integers(-limit, limit, size=(count, 2), endpoint=True, dtype=np.int64)


def plan_crops(
    bbox: tuple[int, int, int, int],
    image_shape: tuple[int, int],
    size: int,
    n_shifted: int,
    max_shift: float,
    rng: np.random.Generator,
) -> list[Crop]:
    """The centred crop and ``n_shifted`` shifted crops of one ROI.

    Parameters
    ----------
    bbox : lesion box (r0, c0, r1, c1), pixels, half-open (see :func:`mask_bbox`)
    image_shape : (rows, cols), pixels
    size : window side ``2**n``, pixels
    n_shifted : number of shifted copies K (paper: 4)
    max_shift : largest centre shift as a fraction of ``size`` (per axis)
    rng : generator of this ROI (:func:`roi_rng`)

    Returns
    -------
    list of Crop, length ``1 + n_shifted``; element 0 is the centred crop.

    Raises
    ------
    PatchLargerThanImage
        If the window does not fit into the image.
    """
    centre = bbox_centre(bbox)
    r0, c0 = place_window(centre, size, image_shape)
    crops = [Crop(0, r0, c0, size)]
    for k, (dr, dc) in enumerate(shift_offsets(rng, n_shifted, size, max_shift), start=1):
        r, c = place_window((centre[0] + int(dr), centre[1] + int(dc)), size, image_shape)
        crops.append(Crop(k, r, c, size, int(dr), int(dc)))
    return crops


def crop(array: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    """The ``size x size`` view of ``array`` whose top-left corner is (row, col); the window must lie inside."""
    if row < 0 or col < 0 or row + size > array.shape[0] or col + size > array.shape[1]:
        raise ValueError(f"window ({row}, {col}) + {size} does not lie inside an array of shape {array.shape}")
    return array[row : row + size, col : col + size]


def plan_negative_windows(
    lesions: np.ndarray,
    image: np.ndarray,
    size: int,
    count: int,
    min_mean: float,
    rng: np.random.Generator,
    max_tries: int = 200,
) -> list[tuple[int, int]]:
    """Top-left corners of up to ``count`` lesion-free windows that inference would not skip as dark.

    Beyond the paper (``patches.n_negative``, default 0): the paper trains only on windows around lesions, so its
    network never sees the lesion-free tissue that fills most inference windows, one source of its 3.65 false
    positives per image. A window qualifies when it holds no lesion pixel and its mean is at least ``min_mean``
    times the image maximum (the rule :mod:`mammoseg.inference.sliding` uses to skip dark windows).

    Parameters
    ----------
    lesions : bool (rows, cols), union of the image's ROI masks
    image : (rows, cols) intensities
    size : window side in pixels; must fit the image
    count : wanted windows; fewer are returned when ``max_tries`` random draws do not find them
    min_mean : fraction of the image maximum
    rng : generator (seed it from the image id for determinism)

    Returns
    -------
    list of (row, col) in full-image pixels, in draw order.
    """
    rows, cols = image.shape
    if count <= 0 or size > rows or size > cols:
        return []
    # Each candidate is checked on its own pixels (a lesion test, then an exact sum), not through summed-area
    # tables: those cost two float64/int64 copies of the full image (~400 MB at 4.5k x 2.8k) for a handful of
    # windows. Sums of integer intensities are exact in float64, so the choice is the same either way.
    floor = min_mean * float(image.max()) * size * size
    chosen: list[tuple[int, int]] = []
    for _ in range(max_tries):
        r, c = int(rng.integers(0, rows - size + 1)), int(rng.integers(0, cols - size + 1))
        if lesions[r : r + size, c : c + size].any():
            continue
        if float(image[r : r + size, c : c + size].sum(dtype=np.float64)) >= floor:
            chosen.append((r, c))
            if len(chosen) == count:
                break
    return chosen
