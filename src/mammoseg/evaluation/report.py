"""HTML pages of an experiment's tables, for the Snakemake report (``snakemake --report``), where they are shown in
the page instead of as download links: the summary with its intervals, the FROC points, per image, per lesion,
the candidates, each fold's training history, the resolved configuration, and a comparison of every experiment
found under the same results folder.

Each page is one self-contained HTML file (inline CSS, no script), so it renders the same in the report, in a
browser opened on the file, and in a test that loads it in headless Chromium.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from mammoseg.evaluation.summary import read_summary_csv
from mammoseg.io.atomic import atomic_directory

__all__ = ["html_page", "comparison_table", "run_report_pages"]

_STYLE = """
body { font-family: system-ui, sans-serif; font-size: 13px; margin: 12px; color: #222; }
h1 { font-size: 16px; margin: 0 0 6px 0; } p { margin: 4px 0 10px 0; color: #555; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; padding: 8px; border: 1px solid #ddd; }
"""
#: Rows beyond which a table is cut in its page (the CSV beside it holds all of them).
MAX_ROWS = 2000


def _format(value: Any) -> str:
    if value is None:  # a figure a summary.csv does not have (read_summary_csv)
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def html_page(title: str, body: str, caption: str = "") -> str:
    """A self-contained HTML page: title, caption, body (already HTML)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            + (f"<p>{html.escape(caption)}</p>" if caption else "") + body + "</body></html>\n")


def _table(frame: pd.DataFrame) -> str:
    shown = frame.head(MAX_ROWS)
    note = f"<p>first {MAX_ROWS} of {len(frame)} rows; the CSV holds all</p>" if len(frame) > MAX_ROWS else ""
    return shown.to_html(index=False, border=0, formatters={c: _format for c in shown.columns}, na_rep="") + note


def comparison_table(experiments_dir: str | Path, image_set: str = "test") -> pd.DataFrame:
    """One row per experiment found under ``experiments_dir`` (every ``<key>/<image_set>/summary.csv``): detection,
    FROC and segmentation figures side by side, with the stage keys that tell the runs apart and the threshold the
    operating-point figures are at (None for tables written before ``summary.csv`` recorded it)."""
    import json

    rows = []
    for summary_csv in sorted(Path(experiments_dir).glob(f"*/{image_set}/summary.csv")):
        values = {metric: figures["value"] for metric, figures in read_summary_csv(summary_csv).items()}
        keys_json = summary_csv.parent.parent / "keys.json"
        keys = json.loads(keys_json.read_text()) if keys_json.is_file() else {}
        rows.append({"experiment": summary_csv.parent.parent.name, "model": keys.get("model", ""),
                     "inference": keys.get("inference", ""), "images": values.get("n_images"),
                     # TPR, FPPI and Dice are at this threshold (infer.threshold or the calibrated one)
                     "lesions": values.get("n_lesions"), "threshold": values.get("threshold"),
                     "TPR": values.get("tpr"), "FPPI": values.get("fppi"),
                     "TPR at 1 FPPI": values.get("tpr_at_1_fppi"), "CPM": values.get("cpm"),
                     "pooled Dice": values.get("pooled_dice"), "Dice at lesions": values.get("pooled_dice_at_lesions"),
                     "FP per normal image": values.get("fp_per_normal_image")})
    return pd.DataFrame(rows)


def run_report_pages(experiment_dir: str | Path, image_sets: Sequence[str], histories: Sequence[str | Path],
                     config_yaml: str | Path, out_dir: str | Path, *, experiment: str) -> list[Path]:  # fmt: skip
    """Stage ``report_pages``: write the HTML pages of one experiment into ``out_dir``; return their paths."""
    experiment_dir, out_dir = Path(experiment_dir), Path(out_dir)
    pages: dict[str, str] = {}
    tables: Mapping[str, tuple[str, str]] = {
        "summary": ("summary", "metric, value and 95% bootstrap interval (ci_low, ci_high) at the operating "
                               "threshold, TPR at 1/8 to 8 FPPI and the CPM"),
        "froc": ("FROC points", "every distinct candidate score as a threshold: lesions detected, false positives, "
                                "TPR, FPPI"),
        "per_image": ("per image", "lesions detected, false positives, pixel counts, Dice and IoU of each image"),
        "lesions": ("lesions", "every lesion (detected or missed) and every false-positive component"),
        "candidates": ("candidates", "every FROC candidate: score (maximum probability), area, position, the lesion "
                                     "it is credited to"),
    }
    for image_set in image_sets:
        for name, (title, caption) in tables.items():
            frame = pd.read_csv(experiment_dir / image_set / f"{name}.csv")
            pages[f"{image_set}-{name}"] = html_page(f"{experiment} [{image_set}]: {title}", _table(frame), caption)
    for fold, history in enumerate(histories):
        frame = pd.read_csv(history)
        pages[f"training-fold-{fold}"] = html_page(f"{experiment}: training history, fold {fold}", _table(frame),
                                                   "loss, accuracy, Dice and IoU per epoch, training and validation")
    pages["configuration"] = html_page(f"{experiment}: resolved configuration",
                                       f"<pre>{html.escape(Path(config_yaml).read_text())}</pre>",
                                       "schema defaults, then the config files given, then --config")
    comparison = comparison_table(experiment_dir.parent)
    pages["experiments"] = html_page("experiments under this results folder", _table(comparison),
                                     "the test figures of every experiment present when this page was made")
    with atomic_directory(out_dir) as tmp:
        for name, text in pages.items():
            (tmp / f"{name}.html").write_text(text)
    return [out_dir / f"{name}.html" for name in pages]
