"""Colour-coded overlays as in the paper's figure 6: TP green, FN red, FP white, over the grey image.

NumPy + Pillow only. Large images are reduced by an integer factor ``f = ceil(longest side / max_side)``:
the grey image by a block mean, and each class by a block *any* (a block shows a class when at least one of its
pixels has it), so a one-pixel-wide region stays visible after reduction. Where a reduced block holds several
classes, the colour painted last wins, in the order FP (white), FN (red), TP (green): a found lesion is never
hidden by its own border errors.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mammoseg.io.atomic import atomic_path

__all__ = ["TP_COLOUR", "FN_COLOUR", "FP_COLOUR", "LEGEND", "FINDINGS_LEGEND", "reduction_factor", "make_overlay",
           "add_legend", "write_overlay"]

TP_COLOUR = (0, 255, 0)
FN_COLOUR = (255, 0, 0)
FP_COLOUR = (255, 255, 255)
#: The legend drawn under an overlay, in the order the colours are painted over each other.
LEGEND = (("true positive", TP_COLOUR), ("false negative (missed)", FN_COLOUR), ("false positive", FP_COLOUR))
#: The legend of an image without ground truth (a new study): every predicted pixel is just that.
FINDINGS_LEGEND = (("predicted mass (no ground truth)", FP_COLOUR),)
LEGEND_BACKGROUND = (48, 48, 48)


def reduction_factor(shape: tuple[int, int], max_side: int) -> int:
    """Smallest integer factor that brings the longest side of ``shape`` to at most ``max_side`` pixels."""
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    return max(1, math.ceil(max(shape) / max_side))


def _blocks(array: np.ndarray, factor: int) -> np.ndarray:
    """View of ``array`` (edge-padded to a multiple of ``factor``) as (rows/f, f, cols/f, f)."""
    rows, cols = array.shape
    pad_r, pad_c = (-rows) % factor, (-cols) % factor
    if pad_r or pad_c:
        array = np.pad(array, ((0, pad_r), (0, pad_c)), mode="edge")
    return array.reshape(array.shape[0] // factor, factor, array.shape[1] // factor, factor)


def _reduce_mean(image: np.ndarray, factor: int) -> np.ndarray:
    return image if factor == 1 else _blocks(image, factor).mean(axis=(1, 3), dtype=np.float32)


def _reduce_any(mask: np.ndarray, factor: int) -> np.ndarray:
    return mask if factor == 1 else _blocks(mask, factor).any(axis=(1, 3))


def _grey_uint8(image: np.ndarray) -> np.ndarray:
    """Min-max to 0..255 (a flat image becomes black)."""
    image = np.asarray(image, dtype=np.float32)
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros(image.shape, dtype=np.uint8)
    return np.rint((image - low) * (255.0 / (high - low))).astype(np.uint8)


def make_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, max_side: int = 1024) -> np.ndarray:
    """RGB overlay of one image.

    Parameters
    ----------
    image : np.ndarray, shape (rows, cols), raw intensities (bright = dense)
    pred, truth : np.ndarray of bool, shape (rows, cols)
    max_side : longest side of the result in pixels

    Returns
    -------
    np.ndarray of uint8, shape (ceil(rows/f), ceil(cols/f), 3), f = :func:`reduction_factor`
    """
    if not image.shape == pred.shape == truth.shape:
        raise ValueError(f"image {image.shape}, prediction {pred.shape} and truth {truth.shape} differ in shape")
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    factor = reduction_factor(image.shape, max_side)
    grey = _grey_uint8(_reduce_mean(np.asarray(image, dtype=np.float32), factor))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for region, colour in ((pred & ~truth, FP_COLOUR), (truth & ~pred, FN_COLOUR), (pred & truth, TP_COLOUR)):
        rgb[_reduce_any(region, factor)] = colour
    return rgb


def add_legend(rgb: np.ndarray, label: str = "", entries=LEGEND) -> np.ndarray:
    """The overlay with a band below it naming the colours (and ``label``, e.g. the image id), so a PNG read on
    its own says what green, red and white mean.

    Returns
    -------
    np.ndarray of uint8, shape (rows + band, cols, 3); the overlay's pixels are unchanged in the top ``rows``.
    """
    from PIL import Image, ImageDraw, ImageFont

    rows, cols = rgb.shape[:2]
    band = 18 if cols < 400 else 24
    font = ImageFont.load_default(size=band - 8)
    canvas = Image.new("RGB", (cols, rows + band), LEGEND_BACKGROUND)
    canvas.paste(Image.fromarray(rgb), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x, swatch = 4, band - 8
    for name, colour in entries:
        draw.rectangle([x, rows + 4, x + swatch - 1, rows + 4 + swatch - 1], fill=colour)
        x += swatch + 3
        draw.text((x, rows + 3), name, fill=(230, 230, 230), font=font)
        x += int(draw.textlength(name, font=font)) + 10
    if label:
        draw.text((max(x, cols - 4 - int(draw.textlength(label, font=font))), rows + 3), label, fill=(170, 170, 170),
                  font=font)
    return np.asarray(canvas)


def write_overlay(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 (rows, cols, 3) array as a PNG, atomically."""
    from PIL import Image

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array (rows, cols, 3), got {rgb.dtype} {rgb.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
