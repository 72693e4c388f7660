"""Standard FROC over candidate scores, the LUNA16 CPM and bootstrap intervals (NumPy, and scikit-image through
:mod:`metrics`: never imports TensorFlow or torch).

A sweep of a few binarisation thresholds (mammoseg's FROC before 0.2) cannot sweep away a false positive saturated
at probability 1.0, and reports TPR 0 for a budget that no sweep point reaches. The detection literature instead
scores each *candidate* once and sweeps over the candidate scores (CAMELYON16, as in MONAI's
``monai.metrics.froc``; LUNA16). This module does that.

Conventions (stated once here, and tested in ``tests/test_froc.py``):

* **Candidates** of one image are the 8-connected components of ``prob_u8 >= threshold_level(candidate_threshold)``
  (:func:`metrics.binarise`, :func:`metrics.label_components`), numbered 0, 1, … in label order (raster order of
  each component's first pixel). A candidate's **score** is its maximum probability, ``max(prob_u8) / 255``.
* **Matching** is :func:`metrics.match_labels` unchanged: rule ``iou`` (component/lesion IoU >= ``iou_threshold``
  and they overlap), rule ``centroid`` (the component contains the lesion's centroid pixel) or rule
  ``centre_in_lesion`` (the component's centroid pixel lies inside the lesion).
* **Credit**: a lesion is *hit* by the best-scoring candidate that matches it (ties: the lowest candidate index);
  its hit score is that candidate's score, 0.0 when no candidate matches (a *miss*). A candidate that matches no
  lesion is a **false positive**. A candidate that matches a lesion credited to another, higher-scoring candidate
  is a *duplicate*: neither a hit nor a false positive, it is ignored (as LUNA16's "ignored double detections"
  and CAMELYON16's max over the detections inside one lesion).
* **FROC curve** (:func:`froc_curve`) is MONAI's ``compute_froc_curve_data`` (from the CAMELYON16 evaluation
  code) with the probability floor 0.0 among the scores: with ``0 = s_0 < s_1 < … < s_m`` the distinct values of
  the floor, all false-positive scores and all lesion hit scores pooled (misses enter as 0.0, one per lesion, as
  MONAI's ``tp_probs`` of length ``num_targets``), the curve has one point per threshold ``s_1 … s_m`` (every
  distinct candidate score) — false positives = #FP scores >= s, detected = #hit scores >= s — and a final point
  (0 FPPI, sensitivity 0) for a threshold above every score. MONAI never uses the lowest distinct value as a
  threshold; with a miss among the lesions that value is 0.0 anyway, but when every lesion is hit, MONAI alone
  would never count the candidates of the lowest score (a lesion found at the lowest score would count as
  missed at every point). The floor, which no candidate reaches (candidates need ``candidate_threshold > 0``),
  makes the curve sweep every candidate score; otherwise the numbers are MONAI's:
  ``froc_curve(fp, hits) == compute_froc_curve_data(fp + [0.0], hits)`` (tested).
* **Sensitivity at an FPPI** (:func:`sensitivity_at_fppi`) is MONAI's ``compute_froc_score`` interpolation:
  ``np.interp(x, fppi[::-1], sensitivity[::-1])``: linear between curve points; constant (the sensitivity at the
  largest FPPI of the curve) beyond the curve's last point; at an FPPI where the curve has several points
  (a vertical step), ``np.interp`` returns the last of them, i.e. the highest sensitivity reached at that FPPI.
* **CPM** (:func:`cpm`, the Competition Performance Metric of Niemeijer et al., IEEE TMI 30(2), 2011, used by
  LUNA16, Setio et al., Med. Image Anal. 42, 2017): the mean sensitivity at the seven FPPI points
  1/8, 1/4, 1/2, 1, 2, 4, 8 (:data:`FPPI_POINTS`).
* **Bootstrap** (:func:`bootstrap_intervals`): percentile intervals (2.5th and 97.5th percentiles, NumPy's linear
  interpolation) over resamples of images with replacement, or of whole patients when ``groups`` are given (all
  images of a drawn patient enter together; the number of images per resample then varies, and FPPI divides by
  it). A statistic undefined in a resample (no lesion drawn: TPR, TPR at 1 FPPI, CPM) is left out of its
  percentiles; ``defined`` says in how many resamples it was defined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from mammoseg.evaluation import metrics

__all__ = [
    "FPPI_POINTS",
    "ImageCandidates",
    "image_candidates",
    "component_max",
    "FrocCurve",
    "froc_curve",
    "sensitivity_at_fppi",
    "cpm",
    "operating_points",
    "ImageRecord",
    "BOOTSTRAP_STATISTICS",
    "resample_weights",
    "bootstrap_replicates",
    "bootstrap_intervals",
]

#: FPPI points of the CPM (LUNA16): 1/8, 1/4, 1/2, 1, 2, 4, 8 false positives per image.
FPPI_POINTS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


# --------------------------------------------------------------------------------------------------------------
# candidates of one image
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageCandidates:
    """Candidates and lesions of one image, in full-image pixel coordinates.

    Attributes
    ----------
    candidates : list of dict, one per candidate (candidate order): ``candidate`` (index from 0), ``score``
        (float, max probability = ``score_u8 / 255``), ``score_u8`` (int), ``area`` (px), ``centroid_row``,
        ``centroid_col`` (float, mean pixel position), ``row0, col0, row1, col1`` (half-open bounding box),
        ``best_iou`` (highest IoU with any lesion), ``matched_lesions`` (indices of the lesions it matches),
        ``credited_lesions`` (those whose hit it is), ``matched_lesion`` (the lowest credited lesion, or -1),
        ``duplicate`` (matches lesions but is credited none), ``false_positive`` (matches none).
    lesions : list of dict, one per lesion (input order): ``lesion`` (index), ``area`` (px), ``centroid_row``,
        ``centroid_col`` (int, the centroid pixel used by rule ``centroid``), ``best_iou``, ``matched_by``
        (indices of the candidates that match it), ``hit`` (bool), ``hit_score`` (float, 0.0 when missed),
        ``hit_candidate`` (index, or -1 when missed).
    box : (row0, col0, row1, col1), the half-open region that was analysed; outside it no pixel reaches the
        candidate threshold and there is no lesion.
    """

    candidates: list[dict]
    lesions: list[dict]
    box: tuple[int, int, int, int]

    @property
    def fp_scores(self) -> np.ndarray:
        """Scores of the false-positive candidates, float64 (n_fp,)."""
        return np.array([c["score"] for c in self.candidates if c["false_positive"]], dtype=np.float64)

    @property
    def lesion_hit_scores(self) -> np.ndarray:
        """Hit score of every lesion (0.0 for a miss), float64 (n_lesions,)."""
        return np.array([les["hit_score"] for les in self.lesions], dtype=np.float64)


def _mask_extent(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Half-open bounding box (row0, col0, row1, col1) of a boolean mask's pixels; None when it has none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _active_box(candidate_mask: np.ndarray, lesions: Sequence[np.ndarray]) -> tuple[int, int, int, int]:
    """Box (half-open) around the candidate pixels and every lesion; (0, 0, 0, 0) when there are none.

    Cropping to it changes no result: :func:`metrics.match_labels` rounds centroids halves up, the same pixel
    whatever the crop's offset.
    """
    extents = [e for e in [_mask_extent(candidate_mask), *(_mask_extent(les) for les in lesions)] if e is not None]
    if not extents:
        return 0, 0, 0, 0
    return (min(e[0] for e in extents), min(e[1] for e in extents), max(e[2] for e in extents),
            max(e[3] for e in extents))


def component_max(prob_u8: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Maximum uint8 probability of components 1..count, int64 (count,).

    ``np.maximum.at`` over the foreground pixels: several times faster than ``scipy.ndimage.maximum``, which
    sorts every pixel of the image.
    """
    flat_labels = labels.ravel()
    foreground = np.flatnonzero(flat_labels)
    peak = np.zeros(count + 1, dtype=np.uint8)
    np.maximum.at(peak, flat_labels[foreground], prob_u8.ravel()[foreground])
    return peak[1:].astype(np.int64)


