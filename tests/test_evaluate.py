"""Evaluation stage end to end on a hand-built two-image test set with known TPR, FPPI and FROC."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicom_helpers import write_test_dicom
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score

from mammoseg.config import validate_config
from mammoseg.errors import InputError
from mammoseg.evaluation import evaluate, summary
from mammoseg.inference import predict

SHAPE = (64, 80)
HIT, MISSED_LEVEL, FP_LEVEL = 230, 100, 200  # uint8 probability levels (0.90, 0.39, 0.78)


def _box(r0, c0, r1, c1):
    m = np.zeros(SHAPE, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def build_case(tmp_path: Path):
    """Image A: lesion A1 hit, lesion A2 missed at 0.5 (found below 0.39), two FP blobs (25 and 16 px).
    Image B: lesion B1 hit, one 4-px FP blob (removed by min_area = 10).

    Returns the manifest, the lesions, the probability maps and the prediction chunk folder (as the predict stage
    writes it: predictions.csv and one .prob.npz per image).
    """
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
    chunk = tmp_path / "pred" / "chunk-0"
    rows, status = [], []
    for image_id, rois in lesions.items():
        image = np.full(SHAPE, 1000, dtype=np.uint16)
        write_test_dicom(root / "images" / f"{image_id}.dcm", image)
        for roi_id, mask in rois.items():
            write_test_dicom(root / "masks" / f"{roi_id}.dcm", mask.astype(np.uint16) * 255)
            rows.append({"roi_id": roi_id, "image_id": image_id, "patient_id": image_id[:3], "split": "test",
                         "abnormality_id": roi_id[-1], "image_path": f"images/{image_id}.dcm",
                         "mask_path": f"masks/{roi_id}.dcm"})
        predict.save_prediction(probs[image_id], chunk / f"{image_id}.prob.npz", {"mode": "paper"})
        status.append({"image_id": image_id, "status": "predicted", "reason": "", "message": ""})
    pd.DataFrame(status).to_csv(chunk / "predictions.csv", index=False)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv", lesions, probs, chunk


EVALUATE = {"match": "iou", "iou_threshold": 0.3, "min_area": 10, "candidate_threshold": 0.1, "seg": "binary",
            "overlay_max_side": 64, "bootstrap": 200, "bootstrap_seed": 0,
            "postprocess": {"min_area": 0, "top_k": 0}}
CONFIG = validate_config({"infer": {"threshold": 0.5, "chunk_size": 100}, "evaluate": EVALUATE,
                          "data": {"abnormality": "mass"}})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("evaluate")
    manifest, lesions, probs, chunk = build_case(tmp_path)
    out = tmp_path / "experiment" / "test" / "chunk-0"
    evaluate.run_evaluate_chunk(chunk, manifest, out, chunk=0, config=CONFIG, image_set="test")
    jsons = [out / f"{image_id}.json" for image_id in lesions]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary_ = summary.run_summarise([out], out.parent, experiment="toy-0123abcd", image_set="test",
                                         config=CONFIG)
    return tmp_path, lesions, probs, jsons, summary_, printed.getvalue()


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
        # the binary mask is an evaluation output: the map binarised at the operating threshold
        png = np.asarray(Image.open(path.with_name(f"{image_id}.mask.png")))
        np.testing.assert_array_equal(png.ravel() == 255, pred)
        assert path.with_name(f"{image_id}.overlay.png").is_file()
        # and the DICOM SEG of the same mask, referencing its source image
        import highdicom as hd
        import pydicom

        seg = hd.seg.segread(path.with_name(f"{image_id}.seg.dcm"))
        source = pydicom.dcmread(tmp_path / "restructured" / "images" / f"{image_id}.dcm")
        np.testing.assert_array_equal(seg.pixel_array.reshape(SHAPE).astype(bool).ravel(), pred)
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
            source.SOPInstanceUID
        assert record["seg"] == f"binary: {image_id}.seg.dcm"


def test_hand_built_tpr_fppi_and_at_lesion_metrics(evaluated):
    tmp_path, lesions, probs, jsons, summary_, printed = evaluated
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

    as_predicted, filtered = summary_["summary"][0], summary_["summary"][10]
    assert as_predicted["tpr"] == pytest.approx(2 / 3) and as_predicted["fppi"] == pytest.approx(3 / 2)
    assert filtered["tpr"] == pytest.approx(2 / 3) and filtered["fppi"] == pytest.approx(2 / 2)
    assert "TPR 0.667" in printed and "FPPI 1.50" in printed


def test_froc_over_candidate_scores_by_hand(evaluated):
    """Candidates (components >= 0.1, scored by their max): hits 0.902, 0.902 (A1, B1) and 0.392 (A2, below the
    operating threshold but a candidate), false positives 0.784 × 3, over 2 images and 3 lesions.

    Thresholds 0.392 / 0.784 / 0.902 / above: (FPPI, TPR) = (1.5, 1), (1.5, 2/3), (0, 2/3), (0, 0).
    Interpolated as MONAI does on increasing FPPI: TPR 2/3 at every FPPI below 1.5, 1 from 1.5 on.
    """
    _, _, _, _, summary_, printed = evaluated
    s = summary_["summary"][0]
    for point in (0.125, 0.25, 0.5, 1):
        assert s[f"tpr_at_{point:g}_fppi"] == pytest.approx(2 / 3), point
    for point in (2, 4, 8):
        assert s[f"tpr_at_{point:g}_fppi"] == pytest.approx(1.0), point
    assert s["cpm"] == pytest.approx((4 * 2 / 3 + 3) / 7)
    assert "CPM 0.810" in printed


def test_pooled_metrics_against_concatenated_masks(evaluated):
    _, lesions, probs, _, summary_, _ = evaluated
    truth = np.concatenate([np.any(list(masks.values()), axis=0).ravel() for masks in lesions.values()])
    pred = np.concatenate([(probs[k] >= 128).ravel() for k in lesions])
    s = summary_["summary"][0]
    assert s["pooled_dice"] == pytest.approx(f1_score(truth, pred))
    assert s["pooled_iou"] == pytest.approx(jaccard_score(truth, pred))
    dices = [f1_score(np.any(list(lesions[k].values()), axis=0).ravel(), (probs[k] >= 128).ravel()) for k in lesions]
    assert s["mean_dice"] == pytest.approx(np.mean(dices))


def test_tables_written_and_name_the_experiment(evaluated):
    tmp_path, *_ = evaluated
    out = tmp_path / "experiment" / "test"
    for name in ("per_image.csv", "lesions.csv", "candidates.csv", "summary.csv", "froc.csv", "froc.png",
                 "summary.txt"):
        assert (out / name).is_file(), name
    tables = {name: pd.read_csv(out / f"{name}.csv") for name in ("per_image", "lesions", "candidates", "froc",
                                                                    "summary")}
    for table in tables.values():
        assert set(table["experiment"]) == {"toy-0123abcd"} and set(table["image_set"]) == {"test"}
    assert len(tables["per_image"]) == 4  # 2 images × (as predicted, min_area 10)
    lesion_rows = tables["lesions"][tables["lesions"]["min_area"] == 0]
    assert (lesion_rows["kind"] == "lesion").sum() == 3 and (lesion_rows["kind"] == "fp_component").sum() == 3
    candidates = tables["candidates"]
    assert len(candidates) == 6 and candidates["false_positive"].sum() == 3
    assert sorted(candidates.loc[~candidates["false_positive"], "matched_roi"]) == [
        "P_1_LEFT_CC_1", "P_1_LEFT_CC_2", "P_2_RIGHT_MLO_1"]
    assert np.allclose(sorted(candidates["score"]), sorted([230 / 255, 100 / 255, 200 / 255, 200 / 255, 230 / 255,
                                                            200 / 255]))
    summary_table = tables["summary"]
    assert {"cpm", "tpr_at_0.125_fppi", "tpr_at_8_fppi"} <= set(summary_table["metric"])
    # the threshold the operating point is at (CONFIG's infer.threshold here), once per min_area variant
    assert summary_table.loc[summary_table["metric"] == "threshold", "value"].tolist() == [0.5, 0.5]
    intervals = summary_table.dropna(subset=["ci_low"])
    assert set(intervals["metric"]) == {"tpr", "fppi", "tpr_at_1_fppi", "cpm", "pooled_dice"}
    assert (intervals["ci_low"] <= intervals["value"] + 1e-12).all()
    assert (intervals["value"] <= intervals["ci_high"] + 1e-12).all()


def test_a_failed_prediction_is_listed_and_counts_in_no_figure(tmp_path):
    manifest, lesions, probs, chunk = build_case(tmp_path)
    status = pd.read_csv(chunk / "predictions.csv", dtype=str, keep_default_na=False)
    status.loc[status["image_id"] == "P_2_RIGHT_MLO", ["status", "reason", "message"]] = [
        "failed", "undecodable", "P_2_RIGHT_MLO.dcm: broken stream"]
    status.to_csv(chunk / "predictions.csv", index=False)
    (chunk / "P_2_RIGHT_MLO.prob.npz").unlink()
    out = tmp_path / "experiment" / "test" / "chunk-0"
    evaluate.run_evaluate_chunk(chunk, manifest, out, chunk=0, config=CONFIG, image_set="test")
    result = summary.run_summarise([out], out.parent, experiment="toy", image_set="test", config=CONFIG)
    assert result["n_failed"] == 1 and result["summary"][0]["n_images"] == 1 and result["summary"][0]["n_lesions"] == 2
    per_image = pd.read_csv(out.parent / "per_image.csv")
    failed = per_image[per_image["image_id"] == "P_2_RIGHT_MLO"]
    assert failed["status"].tolist() == ["not_predicted"] and failed["reason"].tolist() == ["undecodable"]
    assert "1 image(s) not predicted" in result["text"]


def test_mismatched_mask_is_a_clear_error(tmp_path):
    manifest, lesions, probs, chunk = build_case(tmp_path)
    write_test_dicom(manifest.parent / "masks" / "P_1_LEFT_CC_2.dcm", np.zeros((10, 10), np.uint16))
    with pytest.raises(InputError, match="P_1_LEFT_CC_2.dcm: mask shape"):
        evaluate.run_evaluate_chunk(chunk, manifest, tmp_path / "out", chunk=0, config=CONFIG, image_set="test")
    assert not (tmp_path / "out").exists()  # the chunk folder appears whole or not at all


def test_a_normal_image_with_a_planted_false_positive_counts_one_fp_and_no_lesion(tmp_path):
    manifest, lesions, probs, chunk = build_case(tmp_path)
    normal_prob = np.zeros(SHAPE, dtype=np.uint8)
    normal_prob[20:26, 30:36] = FP_LEVEL  # one planted false positive
    write_test_dicom(manifest.parent / "images" / "P_3_LEFT_MLO.dcm", np.full(SHAPE, 900, dtype=np.uint16))
    predict.save_prediction(normal_prob, chunk / "P_3_LEFT_MLO.prob.npz", {"mode": "paper"})
    clean = np.zeros(SHAPE, dtype=np.uint8)
    write_test_dicom(manifest.parent / "images" / "P_4_RIGHT_CC.dcm", np.full(SHAPE, 900, dtype=np.uint16))
    predict.save_prediction(clean, chunk / "P_4_RIGHT_CC.prob.npz", {"mode": "paper"})
    status = pd.read_csv(chunk / "predictions.csv", dtype=str, keep_default_na=False)
    extra = [{"image_id": i, "status": "predicted", "reason": "", "message": ""} for i in ("P_3_LEFT_MLO",
                                                                                           "P_4_RIGHT_CC")]
    pd.concat([status, pd.DataFrame(extra)]).to_csv(chunk / "predictions.csv", index=False)
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    normals = [{"roi_id": "", "image_id": i, "patient_id": i[:3], "split": "test", "abnormality_id": "0",
                "pathology": "NORMAL",
                "image_path": f"images/{i}.dcm", "mask_path": ""} for i in ("P_3_LEFT_MLO", "P_4_RIGHT_CC")]
    pd.concat([table, pd.DataFrame(normals)]).to_csv(manifest, index=False)
    out = tmp_path / "experiment" / "test" / "chunk-0"
    evaluate.run_evaluate_chunk(chunk, manifest, out, chunk=0, config=CONFIG, image_set="test")
    planted = json.loads((out / "P_3_LEFT_MLO.json").read_text())
    assert planted["normal"] and planted["n_lesions"] == 0
    assert planted["results"][0]["false_positives"] == 1 and planted["results"][0]["detected"] == 0
    result = summary.run_summarise([out], out.parent, experiment="toy", image_set="test", config=CONFIG)
    s = result["summary"][0]
    assert s["n_lesions"] == 3 and s["n_images"] == 4  # normal images add images, never lesions
    assert s["n_normal_images"] == 2 and s["fp_per_normal_image"] == 0.5 and s["normal_images_without_mark"] == 0.5
    assert s["fppi"] == pytest.approx((3 + 1) / 4) and s["fppi_lesion_images"] == pytest.approx(3 / 2)
    assert "2 normal images" not in result["text"] and "normal images 2: 0.50 false positives" in result["text"]


def test_chunks_binarised_at_different_thresholds_are_not_pooled(tmp_path):
    # two chunks of one image set, one evaluated at 0.5 and one (left over from another run) at 0.3: the summary
    # would print one threshold for two operating points, so it refuses and names both
    from mammoseg.errors import InputError

    manifest, lesions, probs, chunk = build_case(tmp_path)
    first, second = tmp_path / "experiment" / "test" / "chunk-0", tmp_path / "experiment" / "test" / "chunk-1"
    evaluate.run_evaluate_chunk(chunk, manifest, first, chunk=0, config=CONFIG, image_set="test")
    other = validate_config({**CONFIG, "infer": {**CONFIG["infer"], "threshold": 0.3}})
    evaluate.run_evaluate_chunk(chunk, manifest, second, chunk=0, config=other, image_set="test")
    for path in second.glob("*.json"):  # as if chunk 1 held other images
        record = json.loads(path.read_text())
        record["image_id"] += "_other"
        path.write_text(json.dumps(record))
    summary.run_summarise([first], first.parent, experiment="toy", image_set="test", config=CONFIG)  # one: fine
    tables = {path.name: path.read_bytes() for path in first.parent.glob("*.csv")}
    with pytest.raises(InputError, match=r"different thresholds \{0.3: \[.*\], 0.5: \["):
        summary.run_summarise([first, second], first.parent, experiment="toy", image_set="test", config=CONFIG)
    assert tables and {path.name: path.read_bytes() for path in first.parent.glob("*.csv")} == tables  # untouched


def test_read_summary_csv_gives_json_ready_figures_of_one_variant(evaluated):
    tmp_path = evaluated[0]
    path = tmp_path / "experiment" / "test" / "summary.csv"
    table = pd.read_csv(path)
    figures = summary.read_summary_csv(path)
    as_predicted = table[table["min_area"] == 0]
    assert set(figures) == set(as_predicted["metric"])
    for row in as_predicted.itertuples():
        assert figures[row.metric]["value"] == pytest.approx(row.value, nan_ok=True)
        assert (figures[row.metric]["ci_low"] is None) == bool(pd.isna(row.ci_low))
    assert any(f["ci_low"] is None for f in figures.values()) and any(f["ci_low"] is not None for f in figures.values())
    json.dumps(figures, allow_nan=False)  # no NaN reaches a model card


def test_comparison_table_names_each_experiment_s_operating_threshold(evaluated):
    """The experiments page compares operating points: each row says the threshold its TPR, FPPI and Dice are at."""
    from mammoseg.evaluation.report import comparison_table

    tmp_path = evaluated[0]
    table = comparison_table(tmp_path)  # tmp_path/experiment/test/summary.csv: one experiment folder
    assert list(table["experiment"]) == ["experiment"] and list(table["threshold"]) == [0.5]
    summary_csv = pd.read_csv(tmp_path / "experiment" / "test" / "summary.csv")
    as_predicted = summary_csv[summary_csv["min_area"] == 0].set_index("metric")["value"]
    assert table["TPR"].iloc[0] == pytest.approx(as_predicted["tpr"]) and table["CPM"].iloc[0] == as_predicted["cpm"]
