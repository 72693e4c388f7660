"""The tables over all evaluated images of one image set (test, or out-of-fold): per image, per lesion, summary,
FROC, and the line printed at the end of a run.

Reads the per-image JSON files written by :mod:`mammoseg.evaluation.evaluate` (one folder per chunk). An image
whose prediction failed is listed in ``per_image.csv`` with its reason and counts in none of the figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mammoseg.errors import InputError
from mammoseg.evaluation import metrics
from mammoseg.io.atomic import atomic_path, write_csv_atomic, write_text_atomic

__all__ = ["FPPI_BUDGETS", "read_image_records", "summarise"]

FPPI_BUDGETS = (0.5, 1.0, 2.0, 4.0)


def _per_image_rows(records: list[dict], experiment: str, image_set: str) -> list[dict]:
    rows = []
    for rec in records:
        for res in rec["results"]:
            pix, at = res["pixel"], res["at_lesions"]
            rows.append({
                "experiment": experiment, "image_set": image_set, "image_id": rec["image_id"],
                "status": rec["status"], "min_area": res["min_area"],
                "n_lesions": res["n_lesions"], "detected": res["detected"],
                "false_positives": res["false_positives"],
                **{k: pix[k] for k in ("tp", "fp", "fn", "tn", "intersection", "union", "dice", "iou")},
                "at_lesions_intersection": at["intersection"], "at_lesions_union": at["union"],
                "dice_at_lesions": at["dice"], "iou_at_lesions": at["iou"],
            })
    return rows


def _lesion_rows(records: list[dict], experiment: str, image_set: str) -> list[dict]:
    rows = []
    for rec in records:
        for res in rec["results"]:
            for les in res["lesions"]:
                rows.append({
                    "experiment": experiment, "image_set": image_set, "kind": "lesion", "image_id": rec["image_id"],
                    "roi_id": les.get("roi_id", ""), "min_area": res["min_area"], "area": les["area"],
                    "centroid_row": les["centroid_row"], "centroid_col": les["centroid_col"],
                    "best_iou": les["best_iou"], "detected": les["detected"],
                })
            for comp in res["fp_components"]:
                rows.append({
                    "experiment": experiment, "image_set": image_set, "kind": "fp_component", "image_id": rec["image_id"],
                    "roi_id": "", "min_area": res["min_area"], "area": comp["area"],
                    "centroid_row": comp["centroid_row"], "centroid_col": comp["centroid_col"],
                    "best_iou": comp["best_iou"], "detected": False,
                    "row0": comp["row0"], "col0": comp["col0"], "row1": comp["row1"], "col1": comp["col1"],
                })
    return rows


def _froc_rows(records: list[dict], experiment: str, image_set: str) -> list[dict]:
    n_images = len(records)
    table = pd.DataFrame([row for rec in records for row in rec["froc"]])
    n_lesions = sum(rec["n_lesions"] for rec in records)
    rows = []
    for min_area, group in table.groupby("min_area", sort=True):
        totals = group.groupby("threshold", sort=True)[["detected", "false_positives"]].sum()
        for point in metrics.froc_points(totals.index.tolist(), totals["detected"].tolist(),
                                         totals["false_positives"].tolist(), n_lesions, n_images):
            rows.append({"experiment": experiment, "image_set": image_set, "min_area": int(min_area), **point,
                         "n_lesions": n_lesions, "n_images": n_images})
    return rows


def _summary_rows(per_image: pd.DataFrame, froc: pd.DataFrame, experiment: str, image_set: str) -> list[dict]:
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
        rows += [{"experiment": experiment, "image_set": image_set, "min_area": int(min_area), "metric": k, "value": v}
                 for k, v in values.items()]
    return rows


def _plot_froc(froc: pd.DataFrame, path: Path, label: str) -> None:
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
    ax.set_title(f"FROC: {label}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _human_summary(summary: pd.DataFrame, label: str, abnormality: str, n_failed: int) -> str:
    lines = [f"mammoseg evaluation of {label}, {abnormality}"
             + (f" ({n_failed} image(s) not predicted: see per_image.csv)" if n_failed else "")]
    for min_area, group in summary.groupby("min_area", sort=True):
        v = dict(zip(group["metric"], group["value"]))
        tag = "as predicted" if min_area == 0 else f"components >= {min_area} px"
        lines.append(
            f"  [{tag}] images {v['n_images']:.0f}, lesions {v['n_lesions']:.0f}: TPR {v['tpr']:.3f} "
            f"({v['detected']:.0f}/{v['n_lesions']:.0f}), FPPI {v['fppi']:.2f}; pooled Dice {v['pooled_dice']:.3f}, "
            f"IoU {v['pooled_iou']:.3f}; at lesions Dice {v['pooled_dice_at_lesions']:.3f}, "
            f"IoU {v['pooled_iou_at_lesions']:.3f}; mean Dice {v['mean_dice']:.3f}")
        lines.append("    TPR at FPPI " + ", ".join(
            f"{b:g}: {v[f'tpr_at_{b:g}_fppi']:.3f}" for b in FPPI_BUDGETS))
    return "\n".join(lines)


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


def summarise(chunk_dirs: Sequence[str | Path], out_dir: str | Path, *, experiment: str, image_set: str,
              abnormality: str, paper_figures: str = "") -> dict[str, Any]:  # fmt: skip
    """Pool the per-image results of one image set into tables and the FROC plot; write and return the summary.

    Writes ``per_image.csv``, ``lesions.csv``, ``summary.csv`` (long format: experiment, image_set, min_area,
    metric, value), ``froc.csv``, ``froc.png`` and ``summary.txt`` (the printed summary) under ``out_dir``.

    Returns
    -------
    dict : ``{"text": printed summary, "summary": {min_area: {metric: value}}}``
    """
    records = read_image_records(chunk_dirs)
    evaluated = [rec for rec in records if rec["status"] == "evaluated"]
    if not evaluated:
        raise InputError(f"no evaluated image in {len(chunk_dirs)} chunk folder(s) of {out_dir}")
    out_dir = Path(out_dir)
    label = f"{experiment} [{image_set}]"
    per_image = pd.DataFrame(_per_image_rows(evaluated, experiment, image_set))
    failed = pd.DataFrame([{"experiment": experiment, "image_set": image_set, "image_id": rec["image_id"],
                            "status": rec["status"], "reason": rec.get("reason", "")}
                           for rec in records if rec["status"] != "evaluated"])
    per_image = pd.concat([per_image, failed], ignore_index=True) if len(failed) else per_image
    lesions = pd.DataFrame(_lesion_rows(evaluated, experiment, image_set))
    froc = pd.DataFrame(_froc_rows(evaluated, experiment, image_set))
    summary = pd.DataFrame(_summary_rows(per_image[per_image["status"] == "evaluated"], froc, experiment, image_set))
    write_csv_atomic(out_dir / "per_image.csv", per_image)
    write_csv_atomic(out_dir / "lesions.csv", lesions)
    write_csv_atomic(out_dir / "froc.csv", froc)
    write_csv_atomic(out_dir / "summary.csv", summary)
    _plot_froc(froc, out_dir / "froc.png", label)
    text = _human_summary(summary, label, abnormality, len(failed))
    if paper_figures:
        text += "\n" + paper_figures
    write_text_atomic(out_dir / "summary.txt", text + "\n")
    print(text)
    nested = {int(m): dict(zip(g["metric"], g["value"])) for m, g in summary.groupby("min_area")}
    return {"text": text, "summary": nested}