def _best_candidate(matching: Sequence[int], score_u8: np.ndarray) -> int:
    """The highest-scoring of the matching candidate indices (ties: the lowest index); -1 when none match."""
    if not matching:
        return -1
    return min(matching, key=lambda k: (-int(score_u8[k]), k))


def image_candidates(
    prob_u8: np.ndarray,
    lesions: Sequence[np.ndarray],
    *,
    candidate_threshold: float,
    match: str,
    iou_threshold: float,
) -> ImageCandidates:
    """Candidates of one image, scored by maximum probability, and the lesion each is credited to.

    Parameters
    ----------
    prob_u8 : np.ndarray of uint8, shape (rows, cols), ``round(probability * 255)``
    lesions : sequence of bool arrays of shape (rows, cols), one per lesion; an empty one is an error
    candidate_threshold : float in (0, 1]; candidates are components of ``prob_u8 >= ceil(threshold * 255)``
    match : ``"iou"``, ``"centroid"`` or ``"centre_in_lesion"`` (:func:`metrics.match_labels`)
    iou_threshold : float in [0, 1], used by rule ``"iou"``

    Returns
    -------
    ImageCandidates (see its attributes; conventions in the module docstring)
    """
    if prob_u8.ndim != 2:
        raise ValueError(f"expected a 2-D probability map, got shape {prob_u8.shape}")
    if metrics.threshold_level(candidate_threshold) < 1:
        raise ValueError(f"candidate_threshold must select pixels above probability 0, got {candidate_threshold}")
    candidate_mask = metrics.binarise(prob_u8, candidate_threshold)  # also checks the dtype
    for index, lesion in enumerate(lesions):
        if lesion.shape != prob_u8.shape:
            raise ValueError(f"lesion {index} has shape {lesion.shape}, the probability map {prob_u8.shape}")
    row0, col0, row1, col1 = _active_box(candidate_mask, lesions)
    if row1 == row0:  # no candidate pixel and no lesion (match_labels cannot take an empty array)
        return ImageCandidates(candidates=[], lesions=[], box=(row0, col0, row1, col1))
    crop = (slice(row0, row1), slice(col0, col1))
    labels, count = metrics.label_components(candidate_mask[crop])
    score_u8 = component_max(prob_u8[crop], labels, count)
    matched = metrics.match_labels(labels, count, [np.asarray(les, dtype=bool)[crop] for les in lesions],
                                   rule=match, iou_threshold=iou_threshold, details=True)
    lesion_rows = _lesion_rows(matched.lesions, score_u8, row0, col0)
    candidate_rows = _candidate_rows(matched.components, score_u8, lesion_rows, row0, col0)
    return ImageCandidates(candidates=candidate_rows, lesions=lesion_rows, box=(row0, col0, row1, col1))


