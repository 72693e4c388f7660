"""Pixel and lesion metrics at an operating threshold (NumPy/SciPy/scikit-image only: never imports TensorFlow).

Conventions (all stated once here, and tested):

* **Masks** are boolean arrays of one full image, shape (rows, cols), in full-resolution pixels.
* **Probability maps** are stored as uint8, ``round(p * 255)``; :func:`binarise` turns one into a mask with
  the rule ``prob_u8 >= ceil(threshold * 255)``, so the mask saved by inference equals the mask evaluation
  recomputes from the saved map (for threshold 0.5 this is exactly ``p >= 0.5`` of the float probability).
* **Dice / IoU of one image** when prediction and ground truth are both empty: 1.0 (perfect agreement; the
  same as scikit-learn's ``zero_division=1.0``). Such images add 0 to both sums of the pooled metrics.
* **Pooled Dice / IoU** (the paper's eq. 4): ``2·Σ|P∩G| / (Σ|P∩G| + Σ|P∪G|)`` and ``Σ|P∩G| / Σ|P∪G|`` over
  images (``|P|+|G| = |P∩G|+|P∪G|``, so the pooled Dice is the Dice of all images seen as one).
* **"At lesions"** (the paper's second table row): the prediction is restricted to the predicted connected
  components that touch at least one ground-truth lesion pixel; false-positive blobs elsewhere are ignored,
  while the whole ground truth is kept (a missed lesion still counts as false negatives). This measures how
  well the lesions that were found are outlined, independent of false alarms far from them.
* **Lesions**: each ROI mask is one lesion. Predicted lesions are 8-connected components of the binary mask.
  A lesion is *detected* by a component when (rule ``iou``, the default) ``|C∩L| / |C∪L| >= iou_threshold``,
  or (rule ``centroid``) the component contains the lesion's centroid (row/col means, halves rounded up).
  A *false positive* is a component that detects no lesion. TPR = detected / lesions, FPPI = FPs / images.
  (The FROC over candidate scores is :mod:`mammoseg.evaluation.froc`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from skimage.measure import label

__all__ = [
    "MATCH_RULES",
    "binarise",
    "threshold_level",
    "PixelCounts",
    "pixel_counts",
    "dice_iou",
    "pooled_dice_iou",
    "label_components",
    "remove_small_components",
    "restrict_to_lesions",
    "LesionMatch",
    "match_labels",
    "match_lesions",
]

MATCH_RULES = ("iou", "centroid", "centre_in_lesion")


# --------------------------------------------------------------------------------------------------------------
# probability maps
# --------------------------------------------------------------------------------------------------------------
def threshold_level(threshold: float) -> int:
    """The uint8 level at which a probability map quantised as ``round(p*255)`` becomes foreground.

    ``ceil(threshold * 255)``, computed with a small tolerance so that e.g. 0.2 * 255 = 51.000000000000007
    gives 51, not 52.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return int(math.ceil(threshold * 255 - 1e-9))


def binarise(prob_u8: np.ndarray, threshold: float) -> np.ndarray:
    """Binary mask from a uint8 probability map: ``prob_u8 >= ceil(threshold * 255)``.

    Parameters
    ----------
    prob_u8 : np.ndarray of uint8, shape (rows, cols), probability × 255 rounded
    threshold : float in [0, 1]

    Returns
    -------
    np.ndarray of bool, shape (rows, cols)
    """
    if prob_u8.dtype != np.uint8:
        raise TypeError(f"expected a uint8 probability map, got {prob_u8.dtype}")
    return prob_u8 >= threshold_level(threshold)


