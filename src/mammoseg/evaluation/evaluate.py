"""Stage glue for evaluation: one JSON + one overlay per test image, then the tables of a whole model.

Never imports TensorFlow (predictions are read with :func:`mammoseg.inference.sliding.load_prediction`, which does not
need it). Metric definitions and conventions are in :mod:`mammoseg.evaluation.metrics`.

Per image (``run_evaluate``), at the configured ``infer.threshold`` and for each ``min_area`` variant (0 = as
predicted; plus ``evaluate.min_area`` when > 0): pixel counts, Dice/IoU over the whole image and "at lesions",
lesion rows and false-positive component rows; and for the FROC, per threshold of
:func:`mammoseg.evaluation.metrics.froc_threshold_grid` and variant: detected lesions, FP components, TP/FP/FN pixels.
The overlay shows the prediction as made (no ``min_area`` filtering).

All pixel work is done inside the bounding box of (probability > 0 at the lowest threshold) ∪ ground truth:
outside it the prediction is empty at every threshold and there is no lesion, so only true negatives are
skipped, and they are added back from the image size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from mammoseg.io.atomic import atomic_path, write_csv_atomic, write_json_atomic
from mammoseg.config import section_hash, validate_config
from mammoseg.io.dicom import read_mammogram
from mammoseg.io.masks import read_mask
from mammoseg.inference.sliding import load_prediction
from mammoseg.evaluation import metrics
from mammoseg.evaluation.overlays import make_overlay, write_overlay

__all__ = ["config_hash", "load_lesions", "evaluate_arrays", "run_evaluate", "run_summarise", "FPPI_BUDGETS"]

FPPI_BUDGETS = (0.5, 1.0, 2.0, 4.0)


def config_hash(config: dict) -> str:
    """Hash of everything that shapes an evaluation: patch geometry, inference and evaluation settings."""
    return section_hash(config["patches"]["n"], config["patches"]["downscale"], config["infer"], config["evaluate"])


def _variants(min_area: int) -> list[int]:
    return [0] + ([int(min_area)] if min_area > 1 else [])


# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------
def load_lesions(manifest_csv: str | Path, image_id: str, shape: tuple[int, int]) -> tuple[Path, list[str], list[np.ndarray], list[dict]]:
    """Read the ROI masks of one image from the manifest (one lesion per ROI).

    Returns
    -------
    (image path, roi ids, lesion masks bool (rows, cols), skipped rows {roi_id, reason, message})
        Empty masks are skipped with a reason, never silently dropped; a mask whose shape differs from
        ``shape`` is an error naming the file.
    """
    manifest_csv = Path(manifest_csv)
    try:
        table = pd.read_csv(manifest_csv, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{manifest_csv}: cannot read manifest: {exc}") from exc
    missing = {"roi_id", "image_id", "image_path", "mask_path"} - set(table.columns)
    if missing:
        raise ValueError(f"{manifest_csv}: manifest lacks columns {sorted(missing)}")
    rows = table[table["image_id"] == image_id]
    if rows.empty:
        raise ValueError(f"{manifest_csv}: no ROI row for image_id {image_id!r}")
    base = manifest_csv.parent
    image_path = base / rows["image_path"].iloc[0]
    roi_ids, masks, skipped = [], [], []
    for roi_id, mask_rel in zip(rows["roi_id"], rows["mask_path"]):
        mask_path = base / mask_rel
        try:
            read = read_mask(mask_path)
        except Exception as exc:  # noqa: BLE001 - decoder errors of any kind, named
            raise ValueError(f"{mask_path}: cannot read ROI mask {roi_id}: {exc}") from exc
        if read.mask.shape != tuple(shape):
            raise ValueError(f"{mask_path}: mask shape {read.mask.shape} differs from the prediction {tuple(shape)}")
        if not read.mask.any():
            skipped.append({"roi_id": roi_id, "reason": "empty_mask", "message": f"{mask_path}: no foreground"})
            continue
        roi_ids.append(roi_id)
        masks.append(read.mask)
    return image_path, roi_ids, masks, skipped


def _active_box(prob: np.ndarray, lowest_level: int, truth: np.ndarray) -> tuple[slice, slice]:
    """Bounding box (slices) of pixels that can be foreground at any threshold, or are ground truth."""
    active = (prob >= max(lowest_level, 1)) | truth
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


def evaluate_arrays(prob: np.ndarray, lesions: Sequence[np.ndarray], eval_cfg: dict, threshold: float) -> dict:
    """All per-image numbers from a uint8 probability map and the lesion masks (no files).

    Parameters
    ----------
    prob : uint8 (rows, cols), probability × 255
    lesions : bool masks (rows, cols), one per lesion, none empty
    eval_cfg : the ``evaluate`` config section; threshold : the operating threshold (``infer.threshold``)

    Returns
    -------
    dict with ``results`` (one per min_area variant: pixel metrics, at-lesion metrics, lesion and FP
    component rows, in full-image coordinates) and ``froc`` (one row per threshold × variant).
    """
    shape = prob.shape
    total = int(prob.size)
    truth_full = np.zeros(shape, dtype=bool)
    for lesion in lesions:
        truth_full |= lesion
    grid = metrics.froc_threshold_grid(int(eval_cfg["froc_thresholds"]))
    lowest = min(metrics.threshold_level(float(grid.min())), metrics.threshold_level(threshold))
    box = _active_box(prob, lowest, truth_full)
    dr, dc = box[0].start, box[1].start
    prob_c, truth = prob[box], truth_full[box]
    lesions_c = [lesion[box] for lesion in lesions]
    rule, tau = eval_cfg["match"], float(eval_cfg["iou_threshold"])

    def counts(pred: np.ndarray, gt: np.ndarray) -> metrics.PixelCounts:
        c = metrics.pixel_counts(pred, gt)
        return metrics.PixelCounts(tp=c.tp, fp=c.fp, fn=c.fn, tn=total - c.tp - c.fp - c.fn)

    results = []
    raw = metrics.binarise(prob_c, threshold)
    for min_area in _variants(int(eval_cfg["min_area"])):
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
    froc = []
    for t in grid:  # one labelling per threshold; the min_area variant filters those labels
        labels, count = metrics.label_components(metrics.binarise(prob_c, float(t)))
        for min_area in _variants(int(eval_cfg["min_area"])):
            kept, kept_count = metrics.filter_components(labels, count, min_area)
            match = metrics.match_labels(kept, kept_count, lesions_c, rule, tau, details=False)
            c = counts(kept > 0, truth)
            froc.append({"threshold": float(t), "min_area": min_area, "detected": match.n_detected,
                         "false_positives": match.n_false_positives, "tp": c.tp, "fp": c.fp, "fn": c.fn})
    return {"results": results, "froc": froc}


def run_evaluate(config: dict, prob_npz: str | Path, manifest_csv: str | Path, image_id: str,
                 out_json: str | Path, out_overlay: str | Path) -> dict:
    """Stage entry: evaluate one image's saved prediction against its ROI masks; write JSON and overlay.

    Parameters
    ----------
    config : whole config (validated here); uses ``infer.threshold``, ``evaluate`` and ``patches``
    prob_npz : ``{image_id}.prob.npz`` from the predict stage
    manifest_csv : the test manifest (paths in it are relative to its folder)
    image_id : which image; out_json, out_overlay : outputs

    Returns
    -------
    dict : the JSON payload written.
    """
    config = validate_config(config)
    eval_cfg, threshold = config["evaluate"], float(config["infer"]["threshold"])
    prob, meta = load_prediction(prob_npz)
    image_path, roi_ids, lesions, skipped = load_lesions(manifest_csv, image_id, prob.shape)
    numbers = evaluate_arrays(prob, lesions, eval_cfg, threshold)
    for result in numbers["results"]:
        for row in result["lesions"]:
            row["roi_id"] = roi_ids[row["lesion"]]
    payload: dict[str, Any] = {
        "image_id": image_id, "prob_npz": str(prob_npz), "image_path": str(image_path),
        "config_hash": config_hash(config), "threshold": threshold, "match": eval_cfg["match"],
        "iou_threshold": eval_cfg["iou_threshold"], "shape": list(prob.shape), "n_lesions": len(lesions),
        "lesions_skipped": skipped, "prediction": meta, **numbers,
    }
    try:
        image = read_mammogram(image_path)
    except Exception as exc:  # noqa: BLE001 - named and re-raised
        raise ValueError(f"{image_path}: cannot read mammogram for the overlay of {image_id}: {exc}") from exc
    if image.shape != prob.shape:
        raise ValueError(f"{image_path}: image shape {image.shape} differs from the prediction {prob.shape} "
                         f"in {prob_npz}")
    truth = np.zeros(prob.shape, dtype=bool)
    for lesion in lesions:
        truth |= lesion
    overlay = make_overlay(image, metrics.binarise(prob, threshold), truth, int(eval_cfg["overlay_max_side"]))
    write_overlay(out_overlay, overlay)
    write_json_atomic(out_json, payload)
    return payload


# --------------------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------------------
def _per_image_rows(records: list[dict], model: str, chash: str) -> list[dict]:
    rows = []
    for rec in records:
        for res in rec["results"]:
            pix, at = res["pixel"], res["at_lesions"]
            rows.append({
                "model": model, "config_hash": chash, "image_id": rec["image_id"], "min_area": res["min_area"],
                "n_lesions": res["n_lesions"], "detected": res["detected"],
                "false_positives": res["false_positives"],
                **{k: pix[k] for k in ("tp", "fp", "fn", "tn", "intersection", "union", "dice", "iou")},
                "at_lesions_intersection": at["intersection"], "at_lesions_union": at["union"],
                "dice_at_lesions": at["dice"], "iou_at_lesions": at["iou"],
            })
    return rows


def _lesion_rows(records: list[dict], model: str, chash: str) -> list[dict]:
    rows = []
    for rec in records:
        for res in rec["results"]:
            for les in res["lesions"]:
                rows.append({
                    "model": model, "config_hash": chash, "kind": "lesion", "image_id": rec["image_id"],
                    "roi_id": les.get("roi_id", ""), "min_area": res["min_area"], "area": les["area"],
                    "centroid_row": les["centroid_row"], "centroid_col": les["centroid_col"],
                    "best_iou": les["best_iou"], "detected": les["detected"],
                })
            for comp in res["fp_components"]:
                rows.append({
                    "model": model, "config_hash": chash, "kind": "fp_component", "image_id": rec["image_id"],
                    "roi_id": "", "min_area": res["min_area"], "area": comp["area"],
                    "centroid_row": comp["centroid_row"], "centroid_col": comp["centroid_col"],
                    "best_iou": comp["best_iou"], "detected": False,
                    "row0": comp["row0"], "col0": comp["col0"], "row1": comp["row1"], "col1": comp["col1"],
                })
    return rows


def _froc_rows(records: list[dict], model: str, chash: str) -> list[dict]:
    n_images = len(records)
    table = pd.DataFrame([row for rec in records for row in rec["froc"]])
    n_lesions = sum(rec["n_lesions"] for rec in records)
    rows = []
    for min_area, group in table.groupby("min_area", sort=True):
        totals = group.groupby("threshold", sort=True)[["detected", "false_positives"]].sum()
        for point in metrics.froc_points(totals.index.tolist(), totals["detected"].tolist(),
                                         totals["false_positives"].tolist(), n_lesions, n_images):
            rows.append({"model": model, "config_hash": chash, "min_area": int(min_area), **point,
                         "n_lesions": n_lesions, "n_images": n_images})
    return rows


def _summary_rows(per_image: pd.DataFrame, froc: pd.DataFrame, model: str, chash: str) -> list[dict]:
    rows = []
    for min_area, group in per_image.groupby("min_area", sort=True):
        n_lesions = int(group["n_lesions"].sum())
        pooled = metrics.pooled_dice_iou(group["intersection"], group["union"])
        pooled_at = metrics.pooled_dice_iou(group["at_lesions_intersection"], group["at_lesions_union"])
        values = {
            "n_images": len(group), "n_lesions": n_lesions, "detected": int(group["detected"].sum()),
            "false_positives": int(group["false_positives"].sum()),
            "tpr": group["detected"].sum() / n_lesions if n_lesions else float("nan"),
            "fppi": group["false_positives"].sum() / len(group),
            "pooled_dice": pooled[0], "pooled_iou": pooled[1],
            "mean_dice": float(group["dice"].mean()), "mean_iou": float(group["iou"].mean()),
            "pooled_dice_at_lesions": pooled_at[0], "pooled_iou_at_lesions": pooled_at[1],
            "mean_dice_at_lesions": float(group["dice_at_lesions"].mean()),
            "mean_iou_at_lesions": float(group["iou_at_lesions"].mean()),
        }
        points = froc[froc["min_area"] == min_area].to_dict("records")
        for budget, tpr in metrics.tpr_at_fppi(points, FPPI_BUDGETS).items():
            values[f"tpr_at_{budget:g}_fppi"] = tpr
        rows += [{"model": model, "config_hash": chash, "min_area": int(min_area), "metric": k, "value": v}
                 for k, v in values.items()]
    return rows


def _plot_froc(froc: pd.DataFrame, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    for min_area, group in froc.groupby("min_area", sort=True):
        group = group.sort_values(["fppi", "tpr"])
        label = "as predicted" if min_area == 0 else f"components ≥ {min_area} px"
        ax.plot(group["fppi"], group["tpr"], marker="o", markersize=3, drawstyle="steps-post", label=label)
    for budget in FPPI_BUDGETS:
        ax.axvline(budget, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xscale("symlog", linthresh=0.5)
    # FPPI is never negative: without a left limit symlog shows a mirrored negative axis
    ax.set_xlim(left=0, right=max(8.0, float(froc["fppi"].max()) * 1.2 if len(froc) else 8.0))
    ax.set_xticks([0, 0.5, 1, 2, 4, 8] + ([16, 64, 256] if len(froc) and froc["fppi"].max() > 12 else []))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("false positives per image (FPPI)")
    ax.set_ylabel("true positive rate (lesions detected)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"FROC: {model}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _human_summary(summary: pd.DataFrame, model: str, chash: str) -> str:
    lines = [f"mammoseg evaluation of {model} (config {chash})"]
    for min_area, group in summary.groupby("min_area", sort=True):
        v = dict(zip(group["metric"], group["value"]))
        tag = "as predicted" if min_area == 0 else f"components >= {min_area} px"
        lines.append(
            f"  [{tag}] images {v['n_images']}, lesions {v['n_lesions']}: TPR {v['tpr']:.3f} "
            f"({v['detected']}/{v['n_lesions']}), FPPI {v['fppi']:.2f}; pooled Dice {v['pooled_dice']:.3f}, "
            f"IoU {v['pooled_iou']:.3f}; at lesions Dice {v['pooled_dice_at_lesions']:.3f}, "
            f"IoU {v['pooled_iou_at_lesions']:.3f}; mean Dice {v['mean_dice']:.3f}")
        lines.append("    TPR at FPPI " + ", ".join(
            f"{b:g}: {v[f'tpr_at_{b:g}_fppi']:.3f}" for b in FPPI_BUDGETS))
    return "\n".join(lines)


def run_summarise(config: dict, image_jsons: Sequence[str | Path], out_dir: str | Path, model_name: str) -> dict:
    """Stage entry: pool the per-image JSONs of one model into tables and the FROC plot; print the summary.

    Writes ``per_image.csv``, ``lesions.csv``, ``summary.csv`` (long format: model, config_hash, min_area,
    metric, value), ``froc.csv`` and ``froc.png`` under ``out_dir``.

    Returns
    -------
    dict : ``{"text": printed summary, "summary": {min_area: {metric: value}}, "config_hash": …}``
    """
    config = validate_config(config)
    chash = config_hash(config)
    if not image_jsons:
        raise ValueError("run_summarise needs at least one per-image JSON")
    records = []
    for path in image_jsons:
        try:
            records.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read per-image metrics: {exc}") from exc
    stale = sorted({rec.get("config_hash") for rec in records} - {chash})
    if stale:
        raise ValueError(f"per-image metrics were made with config hash(es) {stale}, not the current {chash}; "
                         "re-run the evaluate stage")
    out_dir = Path(out_dir)
    per_image = pd.DataFrame(_per_image_rows(records, model_name, chash))
    lesions = pd.DataFrame(_lesion_rows(records, model_name, chash))
    froc = pd.DataFrame(_froc_rows(records, model_name, chash))
    summary = pd.DataFrame(_summary_rows(per_image, froc, model_name, chash))
    write_csv_atomic(out_dir / "per_image.csv", per_image)
    write_csv_atomic(out_dir / "lesions.csv", lesions)
    write_csv_atomic(out_dir / "froc.csv", froc)
    write_csv_atomic(out_dir / "summary.csv", summary)
    _plot_froc(froc, out_dir / "froc.png", model_name)
    text = _human_summary(summary, model_name, chash)
    print(text)
    nested = {int(m): dict(zip(g["metric"], g["value"])) for m, g in summary.groupby("min_area")}
    return {"text": text, "summary": nested, "config_hash": chash}
