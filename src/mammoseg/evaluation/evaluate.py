"""Stage ``evaluate``: per image of a prediction chunk, metrics (JSON), the binary mask (PNG) and the overlay.

Binarising belongs here, not to prediction: predictions are probability maps, so a new threshold re-runs this
stage and the summaries only. Never imports TensorFlow. Metric definitions and conventions are in
:mod:`mammoseg.evaluation.metrics`; the tables over all images are made by :mod:`mammoseg.evaluation.summary`.

Per image (:func:`evaluate_image`), at the configured ``infer.threshold`` and for each ``min_area`` variant (0 = as
predicted; plus ``evaluate.min_area`` when > 0): pixel counts, Dice/IoU over the whole image and "at lesions",
lesion rows and false-positive component rows; and for the FROC, the candidates of the probability map (components
at or above ``evaluate.candidate_threshold``, scored by their maximum probability; :mod:`.froc`) with the lesion
each is credited to. The overlay shows the prediction as made (no ``min_area`` filtering).

The operating-threshold work is done inside the bounding box of (prediction at the threshold) ∪ ground truth:
outside it the prediction is empty and there is no lesion, so only true negatives are skipped, and they are added
back from the image size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from mammoseg.data.manifest import chunk_count, has_truth, is_normal, lesion_rows, read_manifest, rows_of_bucket
from mammoseg.errors import InputError
from mammoseg.evaluation import froc, metrics
from mammoseg.evaluation.calibrate import evaluation_threshold
from mammoseg.evaluation.overlays import FINDINGS_LEGEND, add_legend, make_overlay, write_overlay
from mammoseg.evaluation.postprocess import operating_mask, postprocess
from mammoseg.inference.predict import load_prediction
from mammoseg.io.atomic import atomic_directory, atomic_path, write_json_atomic
from mammoseg.io.dicom import read_mammogram
from mammoseg.io.masks import read_mask
from mammoseg.io.seg import write_seg

__all__ = ["load_lesions", "evaluate_arrays", "evaluate_image", "findings_image", "evaluate_chunk", "write_mask_png"]


def _variants(min_area: int) -> list[int]:
    return [0] + ([int(min_area)] if min_area > 1 else [])


# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------
def load_lesions(rows: Sequence[Mapping[str, str]], base: str | Path, shape: tuple[int, int]
                 ) -> tuple[list[str], list[np.ndarray], list[dict]]:  # fmt: skip
    """Read the ROI masks of one image (one lesion per manifest row).

    Parameters
    ----------
    rows : the image's manifest rows (``roi_id``, ``mask_path`` relative to ``base``; a normal image's one row
        has none, and the image no lesion)
    base : the folder of the manifest
    shape : (rows, cols) of the prediction; a mask of another shape is an error naming the file

    Returns
    -------
    (roi ids, lesion masks bool (rows, cols), skipped rows {roi_id, reason, message})
        Empty masks are skipped with a reason, never silently dropped.
    """
    roi_ids, masks, skipped = [], [], []
    for row in lesion_rows(rows):  # a normal image's row has no mask: no lesion
        mask_path = Path(base) / row["mask_path"]
        try:
            read = read_mask(mask_path)
        except Exception as exc:  # noqa: BLE001 - decoder errors of any kind, named
            raise InputError(f"{mask_path}: cannot read ROI mask {row['roi_id']}: {exc}") from exc
        if read.mask.shape != tuple(shape):
            raise InputError(f"{mask_path}: mask shape {read.mask.shape} differs from the prediction {tuple(shape)}")
        if read.bbox is None:
            skipped.append({"roi_id": row["roi_id"], "reason": "empty_mask", "message": f"{mask_path}: no foreground"})
            continue
        roi_ids.append(row["roi_id"])
        masks.append(read.mask)
    return roi_ids, masks, skipped


def _active_box(mask: np.ndarray, truth: np.ndarray) -> tuple[slice, slice]:
    """Bounding box (slices) of the pixels of the operating mask or the ground truth."""
    active = mask | truth
    rows = np.flatnonzero(active.any(axis=1))
    cols = np.flatnonzero(active.any(axis=0))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


# --------------------------------------------------------------------------------------------------------------
# per image
# --------------------------------------------------------------------------------------------------------------
def _offset(rows: list[dict], dr: int, dc: int, keys_r: Sequence[str], keys_c: Sequence[str]) -> list[dict]:
    for row in rows:
        for key in keys_r:
            row[key] += dr
        for key in keys_c:
            row[key] += dc
    return rows


def _operating_mask(prob: np.ndarray, threshold: float, evaluate: Mapping[str, Any]) -> np.ndarray:
    """The mask at the operating threshold as ``evaluate.binarise`` asks (one place for every caller)."""
    return operating_mask(prob, threshold, binarise=evaluate["binarise"],
                          candidate_threshold=float(evaluate["candidate_threshold"]))


def evaluate_arrays(prob: np.ndarray, lesions: Sequence[np.ndarray], evaluate: Mapping[str, Any],
                    threshold: float) -> dict:  # fmt: skip
    """All per-image numbers from a uint8 probability map and the lesion masks (no files).

    Parameters
    ----------
    prob : uint8 (rows, cols), probability × 255
    lesions : bool masks (rows, cols), one per lesion, none empty
    evaluate : the ``evaluate`` config section; threshold : the operating threshold (``infer.threshold``)

    Returns
    -------
    dict with ``results`` (one per min_area variant, at the operating threshold: pixel metrics, at-lesion
    metrics, lesion and false-positive component rows, in full-image coordinates), ``candidates`` and
    ``lesion_hits`` (the FROC candidates of :func:`mammoseg.evaluation.froc.image_candidates`) and ``record``
    (what the bootstrap needs, :class:`mammoseg.evaluation.froc.ImageRecord`), and ``mask``: the operating mask
    (bool (rows, cols), :func:`mammoseg.evaluation.postprocess.operating_mask`; not JSON, the caller writes it).
    """
    shape = prob.shape
    total = int(prob.size)
    truth_full = np.zeros(shape, dtype=bool)
    for lesion in lesions:
        truth_full |= lesion
    mask = _operating_mask(prob, threshold, evaluate)
    box = _active_box(mask, truth_full)  # components and pixel counts measured on the crop that holds them all
    dr, dc = box[0].start, box[1].start
    truth = truth_full[box]
    lesions_c = [lesion[box] for lesion in lesions]
    rule, tau = evaluate["match"], float(evaluate["iou_threshold"])

    def counts(pred: np.ndarray, gt: np.ndarray) -> metrics.PixelCounts:
        c = metrics.pixel_counts(pred, gt)
        return metrics.PixelCounts(tp=c.tp, fp=c.fp, fn=c.fn, tn=total - c.tp - c.fp - c.fn)

    results = []
    raw = mask[box]
    for min_area in _variants(int(evaluate["min_area"])):
        pred = metrics.remove_small_components(raw, min_area)
        match = metrics.match_lesions(pred, lesions_c, rule=rule, iou_threshold=tau)
        results.append({
            "min_area": min_area,
            "pixel": counts(pred, truth).as_dict(),
            "at_lesions": counts(metrics.restrict_to_lesions(pred, truth), truth).as_dict(),
            "n_lesions": match.n_lesions, "detected": match.n_detected,
            "false_positives": match.n_false_positives,
            "lesions": _offset(match.lesions, dr, dc, ["centroid_row"], ["centroid_col"]),
            "fp_components": _offset([c for c in match.components if c["false_positive"]], dr, dc,
                                     ["row0", "row1", "centroid_row"], ["col0", "col1", "centroid_col"]),
        })
    found = froc.image_candidates(prob, lesions, candidate_threshold=float(evaluate["candidate_threshold"]),
                                  match=rule, iou_threshold=tau)
    as_predicted = results[0]
    record = froc.ImageRecord.from_candidates(
        found, detected=as_predicted["detected"], false_positives=as_predicted["false_positives"],
        intersection=as_predicted["pixel"]["intersection"], union=as_predicted["pixel"]["union"])
    return {"results": results, "candidates": found.candidates, "lesion_hits": found.lesions,
            "record": record.as_dict(), "mask": mask}


def evaluate_image(prob: np.ndarray, meta: Mapping[str, Any], rows: Sequence[Mapping[str, str]], base: Path,
                   out_dir: Path, *, threshold: float, evaluate: Mapping[str, Any],
                   experiment: str = "") -> dict[str, Any]:  # fmt: skip
    """Metrics, binary mask, overlay and DICOM SEG of one predicted image; writes ``{image_id}.json``,
    ``.mask.png``, ``.overlay.png`` (with a legend) and ``.seg.dcm`` (``evaluate.seg``) into ``out_dir`` and
    returns the JSON payload."""
    image_id = rows[0]["image_id"]
    image_path = base / rows[0]["image_path"]
    roi_ids, lesions, skipped = load_lesions(rows, base, prob.shape)
    numbers = evaluate_arrays(prob, lesions, evaluate, threshold)
    mask = numbers.pop("mask")
    for result in numbers["results"]:
        for row in result["lesions"]:
            row["roi_id"] = roi_ids[row["lesion"]]
    payload: dict[str, Any] = {
        "image_id": image_id, "patient_id": rows[0]["patient_id"], "status": "evaluated",
        "normal": all(is_normal(row) for row in rows),
        "image_path": str(image_path), "threshold": threshold, "binarise": evaluate["binarise"],
        "match": evaluate["match"],
        "iou_threshold": evaluate["iou_threshold"], "shape": list(prob.shape), "n_lesions": len(lesions),
        "lesions_skipped": skipped, "prediction": dict(meta), **numbers,
    }
    try:
        image = read_mammogram(image_path)
    except Exception as exc:  # noqa: BLE001 - named and re-raised
        raise InputError(f"{image_path}: cannot read mammogram for the overlay of {image_id}: {exc}") from exc
    if image.shape != prob.shape:
        raise InputError(f"{image_path}: image shape {image.shape} differs from its prediction {prob.shape}")
    truth = np.zeros(prob.shape, dtype=bool)
    for lesion in lesions:
        truth |= lesion
    overlay = make_overlay(image, mask, truth, int(evaluate["overlay_max_side"]))
    write_overlay(out_dir / f"{image_id}.overlay.png", add_legend(overlay, image_id))
    write_mask_png(out_dir / f"{image_id}.mask.png", mask)
    payload["seg"] = write_image_seg(image_path, mask if evaluate["seg"] == "binary" else prob,
                                     out_dir / f"{image_id}.seg.dcm", kind=evaluate["seg"], experiment=experiment)
    write_json_atomic(out_dir / f"{image_id}.json", payload)
    return payload


def findings_image(prob: np.ndarray, meta: Mapping[str, Any], row: Mapping[str, str], base: Path, out_dir: Path, *,
                   threshold: float, evaluate: Mapping[str, Any], experiment: str = "") -> dict[str, Any]:  # fmt: skip
    """What a model finds on an image without ground truth (a new study): the binary mask, an overlay of the
    prediction, the DICOM SEG, the candidates (score, area, position) and the marks at the operating threshold.
    Writes ``{image_id}.json``, ``.mask.png``, ``.overlay.png`` and ``.seg.dcm`` into ``out_dir``."""
    image_id, image_path = row["image_id"], base / row["image_path"]
    mask = _operating_mask(prob, threshold, evaluate)
    found = froc.image_candidates(prob, [], candidate_threshold=float(evaluate["candidate_threshold"]),
                                  match=evaluate["match"], iou_threshold=float(evaluate["iou_threshold"]))
    marks = metrics.match_lesions(mask, []).components
    for mark in marks:  # the highest probability inside each mark
        region = prob[mark["row0"]:mark["row1"], mark["col0"]:mark["col1"]][mask[mark["row0"]:mark["row1"],
                                                                                  mark["col0"]:mark["col1"]]]
        mark["score"] = float(region.max()) / 255.0
    payload: dict[str, Any] = {
        "image_id": image_id, "patient_id": row["patient_id"], "status": "evaluated", "truth": "unknown",
        "image_path": str(image_path), "threshold": threshold, "shape": list(prob.shape), "prediction": dict(meta),
        "candidates": [{k: c[k] for k in ("candidate", "score", "area", "centroid_row", "centroid_col", "row0",
                                           "col0", "row1", "col1")} for c in found.candidates],
        "marks": [{k: m[k] for k in ("area", "score", "centroid_row", "centroid_col", "row0", "col0", "row1", "col1")}
                  for m in marks],
    }
    try:
        image = read_mammogram(image_path)
    except Exception as exc:  # noqa: BLE001 - named and re-raised
        raise InputError(f"{image_path}: cannot read mammogram for the overlay of {image_id}: {exc}") from exc
    overlay = make_overlay(image, mask, np.zeros_like(mask), int(evaluate["overlay_max_side"]))
    write_overlay(out_dir / f"{image_id}.overlay.png", add_legend(overlay, image_id, FINDINGS_LEGEND))
    write_mask_png(out_dir / f"{image_id}.mask.png", mask)
    payload["seg"] = write_image_seg(image_path, mask if evaluate["seg"] == "binary" else prob,
                                     out_dir / f"{image_id}.seg.dcm", kind=evaluate["seg"], experiment=experiment)
    write_json_atomic(out_dir / f"{image_id}.json", payload)
    return payload


def write_image_seg(source: Path, pixels: np.ndarray, out_path: Path, *, kind: str, experiment: str) -> str:
    """The DICOM SEG of one image (:mod:`mammoseg.io.seg`); what was done, for the per-image JSON.

    ``kind`` ``none`` writes nothing; a source that is not a DICOM file (the Kaggle layout's JPEGs) gets no SEG,
    with the reason recorded, since a SEG must reference a DICOM image.
    """
    if kind == "none":
        return "not requested (evaluate.seg: none)"
    try:
        write_seg(source, pixels, out_path, kind=kind, experiment=experiment)
    except InputError as exc:  # a source that cannot be referenced (not DICOM, no SOP Instance UID)
        return f"not written: {exc}"
    return f"{kind}: {out_path.name}"


def write_mask_png(path: str | Path, mask: np.ndarray) -> None:
    """A binary mask (bool (rows, cols)) as an 8-bit PNG, foreground 255, written atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(tmp, format="PNG")


def evaluate_chunk(prediction_dir: str | Path, manifest_rows: Sequence[Mapping[str, str]], manifest_base: str | Path,
                   out_dir: str | Path, *, threshold: float, evaluate: Mapping[str, Any], experiment: str = "",
                   log=print) -> list[dict[str, Any]]:  # fmt: skip
    """Evaluate every image of one prediction chunk against its ROI masks; write the chunk's folder atomically.

    Parameters
    ----------
    prediction_dir : a chunk folder of :func:`mammoseg.inference.predict.predict_images` (``predictions.csv``
        and ``{image_id}.prob.npz``)
    manifest_rows : the manifest rows of (at least) the chunk's images; paths relative to ``manifest_base``
    out_dir : the chunk's evaluation folder: ``{image_id}.json``, ``.mask.png``, ``.overlay.png`` per predicted
        image, and a ``{image_id}.json`` with ``status: not_predicted`` and the reason for an image whose
        prediction failed (so the summary counts it)
    threshold : the operating threshold (``infer.threshold``); evaluate : the ``evaluate`` config section

    Returns
    -------
    list of the per-image payloads written.
    """
    prediction_dir, base = Path(prediction_dir), Path(manifest_base)
    status = pd.read_csv(prediction_dir / "predictions.csv", dtype=str, keep_default_na=False)
    by_image: dict[str, list[Mapping[str, str]]] = {}
    for row in manifest_rows:
        by_image.setdefault(row["image_id"], []).append(row)
    payloads = []
    with atomic_directory(out_dir) as tmp:
        for record in status.to_dict("records"):
            image_id = record["image_id"]
            if image_id not in by_image:
                raise InputError(f"{prediction_dir}: image {image_id} is not in the manifest")
            if record["status"] != "predicted":
                payload = {"image_id": image_id, "patient_id": by_image[image_id][0]["patient_id"],
                           "status": "not_predicted", "reason": record["reason"], "message": record["message"],
                           "n_lesions": len(lesion_rows(by_image[image_id])),
                           "normal": all(is_normal(row) for row in by_image[image_id])}
                write_json_atomic(tmp / f"{image_id}.json", payload)
                log(f"{image_id}: not evaluated, its prediction failed ({record['reason']})")
            else:
                prob, meta = load_prediction(prediction_dir / f"{image_id}.prob.npz")
                # before anything is measured, so masks, candidates, FROC, overlays and SEG see one map
                prob = postprocess(prob, candidate_threshold=float(evaluate["candidate_threshold"]),
                                   **evaluate["postprocess"])
                if not has_truth(by_image[image_id]):  # a new study: what the model finds, no metrics
                    payload = findings_image(prob, meta, by_image[image_id][0], base, tmp, threshold=threshold,
                                             evaluate=evaluate, experiment=experiment)
                    log(f"{image_id}: {len(payload['marks'])} marks at threshold {threshold}")
                else:
                    payload = evaluate_image(prob, meta, by_image[image_id], base, tmp, threshold=threshold,
                                             evaluate=evaluate, experiment=experiment)
                    log(f"{image_id}: {payload['results'][0]['detected']}/{payload['n_lesions']} lesions, "
                        f"{payload['results'][0]['false_positives']} false positives")
            payloads.append(payload)
    return payloads


def run_evaluate_chunk(prediction_dir: str | Path, manifest: str | Path, out_dir: str | Path, *, chunk: int,
                       config: Mapping[str, Any], image_set: str, experiment: str = "",
                       operating_point: str | Path | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Stage ``evaluate_chunk``: :func:`evaluate_chunk` for chunk ``chunk`` of ``manifest``, with the resolved
    configuration's ``infer.chunk_size`` and ``evaluate`` settings, at the threshold of
    :func:`mammoseg.evaluation.calibrate.evaluation_threshold` (``operating_point``: the calibration's JSON when
    ``evaluate.target_fppi`` > 0); ``experiment`` names the algorithm version in the DICOM SEGs."""
    all_rows = read_manifest(manifest)
    rows = rows_of_bucket(all_rows, chunk, chunk_count(all_rows, config["infer"]["chunk_size"]))
    payloads = evaluate_chunk(prediction_dir, rows, Path(manifest).parent, out_dir,
                              threshold=evaluation_threshold(config, image_set, operating_point),
                              evaluate=config["evaluate"], experiment=experiment)
    print(f"chunk {chunk}: {sum(p['status'] == 'evaluated' for p in payloads)} images evaluated -> {out_dir}")
    return payloads

