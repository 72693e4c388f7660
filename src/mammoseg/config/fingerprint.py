"""A dataset fingerprint and a training plan written to disk (after nnU-Net), so every later stage can be traced
to the data it was planned on.

The fingerprint describes the restructured data (counts, image sizes, pathology); the plan states what the
configured method will do with it (patch and network input sizes in pixels, expected patch and window counts,
the config hash of each stage). Both come from the manifests alone: no pixels are read, no TensorFlow imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammoseg import __version__
from mammoseg.io.atomic import write_json_atomic
from mammoseg.config import section_hash

__all__ = ["dataset_fingerprint", "training_plan", "run_fingerprint"]


def _size_stats(values: pd.Series) -> dict[str, float]:
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy()
    if v.size == 0:
        return {}
    return {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())}


def dataset_fingerprint(manifests: list[pd.DataFrame]) -> dict[str, Any]:
    """Counts and size statistics per split from restructured manifests (one row per ROI)."""
    fingerprint: dict[str, Any] = {}
    for manifest in manifests:
        if manifest.empty:
            continue
        for split, rows in manifest.groupby("split"):
            images = rows.drop_duplicates("image_id")
            fingerprint[str(split)] = {
                "rois": int(len(rows)),
                "images": int(len(images)),
                "patients": int(rows["patient_id"].nunique()),
                "rois_per_image_max": int(rows.groupby("image_id").size().max()),
                "image_rows_px": _size_stats(images["image_rows"]),
                "image_cols_px": _size_stats(images["image_cols"]),
                "pathology": {str(k): int(n) for k, n in rows["pathology"].replace("", "unknown").value_counts().items()},
            }
    return fingerprint


def training_plan(fingerprint: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """What the configured method will do with the fingerprinted data (sizes in pixels)."""
    patches = config["patches"]
    side = 2 ** patches["n"]
    net_input = side // patches["downscale"]
    train = fingerprint.get("train", {})
    rows = train.get("image_rows_px", {})
    cols = train.get("image_cols_px", {})
    test = fingerprint.get("test", {})
    test_rows, test_cols = test.get("image_rows_px", {}), test.get("image_cols_px", {})
    plan = {
        "patch_side_px": side,
        "downscale_factor": patches["downscale"],
        "network_input_px": [net_input, net_input, 1],
        "copies_per_roi": 1 + patches["n_shifted"],
        "expected_training_patches": train.get("rois", 0) * (1 + patches["n_shifted"]),
        "patch_fits_smallest_train_image": bool(rows and cols and side <= min(rows["min"], cols["min"])),
        "paper_mode_windows_per_median_test_image": (
            int(test_rows["median"] // side) * int(test_cols["median"] // side) if test_rows and test_cols else 0
        ),
        "model": config["model"],
        "train": config["train"],
        "config_hashes": {
            "patches": section_hash(config["patches"]),
            "model+train": section_hash(config["model"], config["train"]),
        },
        "mammoseg_version": __version__,
    }
    if net_input < 2 ** config["model"]["depth"]:
        plan["warning"] = (
            f"network input {net_input} px cannot be halved {config['model']['depth']} times; lower model.depth"
        )
    return plan


def run_fingerprint(config: dict, manifests: list[Path], out_fingerprint: Path, out_plan: Path) -> dict[str, Any]:
    """Stage entry: read the manifests, write fingerprint.json and plan.json, print the plan's key figures."""
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in manifests]
    fingerprint = dataset_fingerprint(frames)
    fingerprint["manifests"] = [str(p) for p in manifests]
    plan = training_plan(fingerprint, config)
    write_json_atomic(out_fingerprint, fingerprint)
    write_json_atomic(out_plan, plan)
    print(
        f"fingerprint: {fingerprint.get('train', {}).get('rois', 0)} training ROIs, "
        f"{fingerprint.get('test', {}).get('images', 0)} test images; plan: {plan['patch_side_px']} px patches -> "
        f"{plan['network_input_px'][0]} px network input, ~{plan['expected_training_patches']} training patches"
    )
    if "warning" in plan:
        print(f"warning: {plan['warning']}")
    return plan
