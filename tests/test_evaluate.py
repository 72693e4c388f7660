"""Evaluation stage end to end on a hand-built two-image test set with known TPR, FPPI and FROC."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, jaccard_score

from mammoseg.evaluation import evaluate
from mammoseg.inference import sliding as infer
from dicom_helpers import write_test_dicom

SHAPE = (64, 80)
HIT, MISSED_LEVEL, FP_LEVEL = 230, 100, 200  # uint8 probability levels (0.90, 0.39, 0.78)


def _box(r0, c0, r1, c1):
    m = np.zeros(SHAPE, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def build_case(tmp_path: Path):
    """Image A: lesion A1 hit, lesion A2 missed at 0.5 (found below 0.39), two FP blobs (25 and 16 px).
    Image B: lesion B1 hit, one 4-px FP blob (removed by min_area = 10)."""
    lesions = {
        "P_1_LEFT_CC": {"P_1_LEFT_CC_1": _box(10, 10, 20, 22), "P_1_LEFT_CC_2": _box(40, 50, 50, 60)},
        "P_2_RIGHT_MLO": {"P_2_RIGHT_MLO_1": _box(30, 30, 42, 40)},
    }
    probs = {k: np.zeros(SHAPE, dtype=np.uint8) for k in lesions}
    probs["P_1_LEFT_CC"][_box(11, 11, 21, 22)] = HIT
    probs["P_1_LEFT_CC"][_box(40, 50, 50, 60)] = MISSED_LEVEL
    probs["P_1_LEFT_CC"][_box(2, 60, 7, 65)] = FP_LEVEL
    probs["P_1_LEFT_CC"][_box(55, 5, 59, 9)] = FP_LEVEL
    probs["P_2_RIGHT_MLO"][_box(30, 30, 42, 41)] = HIT
    probs["P_2_RIGHT_MLO"][_box(5, 5, 7, 7)] = FP_LEVEL
    root = tmp_path / "restructured"
    rows = []
    for image_id, rois in lesions.items():
        image = np.full(SHAPE, 1000, dtype=np.uint16)
        write_test_dicom(root / "images" / f"{image_id}.dcm", image)
        for roi_id, mask in rois.items():
            write_test_dicom(root / "masks" / f"{roi_id}.dcm", mask.astype(np.uint16) * 255)
            rows.append({"roi_id": roi_id, "image_id": image_id, "image_path": f"images/{image_id}.dcm",
                         "mask_path": f"masks/{roi_id}.dcm"})
        meta = {"mode": "paper", "threshold": 0.5}
        infer.save_prediction(probs[image_id], probs[image_id] >= 128, tmp_path / "pred" / f"{image_id}.prob.npz",
                              tmp_path / "pred" / f"{image_id}.mask.png", meta)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv", lesions, probs


CONFIG = {"evaluate": {"match": "iou", "iou_threshold": 0.3, "min_area": 10, "froc_thresholds": 21,
                       "overlay_max_side": 64}}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("evaluate")
    manifest, lesions, probs = build_case(tmp_path)
    jsons = []
    for image_id in lesions:
        out = tmp_path / "metrics" / "images" / f"{image_id}.json"
        evaluate.run_evaluate(CONFIG, tmp_path / "pred" / f"{image_id}.prob.npz", manifest, image_id, out,
                              tmp_path / "overlays" / f"{image_id}.png")
        jsons.append(out)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = evaluate.run_summarise(CONFIG, jsons, tmp_path / "metrics", "toy")
    return tmp_path, lesions, probs, jsons, summary, printed.getvalue()


def test_per_image_json_pixel_metrics_match_sklearn(evaluated):
    tmp_path, lesions, probs, jsons, _, _ = evaluated
    for image_id, path in zip(lesions, jsons):
        record = json.loads(path.read_text())
        truth = np.any(list(lesions[image_id].values()), axis=0).ravel()
        pred = (probs[image_id] >= 128).ravel()
        pixel = record["results"][0]["pixel"]
        assert record["results"][0]["min_area"] == 0
        assert pixel["tp"] == int(np.sum(pred & truth)) and pixel["fp"] == int(np.sum(pred & ~truth))
        assert pixel["tn"] == int(np.sum(~pred & ~truth))
        assert pixel["dice"] == pytest.approx(f1_score(truth, pred))
        assert pixel["iou"] == pytest.approx(jaccard_score(truth, pred))
    overlay = tmp_path / "overlays" / f"{list(lesions)[0]}.png"
    assert overlay.is_file()


def test_hand_built_tpr_fppi_and_at_lesion_metrics(evaluated):
    tmp_path, lesions, probs, jsons, summary, printed = evaluated
    a = json.loads(jsons[0].read_text())["results"][0]
    assert (a["n_lesions"], a["detected"], a["false_positives"]) == (2, 1, 2)
    assert [row["roi_id"] for row in a["lesions"]] == ["P_1_LEFT_CC_1", "P_1_LEFT_CC_2"]
    assert sorted(c["area"] for c in a["fp_components"]) == [16, 25]
    fp25 = [c for c in a["fp_components"] if c["area"] == 25][0]
    assert (fp25["row0"], fp25["col0"], fp25["row1"], fp25["col1"]) == (2, 60, 7, 65)  # full-image coordinates
    # at lesions: only the component touching A1 counts, the FP blobs do not; both lesions stay in the truth
    truth = np.any(list(lesions["P_1_LEFT_CC"].values()), axis=0).ravel()
    touching = _box(11, 11, 21, 22).ravel()
    assert a["at_lesions"]["dice"] == pytest.approx(f1_score(truth, touching))

    as_predicted, filtered = summary["summary"][0], summary["summary"][10]
    assert as_predicted["tpr"] == pytest.approx(2 / 3) and as_predicted["fppi"] == pytest.approx(3 / 2)
    assert filtered["tpr"] == pytest.approx(2 / 3) and filtered["fppi"] == pytest.approx(2 / 2)
    # FROC: thresholds ≤ 0.39 find A2 as well (TPR 1 at FPPI 1.5); 0.78 < t ≤ 0.90 keeps only the hits (FPPI 0)
    assert as_predicted["tpr_at_0.5_fppi"] == pytest.approx(2 / 3)
    assert as_predicted["tpr_at_1_fppi"] == pytest.approx(2 / 3)
    assert as_predicted["tpr_at_2_fppi"] == pytest.approx(1.0)
    assert filtered["tpr_at_1_fppi"] == pytest.approx(1.0)
    assert "TPR 0.667" in printed and "FPPI 1.50" in printed


def test_pooled_metrics_against_concatenated_masks(evaluated):
    _, lesions, probs, _, summary, _ = evaluated
    truth = np.concatenate([np.any(list(l.values()), axis=0).ravel() for l in lesions.values()])
    pred = np.concatenate([(probs[k] >= 128).ravel() for k in lesions])
    s = summary["summary"][0]
    assert s["pooled_dice"] == pytest.approx(f1_score(truth, pred))
    assert s["pooled_iou"] == pytest.approx(jaccard_score(truth, pred))
    dices = [f1_score(np.any(list(lesions[k].values()), axis=0).ravel(), (probs[k] >= 128).ravel()) for k in lesions]
    assert s["mean_dice"] == pytest.approx(np.mean(dices))


def test_tables_written_and_name_model_and_config(evaluated):
    tmp_path, *_ = evaluated
    out = tmp_path / "metrics"
    for name in ("per_image.csv", "lesions.csv", "summary.csv", "froc.csv", "froc.png"):
        assert (out / name).is_file(), name
    per_image = pd.read_csv(out / "per_image.csv")
    lesions = pd.read_csv(out / "lesions.csv")
    froc = pd.read_csv(out / "froc.csv")
    summary = pd.read_csv(out / "summary.csv")
    for table in (per_image, lesions, froc, summary):
        assert set(table["model"]) == {"toy"} and table["config_hash"].nunique() == 1
    assert len(per_image) == 4  # 2 images × (as predicted, min_area 10)
    as_pred = lesions[lesions["min_area"] == 0]
    assert (as_pred["kind"] == "lesion").sum() == 3 and (as_pred["kind"] == "fp_component").sum() == 3
    assert len(froc) == 2 * 21
    assert froc["threshold"].between(0, 1).all()


def test_summarise_refuses_metrics_from_another_config(evaluated):
    tmp_path, _, _, jsons, _, _ = evaluated
    other = {"evaluate": {**CONFIG["evaluate"], "iou_threshold": 0.5}}
    with pytest.raises(ValueError, match="config hash"):
        evaluate.run_summarise(other, jsons, tmp_path / "other", "toy")


def test_unknown_image_and_mismatched_mask_are_clear_errors(tmp_path):
    manifest, lesions, probs = build_case(tmp_path)
    npz = tmp_path / "pred" / "P_1_LEFT_CC.prob.npz"
    with pytest.raises(ValueError, match="no ROI row for image_id"):
        evaluate.run_evaluate(CONFIG, npz, manifest, "P_9_LEFT_CC", tmp_path / "x.json", tmp_path / "x.png")
    write_test_dicom(manifest.parent / "masks" / "P_1_LEFT_CC_2.dcm", np.zeros((10, 10), np.uint16))
    with pytest.raises(ValueError, match="P_1_LEFT_CC_2.dcm: mask shape"):
        evaluate.run_evaluate(CONFIG, npz, manifest, "P_1_LEFT_CC", tmp_path / "x.json", tmp_path / "x.png")
