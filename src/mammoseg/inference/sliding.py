"""Sliding-window inference on one full mammogram: the paper's mode and a blended mode.

NumPy only: the network comes in as a batch predictor (a callable, see :data:`Predictor`), built from one or
several Keras models by :mod:`mammoseg.inference.predict`, which also holds the stage that predicts chunks of
images.

Paper mode (Marita et al.)
    1. The breast side is the side whose strip (``strip_fraction`` of the width) has the larger mean.
    2. The image is cropped to a whole number of ``2**n`` windows: in width the crop starts at the breast side
       (the remainder is dropped on the side away from the breast, where there is only background); in height
       the remainder ``r`` is split with ``r // 2`` rows dropped at the top and ``r - r // 2`` at the bottom.
    3. Non-overlapping windows; a window is skipped when its mean raw intensity is below
       ``min_mean × image max`` (background) or when its max equals its min (flat: the paper's per-window
       min-max normalisation is undefined; skipped under ``patches.normalise: image`` too, so both modes predict
       the same windows).
    4. Kept windows go through :func:`mammoseg.patches.geometry.preprocess_window` (block mean by ``downscale`` then
       min-max, or the image's ``intensity_range`` under ``patches.normalise: image``), are predicted in batches
       by one compiled ``tf.function``, and the probabilities are brought back to full resolution with
       ``np.repeat`` by ``downscale`` (the inverse footprint of the block mean).
    5. The saved probability map holds these per-window probabilities (0 in skipped windows and in the cropped
       margins), so thresholds can be swept later without the model. The paper's binary mask, each window's
       prediction binarised and OR-combined, equals the map binarised at the threshold because windows do not
       overlap; binarising is evaluation's job (:func:`mammoseg.evaluation.metrics.binarise`).

    Images smaller than one window in a dimension are padded (fallback, recorded in the metadata as ``padded``)
    with the image minimum, at the bottom and on the side away from the breast, to exactly one window; the
    padding is removed from the output, so every output has the input's shape.

Blended mode (beyond the paper; as nnU-Net/MONAI)
    Overlapping windows over the whole image with stride ``stride_fraction × window``; the last row/column of
    windows is shifted back to end at the image edge (so no artificial padding is shown to the network, unless
    the image is smaller than one window, then it is padded as above). Each window's probabilities are weighted
    by a Gaussian importance map (sigma = window / 8, peak 1, floored at its smallest non-zero value) and the map
    is ``Σ w·p / Σ w``. Or (``blend="max"``) each pixel takes the highest probability of the windows that cover
    it: the overlapping form of the paper's OR of window predictions, which keeps a lesion that only some window
    positions find (on real tissue an out-of-fold model's answer on a mass can change from 0.99 to 0.01 when the
    window moves by 1/8 of its side, and the weighted mean takes the centred window's answer). Windows failing the
    paper's skip rules are not predicted and do not vote; pixels covered only by skipped windows get probability 0.
    Optional TTA averages each window with its horizontally flipped prediction (before blending).

Probability maps are returned as uint8, ``round(p × 255)``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from mammoseg.patches.geometry import preprocess_window

__all__ = [
    "BreastSide",
    "CropBox",
    "Prediction",
    "Predictor",
    "breast_side",
    "paper_crop_box",
    "paper_windows",
    "blended_starts",
    "gaussian_importance",
    "quantise",
    "predict_paper",
    "predict_blended",
]

#: A batch predictor: float32 (B, s, s) in [0, 1] → float32 probabilities (B, s, s).
Predictor = Callable[[np.ndarray], np.ndarray]


class BreastSide(str, enum.Enum):
    """Which side of the image holds the breast (the chest wall)."""

    LEFT = "LEFT"
    RIGHT = "RIGHT"


@dataclass(frozen=True)
class CropBox:
    """Half-open pixel ranges ``[top, bottom) × [left, right)`` of the region tiled by windows."""

    top: int
    bottom: int
    left: int
    right: int

    def as_dict(self) -> dict[str, int]:
        return {"top": self.top, "bottom": self.bottom, "left": self.left, "right": self.right}


@dataclass
class Prediction:
    """Result of inference on one image.

    Attributes
    ----------
    prob : np.ndarray of uint8, shape (rows, cols): probability × 255, rounded
    meta : dict, JSON-serialisable: mode, side, crop box, windows predicted/skipped, …
    """

    prob: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# geometry (NumPy only)
# --------------------------------------------------------------------------------------------------------------
def breast_side(image: np.ndarray, strip_fraction: float = 0.1) -> BreastSide:
    """The side holding the breast: the one whose vertical strip has the larger mean intensity.

    Parameters
    ----------
    image : np.ndarray, shape (rows, cols), bright = dense
    strip_fraction : float in (0, 0.5], strip width as a fraction of the image width (at least 1 pixel)

    Returns
    -------
    BreastSide; ties go to LEFT.
    """
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {image.shape}")
    if not 0 < strip_fraction <= 0.5:
        raise ValueError(f"strip_fraction must be in (0, 0.5], got {strip_fraction}")
    width = max(1, int(round(image.shape[1] * strip_fraction)))
    left = float(np.mean(image[:, :width], dtype=np.float64))
    right = float(np.mean(image[:, -width:], dtype=np.float64))
    return BreastSide.LEFT if left >= right else BreastSide.RIGHT


def paper_crop_box(shape: tuple[int, int], window: int, side: BreastSide) -> CropBox:
    """The paper's crop: a whole number of windows, anchored at the breast side, vertical remainder split.

    Parameters
    ----------
    shape : (rows, cols) of the image, each >= ``window``
    window : window side in full-resolution pixels (2**n)
    side : breast side; the horizontal remainder is dropped on the other side

    Returns
    -------
    CropBox; the ``r = rows % window`` spare rows are split ``r // 2`` at the top, ``r - r // 2`` at the bottom.
    """
    rows, cols = shape
    if rows < window or cols < window:
        raise ValueError(f"image of shape {shape} is smaller than one {window}×{window} window")
    width = (cols // window) * window
    height = (rows // window) * window
    top = (rows - height) // 2
    left = 0 if side == BreastSide.LEFT else cols - width
    return CropBox(top=top, bottom=top + height, left=left, right=left + width)


def paper_windows(box: CropBox, window: int) -> list[tuple[int, int]]:
    """Top-left corners (row, col) of the non-overlapping windows tiling ``box``, row-major."""
    return [(r, c) for r in range(box.top, box.bottom, window) for c in range(box.left, box.right, window)]


def blended_starts(length: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``stride`` pixels, the last one shifted to end at the edge.

    ``length`` must be >= ``window`` (pad first otherwise).
    """
    if length < window:
        raise ValueError(f"length {length} is smaller than the window {window}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


#: How blended mode combines overlapping windows (``infer.blend``).
BLENDS = ("gaussian", "max")


def gaussian_importance(size: int, sigma_fraction: float = 1 / 8) -> np.ndarray:
    """nnU-Net's importance map: a 2-D Gaussian (sigma = size × sigma_fraction), peak 1, float32 (size, size).

    Values are floored at the smallest positive value so that no pixel has zero weight.
    """
    centre = (size - 1) / 2.0
    sigma = size * sigma_fraction
    axis = np.exp(-((np.arange(size) - centre) ** 2) / (2 * sigma**2))
    weights = np.outer(axis, axis)
    weights /= weights.max()
    positive = weights[weights > 0]
    weights = np.maximum(weights, positive.min())
    return weights.astype(np.float32)


def quantise(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] → uint8 ``round(p × 255)`` (values outside [0, 1] are clipped)."""
    return np.rint(np.clip(np.asarray(prob, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _pad_to_window(image: np.ndarray, window: int, side: BreastSide) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Pad an image smaller than one window (bottom; side away from the breast) with its minimum.

    Returns the padded image and ``(top, bottom, left, right)`` pad widths.
    """
    rows, cols = image.shape
    pad_rows = max(0, window - rows)
    pad_cols = max(0, window - cols)
    if not pad_rows and not pad_cols:
        return image, (0, 0, 0, 0)
    left, right = (0, pad_cols) if side == BreastSide.LEFT else (pad_cols, 0)
    pads = (0, pad_rows, left, right)
    padded = np.pad(image, ((0, pad_rows), (left, right)), mode="constant", constant_values=float(image.min()))
    return padded, pads


def _unpad(array: np.ndarray, pads: tuple[int, int, int, int]) -> np.ndarray:
    top, bottom, left, right = pads
    return array[top : array.shape[0] - bottom, left : array.shape[1] - right]


def _skip_reason(window: np.ndarray, min_level: float) -> str:
    """'' to keep the window, 'dark' below the mean threshold, 'flat' when max equals min (raw intensities)."""
    if float(window.mean(dtype=np.float64)) < min_level:
        return "dark"
    if float(window.max()) == float(window.min()):
        return "flat"
    return ""


def _check_geometry(window: int, downscale: int) -> int:
    if window < 1 or downscale < 1 or window % downscale:
        raise ValueError(f"window {window} must be a positive multiple of the downscale factor {downscale}")
    return window // downscale


def _batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _predict_windows(
    image: np.ndarray, corners: list[tuple[int, int]], window: int, downscale: int, predictor: Predictor,
    batch_size: int, intensity_range: tuple[float, float] | None, tta: bool = False,
) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """Yield ((row, col), float32 probabilities at model resolution (s, s)) per window, predicted in batches."""
    for chunk in _batched(corners, batch_size):
        batch = np.stack([preprocess_window(image[r : r + window, c : c + window], downscale, intensity_range)
                          for r, c in chunk])
        probs = np.asarray(predictor(batch), dtype=np.float32).reshape(batch.shape)
        if tta:
            flipped = np.asarray(predictor(np.ascontiguousarray(batch[:, :, ::-1])), dtype=np.float32)
            probs = 0.5 * (probs + flipped.reshape(batch.shape)[:, :, ::-1])
        yield from zip(chunk, probs)


def _upsample(prob: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upsampling by an integer factor: each model pixel covers its factor×factor block."""
    if factor == 1:
        return prob
    return np.repeat(np.repeat(prob, factor, axis=0), factor, axis=1)


def predict_paper(
    image: np.ndarray,
    predictor: Predictor,
    window: int,
    downscale: int,
    strip_fraction: float = 0.1,
    min_mean: float = 0.1,
    batch_size: int = 16,
    intensity_range: tuple[float, float] | None = None,
) -> Prediction:
    """The paper's inference: crop, non-overlapping windows, skip rules, batch prediction, reassembly.

    Parameters
    ----------
    image : np.ndarray, shape (rows, cols), raw intensities (bright = dense), as from ``read_mammogram``
    predictor : batch predictor float32 (B, s, s) → (B, s, s), s = window // downscale
    window : window side in full-resolution pixels (2**n)
    downscale : integer factor (block mean), as in training
    strip_fraction, min_mean, batch_size : see the module docstring and the ``infer`` config
    intensity_range : None = each window min-max normalised (the paper); (low, high) = every window mapped
        through the image's range, as its training patches were (``patches.normalise: image``,
        :func:`mammoseg.patches.geometry.intensity_range_for`)

    Returns
    -------
    Prediction with uint8 probabilities of the input's shape.
    """
    _check_geometry(window, downscale)
    image = np.asarray(image, dtype=np.float32)
    side = breast_side(image, strip_fraction)
    work, pads = _pad_to_window(image, window, side)
    box = paper_crop_box(work.shape, window, side)
    min_level = min_mean * float(image.max())
    corners, skipped = [], {"dark": 0, "flat": 0}
    for r, c in paper_windows(box, window):
        reason = _skip_reason(work[r : r + window, c : c + window], min_level)
        if reason:
            skipped[reason] += 1
        else:
            corners.append((r, c))
    prob = np.zeros(work.shape, dtype=np.uint8)  # cropped margins and skipped windows stay 0 (background)
    for (r, c), p in _predict_windows(work, corners, window, downscale, predictor, batch_size, intensity_range):
        prob[r : r + window, c : c + window] = _upsample(quantise(p), downscale)
    prob = _unpad(prob, pads)
    meta = {
        "mode": "paper", "side": side.value, "crop_box": box.as_dict(), "padded": list(pads),
        "window": window, "downscale": downscale, "windows_total": len(corners) + sum(skipped.values()),
        "windows_predicted": len(corners), "windows_skipped_dark": skipped["dark"],
        "windows_skipped_flat": skipped["flat"], "min_mean": min_mean,
        "strip_fraction": strip_fraction, "shape": list(image.shape),
        "intensity_range": None if intensity_range is None else [float(v) for v in intensity_range],
    }
    return Prediction(prob=prob, meta=meta)


def predict_blended(
    image: np.ndarray,
    predictor: Predictor,
    window: int,
    downscale: int,
    stride_fraction: float = 0.5,
    tta: bool = False,
    strip_fraction: float = 0.1,
    min_mean: float = 0.1,
    batch_size: int = 16,
    intensity_range: tuple[float, float] | None = None,
    blend: str = "gaussian",
) -> Prediction:
    """Overlapping windows with Gaussian-weighted blending, or their pixel-wise maximum (see the module docstring).

    Parameters are those of :func:`predict_paper` plus ``stride_fraction`` (stride = round(fraction × window),
    rounded to a multiple of ``downscale``, at least ``downscale``), ``tta`` (horizontal-flip averaging) and
    ``blend`` (``"gaussian"``: Σ w·p / Σ w; ``"max"``: the highest probability of the covering windows).
    """
    if blend not in BLENDS:
        raise ValueError(f"unknown blend {blend!r}; allowed: {', '.join(BLENDS)}")
    s = _check_geometry(window, downscale)
    image = np.asarray(image, dtype=np.float32)
    side = breast_side(image, strip_fraction)
    work, pads = _pad_to_window(image, window, side)
    stride = max(downscale, int(round(stride_fraction * window / downscale)) * downscale)
    min_level = min_mean * float(image.max())
    corners, skipped = [], {"dark": 0, "flat": 0}
    for r in blended_starts(work.shape[0], window, stride):
        for c in blended_starts(work.shape[1], window, stride):
            reason = _skip_reason(work[r : r + window, c : c + window], min_level)
            if reason:
                skipped[reason] += 1
            else:
                corners.append((r, c))
    weights = _upsample(gaussian_importance(s), downscale) if blend == "gaussian" else None
    numerator = np.zeros(work.shape, dtype=np.float32)
    denominator = np.zeros(work.shape, dtype=np.float32)
    for (r, c), p in _predict_windows(work, corners, window, downscale, predictor, batch_size, intensity_range,
                                      tta=tta):
        if blend == "max":  # numerator holds the running maximum, denominator marks the covered pixels
            np.maximum(numerator[r : r + window, c : c + window], _upsample(p, downscale),
                       out=numerator[r : r + window, c : c + window])
            denominator[r : r + window, c : c + window] = 1.0
        else:
            numerator[r : r + window, c : c + window] += weights * _upsample(p, downscale)
            denominator[r : r + window, c : c + window] += weights
    np.divide(numerator, denominator, out=numerator, where=denominator > 0)
    numerator[denominator == 0] = 0.0
    del denominator
    prob = _unpad(quantise(numerator), pads)
    del numerator
    meta = {
        "mode": "blended", "side": side.value, "crop_box": {"top": 0, "bottom": image.shape[0], "left": 0,
        "right": image.shape[1]}, "padded": list(pads), "window": window, "downscale": downscale,
        "stride": stride, "tta": tta, "blend": blend, "windows_total": len(corners) + sum(skipped.values()),
        "windows_predicted": len(corners), "windows_skipped_dark": skipped["dark"],
        "windows_skipped_flat": skipped["flat"], "min_mean": min_mean,
        "strip_fraction": strip_fraction, "shape": list(image.shape),
        "intensity_range": None if intensity_range is None else [float(v) for v in intensity_range],
    }
    return Prediction(prob=prob, meta=meta)
