"""The dataset fingerprint (after nnU-Net): counts, image sizes and pathology of the restructured data, per split,
from the manifests alone (no pixels read, no TensorFlow imported).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from mammoseg import __version__
from mammoseg.errors import InputError
from mammoseg.io.atomic import write_json_atomic

__all__ = ["dataset_fingerprint", "run_fingerprint"]


def _size_stats(values: pd.Series) -> dict[str, float]:
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy()
    if v.size == 0:
        return {}
    return {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())}


def dataset_fingerprint(manifests: list[pd.DataFrame]) -> dict[str, Any]:
    """Counts and size statistics per split from restructured manifests (one row per ROI or normal image).

    Raises
    ------
    InputError
        If a patient has images in both splits: every patient-level split (and the test set's independence)
        rests on a patient being on one side only, normal images included.
    """
    fingerprint: dict[str, Any] = {}
    patients: dict[str, set[str]] = {}
    for manifest in manifests:
        if manifest.empty:
            continue
        for split, rows in manifest.groupby("split"):
            images = rows.drop_duplicates("image_id")
            lesions = rows[rows["roi_id"] != ""]
            patients[str(split)] = set(rows["patient_id"])
            fingerprint[str(split)] = {
                "rois": int(len(lesions)),
                "images": int(len(images)),
                "normal_images": int((rows["roi_id"] == "").sum()),
                "patients": int(rows["patient_id"].nunique()),
                "rois_per_image_max": int(lesions.groupby("image_id").size().max()) if len(lesions) else 0,
                "image_rows_px": _size_stats(images["image_rows"]),
                "image_cols_px": _size_stats(images["image_cols"]),
                "pathology": {str(k): int(n)
                              for k, n in rows["pathology"].replace("", "unknown").value_counts().items()},
            }
    shared = sorted(patients.get("train", set()) & patients.get("test", set()))
    if shared:
        raise InputError(f"patient(s) {', '.join(shared[:5])} have images in both the train and the test split "
                         "(data.normals or the download): a patient must be on one side only")
    return fingerprint


def run_fingerprint(manifests: Sequence[str | Path], out_fingerprint: str | Path) -> dict[str, Any]:
    """Stage entry: read the restructured manifests, write ``fingerprint.json``, print its key figures."""
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in manifests]
    fingerprint = dataset_fingerprint(frames)
    fingerprint["manifests"] = [str(p) for p in manifests]
    fingerprint["mammoseg_version"] = __version__
    write_json_atomic(out_fingerprint, fingerprint)
    summary = ", ".join(f"{split}: {v['images']} images ({v['normal_images']} normal), {v['rois']} ROIs, "
                        f"{v['patients']} patients"
                        for split, v in fingerprint.items() if isinstance(v, dict) and "rois" in v)
    print(f"fingerprint: {summary or 'no kept ROI'} -> {out_fingerprint}")
    return fingerprint
