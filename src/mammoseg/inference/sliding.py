"""Sliding-window inference on full mammograms: the paper's mode and a blended mode.

Geometry and pre-processing are NumPy only; TensorFlow/Keras are imported lazily inside the functions that
need a model, so ``mammoseg.evaluation.evaluate`` can read predictions (:func:`load_prediction`) without TensorFlow.

Paper mode (Marita et al.)
    1. The breast side is the side whose strip (``strip_fraction`` of the width) has the larger mean.
    2. The image is cropped to a whole number of ``2**n`` windows: in width the crop starts at the breast side
       (the remainder is dropped on the side away from the breast, where there is only background); in height
       the remainder ``r`` is split with ``r // 2`` rows dropped at the top and ``r - r // 2`` at the bottom.
    3. Non-overlapping windows; a window is skipped when its mean raw intensity is below
       ``min_mean × image max`` (background) or when its max equals its min (flat: per-window min-max
       normalisation is undefined).
    4. Kept windows go through :func:`mammoseg.patches.geometry.preprocess_window` (block mean by ``downscale`` then
       min-max), are predicted in batches by one compiled ``tf.function``, and the probabilities are brought back
       to full resolution with ``np.repeat`` by ``downscale`` (the inverse footprint of the block mean).
    5. The saved probability map holds these per-window probabilities (0 in skipped windows and in the cropped
       margins), so thresholds can be swept later without the model. The binary mask is ``prob >= threshold``
       OR-combined over windows; windows do not overlap, so this equals thresholding the map (with overlapping
       windows, the max-combined map would give the same identity).

    Images smaller than one window in a dimension are padded (fallback, recorded in the metadata as ``padded``)
    with the image minimum, at the bottom and on the side away from the breast, to exactly one window; the
    padding is removed from the output, so every output has the input's shape.

Blended mode (beyond the paper; as nnU-Net/MONAI)
    Overlapping windows over the whole image with stride ``stride_fraction × window``; the last row/column of
    windows is shifted back to end at the image edge (so no artificial padding is shown to the network, unless
    the image is smaller than one window, then it is padded as above). Each window's probabilities are weighted
    by a Gaussian importance map (sigma = window / 8, peak 1, floored at its smallest non-zero value) and the map
    is ``Σ w·p / Σ w``. Windows failing the paper's skip rules are not predicted and do not vote; pixels covered
    only by skipped windows get probability 0. Optional TTA averages with the horizontally flipped prediction.

Probability maps are returned and saved as uint8, ``round(p × 255)``; the binary mask is always
``mammoseg.evaluation.metrics.binarise(prob_u8, threshold)``, so the saved mask equals what evaluation recomputes.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mammoseg.io.atomic import atomic_path
from mammoseg.config import section_hash, validate_config
from mammoseg.io.dicom import read_mammogram
from mammoseg.evaluation.metrics import binarise
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
    "load_model",
    "make_predictor",
    "save_prediction",
    "load_prediction",
    "run_predict",
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
    mask : np.ndarray of bool, shape (rows, cols): ``binarise(prob, threshold)``
    meta : dict, JSON-serialisable: mode, side, crop box, windows predicted/skipped, threshold, …
    """

    prob: np.ndarray
    mask: np.ndarray
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
    batch_size: int, tta: bool = False,
) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """Yield ((row, col), float32 probabilities at model resolution (s, s)) per window, predicted in batches."""
    for chunk in _batched(corners, batch_size):
        batch = np.stack([preprocess_window(image[r : r + window, c : c + window], downscale) for r, c in chunk])
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
    threshold: float = 0.5,
    batch_size: int = 16,
) -> Prediction:
    """The paper's inference: crop, non-overlapping windows, skip rules, batch prediction, reassembly.

    Parameters
    ----------
    image : np.ndarray, shape (rows, cols), raw intensities (bright = dense), as from ``read_mammogram``
    predictor : batch predictor float32 (B, s, s) → (B, s, s), s = window // downscale
    window : window side in full-resolution pixels (2**n)
    downscale : integer factor (block mean), as in training
    strip_fraction, min_mean, threshold, batch_size : see the module docstring and the ``infer`` config

    Returns
    -------
    Prediction with uint8 probabilities and bool mask of the input's shape.
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
    for (r, c), p in _predict_windows(work, corners, window, downscale, predictor, batch_size):
        prob[r : r + window, c : c + window] = _upsample(quantise(p), downscale)
    prob = _unpad(prob, pads)
    meta = {
        "mode": "paper", "side": side.value, "crop_box": box.as_dict(), "padded": list(pads),
        "window": window, "downscale": downscale, "windows_total": len(corners) + sum(skipped.values()),
        "windows_predicted": len(corners), "windows_skipped_dark": skipped["dark"],
        "windows_skipped_flat": skipped["flat"], "threshold": threshold, "min_mean": min_mean,
        "strip_fraction": strip_fraction, "shape": list(image.shape),
    }
    return Prediction(prob=prob, mask=binarise(prob, threshold), meta=meta)


def predict_blended(
    image: np.ndarray,
    predictor: Predictor,
    window: int,
    downscale: int,
    stride_fraction: float = 0.5,
    tta: bool = False,
    strip_fraction: float = 0.1,
    min_mean: float = 0.1,
    threshold: float = 0.5,
    batch_size: int = 16,
) -> Prediction:
    """Overlapping windows with Gaussian-weighted blending (see the module docstring).

    Parameters are those of :func:`predict_paper` plus ``stride_fraction`` (stride = round(fraction × window),
    rounded to a multiple of ``downscale``, at least ``downscale``) and ``tta`` (horizontal-flip averaging).
    """
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
    weights = _upsample(gaussian_importance(s), downscale)
    numerator = np.zeros(work.shape, dtype=np.float32)
    denominator = np.zeros(work.shape, dtype=np.float32)
    for (r, c), p in _predict_windows(work, corners, window, downscale, predictor, batch_size, tta=tta):
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
        "stride": stride, "tta": tta, "windows_total": len(corners) + sum(skipped.values()),
        "windows_predicted": len(corners), "windows_skipped_dark": skipped["dark"],
        "windows_skipped_flat": skipped["flat"], "threshold": threshold, "min_mean": min_mean,
        "strip_fraction": strip_fraction, "shape": list(image.shape),
    }
    return Prediction(prob=prob, mask=binarise(prob, threshold), meta=meta)


# --------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------
def load_model(model_path: str | Path):
    """Load a ``.keras`` model safely (``compile=False, safe_mode=True``), custom objects registered first."""
    if importlib.util.find_spec("mammoseg.model.losses") is not None:
        importlib.import_module("mammoseg.model.losses")  # registers the project's serialisable custom objects
    import keras

    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: cannot load Keras model: {exc}") from exc


def model_input_size(model, window: int, downscale: int) -> int:
    """Check that the model takes (s, s, 1) inputs with s = window // downscale; return s."""
    s = _check_geometry(window, downscale)
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 1:
        raise ValueError(f"model input shape {shape} is not (batch, s, s, 1)")
    for dim in shape[1:3]:
        if dim is not None and dim != s:
            raise ValueError(
                f"model input shape {shape} does not match windows of {window} px downscaled by {downscale} (s={s})"
            )
    return s


