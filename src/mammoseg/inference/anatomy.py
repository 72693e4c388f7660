"""Where a mass can be: the breast region and, on MLO views, the pectoral muscle to leave out (beyond the paper).

On held-out real mammograms, paper-mode false positives sat on the pectoral muscle at the top of MLO views, on
the image's top edge and on background labels. :func:`apply_anatomy` zeroes the probability map
outside the breast (``infer.breast_mask``) and on the pectoral muscle (``infer.exclude_pectoral``, MLO only), so
that every later step (thresholding, candidates, FROC, SEG) sees the cleaned map. NumPy, SciPy and scikit-image
only: never imports TensorFlow.

Both masks are found on a *working image*: the mammogram block-averaged (``skimage.transform.downscale_local_mean``)
by an integer factor so that its longer side is at most :data:`WORK_SIDE` pixels. Mammograms cover about the same
physical field whatever their pixel size (a 1024-px MIAS film at 200 µm, a 5000-px CBIS-DDSM scan at 50 µm), so a
working pixel is about the same size in millimetres for every source (0.8-1 mm) and the constants below need no
pixel spacing. The masks are brought back to full resolution by repeating each working pixel (nearest neighbour).

Breast region (:func:`breast_mask`)
    On the lightly smoothed working image, Otsu's threshold splits background from tissue; the breast is everything
    brighter than :data:`BREAST_LEVEL` of the way from the background's median up to that threshold (Otsu's
    threshold itself cuts the fatty periphery of dense breasts away), opened with a small disk (labels, markers and
    film-edge bands that noise joins to the breast come loose), its largest 8-connected component, holes filled.
    No erosion away from the skin line: masses lie right against it (mias-dev), and the boundary already sits at
    the faint edge of the tissue.

Pectoral muscle (:func:`pectoral_mask`)
    On an MLO view the muscle is a bright, roughly triangular region in the top corner on the chest-wall side, with
    a fairly straight lower edge. With the chest wall turned to the left, every straight edge from the top row (at
    column ``a``) to the chest-wall column (at row ``b``) is scored by its *edge contrast*: per row above ``b``,
    the mean of the breast pixels in a band just inside the edge minus the mean in a band just outside it, summed
    and divided by ``b`` (rows without breast pixels on both sides add nothing), in units of the breast's 99th
    intensity percentile. The best edge is the muscle's when its contrast reaches :data:`PECTORAL_MIN_CONTRAST`, it
    is brighter inside on at least :data:`PECTORAL_MIN_CONSISTENCY` of its rows and the triangle holds at most
    :data:`PECTORAL_MAX_FRACTION` of the breast; otherwise the mask is empty. The mask is the triangle shrunk
    towards the corner by :data:`PECTORAL_MARGIN` of its legs: the muscle's real edge is curved, and masses in the
    axillary tail lie right against it, so the strip next to the fitted edge is kept.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mammoseg.inference.sliding import BreastSide

__all__ = [
    "WORK_SIDE",
    "BREAST_LEVEL",
    "BREAST_SMOOTHING",
    "BREAST_OPENING_RADIUS",
    "PECTORAL_MIN_CONTRAST",
    "PECTORAL_MIN_CONSISTENCY",
    "PECTORAL_MAX_FRACTION",
    "PECTORAL_MARGIN",
    "MLO_VIEWS",
    "working_image",
    "breast_mask",
    "chest_wall_side",
    "pectoral_mask",
    "apply_anatomy",
]

#: Longest side of the working image, pixels (0.8-1 mm per working pixel on a full-field mammogram).
WORK_SIDE = 256
#: The breast threshold's place between the background's median (0) and Otsu's threshold (1) of the working image.
#: Otsu's threshold itself (1) cuts the fatty periphery of dense breasts away; 0.1 joins labels to the breast.
BREAST_LEVEL = 0.15
#: Gaussian smoothing of the working image before the breast threshold, working pixels (noise must not join labels).
BREAST_SMOOTHING = 1.0
#: Radius of the opening that separates labels and film edges from the breast, working pixels.
BREAST_OPENING_RADIUS = 3
#: Least edge contrast of the pectoral muscle, as a fraction of the breast's 99th intensity percentile. Chosen on
#: the 38 mias-dev mass images (a development set, not a validation): the best edges of the 23 accepted images
#: score 0.084-0.22, those of the 15 rejected 0.024-0.072 (two of them, 0.065 and 0.069, faint muscles left in).
PECTORAL_MIN_CONTRAST = 0.08
#: Least fraction of the edge's rows (with breast pixels on both sides) that are brighter inside. A safeguard for
#: edges along tissue boundaries (0.54-0.68 on mias-dev, all of which the contrast already rejects); accepted
#: muscles: 0.78-0.92.
PECTORAL_MIN_CONSISTENCY = 0.75
#: Largest fraction of the breast region a pectoral triangle may hold.
PECTORAL_MAX_FRACTION = 0.35
#: Fraction of each leg of the fitted triangle given back to the breast (the strip along the fitted edge).
PECTORAL_MARGIN = 0.2
#: Shortest legs of a pectoral triangle, as fractions of the breast's height (along the chest wall) and width
#: (along the top): the muscle runs a long way down the chest wall; short corner triangles are the top edge's.
PECTORAL_MIN_HEIGHT = 1 / 3
PECTORAL_MIN_WIDTH = 1 / 8
#: Width of the bands on either side of a candidate edge, pixels of the pectoral search grid (~7 mm).
_BAND = 4
#: The pectoral search runs on the working image block-averaged once more by this factor (a 128-px grid).
_PECTORAL_COARSEN = 2
#: View positions that show the pectoral muscle (the manifest's ``view`` column, DICOM ViewPosition).
MLO_VIEWS = ("MLO",)


# --------------------------------------------------------------------------------------------------------------
# working resolution
# --------------------------------------------------------------------------------------------------------------
def working_image(image: np.ndarray, side: int = WORK_SIDE) -> tuple[np.ndarray, int]:
    """The image block-averaged so its longer side is at most ``side`` pixels.

    Parameters
    ----------
    image : (rows, cols), any real dtype, bright = dense
    side : longest side of the result, pixels

    Returns
    -------
    (float32 (ceil(rows / f), ceil(cols / f)), f) : the block means (blocks cut by the image edge are averaged
    with zeros, ``downscale_local_mean``'s padding) and the integer factor ``f = ceil(max(rows, cols) / side)``.
    """
    from skimage.transform import downscale_local_mean

    image = np.asarray(image)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {image.shape}")
    factor = max(1, math.ceil(max(image.shape) / side))
    small = downscale_local_mean(image.astype(np.float32, copy=False), (factor, factor))
    return small.astype(np.float32, copy=False), factor


def _full_resolution(mask: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """A working-resolution mask repeated ``factor`` times on both axes and cut to ``shape``: bool (rows, cols)."""
    return np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)[: shape[0], : shape[1]]


# --------------------------------------------------------------------------------------------------------------
# breast region
# --------------------------------------------------------------------------------------------------------------
def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a bool mask (all False when it has none)."""
    from skimage.measure import label

    labels = label(mask, connectivity=2)
    if labels.max() == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _breast_region(small: np.ndarray) -> np.ndarray:
    """The breast on a working image: bool, its shape; all True when the image is flat (nothing to tell apart)."""
    from scipy.ndimage import binary_fill_holes, binary_opening, gaussian_filter
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk

    if float(small.max()) <= float(small.min()):
        return np.ones(small.shape, dtype=bool)
    smooth = gaussian_filter(small, BREAST_SMOOTHING)
    otsu = float(threshold_otsu(smooth))
    background = float(np.median(smooth[smooth <= otsu]))
    tissue = smooth > background + BREAST_LEVEL * (otsu - background)
    # the opening cuts the thin bridges of noise that join labels and film edges to the breast at so low a level
    tissue = binary_opening(tissue, structure=disk(BREAST_OPENING_RADIUS))
    return binary_fill_holes(_largest_component(tissue))


def breast_mask(image: np.ndarray) -> np.ndarray:
    """The breast region of a mammogram (see the module docstring for the method).

    Parameters
    ----------
    image : (rows, cols), raw intensities, bright = dense (MONOCHROME2), any real dtype

    Returns
    -------
    bool (rows, cols): True on the breast; all True for a flat image.
    """
    small, factor = working_image(image)
    return _full_resolution(_breast_region(small), factor, np.shape(image))


def chest_wall_side(breast: np.ndarray) -> BreastSide:
    """The chest-wall side of a breast mask: the half of the image holding the mask's centroid column.

    Unlike :func:`mammoseg.inference.sliding.breast_side` (strip means) it is not misled by a bright film-edge band
    on the side away from the breast: the strip rule picks the wrong side on 4 of the 38 mias-dev mass images and
    8 of its 99 normal images, this rule on none (it equals the laterality on all 137).

    Parameters
    ----------
    breast : bool (rows, cols), non-empty

    Returns
    -------
    BreastSide; a centroid exactly in the middle gives LEFT.
    """
    cols = np.nonzero(np.asarray(breast, dtype=bool))[1]
    if cols.size == 0:
        raise ValueError("the breast mask is empty")
    return BreastSide.LEFT if float(cols.mean()) <= (breast.shape[1] - 1) / 2 else BreastSide.RIGHT


# --------------------------------------------------------------------------------------------------------------
# pectoral muscle
# --------------------------------------------------------------------------------------------------------------
def _row_prefix_sums(values: np.ndarray) -> np.ndarray:
    """Per row, the sums of the first 0..cols values: float64 (rows, cols + 1)."""
    prefix = np.zeros((values.shape[0], values.shape[1] + 1), dtype=np.float64)
    np.cumsum(values, axis=1, out=prefix[:, 1:])
    return prefix


def _edge_columns(a: np.ndarray, b: int, cols: int) -> np.ndarray:
    """Per candidate top intercept ``a`` (n,) and row r < b, the first column outside the triangle (0,0)-(0,a)-(b,0):
    int (n, b), ``ceil(a * (1 - r / b))`` clipped to [0, cols]."""
    rows = np.arange(b, dtype=np.float64)
    return np.clip(np.ceil(a[:, None] * (1.0 - rows[None, :] / b) - 1e-9), 0, cols).astype(np.int64)


def _best_edge(small: np.ndarray, breast: np.ndarray) -> dict[str, Any] | None:
    """The highest-contrast straight pectoral edge of an image (the search grid) whose chest wall is on the left.

    Parameters
    ----------
    small : float (rows, cols), the breast's bounding box on the search grid, chest wall at column 0
    breast : bool (rows, cols), the breast region on the same grid

    Returns
    -------
    dict ``a`` (top intercept, columns), ``b`` (chest-wall intercept, rows), ``contrast`` (fraction of the
    breast's 99th percentile), ``consistency`` (fraction of rows brighter inside), ``fraction`` (of the breast
    inside the triangle); None when no candidate has breast pixels on both sides of its edge on half its rows.
    """
    rows, cols = small.shape
    if not breast.any():
        return None
    scale = float(np.percentile(small[breast], 99)) or 1.0
    values = _row_prefix_sums(np.where(breast, small / scale, 0.0))
    counts = _row_prefix_sums(breast.astype(np.float64))
    breast_area = counts[:, -1].sum()
    a = np.arange(max(1, math.ceil(cols * PECTORAL_MIN_WIDTH)), cols, dtype=np.float64)
    best: dict[str, Any] | None = None
    for b in range(max(1, math.ceil(rows * PECTORAL_MIN_HEIGHT)), rows + 1):
        edge = _edge_columns(a, b, cols)  # (n_a, b)
        r = np.arange(b)[None, :]
        inner, outer = np.clip(edge - _BAND, 0, cols), np.clip(edge + _BAND, 0, cols)
        inside_n = counts[r, edge] - counts[r, inner]
        outside_n = counts[r, outer] - counts[r, edge]
        both = (inside_n > 0) & (outside_n > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            contrast = np.where(both, (values[r, edge] - values[r, inner]) / inside_n
                                - (values[r, outer] - values[r, edge]) / outside_n, 0.0)
        fraction = counts[r, edge].sum(axis=1) / breast_area
        score = contrast.sum(axis=1) / b
        valid = (both.sum(axis=1) * 2 >= b) & (fraction <= PECTORAL_MAX_FRACTION)
        if not valid.any():
            continue
        k = int(np.flatnonzero(valid)[np.argmax(score[valid])])
        if best is None or score[k] > best["contrast"]:
            best = {"a": float(a[k]), "b": b, "contrast": float(score[k]),
                    "consistency": float((contrast[k] > 0).sum() / both[k].sum()), "fraction": float(fraction[k])}
    return best


def _triangle(shape: tuple[int, int], a: float, b: float) -> np.ndarray:
    """bool ``shape``: the pixels (r, c) with ``c < a * (1 - r / b)``, the triangle (0,0)-(0,a)-(b,0)."""
    r, c = np.indices(shape, dtype=np.float64)
    return c < a * (1.0 - r / b)


def _pectoral_region(small: np.ndarray, region: np.ndarray, side: BreastSide) -> np.ndarray:
    """The pectoral muscle on a working image (bool, its shape) given its breast region and chest-wall side."""
    muscle = np.zeros(small.shape, dtype=bool)
    if not region.any():
        return muscle
    if side == BreastSide.RIGHT:  # turn the chest wall to the left
        small, region, muscle = small[:, ::-1], region[:, ::-1], muscle[:, ::-1]
    # the corner is the breast's own top chest-wall corner: film borders and a dark gap before the image edge
    # are cut off by the breast's bounding box
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    found = _best_edge(*_coarsen(small[box], region[box]))
    if (found is not None and found["contrast"] >= PECTORAL_MIN_CONTRAST
            and found["consistency"] >= PECTORAL_MIN_CONSISTENCY):
        keep = 1.0 - PECTORAL_MARGIN
        muscle[box] = _triangle(region[box].shape, found["a"] * _PECTORAL_COARSEN * keep,
                                found["b"] * _PECTORAL_COARSEN * keep) & region[box]
    return muscle[:, ::-1] if side == BreastSide.RIGHT else muscle


def _coarsen(small: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The working image and its breast mask block-averaged by :data:`_PECTORAL_COARSEN` (mask: majority)."""
    from skimage.transform import downscale_local_mean

    f = (_PECTORAL_COARSEN, _PECTORAL_COARSEN)
    return downscale_local_mean(small, f), downscale_local_mean(region.astype(np.float32), f) >= 0.5


def _as_side(side: BreastSide | str) -> BreastSide:
    return BreastSide(str(getattr(side, "value", side)).upper())


def pectoral_mask(image: np.ndarray, side: BreastSide | str) -> np.ndarray:
    """The pectoral muscle of an MLO view, or an empty mask when no muscle edge is found (module docstring).

    Parameters
    ----------
    image : (rows, cols), raw intensities, bright = dense, any real dtype
    side : the chest-wall side, ``BreastSide`` or ``"LEFT"``/``"RIGHT"`` (:func:`chest_wall_side`); the muscle is
        looked for in the top corner on that side

    Returns
    -------
    bool (rows, cols): True on the muscle; never outside :func:`breast_mask`, and about
    ``(1 - PECTORAL_MARGIN)**2 * PECTORAL_MAX_FRACTION`` of it at most (the shrunk triangle of a fit holding at
    most :data:`PECTORAL_MAX_FRACTION`).
    """
    small, factor = working_image(image)
    return _full_resolution(_pectoral_region(small, _breast_region(small), _as_side(side)), factor, np.shape(image))


# --------------------------------------------------------------------------------------------------------------
# the probability map
# --------------------------------------------------------------------------------------------------------------
def apply_anatomy(prob_u8: np.ndarray, image: np.ndarray, side: BreastSide | str | None, view: str, *,
                  breast_mask: bool, exclude_pectoral: bool) -> np.ndarray:  # fmt: skip
    """The probability map with zeros outside the breast and, on MLO views, on the pectoral muscle.

    Parameters
    ----------
    prob_u8 : uint8 (rows, cols), ``round(p * 255)``
    image : (rows, cols), the mammogram it was predicted from, raw intensities, bright = dense
    side : the chest-wall side for the pectoral search; None = :func:`chest_wall_side` of the breast mask (the
        robust choice: see its docstring)
    view : the view position (manifest column ``view``, DICOM ViewPosition), e.g. ``"MLO"`` or ``"CC"``; the
        muscle is only looked for on :data:`MLO_VIEWS` (case-insensitive); an unknown view leaves it in
    breast_mask : ``infer.breast_mask``: zero every pixel outside :func:`breast_mask`
    exclude_pectoral : ``infer.exclude_pectoral``: zero the :func:`pectoral_mask` of an MLO view

    Returns
    -------
    uint8 (rows, cols): a new array; ``prob_u8`` itself when neither option is on.
    """
    if prob_u8.dtype != np.uint8 or prob_u8.ndim != 2:
        raise TypeError(f"expected a 2-D uint8 probability map, got {prob_u8.dtype} {prob_u8.shape}")
    if np.shape(image) != prob_u8.shape:
        raise ValueError(f"image shape {np.shape(image)} differs from the probability map {prob_u8.shape}")
    pectoral = exclude_pectoral and str(view).strip().upper() in MLO_VIEWS
    if not (breast_mask or pectoral):
        return prob_u8
    small, factor = working_image(image)
    region = _breast_region(small)
    keep = region.copy() if breast_mask else np.ones(small.shape, dtype=bool)
    if pectoral:
        wall = chest_wall_side(region) if side is None else _as_side(side)
        keep &= ~_pectoral_region(small, region, wall)
    return np.where(_full_resolution(keep, factor, prob_u8.shape), prob_u8, np.uint8(0))