def _lesion_rows(matched_lesions: list[dict], score_u8: np.ndarray, row0: int, col0: int) -> list[dict]:
    """Lesion rows with the hit (best matching candidate), in full-image coordinates."""
    rows = []
    for les in matched_lesions:
        matched_by = [label - 1 for label in les["detected_by"]]
        hit = _best_candidate(matched_by, score_u8)
        rows.append({
            "lesion": les["lesion"], "area": les["area"],
            "centroid_row": les["centroid_row"] + row0, "centroid_col": les["centroid_col"] + col0,
            "best_iou": les["best_iou"], "matched_by": matched_by, "hit": hit >= 0,
            "hit_score": float(score_u8[hit]) / 255.0 if hit >= 0 else 0.0, "hit_candidate": hit,
        })
    return rows


def _candidate_rows(components: list[dict], score_u8: np.ndarray, lesion_rows: list[dict], row0: int,
                    col0: int) -> list[dict]:
    """Candidate rows (component geometry, score, credit), in full-image coordinates."""
    credited: dict[int, list[int]] = {}
    for les in lesion_rows:
        if les["hit"]:
            credited.setdefault(les["hit_candidate"], []).append(les["lesion"])
    rows = []
    for comp in components:
        index = comp["component"] - 1
        mine = credited.get(index, [])
        rows.append({
            "candidate": index, "score": float(score_u8[index]) / 255.0, "score_u8": int(score_u8[index]),
            "area": comp["area"], "centroid_row": comp["centroid_row"] + row0,
            "centroid_col": comp["centroid_col"] + col0, "row0": comp["row0"] + row0, "col0": comp["col0"] + col0,
            "row1": comp["row1"] + row0, "col1": comp["col1"] + col0, "best_iou": comp["best_iou"],
            "matched_lesions": list(comp["matched_lesions"]), "credited_lesions": mine,
            "matched_lesion": min(mine) if mine else -1,
            "duplicate": bool(comp["matched_lesions"]) and not mine, "false_positive": comp["false_positive"],
        })
    return rows


