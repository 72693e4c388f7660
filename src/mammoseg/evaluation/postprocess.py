"""Candidate post-processing of a probability map (beyond the paper): small candidates out, at most k per image;
and the operating mask, the map binarised at the operating threshold pixel by pixel or candidate by candidate.

On held-out real mammograms paper-mode inference left 2.82 false positives per image, many of them small or
low-scoring next to the true mass. :func:`postprocess` removes from the map itself the candidates (as
:mod:`mammoseg.evaluation.froc` defines them: 8-connected components of
``prob_u8 >= threshold_level(candidate_threshold)``, scored by their maximum) that are smaller than ``min_area``
pixels, then all but the ``top_k`` highest-scoring ones, so that everything after it (operating-threshold mask,
candidates, FROC, DICOM SEG, overlays) sees the same map.

Conventions:

* A removed candidate's pixels (those at or above the candidate level) become 0; pixels below that level are kept,
  so with an operating threshold (``infer.threshold``) below ``candidate_threshold`` the faint rim of a removed
  candidate can still be foreground at the operating threshold.
* ``min_area`` is applied first, then ``top_k`` ranks the candidates that are left.
* Ties in score are broken as :func:`mammoseg.evaluation.froc.image_candidates` breaks them: the lower candidate
  index (label order: raster order of each component's first pixel) ranks first.
* ``min_area`` <= 1 and ``top_k`` = 0 keep every candidate (the defaults: the map is returned unchanged).

:func:`operating_mask` binarises at the operating threshold. ``binarise="threshold"`` (the paper) keeps the pixels
at or above it; on real tissue a region whose peak passes the threshold then breaks into several components, each
a false positive of its own (about four false components per image where the FROC counted one candidate).
``binarise="candidates"`` keeps each candidate whose maximum reaches the threshold, whole: every mark is one FROC
candidate, so the operating point lies on the FROC curve and a threshold calibrated on candidates
(:mod:`mammoseg.evaluation.calibrate`) gives the false positives per image it was calibrated for.
"""

from __future__ import annotations

import numpy as np

from mammoseg.evaluation import metrics
from mammoseg.evaluation.froc import component_max

__all__ = ["BINARISE", "kept_candidates", "operating_mask", "postprocess"]

#: the ways of binarising at the operating threshold (``evaluate.binarise``)
BINARISE = ("threshold", "candidates")


def kept_candidates(areas: np.ndarray, scores: np.ndarray, *, min_area: int, top_k: int) -> np.ndarray:
    """Which candidates survive, from their areas and scores.

    Parameters
    ----------
    areas : int (n,), pixels of each candidate, in candidate order
    scores : int or float (n,), score of each candidate (any monotone unit: uint8 levels or probabilities)
    min_area : int >= 0, candidates with fewer pixels go (<= 1 keeps all)
    top_k : int >= 0, at most this many of the rest stay, highest scores first, ties to the lower index (0 = all)

    Returns
    -------
    bool (n,): True for a kept candidate.
    """
    areas, scores = np.asarray(areas), np.asarray(scores)
    if min_area < 0 or top_k < 0:
        raise ValueError(f"min_area and top_k must be >= 0, got {min_area} and {top_k}")
    keep = areas >= min_area if min_area > 1 else np.ones(areas.shape, dtype=bool)
    if top_k > 0 and int(keep.sum()) > top_k:
        survivors = np.flatnonzero(keep)
        ranked = survivors[np.lexsort((survivors, -scores[survivors]))]  # score descending, then index
        keep[:] = False
        keep[ranked[:top_k]] = True
    return keep


def postprocess(prob_u8: np.ndarray, *, candidate_threshold: float, min_area: int, top_k: int) -> np.ndarray:
    """The probability map without the candidates smaller than ``min_area`` and beyond the best ``top_k``.

    Parameters
    ----------
    prob_u8 : uint8 (rows, cols), ``round(p * 255)``
    candidate_threshold : float in (0, 1], ``evaluate.candidate_threshold``: candidates are the 8-connected
        components of ``prob_u8 >= ceil(candidate_threshold * 255)``
    min_area : int >= 0, ``evaluate.postprocess.min_area``, full-resolution pixels
    top_k : int >= 0, ``evaluate.postprocess.top_k``, candidates kept per image (0 = all)

    Returns
    -------
    uint8 (rows, cols): ``prob_u8`` itself when nothing is removed, else a new map with the removed candidates'
    pixels set to 0 (conventions in the module docstring).
    """
    level = metrics.threshold_level(candidate_threshold)
    if level < 1:
        raise ValueError(f"candidate_threshold must select pixels above probability 0, got {candidate_threshold}")
    if min_area <= 1 and top_k == 0:
        return prob_u8
    labels, count = metrics.label_components(metrics.binarise(prob_u8, candidate_threshold))
    if count == 0:
        return prob_u8
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = kept_candidates(areas, component_max(prob_u8, labels, count), min_area=min_area, top_k=top_k)
    if keep.all():
        return prob_u8
    removed = np.concatenate([[False], ~keep])[labels]
    return np.where(removed, np.uint8(0), prob_u8)


def operating_mask(prob_u8: np.ndarray, threshold: float, *, binarise: str,
                   candidate_threshold: float) -> np.ndarray:  # fmt: skip
    """The binary mask at the operating threshold: metrics, overlays, DICOM SEG and marks are read off it.

    Parameters
    ----------
    prob_u8 : uint8 (rows, cols), ``round(p * 255)``
    threshold : float in [0, 1], the operating threshold (``infer.threshold`` or the calibrated one)
    binarise : ``"threshold"``: ``prob_u8 >= threshold_level(threshold)`` (the paper); ``"candidates"``: the
        candidates (8-connected components of ``prob_u8 >= threshold_level(candidate_threshold)``) whose maximum
        is at or above ``threshold_level(threshold)``, each whole
    candidate_threshold : float in (0, 1], ``evaluate.candidate_threshold`` (used by ``"candidates"`` only)

    Returns
    -------
    bool (rows, cols). It always holds the ``"threshold"`` mask: with ``"candidates"`` and ``threshold`` below
    ``candidate_threshold``, the pixels at or above the threshold but under the candidate level are foreground too.
    """
    if binarise not in BINARISE:
        raise ValueError(f"unknown binarise {binarise!r}; allowed: {', '.join(BINARISE)}")
    thresholded = metrics.binarise(prob_u8, threshold)
    if binarise == "threshold":
        return thresholded
    labels, count = metrics.label_components(metrics.binarise(prob_u8, candidate_threshold))
    if count == 0:
        return thresholded
    reaching = np.zeros(count + 1, dtype=bool)
    reaching[1:] = component_max(prob_u8, labels, count) >= metrics.threshold_level(threshold)
    return reaching[labels] | thresholded
