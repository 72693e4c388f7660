"""The tables over all evaluated images of one image set (the test split, or the out-of-fold training images).

Reads the per-image JSON files of :mod:`mammoseg.evaluation.evaluate` (one folder per chunk) and writes:

``per_image.csv``   one row per image and ``min_area`` variant at the operating threshold; images whose prediction
                    failed are listed with ``status`` and ``reason`` and count in no figure
``lesions.csv``     one row per lesion and per false-positive component at the operating threshold
``candidates.csv``  one row per FROC candidate: image, candidate, score, area, position, the lesion it is credited
                    to (or none), false positive or duplicate; anyone can recompute the FROC from it
``froc.csv``        the FROC curve over every distinct candidate score (:func:`mammoseg.evaluation.froc.froc_curve`)
``summary.csv``     long format ``metric, value, ci_low, ci_high``: the operating threshold the images were
                    binarised at (``threshold``: ``infer.threshold``, or the calibrated one), counts, TPR and FPPI
                    and pooled/mean Dice and IoU at that threshold, TPR at 1/8 … 8 FPPI and the CPM, 95 %
                    bootstrap intervals over patients (images when a patient is unknown) for TPR, FPPI, TPR at
                    1 FPPI, CPM and pooled Dice
``froc.png``        the FROC curve, ``summary.txt`` the printed summary
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from mammoseg.errors import InputError
from mammoseg.evaluation import froc, metrics
from mammoseg.io.atomic import atomic_path, write_csv_atomic, write_text_atomic

__all__ = ["PAPER_FIGURES", "read_image_records", "summarise", "run_summarise", "summarise_findings",
           "read_summary_csv", "screening_point"]

#: The paper's figures on the CBIS-DDSM mass test set (Marita et al.), printed beside a mass evaluation.
PAPER_FIGURES = ("(paper, CBIS-DDSM mass test set: Dice 0.29 whole image / 0.70 at lesions, IoU 0.17 / 0.534, "
                 "TPR 0.77 at 3.65 FPPI)")
#: The bootstrap statistics with an interval in summary.csv, under their summary.csv names.
_INTERVALS = {"tpr": "tpr", "fppi": "fppi", "tpr_at_1_fppi": "tpr_at_1_fppi", "cpm": "cpm",
              "pooled_dice": "pooled_dice"}


def read_image_records(chunk_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every per-image JSON of the chunk folders, sorted by image id."""
    records = []
    for folder in chunk_dirs:
        for path in sorted(Path(folder).glob("*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as exc:
                raise InputError(f"{path}: cannot read per-image metrics: {exc}") from exc
    return sorted(records, key=lambda rec: rec["image_id"])


def _per_image_rows(records: Sequence[Mapping], tag: Mapping[str, str]) -> list[dict]:
    rows = []
    for rec in records:
        if rec["status"] != "evaluated":
            rows.append({**tag, "image_id": rec["image_id"], "patient_id": rec.get("patient_id", ""),
                         "normal": rec.get("normal", False), "status": rec["status"], "reason": rec.get("reason", ""),
                         "n_lesions": rec["n_lesions"]})
            continue
        for res in rec["results"]:
            pix, at = res["pixel"], res["at_lesions"]
            rows.append({
                **tag, "image_id": rec["image_id"], "patient_id": rec.get("patient_id", ""),
                "normal": rec.get("normal", False), "status": rec["status"], "reason": "", "min_area": res["min_area"],
                "n_lesions": res["n_lesions"], "detected": res["detected"],
                "false_positives": res["false_positives"],
                **{k: pix[k] for k in ("tp", "fp", "fn", "tn", "intersection", "union", "dice", "iou")},
                "at_lesions_intersection": at["intersection"], "at_lesions_union": at["union"],
                "dice_at_lesions": at["dice"], "iou_at_lesions": at["iou"],
            })
    return rows


def _lesion_rows(records: Sequence[Mapping], tag: Mapping[str, str]) -> list[dict]:
    rows = []
    for rec in records:
        for res in rec["results"]:
            for les in res["lesions"]:
                rows.append({
                    **tag, "kind": "lesion", "image_id": rec["image_id"], "roi_id": les.get("roi_id", ""),
                    "min_area": res["min_area"], "area": les["area"], "centroid_row": les["centroid_row"],
                    "centroid_col": les["centroid_col"], "best_iou": les["best_iou"], "detected": les["detected"],
                })
            for comp in res["fp_components"]:
                rows.append({
                    **tag, "kind": "fp_component", "image_id": rec["image_id"], "roi_id": "",
                    "min_area": res["min_area"], "area": comp["area"], "centroid_row": comp["centroid_row"],
                    "centroid_col": comp["centroid_col"], "best_iou": comp["best_iou"], "detected": False,
                    "row0": comp["row0"], "col0": comp["col0"], "row1": comp["row1"], "col1": comp["col1"],
                })
    return rows


CANDIDATE_COLUMNS = ("image_id", "candidate", "score", "area", "centroid_row", "centroid_col", "row0", "col0", "row1",
                     "col1", "matched_roi", "false_positive", "duplicate")


def _candidate_rows(records: Sequence[Mapping], tag: Mapping[str, str]) -> list[dict]:
    rows = []
    for rec in records:
        roi_ids = {les["lesion"]: les.get("roi_id", "") for les in rec["results"][0]["lesions"]}
        for cand in rec["candidates"]:
            rows.append({**tag, **{k: cand[k] for k in CANDIDATE_COLUMNS if k in cand}, "image_id": rec["image_id"],
                         "matched_roi": roi_ids.get(cand["matched_lesion"], "") if cand["matched_lesion"] >= 0 else ""})
    return rows


def candidate_scores(records: Sequence[Mapping]) -> tuple[list[float], list[float], int, int]:
    """``(fp_scores, lesion_hit_scores, n_lesions, n_images)`` of evaluated per-image records, as
    :func:`mammoseg.evaluation.froc.froc_curve` takes them."""
    fp_scores = [c["score"] for rec in records for c in rec["candidates"] if c["false_positive"]]
    hit_scores = [les["hit_score"] for rec in records for les in rec["lesion_hits"]]
    return fp_scores, hit_scores, sum(rec["n_lesions"] for rec in records), len(records)


def _curve(records: Sequence[Mapping]) -> froc.FrocCurve:
    return froc.froc_curve(*candidate_scores(records))


def _summary_rows(per_image: pd.DataFrame, curve: froc.FrocCurve, intervals: Mapping[str, Mapping],
                  tag: Mapping[str, str], threshold: float) -> list[dict]:  # fmt: skip
    rows = []
    for min_area, group in per_image.groupby("min_area", sort=True):
        n_lesions = int(group["n_lesions"].sum())
        is_normal = group["normal"].astype(bool)
        # means over the images with lesions: an empty prediction on a normal image has Dice 1, which would
        # dilute them; the pooled figures take every image (false positives on normal images enter the union)
        lesion_images, normal = group[~is_normal], group[is_normal]
        pooled = metrics.pooled_dice_iou(group["intersection"], group["union"])
        pooled_at = metrics.pooled_dice_iou(group["at_lesions_intersection"], group["at_lesions_union"])
        values: dict[str, float] = {
            # the threshold this table's operating point is at: the test split is binarised at the calibrated
            # one when evaluate.target_fppi is set, so a reader cannot take it from infer.threshold
            "threshold": threshold,
            "n_images": len(group), "n_lesions": n_lesions, "detected": int(group["detected"].sum()),
            "false_positives": int(group["false_positives"].sum()),
            "tpr": group["detected"].sum() / n_lesions if n_lesions else float("nan"),
            "fppi": group["false_positives"].sum() / len(group),
            "pooled_dice": pooled[0], "pooled_iou": pooled[1],
            "mean_dice": float(lesion_images["dice"].mean()), "mean_iou": float(lesion_images["iou"].mean()),
            "pooled_dice_at_lesions": pooled_at[0], "pooled_iou_at_lesions": pooled_at[1],
            "mean_dice_at_lesions": float(lesion_images["dice_at_lesions"].mean()),
            "mean_iou_at_lesions": float(lesion_images["iou_at_lesions"].mean()),
        }
        if len(normal):  # false positives on lesion-free images, as CAD systems are judged on screening data
            values.update({
                "n_normal_images": len(normal),
                "fp_per_normal_image": float(normal["false_positives"].mean()),
                "normal_images_without_mark": float((normal["false_positives"] == 0).mean()),
                "fppi_lesion_images": float(lesion_images["false_positives"].mean()) if len(lesion_images) else
                float("nan"),
            })
        if min_area == 0:  # the FROC is over the candidates as predicted
            for point, tpr in zip(froc.FPPI_POINTS, froc.sensitivity_at_fppi(curve.fppi, curve.sensitivity)):
                values[f"tpr_at_{point:g}_fppi"] = float(tpr)
            values["cpm"] = froc.cpm(curve.fppi, curve.sensitivity)
        for metric, value in values.items():
            ci = intervals.get(metric) if min_area == 0 else None
            rows.append({**tag, "min_area": int(min_area), "metric": metric, "value": value,
                         "ci_low": ci["low"] if ci else float("nan"), "ci_high": ci["high"] if ci else float("nan")})
    return rows


def _intervals(records: Sequence[Mapping], n_resamples: int, seed: int) -> dict[str, dict]:
    """95 % bootstrap intervals over patients (each image its own group when the patient is unknown)."""
    if n_resamples <= 0:
        return {}
    groups = [rec.get("patient_id") or rec["image_id"] for rec in records]
    found = froc.bootstrap_intervals([rec["record"] for rec in records], n_resamples, seed, groups=groups)
    return {name: found[key] for name, key in _INTERVALS.items()}


def _plot_froc(curve: froc.FrocCurve, path: Path, title: str) -> None:
    import matplotlib.ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    order = np.argsort(curve.fppi, kind="stable")
    ax.plot(curve.fppi[order], curve.sensitivity[order], marker="o", markersize=3, label="candidates by score")
    points = froc.sensitivity_at_fppi(curve.fppi, curve.sensitivity)
    ax.plot(froc.FPPI_POINTS, points, linestyle="none", marker="s", markersize=5, color="black",
            label=f"CPM points (CPM {float(np.mean(points)):.3f})")
    ax.set_xscale("symlog", linthresh=0.125)
    ax.set_xlim(left=0, right=max(8.0, float(curve.fppi.max()) * 1.2 if len(curve.fppi) else 8.0))
    ax.set_xticks([0, 0.125, 0.25, 0.5, 1, 2, 4, 8])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("false positives per image (FPPI)")
    ax.set_ylabel("true positive rate (lesions detected)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"FROC: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _fmt_ci(values: Mapping[str, float], name: str, digits: int) -> str:
    low, high = values.get(f"{name}:ci_low", math.nan), values.get(f"{name}:ci_high", math.nan)
    value = f"{values[name]:.{digits}f}"
    return value if math.isnan(low) else f"{value} [{low:.{digits}f}, {high:.{digits}f}]"


def _human_summary(summary: pd.DataFrame, label: str, abnormality: str, n_failed: int, threshold: float,
                   binarise: str) -> str:  # fmt: skip
    how = "" if binarise == "threshold" else ", candidate by candidate"
    lines = [f"mammoseg evaluation of {label}, {abnormality}, binarised at probability >= {threshold:.4g}{how}"
             + (f" ({n_failed} image(s) not predicted: see per_image.csv)" if n_failed else "")]
    for min_area, group in summary.groupby("min_area", sort=True):
        v = dict(zip(group["metric"], group["value"]))
        v.update({f"{m}:ci_low": lo for m, lo in zip(group["metric"], group["ci_low"])})
        v.update({f"{m}:ci_high": hi for m, hi in zip(group["metric"], group["ci_high"])})
        tag = "as predicted" if min_area == 0 else f"components >= {min_area} px"
        lines.append(
            f"  [{tag}] images {v['n_images']:.0f}, lesions {v['n_lesions']:.0f}: TPR {_fmt_ci(v, 'tpr', 3)} "
            f"({v['detected']:.0f}/{v['n_lesions']:.0f}), FPPI {_fmt_ci(v, 'fppi', 2)}; "
            f"pooled Dice {_fmt_ci(v, 'pooled_dice', 3)}, IoU {v['pooled_iou']:.3f}; at lesions Dice "
            f"{v['pooled_dice_at_lesions']:.3f}, IoU {v['pooled_iou_at_lesions']:.3f}; mean Dice {v['mean_dice']:.3f}")
        if "n_normal_images" in v:
            lines.append(f"    normal images {v['n_normal_images']:.0f}: {v['fp_per_normal_image']:.2f} false "
                         f"positives per normal image, {v['normal_images_without_mark']:.0%} without a mark; "
                         f"FPPI on lesion images {v['fppi_lesion_images']:.2f}")
        if "cpm" in v:
            lines.append("    FROC: TPR at FPPI " + ", ".join(
                f"{p:g}: {v[f'tpr_at_{p:g}_fppi']:.3f}" for p in froc.FPPI_POINTS)
                + f"; TPR at 1 FPPI {_fmt_ci(v, 'tpr_at_1_fppi', 3)}; CPM {_fmt_ci(v, 'cpm', 3)}")
    if any(not math.isnan(x) for x in summary["ci_low"]):
        lines.append("    [95% bootstrap intervals over patients]")
    return "\n".join(lines)


def _shared_threshold(evaluated: Sequence[Mapping[str, Any]], out_dir: Path) -> float:
    """The one probability threshold every evaluated image was binarised at (the chunks of one image set are
    evaluated with one threshold; chunks left over from another threshold would mix two operating points)."""
    thresholds = sorted({float(rec["threshold"]) for rec in evaluated})
    if len(thresholds) != 1:
        mixed = {t: [rec["image_id"] for rec in evaluated if float(rec["threshold"]) == t][:3] for t in thresholds}
        raise InputError(f"{out_dir}: the images were binarised at different thresholds {mixed}; re-run evaluation")
    return thresholds[0]


def summarise(chunk_dirs: Sequence[str | Path], out_dir: str | Path, *, experiment: str, image_set: str,
              abnormality: str, bootstrap: int, bootstrap_seed: int, binarise: str) -> dict[str, Any]:  # fmt: skip
    """Pool the per-image results of one image set into the tables of the module docstring; return the summary.

    ``binarise`` (``evaluate.binarise``) only names, in the printed summary, how the images were binarised.

    Returns
    -------
    dict : ``{"text": printed summary, "summary": {min_area: {metric: value}}, "n_failed": int}``
    """
    records = read_image_records(chunk_dirs)
    evaluated = [rec for rec in records if rec["status"] == "evaluated"]
    if not evaluated:
        raise InputError(f"no evaluated image in the {len(chunk_dirs)} chunk folder(s) of {out_dir}")
    out_dir = Path(out_dir)
    threshold = _shared_threshold(evaluated, out_dir)  # before anything is written: a refused pool leaves no table
    tag = {"experiment": experiment, "image_set": image_set}
    per_image = pd.DataFrame(_per_image_rows(records, tag))
    curve = _curve(evaluated)
    intervals = _intervals(evaluated, bootstrap, bootstrap_seed)
    summary = pd.DataFrame(_summary_rows(per_image[per_image["status"] == "evaluated"], curve, intervals, tag,
                                         threshold))
    froc_table = pd.DataFrame([{**tag, **row, "n_lesions": sum(r["n_lesions"] for r in evaluated),
                                "n_images": len(evaluated)} for row in froc.operating_points(curve)])
    candidates = pd.DataFrame(_candidate_rows(evaluated, tag), columns=[*tag, *CANDIDATE_COLUMNS])
    write_csv_atomic(out_dir / "per_image.csv", per_image)
    write_csv_atomic(out_dir / "lesions.csv", pd.DataFrame(_lesion_rows(evaluated, tag)))
    write_csv_atomic(out_dir / "candidates.csv", candidates)
    write_csv_atomic(out_dir / "froc.csv", froc_table)
    write_csv_atomic(out_dir / "summary.csv", summary)
    label = f"{experiment} [{image_set}]"
    _plot_froc(curve, out_dir / "froc.png", label)
    n_failed = len(records) - len(evaluated)
    text = _human_summary(summary, label, abnormality, n_failed, threshold, binarise)
    if abnormality == "mass" and image_set == "test":
        text += "\n  " + PAPER_FIGURES
    write_text_atomic(out_dir / "summary.txt", text + "\n")
    print(text)
    nested = {int(m): dict(zip(g["metric"], g["value"])) for m, g in summary.groupby("min_area")}
    return {"text": text, "summary": nested, "n_failed": n_failed}


def read_summary_csv(path: str | Path, min_area: int = 0) -> dict[str, dict[str, float | None]]:
    """``{metric: {"value", "ci_low", "ci_high"}}`` of a ``summary.csv`` at one ``min_area`` variant (0: the
    components as predicted). A metric without an interval has None there (not NaN), so the result goes into JSON
    as it is."""
    table = pd.read_csv(path)
    rows = table[table["min_area"] == min_area]

    def number(value) -> float | None:
        return None if pd.isna(value) else float(value)

    return {row.metric: {"value": number(row.value), "ci_low": number(row.ci_low), "ci_high": number(row.ci_high)}
            for row in rows.itertuples()}


def screening_point(image_set_dir: str | Path, target_tpr: float) -> dict[str, Any]:
    """The highest candidate-score threshold whose lesion TPR reaches ``target_tpr`` (a screening operating
    point), read off an image set's ``froc.csv``, with the false positives there per normal image from its
    ``candidates.csv`` and ``per_image.csv``.

    A candidate marks its image at threshold ``s`` when its score is >= ``s``; every candidate of a normal image
    is a false positive. When no threshold reaches the target, the most permissive one (the lowest score, where
    the TPR is highest) is reported with ``reached: False``.

    Returns
    -------
    dict: ``reached``, ``target_tpr``, ``threshold`` (None without any candidate), ``tpr``, ``fppi``,
    ``fp_per_normal_image`` and ``normal_images_without_mark`` (None without normal images), ``n_normal_images``
    """
    folder = Path(image_set_dir)
    curve = pd.read_csv(folder / "froc.csv")
    curve = curve[np.isfinite(curve["score_threshold"].astype(float))]
    per_image = pd.read_csv(folder / "per_image.csv")
    normal = per_image["normal"].astype(str).str.lower() == "true"
    normal_ids = set(per_image.loc[normal & (per_image["status"] == "evaluated"), "image_id"])
    n_normal = len(normal_ids)
    reaching = curve[curve["tpr"] >= target_tpr - 1e-12]
    reached = not reaching.empty
    candidates = pd.read_csv(folder / "candidates.csv")
    if curve.empty:  # no candidate in the whole image set: nothing marks an image
        threshold, tpr, fppi, marks = None, 0.0, 0.0, candidates.iloc[:0]
    else:
        row = (reaching.loc[reaching["score_threshold"].idxmax()] if reached
               else curve.loc[curve["score_threshold"].idxmin()])
        threshold, tpr, fppi = float(row["score_threshold"]), float(row["tpr"]), float(row["fppi"])
        marks = candidates[candidates["image_id"].isin(normal_ids) & (candidates["score"] >= threshold - 1e-9)]
    return {"target_tpr": target_tpr, "n_normal_images": n_normal, "reached": reached, "threshold": threshold,
            "tpr": tpr, "fppi": fppi, "fp_per_normal_image": len(marks) / n_normal if n_normal else None,
            "normal_images_without_mark": (n_normal - marks["image_id"].nunique()) / n_normal if n_normal else None}


def run_summarise(chunk_dirs: Sequence[str | Path], out_dir: str | Path, *, experiment: str, image_set: str,
                  config: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Stage ``summarise``: :func:`summarise` with the resolved configuration's ``evaluate`` and ``data`` settings."""
    evaluate = config["evaluate"]
    return summarise(chunk_dirs, out_dir, experiment=experiment, image_set=image_set,
                     abnormality=config["data"]["abnormality"], bootstrap=evaluate["bootstrap"],
                     bootstrap_seed=evaluate["bootstrap_seed"], binarise=evaluate["binarise"])


FINDING_COLUMNS = ("image_id", "status", "reason", "marks", "marked_px", "max_score", "candidates")


def summarise_findings(chunk_dirs: Sequence[str | Path], out_dir: str | Path, *, experiment: str,
                       threshold: float, source: str = "", warning: str = "") -> dict[str, Any]:  # fmt: skip
    """The tables of new studies (no ground truth): ``findings.csv`` (one row per image: marks at the operating
    threshold, their pixels, the highest score, the candidates; images that could not be predicted with their
    reason), ``candidates.csv`` (every candidate: score, area, position) and ``summary.txt``, which names the
    studies' ``source`` (folder) and ends with ``warning`` (a line about the model, when there is one)."""
    records = read_image_records(chunk_dirs)
    out_dir = Path(out_dir)
    findings, candidates = [], []
    for rec in records:
        if rec["status"] != "evaluated":
            findings.append({"image_id": rec["image_id"], "status": rec["status"], "reason": rec.get("reason", "")})
            continue
        scores = [c["score"] for c in rec["candidates"]]
        findings.append({"image_id": rec["image_id"], "status": rec["status"], "reason": "",
                         "marks": len(rec["marks"]), "marked_px": sum(m["area"] for m in rec["marks"]),
                         "max_score": max(scores, default=0.0), "candidates": len(scores)})
        candidates += [{"experiment": experiment, "image_id": rec["image_id"], **c} for c in rec["candidates"]]
    table = pd.DataFrame(findings, columns=list(FINDING_COLUMNS))
    write_csv_atomic(out_dir / "findings.csv", table)
    write_csv_atomic(out_dir / "candidates.csv", pd.DataFrame(candidates))
    evaluated = table[table["status"] == "evaluated"]
    text = (f"mammoseg findings of {experiment} on {len(records)} new studies"
            + (f" of {source}" if source else "") + " (no ground truth): "
            f"{int((evaluated['marks'] > 0).sum())} of {len(evaluated)} predicted images marked at threshold "
            f"{threshold:g} ({int(evaluated['marks'].sum())} marks)"
            + (f"; {len(records) - len(evaluated)} not predicted (findings.csv)"
               if len(evaluated) < len(records) else "")
            + (f"\n  {warning}" if warning else ""))
    write_text_atomic(out_dir / "summary.txt", text + "\n")
    print(text)
    return {"text": text, "findings": table}