# --------------------------------------------------------------------------------------------------------------
# FROC curve and CPM
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrocCurve:
    """Points of a FROC curve, ordered by increasing score threshold (so by non-increasing FPPI).

    Attributes
    ----------
    score_thresholds : float64 (n_points,), a candidate counts at a point when its score >= the threshold; the
        last point's threshold is +inf (nothing counts)
    detected, false_positives : int64 (n_points,), totals over all images at each point
    sensitivity, fppi : float64 (n_points,), ``detected / n_lesions`` (NaN when n_lesions is 0) and
        ``false_positives / n_images``; equal to MONAI's ``compute_froc_curve_data`` output
    n_lesions, n_images : int
    """

    score_thresholds: np.ndarray
    detected: np.ndarray
    false_positives: np.ndarray
    sensitivity: np.ndarray
    fppi: np.ndarray
    n_lesions: int
    n_images: int


def _as_scores(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} must be finite")
    return scores


def _curve_counts(values: np.ndarray, fp_counts: np.ndarray, hit_counts: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds, FP totals and hit totals of the curve from score counts.

    Parameters
    ----------
    values : float64 (n_values,), increasing score values
    fp_counts, hit_counts : (n_values,), how many false-positive scores and hit scores (misses at 0.0 included)
        equal each value; values counted by neither are skipped

    Returns
    -------
    (score thresholds, false positives, detected), each (n_points,), as described in :class:`FrocCurve`
    """
    present = np.flatnonzero((fp_counts + hit_counts > 0) | (values == 0.0))  # values[0] is the floor 0.0
    thresholds = present[1:]  # the lowest distinct value is never a threshold (MONAI / CAMELYON16)
    fp_at_or_above = np.cumsum(fp_counts[::-1])[::-1]
    hit_at_or_above = np.cumsum(hit_counts[::-1])[::-1]
    return (np.append(values[thresholds], np.inf), np.append(fp_at_or_above[thresholds], 0),
            np.append(hit_at_or_above[thresholds], 0))


def _ratio(numerator: np.ndarray | float, denominator: np.ndarray | float) -> np.ndarray:
    """numerator / denominator as float64, element-wise; NaN (without a warning) where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator == 0, np.nan, numerator / denominator)


def froc_curve(
    fp_scores: Sequence[float] | np.ndarray,
    lesion_hit_scores: Sequence[float] | np.ndarray,
    n_lesions: int,
    n_images: int,
) -> FrocCurve:
    """FROC curve over candidate scores; ``fppi`` and ``sensitivity`` equal MONAI's ``compute_froc_curve_data``.

    Parameters
    ----------
    fp_scores : float (n_fp,), scores of the false-positive candidates of all images
    lesion_hit_scores : float (n_lesions,), hit score of every lesion of all images, 0.0 for a missed lesion
        (MONAI's ``tp_probs``); its length must equal ``n_lesions``, so that misses cannot be left out silently
    n_lesions : int >= 0, the number of lesions (MONAI's ``num_targets``)
    n_images : int >= 1

    Returns
    -------
    FrocCurve (the lowest distinct score is never a threshold: see the module docstring)
    """
    fp = _as_scores(fp_scores, "fp_scores")
    hits = _as_scores(lesion_hit_scores, "lesion_hit_scores")
    if n_images < 1:
        raise ValueError(f"a FROC curve needs at least one image, got {n_images}")
    if hits.size != n_lesions:
        raise ValueError(f"lesion_hit_scores has {hits.size} entries for {n_lesions} lesions; "
                         "missed lesions enter as 0.0")
    if (fp < 0).any() or (hits < 0).any():
        raise ValueError("scores are probabilities: none may be below 0")
    values, inverse = np.unique(np.concatenate([[0.0], fp, hits]), return_inverse=True)  # 0.0: the floor
    fp_counts = np.bincount(inverse[1 : 1 + fp.size], minlength=values.size)
    hit_counts = np.bincount(inverse[1 + fp.size :], minlength=values.size)
    thresholds, false_positives, detected = _curve_counts(values, fp_counts, hit_counts)
    return FrocCurve(score_thresholds=thresholds, detected=detected.astype(np.int64),
                     false_positives=false_positives.astype(np.int64), sensitivity=_ratio(detected, n_lesions),
                     fppi=_ratio(false_positives, n_images), n_lesions=int(n_lesions), n_images=int(n_images))


