"""Patch geometry and the pre-processing shared by extraction and inference.

Everything here is NumPy only. Training patches (:mod:`mammoseg.shards`) and inference windows
(:mod:`mammoseg.infer`) both go through :func:`preprocess_window`, so the network sees the same kind of input
in both stages.
"""

from __future__ import annotations

import numpy as np

__all__ = ["downscale_image", "downscale_mask", "normalise_patch", "preprocess_window"]


def _check_divisible(shape: tuple[int, ...], factor: int) -> None:
    if factor < 1:
        raise ValueError(f"downscale factor must be >= 1, got {factor}")
    if shape[0] % factor or shape[1] % factor:
        raise ValueError(f"window of shape {shape} is not divisible by the downscale factor {factor}")


def downscale_image(window: np.ndarray, factor: int) -> np.ndarray:
    """Downscale by an integer factor with a block mean (area anti-aliasing).

    Parameters
    ----------
    window : np.ndarray, shape (H, W), any real dtype; H and W divisible by ``factor``
    factor : int, scale factor (paper: 4)

    Returns
    -------
    np.ndarray of float32, shape (H // factor, W // factor)
    """
    _check_divisible(window.shape, factor)
    h, w = window.shape
    blocks = np.asarray(window, dtype=np.float32).reshape(h // factor, factor, w // factor, factor)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def downscale_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Downscale a binary mask by majority vote, so it stays binary.

    Returns
    -------
    np.ndarray of uint8, shape (H // factor, W // factor), values in {0, 1}
        1 where at least half of the ``factor x factor`` block is foreground.
    """
    return (downscale_image(mask.astype(np.float32), factor) >= 0.5).astype(np.uint8)


def normalise_patch(patch: np.ndarray) -> np.ndarray:
    """Min-max normalise one patch to [0, 1] (float32); a flat patch becomes all zeros."""
    patch = np.asarray(patch, dtype=np.float32)
    low, high = float(patch.min()), float(patch.max())
    if high <= low:
        return np.zeros_like(patch, dtype=np.float32)
    return (patch - low) / np.float32(high - low)


def preprocess_window(window: np.ndarray, factor: int) -> np.ndarray:
    """What the network sees: downscale by ``factor`` then min-max normalise to [0, 1] (float32)."""
    return normalise_patch(downscale_image(window, factor))