# --------------------------------------------------------------------------------------------------------------
# pixel metrics
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PixelCounts:
    """Confusion counts of one binary prediction against one binary ground truth (pixels)."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def intersection(self) -> int:
        return self.tp

    @property
    def union(self) -> int:
        return self.tp + self.fp + self.fn

    @property
    def dice(self) -> float:
        return dice_iou(self.tp, self.fp, self.fn)[0]

    @property
    def iou(self) -> float:
        return dice_iou(self.tp, self.fp, self.fn)[1]

    def as_dict(self, prefix: str = "") -> dict[str, float | int]:
        return {
            f"{prefix}tp": self.tp, f"{prefix}fp": self.fp, f"{prefix}fn": self.fn, f"{prefix}tn": self.tn,
            f"{prefix}intersection": self.intersection, f"{prefix}union": self.union,
            f"{prefix}dice": self.dice, f"{prefix}iou": self.iou,
        }


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> None:
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {truth.shape}")


def pixel_counts(pred: np.ndarray, truth: np.ndarray) -> PixelCounts:
    """TP/FP/FN/TN pixel counts of two boolean masks of the same shape (rows, cols)."""
    _check_pair(pred, truth)
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    tp = int(np.count_nonzero(pred & truth))
    n_pred = int(np.count_nonzero(pred))
    n_truth = int(np.count_nonzero(truth))
    fp, fn = n_pred - tp, n_truth - tp
    return PixelCounts(tp=tp, fp=fp, fn=fn, tn=int(pred.size) - tp - fp - fn)


def dice_iou(tp: int, fp: int, fn: int) -> tuple[float, float]:
    """Dice ``2TP/(2TP+FP+FN)`` and IoU ``TP/(TP+FP+FN)``; both 1.0 when prediction and truth are empty."""
    union = tp + fp + fn
    if union == 0:
        return 1.0, 1.0
    return 2.0 * tp / (tp + union), tp / union


def pooled_dice_iou(intersections: Iterable[int], unions: Iterable[int]) -> tuple[float, float]:
    """The paper's eq. (4): ``2Σ∩ / (Σ∩ + Σ∪)`` and ``Σ∩ / Σ∪`` over images; (1.0, 1.0) when Σ∪ = 0."""
    total_inter = float(np.sum(np.asarray(list(intersections), dtype=np.float64)))
    total_union = float(np.sum(np.asarray(list(unions), dtype=np.float64)))
    if total_union == 0:
        return 1.0, 1.0
    return 2.0 * total_inter / (total_inter + total_union), total_inter / total_union


# --------------------------------------------------------------------------------------------------------------
# components
# --------------------------------------------------------------------------------------------------------------
def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels int32 (rows, cols), 0 = background; count)."""
    labels, count = label(np.asarray(mask, dtype=bool), connectivity=2, return_num=True)
    return labels.astype(np.int32, copy=False), int(count)


def remove_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_area`` pixels (``min_area`` <= 1 keeps all)."""
    mask = np.asarray(mask, dtype=bool)
    if min_area <= 1:
        return mask.copy()
    labels, count = label_components(mask)
    if count == 0:
        return mask.copy()
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    keep = areas >= min_area
    keep[0] = False
    return keep[labels]