def make_predictor(model, batch_size: int = 16) -> Predictor:
    """Wrap a Keras model in one compiled ``tf.function`` (traced once: batch dimension left free).

    Returns a callable float32 (B, s, s) → float32 (B, s, s); B may be anything up to ``batch_size`` and
    larger inputs are split into chunks of ``batch_size``.
    """
    import tensorflow as tf

    s = model.input_shape[1]

    @tf.function(input_signature=[tf.TensorSpec([None, s, s, 1], tf.float32)], reduce_retracing=True)
    def forward(batch):
        return tf.cast(model(batch, training=False), tf.float32)

    def predict(batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        outputs = [forward(tf.convert_to_tensor(chunk[..., None])).numpy()[..., 0]
                   for chunk in (batch[i : i + batch_size] for i in range(0, len(batch), batch_size))]
        return np.concatenate(outputs) if outputs else np.zeros_like(batch)

    return predict


# --------------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------------
def save_prediction(
    prob: np.ndarray, mask: np.ndarray, prob_npz: str | Path, mask_png: str | Path, meta: dict[str, Any]
) -> None:
    """Write the probability map (compressed npz) and the binary mask (PNG, 0/255), each atomically.

    Parameters
    ----------
    prob : uint8 (rows, cols) ``round(p×255)``, or float in [0, 1] (quantised here)
    mask : bool (rows, cols)
    prob_npz : target ``.npz``; holds ``prob`` (uint8) and ``meta`` (a JSON string, no pickle needed)
    mask_png : target ``.png``, 8-bit greyscale, foreground 255
    meta : JSON-serialisable metadata (side, crop box, windows predicted/skipped, threshold, mode, …)
    """
    from PIL import Image

    prob_u8 = prob if prob.dtype == np.uint8 else quantise(prob)
    if prob_u8.shape != mask.shape:
        raise ValueError(f"probability map {prob_u8.shape} and mask {mask.shape} differ in shape")
    meta_json = json.dumps(meta, sort_keys=True, default=str)
    with atomic_path(prob_npz) as tmp:
        with open(tmp, "wb") as handle:  # a file handle: numpy must not append its own suffix
            np.savez_compressed(handle, prob=prob_u8, meta=np.array(meta_json))
    with atomic_path(mask_png) as tmp:
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(tmp, format="PNG")


def load_prediction(prob_npz: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read ``(prob uint8 (rows, cols), meta dict)`` written by :func:`save_prediction`."""
    path = Path(prob_npz)
    try:
        with np.load(path, allow_pickle=False) as data:
            prob = data["prob"]
            meta = json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a mammoseg prediction file: {exc}") from exc
    if prob.dtype != np.uint8 or prob.ndim != 2:
        raise ValueError(f"{path}: 'prob' must be a 2-D uint8 array, got {prob.dtype} {prob.shape}")
    return prob, meta


# --------------------------------------------------------------------------------------------------------------
# stage entry
# --------------------------------------------------------------------------------------------------------------
def predict_image(image: np.ndarray, predictor: Predictor, infer_cfg: dict, patches_cfg: dict) -> Prediction:
    """Dispatch to the configured mode with the ``infer`` and ``patches`` config sections."""
    window = 2 ** int(patches_cfg["n"])
    downscale = int(patches_cfg["downscale"])
    common = dict(
        strip_fraction=infer_cfg["strip_fraction"], min_mean=infer_cfg["min_mean"],
        threshold=infer_cfg["threshold"], batch_size=infer_cfg["batch_size"],
    )
    if infer_cfg["mode"] == "paper":
        return predict_paper(image, predictor, window, downscale, **common)
    if infer_cfg["mode"] == "blended":
        return predict_blended(image, predictor, window, downscale, stride_fraction=infer_cfg["stride_fraction"],
                               tta=infer_cfg["tta"], **common)
    raise ValueError(f"unknown inference mode {infer_cfg['mode']!r}; allowed: paper, blended")


def run_predict(config: dict, model_path: str | Path, image_path: str | Path, out_prob: str | Path,
                out_mask: str | Path) -> dict:
    """Stage entry: predict one full image and save ``{image_id}.prob.npz`` and ``{image_id}.mask.png``.

    Parameters
    ----------
    config : the whole config (validated here, defaults filled); uses sections ``infer`` and ``patches``
    model_path : ``.keras`` model; image_path : full mammogram (DICOM, read by ``read_mammogram``)
    out_prob, out_mask : output paths

    Returns
    -------
    dict : the metadata saved with the prediction (plus timing in seconds and the model path).
    """
    config = validate_config(config)
    infer_cfg, patches_cfg = config["infer"], config["patches"]
    try:
        image = read_mammogram(image_path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure, re-raised with the file named
        raise ValueError(f"{image_path}: cannot read mammogram: {exc}") from exc
    model = load_model(model_path)
    model_input_size(model, 2 ** int(patches_cfg["n"]), int(patches_cfg["downscale"]))
    predictor = make_predictor(model, infer_cfg["batch_size"])
    start = time.perf_counter()
    result = predict_image(image, predictor, infer_cfg, patches_cfg)
    elapsed = time.perf_counter() - start
    meta = dict(result.meta)
    meta.update({
        "image": str(image_path), "model": str(model_path), "seconds": round(elapsed, 3),
        "config_hash": section_hash(patches_cfg["n"], patches_cfg["downscale"], infer_cfg),
    })
    save_prediction(result.prob, result.mask, out_prob, out_mask, meta)
    return meta