def sensitivity_at_fppi(fppi: np.ndarray, sensitivity: np.ndarray,
                        fppi_points: Sequence[float] = FPPI_POINTS) -> np.ndarray:
    """Sensitivity interpolated at each FPPI point, as MONAI's ``compute_froc_score`` does.

    Parameters
    ----------
    fppi, sensitivity : float (n_points,), a curve in :func:`froc_curve`'s order (non-increasing FPPI)
    fppi_points : the false positives per image to read the curve at

    Returns
    -------
    float64 (len(fppi_points),): ``np.interp(fppi_points, fppi[::-1], sensitivity[::-1])``
    """
    return np.interp(np.asarray(fppi_points, dtype=np.float64), np.asarray(fppi)[::-1],
                     np.asarray(sensitivity)[::-1])


def cpm(fppi: np.ndarray, sensitivity: np.ndarray, fppi_points: Sequence[float] = FPPI_POINTS) -> float:
    """Competition Performance Metric: mean of :func:`sensitivity_at_fppi` over ``fppi_points`` (LUNA16's seven)."""
    return float(np.mean(sensitivity_at_fppi(fppi, sensitivity, fppi_points)))


def operating_points(curve: FrocCurve) -> list[dict]:
    """The curve as table rows, one per point, in the curve's order (increasing score threshold).

    Returns
    -------
    list of dict: ``score_threshold`` (float; a candidate counts when its score >= it; +inf on the last row,
    where nothing counts), ``detected``, ``false_positives`` (int), ``tpr``, ``fppi`` (float).
    """
    return [
        {"score_threshold": float(t), "detected": int(d), "false_positives": int(f), "tpr": float(s),
         "fppi": float(x)}
        for t, d, f, s, x in zip(curve.score_thresholds, curve.detected, curve.false_positives,
                                 curve.sensitivity, curve.fppi)
    ]


# --------------------------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRecord:
    """What the bootstrap needs of one image: everything resampled statistics are recomputed from.

    Attributes
    ----------
    n_lesions : int, lesions of the image
    detected, false_positives : int, lesions detected and false-positive components at the configured operating
        threshold (:func:`metrics.match_lesions` on the binarised map)
    intersection, union : int, pixels of |P∩G| and |P∪G| at the operating threshold (for the pooled Dice)
    candidate_scores : tuple of float (n_candidates,), the score of every candidate
    candidate_false_positive : tuple of bool (n_candidates,), whether each candidate is a false positive
    lesion_hit_scores : tuple of float (n_lesions,), 0.0 for a missed lesion
    """

    n_lesions: int
    detected: int
    false_positives: int
    intersection: int
    union: int
    candidate_scores: tuple[float, ...]
    candidate_false_positive: tuple[bool, ...]
    lesion_hit_scores: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.candidate_scores) != len(self.candidate_false_positive):
            raise ValueError(f"{len(self.candidate_scores)} candidate scores but "
                             f"{len(self.candidate_false_positive)} false-positive flags")
        if len(self.lesion_hit_scores) != self.n_lesions:
            raise ValueError(f"{len(self.lesion_hit_scores)} lesion hit scores for {self.n_lesions} lesions")

    @property
    def fp_scores(self) -> np.ndarray:
        """Scores of the false-positive candidates, float64 (n_fp,)."""
        scores = np.asarray(self.candidate_scores, dtype=np.float64)
        return scores[np.asarray(self.candidate_false_positive, dtype=bool)]

    @classmethod
    def from_candidates(cls, found: ImageCandidates, *, detected: int, false_positives: int, intersection: int,
                        union: int) -> "ImageRecord":
        """Record from :func:`image_candidates` and the operating-threshold numbers of the same image."""
        return cls(
            n_lesions=len(found.lesions), detected=int(detected), false_positives=int(false_positives),
            intersection=int(intersection), union=int(union),
            candidate_scores=tuple(c["score"] for c in found.candidates),
            candidate_false_positive=tuple(c["false_positive"] for c in found.candidates),
            lesion_hit_scores=tuple(les["hit_score"] for les in found.lesions),
        )

    def as_dict(self) -> dict:
        """JSON-ready dict (lists for the tuples); :meth:`from_dict` reads it back."""
        return {
            "n_lesions": self.n_lesions, "detected": self.detected, "false_positives": self.false_positives,
            "intersection": self.intersection, "union": self.union,
            "candidate_scores": list(self.candidate_scores),
            "candidate_false_positive": list(self.candidate_false_positive),
            "lesion_hit_scores": list(self.lesion_hit_scores),
        }

    @classmethod
    def from_dict(cls, row: Mapping) -> "ImageRecord":
        return cls(
            n_lesions=int(row["n_lesions"]), detected=int(row["detected"]),
            false_positives=int(row["false_positives"]), intersection=int(row["intersection"]),
            union=int(row["union"]), candidate_scores=tuple(float(s) for s in row["candidate_scores"]),
            candidate_false_positive=tuple(bool(f) for f in row["candidate_false_positive"]),
            lesion_hit_scores=tuple(float(s) for s in row["lesion_hit_scores"]),
        )