def restrict_to_lesions(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The prediction restricted to its 8-connected components that touch the ground truth ("at lesions")."""
    _check_pair(pred, truth)
    labels, count = label_components(pred)
    if count == 0:
        return np.zeros(pred.shape, dtype=bool)
    touching = np.zeros(count + 1, dtype=bool)
    touching[np.unique(labels[np.asarray(truth, dtype=bool)])] = True
    touching[0] = False
    return touching[labels]


# --------------------------------------------------------------------------------------------------------------
# lesion matching
# --------------------------------------------------------------------------------------------------------------
@dataclass
class LesionMatch:
    """Lesion-level result of one image.

    Attributes
    ----------
    lesions : list of dict, one per ground-truth lesion (in input order): ``lesion`` (index), ``area`` (px),
        ``centroid_row``, ``centroid_col``, ``best_iou``, ``best_component`` (label or 0), ``detected`` (bool),
        ``detected_by`` (labels of the components that detect it).
    components : list of dict, one per predicted component (label order): ``component`` (label), ``area`` (px),
        ``row0, col0, row1, col1`` (half-open bounding box), ``centroid_row``, ``centroid_col`` (float),
        ``best_iou``, ``matched_lesions`` (indices), ``false_positive`` (bool). Empty when matching was run
        with ``details=False`` (the FROC sweep), which still fills the counts.
    n_components, n_false_positives : int
    """

    lesions: list[dict] = field(default_factory=list)
    components: list[dict] = field(default_factory=list)
    n_components: int = 0
    n_false_positives: int = 0

    @property
    def n_lesions(self) -> int:
        return len(self.lesions)

    @property
    def n_detected(self) -> int:
        return sum(1 for row in self.lesions if row["detected"])


def _centroid(mask: np.ndarray) -> tuple[int, int]:
    """The centroid pixel, halves rounded up (``floor(x + 0.5)``): Python's ``round`` rounds halves to even, which
    made the centroid, and so the centroid rule, depend on the offset of a crop."""
    rows, cols = np.nonzero(mask)
    return int(math.floor(float(rows.mean()) + 0.5)), int(math.floor(float(cols.mean()) + 0.5))


def _component_centroids(labels: np.ndarray, count: int, areas: np.ndarray) -> np.ndarray:
    """float (count + 1, 2): the centroid (row, col) of components 1..count, from the foreground pixels only;
    entry 0 (the background) is unused."""
    flat = np.flatnonzero(labels)
    ids = labels.ravel()[flat]
    rows, cols = np.divmod(flat, labels.shape[1])
    safe = np.maximum(areas, 1)
    return np.stack([np.bincount(ids, weights=rows, minlength=count + 1) / safe,
                     np.bincount(ids, weights=cols, minlength=count + 1) / safe], axis=1)


def _component_centre_pixels(labels: np.ndarray, count: int, areas: np.ndarray) -> np.ndarray:
    """int (count + 1, 2): :func:`_component_centroids` as pixels, halves rounded up as :func:`_centroid`
    rounds them."""
    return np.floor(_component_centroids(labels, count, areas) + 0.5).astype(np.int64)


def _component_rows(labels: np.ndarray, count: int, areas: np.ndarray) -> dict[int, dict]:
    """Bounding boxes (half-open) and centroids of components 1..count, from the foreground pixels only."""
    from scipy import ndimage

    centre_r, centre_c = _component_centroids(labels, count, areas).T
    out = {}
    for index, box in enumerate(ndimage.find_objects(labels, max_label=count), start=1):
        if box is not None:
            out[index] = {"row0": box[0].start, "col0": box[1].start, "row1": box[0].stop, "col1": box[1].stop,
                          "centroid_row": float(centre_r[index]), "centroid_col": float(centre_c[index])}
    return out


def match_labels(
    labels: np.ndarray,
    count: int,
    lesions: Sequence[np.ndarray],
    rule: str = "iou",
    iou_threshold: float = 0.1,
    details: bool = True,
) -> LesionMatch:
    """:func:`match_lesions` on already labelled components (int (rows, cols), 0 = background, 1..count)."""
    if rule not in MATCH_RULES:
        raise ValueError(f"unknown match rule {rule!r}; allowed: {', '.join(MATCH_RULES)}")
    areas = np.bincount(labels.ravel(), minlength=count + 1).astype(np.int64)
    matched = np.zeros(count + 1, dtype=bool)
    matched_lists: dict[int, list[int]] = {}
    best_iou_of_component = np.zeros(count + 1, dtype=np.float64)
    result = LesionMatch(n_components=count)
    centres = _component_centre_pixels(labels, count, areas) if rule == "centre_in_lesion" else None
    for index, lesion in enumerate(lesions):
        lesion = np.asarray(lesion, dtype=bool)
        _check_pair(lesion, labels)
        area = int(np.count_nonzero(lesion))
        if area == 0:
            raise ValueError(f"lesion {index} has an empty mask")
        inter = np.bincount(labels[lesion], minlength=count + 1).astype(np.int64)
        inter[0] = 0
        ious = inter / np.maximum(areas + area - inter, 1)
        ious[0] = 0.0
        best_iou_of_component = np.maximum(best_iou_of_component, ious)
        crow, ccol = _centroid(lesion)
        if rule == "iou":
            hits = [int(k) for k in np.nonzero((ious >= iou_threshold) & (inter > 0))[0]]
        elif rule == "centre_in_lesion":
            hits = [int(k) + 1 for k in np.nonzero(lesion[centres[1:, 0], centres[1:, 1]])[0]]
        else:
            hit = int(labels[crow, ccol])
            hits = [hit] if hit > 0 else []
        for k in hits:
            matched[k] = True
            matched_lists.setdefault(k, []).append(index)
        best = int(np.argmax(ious))
        result.lesions.append({
            "lesion": index, "area": area, "centroid_row": crow, "centroid_col": ccol,
            "best_iou": float(ious[best]), "best_component": best if ious[best] > 0 else 0,
            "detected": bool(hits), "detected_by": hits,
        })
    result.n_false_positives = int(count - np.count_nonzero(matched[1:]))
    if details and count:  # find_objects cannot take an empty label array
        for k, geometry in _component_rows(labels, count, areas).items():
            result.components.append({
                "component": k, "area": int(areas[k]), **geometry, "best_iou": float(best_iou_of_component[k]),
                "matched_lesions": matched_lists.get(k, []), "false_positive": not matched[k],
            })
    return result


def match_lesions(
    pred: np.ndarray,
    lesions: Sequence[np.ndarray],
    rule: str = "iou",
    iou_threshold: float = 0.1,
    details: bool = True,
) -> LesionMatch:
    """Match the 8-connected components of ``pred`` with ground-truth lesions.

    Parameters
    ----------
    pred : np.ndarray of bool, shape (rows, cols), the binary prediction
    lesions : sequence of bool arrays of shape (rows, cols), one per lesion (ROI mask); empty ones are an error
    rule : ``"iou"`` (component/lesion IoU >= ``iou_threshold``), ``"centroid"`` (the component contains the
        lesion's centroid) or ``"centre_in_lesion"`` (the component's centroid lies inside the lesion: the criterion
        of detection studies on circle annotations, a mark counts when its centre is inside the circle)
    iou_threshold : float in [0, 1], used by rule ``"iou"``
    details : False skips the per-component rows (counts only; for the FROC sweep)

    Returns
    -------
    LesionMatch
    """
    labels, count = label_components(pred)
    return match_labels(labels, count, lesions, rule, iou_threshold, details)


# --------------------------------------------------------------------------------------------------------------
# FROC
# --------------------------------------------------------------------------------------------------------------
