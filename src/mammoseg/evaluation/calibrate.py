"""The operating threshold calibrated for a target FPPI on validation candidates (beyond the paper).

The paper binarises at 0.5, which left 2.82 false positives per image on held-out real mammograms; a CAD system is
instead run at the threshold that gives an agreed false-positive rate. Here that threshold is read off the FROC
curve (:func:`mammoseg.evaluation.froc.froc_curve`, its conventions unchanged) of candidates that the model did not
train on (out-of-fold predictions of the training images) and is then applied unchanged to the test images. This
module never sees which images its candidates come from: keeping test images out is the caller's job (the workflow
passes out-of-fold candidates only).

Conventions:

* Thresholds are the curve's: every distinct candidate score, and +inf (nothing counts). A candidate counts at
  threshold ``t`` when its score (maximum probability) is ``>= t``; candidates with equal scores count together,
  so the FPPI of the chosen threshold never exceeds the target (ties are never split).
* The chosen threshold is the **lowest** whose FPPI is ``<= target_fppi``: the most sensitive admissible one.
* As a pixel threshold (``metrics.binarise``: ``prob_u8 >= ceil(t * 255)``) a score ``k / 255`` keeps exactly the
  candidates scoring ``>= k / 255``, so the binarised map detects what the curve counted. Binarised pixel by pixel
  (``evaluate.binarise: threshold``) a candidate can still break into several components, so ``expected_fppi`` is
  the candidates' FPPI; binarised candidate by candidate (``evaluate.binarise: candidates``) each mark is one
  candidate and the operating point on these images is the curve's.
* **When even the top score exceeds the target** (the best-scoring candidates alone are more false positives per
  image than allowed), the threshold is ``math.inf``: no candidate is admissible, ``expected_tpr`` and
  ``expected_fppi`` are 0. It is no pixel threshold; :func:`operating_threshold` reports it as unreachable.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mammoseg.errors import ConfigError, InputError
from mammoseg.evaluation.froc import froc_curve
from mammoseg.evaluation.summary import candidate_scores, read_image_records
from mammoseg.io.atomic import write_text_atomic

__all__ = ["calibrate_threshold", "operating_threshold", "run_calibrate", "evaluation_threshold"]


def calibrate_threshold(fp_scores: Sequence[float] | np.ndarray, lesion_hit_scores: Sequence[float] | np.ndarray,
                        n_lesions: int, n_images: int, target_fppi: float) -> dict[str, Any]:  # fmt: skip
    """The lowest candidate-score threshold whose FPPI on these candidates is at most ``target_fppi``.

    Parameters
    ----------
    fp_scores : float (n_fp,), scores of the false-positive candidates of all calibration images
    lesion_hit_scores : float (n_lesions,), hit score of every lesion (0.0 for a missed lesion), as
        :func:`mammoseg.evaluation.froc.froc_curve` takes them
    n_lesions : int >= 0; n_images : int >= 1, the calibration images (lesion-free ones included)
    target_fppi : float >= 0, false positives per image allowed

    Returns
    -------
    dict: ``threshold`` (float in (0, 1], or ``math.inf`` when no candidate score is admissible),
    ``expected_tpr`` (detected / n_lesions at it; NaN without lesions), ``expected_fppi``, ``detected``,
    ``false_positives`` (int), ``target_fppi``, ``n_lesions``, ``n_images``.
    """
    if not (math.isfinite(target_fppi) and target_fppi >= 0):
        raise ValueError(f"target_fppi must be a finite number >= 0, got {target_fppi}")
    curve = froc_curve(fp_scores, lesion_hit_scores, n_lesions, n_images)
    # the curve runs from the lowest threshold up; its last point (+inf) has FPPI 0, so one always qualifies
    k = int(np.flatnonzero(curve.fppi <= target_fppi)[0])
    return {
        "threshold": float(curve.score_thresholds[k]), "expected_tpr": float(curve.sensitivity[k]),
        "expected_fppi": float(curve.fppi[k]), "detected": int(curve.detected[k]),
        "false_positives": int(curve.false_positives[k]), "target_fppi": float(target_fppi),
        "n_lesions": int(n_lesions), "n_images": int(n_images),
    }


def operating_threshold(infer: Mapping[str, Any], evaluate: Mapping[str, Any],
                        fp_scores: Sequence[float] | np.ndarray, lesion_hit_scores: Sequence[float] | np.ndarray,
                        n_lesions: int, n_images: int) -> dict[str, Any]:  # fmt: skip
    """The threshold evaluation binarises at: ``infer.threshold``, or the calibrated one when
    ``evaluate.target_fppi`` > 0 (the one place that decides between them).

    Parameters
    ----------
    infer, evaluate : the validated ``infer`` and ``evaluate`` config sections
    fp_scores, lesion_hit_scores, n_lesions, n_images : the out-of-fold calibration candidates
        (:func:`calibrate_threshold`); unused when ``target_fppi`` is 0

    Returns
    -------
    dict: ``threshold`` (float in [0, 1]), ``source`` (``"infer.threshold"`` or ``"calibrated"``) and, when
    calibrated, the :func:`calibrate_threshold` result under ``calibration``.

    Raises
    ------
    ValueError
        When the target cannot be met by any candidate score (the calibration's threshold is +inf): the model's
        best-scoring validation candidates already exceed it, and no pixel threshold in [0, 1] would; or there is
        no candidate at all to calibrate on (said so).
    """
    target = float(evaluate["target_fppi"])
    if target == 0:
        return {"threshold": float(infer["threshold"]), "source": "infer.threshold"}
    calibration = calibrate_threshold(fp_scores, lesion_hit_scores, n_lesions, n_images, target)
    if math.isinf(calibration["threshold"]):
        if len(fp_scores) == 0 and not np.any(np.asarray(lesion_hit_scores, dtype=float) > 0):
            raise ValueError(f"evaluate.target_fppi = {target}: the out-of-fold maps hold no candidate at all (no "
                             f"component at or above evaluate.candidate_threshold), so there is nothing to calibrate "
                             f"on; the model marks nothing")
        raise ValueError(f"evaluate.target_fppi = {target}: even the top-scoring validation candidates give more "
                         f"false positives per image; no threshold in [0, 1] meets it")
    return {"threshold": calibration["threshold"], "source": "calibrated", "calibration": calibration}


def run_calibrate(chunk_dirs: Sequence[str | Path], out_path: str | Path, *, config: Mapping[str, Any]) -> dict:
    """Stage ``calibrate``: the operating threshold of the out-of-fold evaluation's candidates (the per-image JSONs
    of ``chunk_dirs``), written atomically as JSON to ``out_path`` (:func:`operating_threshold`'s dict).

    Raises
    ------
    InputError
        When no image of the chunks was evaluated, or no threshold meets ``evaluate.target_fppi``.
    """
    evaluated = [rec for rec in read_image_records(chunk_dirs) if rec["status"] == "evaluated"]
    if not evaluated:
        raise InputError(f"{out_path}: no evaluated out-of-fold image to calibrate the operating threshold on")
    try:
        point = operating_threshold(config["infer"], config["evaluate"], *candidate_scores(evaluated))
    except ValueError as exc:
        raise InputError(f"{out_path}: {exc}") from None
    write_text_atomic(out_path, json.dumps(point, indent=2, sort_keys=True) + "\n")
    if point["source"] == "calibrated":
        c = point["calibration"]
        print(f"operating threshold {point['threshold']:.4f}: FPPI {c['expected_fppi']:.2f} <= {c['target_fppi']:g}, "
              f"TPR {c['expected_tpr']:.3f} ({c['detected']}/{c['n_lesions']}) on {c['n_images']} out-of-fold images")
    return point


def evaluation_threshold(config: Mapping[str, Any], image_set: str, operating_point: str | Path | None = None) -> float:
    """The threshold an image set is binarised at: ``infer.threshold`` for out-of-fold images (they calibrate it)
    and whenever ``evaluate.target_fppi`` is 0; else the calibrated one read from ``operating_point`` (the JSON of
    :func:`run_calibrate`, also in an exported model's folder), which must be calibrated for that target.

    Raises
    ------
    ConfigError
        ``target_fppi`` > 0 without an operating point, or an operating point given while ``target_fppi`` is 0.
    InputError
        An operating point that cannot be read, is not a calibration, or was calibrated for another target.
    """
    target = float(config["evaluate"]["target_fppi"])
    if target == 0 and operating_point is not None and image_set != "oof":
        raise ConfigError(f"{operating_point}: an operating point is given but evaluate.target_fppi is 0 "
                          f"(set it to the target the point was calibrated for, or leave the point out)")
    if image_set == "oof" or target == 0:
        return float(config["infer"]["threshold"])
    if operating_point is None:
        raise ConfigError(f"evaluate.target_fppi = {target:g} needs the calibrated operating point "
                          f"(operating_point.json of the experiment) to binarise {image_set!r} images")
    try:
        point = json.loads(Path(operating_point).read_text())
        calibrated_for = float(point["calibration"]["target_fppi"])
        threshold = float(point["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{operating_point}: not an operating point written by calibration: "
                         f"{type(exc).__name__}: {exc}") from None
    if point.get("source") != "calibrated" or calibrated_for != target:
        raise InputError(f"{operating_point}: calibrated for FPPI {calibrated_for:g}, but evaluate.target_fppi is "
                         f"{target:g}")
    return threshold