#: Statistics of :func:`bootstrap_replicates` / :func:`bootstrap_intervals`.
BOOTSTRAP_STATISTICS = ("tpr", "fppi", "tpr_at_1_fppi", "cpm", "pooled_dice")


def resample_weights(n_images: int, n_resamples: int, seed: int,
                     groups: Sequence | None = None) -> np.ndarray:
    """How often each image enters each bootstrap resample.

    Parameters
    ----------
    n_images : int >= 1
    n_resamples : int >= 0
    seed : int, for ``np.random.default_rng``
    groups : optional, (n_images,) cluster id (patient) of each image; when given, ``n_groups`` clusters are drawn
        with replacement and each drawn cluster brings all its images

    Returns
    -------
    int64 (n_resamples, n_images); with ``groups``, images of one cluster have equal columns
    """
    if n_images < 1:
        raise ValueError("the bootstrap needs at least one image")
    rng = np.random.default_rng(seed)
    if groups is None:
        draws = rng.integers(0, n_images, size=(n_resamples, n_images))
        return _row_counts(draws, n_images)
    if len(groups) != n_images:
        raise ValueError(f"{len(groups)} group ids for {n_images} images")
    _, group_of_image = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(group_of_image.max()) + 1
    group_weights = _row_counts(rng.integers(0, n_groups, size=(n_resamples, n_groups)), n_groups)
    return group_weights[:, group_of_image]


def _row_counts(draws: np.ndarray, n_values: int) -> np.ndarray:
    """Per row of ``draws`` (int (rows, k) in [0, n_values)), how often each value occurs: int64 (rows, n_values)."""
    rows = draws.shape[0]
    flat = (np.arange(rows)[:, None] * n_values + draws).ravel()
    return np.bincount(flat, minlength=rows * n_values).reshape(rows, n_values).astype(np.int64)


def _score_histograms(records: Sequence[ImageRecord]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores of all images and, per image, how many FP scores and hit scores equal each.

    Returns
    -------
    (values float64 (n_values,), fp_hist float64 (n_images, n_values), hit_hist float64 (n_images, n_values))
    """
    fp = [rec.fp_scores for rec in records]
    hits = [np.asarray(rec.lesion_hit_scores, dtype=np.float64) for rec in records]
    arrays = fp + hits  # rows 0..n-1: false positives of each image; n..2n-1: hit scores
    values, inverse = np.unique(np.concatenate([np.zeros(1)] + arrays), return_inverse=True)  # 0.0: the floor
    inverse = inverse[1:]
    owner = np.repeat(np.arange(len(arrays)), [a.size for a in arrays])
    hist = np.bincount(owner * values.size + inverse, minlength=len(arrays) * values.size)
    hist = hist.reshape(len(arrays), values.size).astype(np.float64)
    return values, hist[: len(records)], hist[len(records):]


def bootstrap_replicates(records: Sequence[ImageRecord], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every statistic of :data:`BOOTSTRAP_STATISTICS` on each weighted resample of the images.

    A resample with weights w (w_i copies of image i) is scored as the pooled data of those copies: TPR =
    Σw·detected / Σw·n_lesions, FPPI = Σw·false_positives / Σw, pooled Dice = 2Σw·∩ / (Σw·∩ + Σw·∪) (1.0 when
    Σw·∪ = 0, as :func:`metrics.pooled_dice_iou`), and the FROC curve of the pooled candidate scores, from which
    TPR at 1 FPPI (:func:`sensitivity_at_fppi`) and the CPM.

    Parameters
    ----------
    records : (n_images,) image records
    weights : int or float (n_resamples, n_images), non-negative whole numbers; a row of ones is the sample itself

    Returns
    -------
    dict statistic -> float64 (n_resamples,); NaN where undefined (no lesion or no image in the resample)
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != len(records):
        raise ValueError(f"weights must have shape (n_resamples, {len(records)}), got {weights.shape}")
    column = {name: np.array([getattr(rec, name) for rec in records], dtype=np.float64)
              for name in ("n_lesions", "detected", "false_positives", "intersection", "union")}
    lesions, images = weights @ column["n_lesions"], weights.sum(axis=1)
    inter, union = weights @ column["intersection"], weights @ column["union"]
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled_dice = np.where(union == 0, 1.0, 2.0 * inter / (inter + union))
    values, fp_hist, hit_hist = _score_histograms(records)
    fp_totals, hit_totals = weights @ fp_hist, weights @ hit_hist
    sensitivities = np.full((weights.shape[0], len(FPPI_POINTS)), np.nan)
    for r in range(weights.shape[0]):
        if lesions[r] > 0 and images[r] > 0:
            _, false_positives, detected = _curve_counts(values, fp_totals[r], hit_totals[r])
            sensitivities[r] = sensitivity_at_fppi(false_positives / images[r], detected / lesions[r])
    return {
        "tpr": _ratio(weights @ column["detected"], lesions),
        "fppi": _ratio(weights @ column["false_positives"], images),
        "tpr_at_1_fppi": sensitivities[:, FPPI_POINTS.index(1.0)],
        "cpm": sensitivities.mean(axis=1),
        "pooled_dice": pooled_dice,
    }


def bootstrap_intervals(records: Sequence[ImageRecord], n_resamples: int, seed: int,
                        groups: Sequence | None = None) -> dict[str, dict]:
    """Point estimates and 95% percentile bootstrap intervals of :data:`BOOTSTRAP_STATISTICS`.

    Parameters
    ----------
    records : (n_images,) :class:`ImageRecord` (or dicts as written by :meth:`ImageRecord.as_dict`)
    n_resamples : int >= 0; 0 gives the estimates with NaN bounds
    seed : int; the same seed, records and groups give the same intervals
    groups : optional (n_images,) patient id of each image; then whole patients are resampled

    Returns
    -------
    dict statistic -> {``estimate`` (on all images), ``low``, ``high`` (2.5th / 97.5th percentiles of the
    resamples where it is defined), ``defined`` (how many resamples that is), ``n_resamples``}
    """
    records = [rec if isinstance(rec, ImageRecord) else ImageRecord.from_dict(rec) for rec in records]
    estimates = bootstrap_replicates(records, np.ones((1, len(records))))
    replicates = bootstrap_replicates(records, resample_weights(len(records), n_resamples, seed, groups))
    out = {}
    for name in BOOTSTRAP_STATISTICS:
        defined = replicates[name][~np.isnan(replicates[name])]
        low, high = np.percentile(defined, [2.5, 97.5]) if defined.size else (math.nan, math.nan)
        out[name] = {"estimate": float(estimates[name][0]), "low": float(low), "high": float(high),
                     "defined": int(defined.size), "n_resamples": int(n_resamples)}
    return out
