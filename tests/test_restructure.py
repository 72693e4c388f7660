"""mammoseg.data.restructure: every layout reconciles with the generator's truth; every bad input has its fate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_helpers import write_test_dicom
from pydicom.uid import JPEG2000Lossless

from mammoseg.config import validate_config
from mammoseg.data.layouts import LAYOUTS
from mammoseg.data.restructure import (
    MANIFEST_COLUMNS,
    SKIP_REASONS,
    SKIPPED_COLUMNS,
    restructure_collection,
    run_restructure,
    summary_text,
)
from mammoseg.errors import InputError
from mammoseg.io.dicom import read_mammogram
from mammoseg.io.dicomwrite import DicomHeader, build_dataset, make_uid
from mammoseg.io.masks import read_mask

synth = pytest.importorskip("mammoseg.data.synth", reason="mammoseg.data.synth (the tree generator) is not there yet")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's remarks on tiny RLE frames

SIZE = {"rows": 256, "cols": 160}


def _check_accounting(summary: dict, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    skipped = pd.read_csv(out / "skipped.csv", dtype=str, keep_default_na=False)
    assert list(manifest.columns) == MANIFEST_COLUMNS and list(skipped.columns) == SKIPPED_COLUMNS
    assert summary["found"] == summary["kept"] + summary["skipped"]
    # kept units: every ROI (a row with a roi_id) and every image (a normal image is one row without)
    assert summary["kept"] == (manifest["roi_id"] != "").sum() + manifest["image_id"].nunique()
    assert summary["skipped"] == len(skipped) and set(skipped["reason"]) <= set(SKIP_REASONS)
    assert not list(out.rglob(".tmp-*")), "temporary files left behind"
    return manifest, skipped


# --- every layout against truth.json -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=LAYOUTS)
def synth_tree(request, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp(f"synth-{request.param}")
    synth.generate_dataset(root, n_train=6, n_test=3, seed=11, layout=request.param, **SIZE)
    return request.param, root


@pytest.mark.parametrize("split", ["train", "test"])
def test_layout_reconciles_with_truth(synth_tree, split, tmp_path):
    layout, root = synth_tree
    truth = json.loads((root / "truth.json").read_text())
    out = tmp_path / "out"
    summary = restructure_collection(root, out, abnormality="mass", split=split, progress=False)
    manifest, skipped = _check_accounting(summary, out)
    assert summary["layout"] == layout

    rois = [r for r in truth["rois"] if r["split"] == split]
    images = [i for i in truth["images"] if i["split"] == split]
    assert summary["found"] == len(rois) + len(images)  # no stray files in a generated tree
    assert set(manifest["roi_id"]) == {r["roi_id"] for r in rois if r["fate"] == "kept"}
    roi_skips = skipped[skipped["reason"].map(lambda r: SKIP_REASONS[r][0]) == "roi"]
    assert dict(zip(roi_skips["roi_id"], roi_skips["reason"])) == {
        r["roi_id"]: r["reason"] for r in rois if r["fate"] == "skipped"}  # fmt: skip
    assert set(manifest["image_id"]) == {i["image_id"] for i in images if i["fate"] == "kept"}

    # the mask chosen is the file the generator wrote as the mask, never the crop (swapped numbering,
    # separate series and mislabelled folders included)
    truth_by_roi = {r["roi_id"]: r for r in rois}
    for row in manifest.itertuples():
        expected = truth_by_roi[row.roi_id]
        assert Path(row.mask_source).resolve() == (root / expected["mask_path"]).resolve()
        assert (int(row.mask_rows), int(row.mask_cols)) == (expected["mask_rows"], expected["mask_cols"])
        assert int(row.abnormality_id) == expected["abnormality_id"]
        assert row.pathology == expected["pathology"] and row.assessment == str(expected["assessment"])
        assert row.margins == expected["mass margins"]  # literal 'NA' stays 'NA'
        assert row.shape == expected["mass shape"] and row.calc_type == row.calc_distribution == ""
        assert row.breast_density in {"1", "2", "3", "4"}
        assert (out / row.mask_path).is_symlink() and (out / row.image_path).is_symlink()


@pytest.mark.parametrize("layout", ["nbia-old", "nbia"])
def test_nbia_mislabelled_folders_do_not_fool_the_classifier(layout, tmp_path):
    # Only the NBIA layouts name folders after SeriesDescription, so only they can carry a wrong label.
    root = tmp_path / "tree"
    synth.generate_dataset(root, n_train=6, n_test=3, seed=11, layout=layout, **SIZE)
    truth = json.loads((root / "truth.json").read_text())
    assert any("mislabelled_folder" in r["quirks"] for r in truth["rois"]), "the quirk under test is missing"
    summary = restructure_collection(root, tmp_path / "o", abnormality="mass", split="train", progress=False)
    assert summary["rois_kept"] == sum(r["fate"] == "kept" and r["split"] == "train" for r in truth["rois"])


def test_calcifications_same_code(tmp_path):
    root = tmp_path / "calc"
    synth.generate_dataset(root, n_train=4, n_test=2, seed=12, abnormality="calc", layout="nbia", **SIZE)
    truth = json.loads((root / "truth.json").read_text())
    summary = restructure_collection(root, tmp_path / "out", abnormality="calc", split="train", progress=False)
    manifest, _ = _check_accounting(summary, tmp_path / "out")
    assert set(manifest["roi_id"]) == {r["roi_id"] for r in truth["rois"]
                                       if r["split"] == "train" and r["fate"] == "kept"}
    assert (manifest["abnormality"] == "calc").all() and summary["collection"] == "Calc-Training"
    # the calc CSV's own attributes reach the manifest; the mass-only columns stay empty
    csv = pd.read_csv(root / "csv" / "calc_case_description_train_set.csv", dtype=str, keep_default_na=False)
    by_roi = {f"{r['patient_id']}_{r['left or right breast']}_{r['image view']}_{r['abnormality id']}": r
              for r in csv.to_dict("records")}  # fmt: skip
    assert len(manifest) > 0
    for row in manifest.itertuples():
        expected = by_roi[row.roi_id]
        assert (row.calc_type, row.calc_distribution) == (expected["calc type"], expected["calc distribution"])
        assert row.breast_density == expected["breast density"] and row.pathology == expected["pathology"]
        assert row.shape == row.margins == ""
    assert manifest["calc_type"].nunique() > 1  # not one constant copied everywhere


def test_links_resolve_from_any_cwd_and_copy_option(tmp_path, monkeypatch):
    root = tmp_path / "src"
    synth.generate_dataset(root, n_train=2, n_test=1, seed=13, layout="doi", **SIZE)
    monkeypatch.chdir(tmp_path)
    restructure_collection(Path("src"), Path("linked"), abnormality="mass", split="train", progress=False)  # relative
    restructure_collection(root, tmp_path / "copied", abnormality="mass", split="train", link="copy", progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    manifest = pd.read_csv(tmp_path / "linked" / "manifest.csv", dtype=str, keep_default_na=False)
    for row in manifest.itertuples():
        linked = tmp_path / "linked" / row.image_path
        copied = tmp_path / "copied" / row.image_path
        assert linked.is_symlink() and not os.path.isabs(os.readlink(linked))
        assert not copied.is_symlink() and copied.read_bytes() == Path(row.image_source).read_bytes()
        np.testing.assert_array_equal(read_mammogram(linked), read_mammogram(row.image_source))
        assert read_mask(tmp_path / "linked" / row.mask_path).mask.any()


def test_rerun_removes_stale_outputs(tmp_path):
    root = tmp_path / "src"
    synth.generate_dataset(root, n_train=2, n_test=1, seed=14, layout="doi", **SIZE)
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "P_99999_LEFT_CC.dcm").write_text("stale")
    restructure_collection(root, out, abnormality="mass", split="train", progress=False)
    manifest = pd.read_csv(out / "manifest.csv")
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted({Path(p).name for p in manifest["image_path"]})


def test_tree_from_real_csv_rows(tmp_path, cbis_csv_dir):
    """Real patient ids, UIDs, multi-abnormality images, id gaps and separate-series ROIs (tiny pixels)."""
    from mammoseg.testing.trees import tree_from_csv

    csv = cbis_csv_dir / "mass_case_description_test_set.csv"
    tree_from_csv([csv], tmp_path / "tree", layout="nbia", limit=60)
    truth = json.loads((tmp_path / "tree" / "truth.json").read_text())
    summary = restructure_collection(tmp_path / "tree", tmp_path / "out", abnormality="mass", split="test",
                                     progress=False)
    manifest, skipped = _check_accounting(summary, tmp_path / "out")
    kept = {r["roi_id"] for r in truth["rois"] if r["fate"] == "kept"}
    assert set(manifest["roi_id"]) == kept and summary["found"] == len(truth["rois"]) + len(truth["images"])
    assert any("separate_series" in r["quirks"] for r in truth["rois"] if r["roi_id"] in kept)
    by_roi = {r["roi_id"]: r for r in truth["rois"]}
    for row in manifest.itertuples():
        assert Path(row.mask_source).resolve() == (tmp_path / "tree" / by_roi[row.roi_id]["mask_path"]).resolve()
    # joined on the series UID: every kept ROI got its CSV pathology (checked against the CSV itself)
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    frame["roi_id"] = frame["ROI mask file path"].str.strip().str.split("/").str[0].str.split("_", n=1).str[1]
    pathology = dict(zip(frame["roi_id"], frame["pathology"]))
    assert all(row.pathology == pathology[row.roi_id] for row in manifest.itertuples())


def test_run_restructure_reads_config(tmp_path):
    root = tmp_path / "src"
    synth.generate_dataset(root, n_train=2, n_test=1, seed=15, layout="nbia-old", **SIZE)
    config = validate_config({"data": {"abnormality": "mass", "layout": "nbia-old", "link": "copy",
                                       "csv_dir": str(root / "csv")}})
    summary = run_restructure(config, root, tmp_path / "out", "test")
    assert summary["layout"] == "nbia-old" and summary["csv"].startswith(str(root / "csv"))
    assert not any(p.is_symlink() for p in (tmp_path / "out").rglob("*"))


def test_works_without_csv(tmp_path):
    root = tmp_path / "src"
    synth.generate_dataset(root, n_train=2, n_test=1, seed=16, layout="doi", **SIZE)
    (root / "csv" / "mass_case_description_train_set.csv").unlink()
    truth = json.loads((root / "truth.json").read_text())
    summary = restructure_collection(root / "CBIS-DDSM", tmp_path / "out", abnormality="mass", split="train",
                                     progress=False)  # fmt: skip
    manifest, _ = _check_accounting(summary, tmp_path / "out")
    assert summary["csv"] == "" and (manifest["pathology"] == "").all()
    assert set(manifest["roi_id"]) == {r["roi_id"] for r in truth["rois"]
                                       if r["split"] == "train" and r["fate"] == "kept"}


# --- hand-built bad inputs -----------------------------------------------------------------------------------

ROWS, COLS = 64, 48


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(100, 4000, size=(ROWS, COLS), dtype=np.uint16)


def _mask(shape=(ROWS, COLS), value=255) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[10:25, 8:20] = value
    return mask


def _write(root: Path, folder: str, name: str, pixels: np.ndarray, *, patient_id: str | None = None,
           description: str = "ROI mask images", syntax=None, sop: str | None = None, **tags) -> Path:  # fmt: skip
    """One DOI-layout file: CBIS-DDSM/<folder>/<study>/<series>/<name>."""
    study, series = make_uid("study", folder), make_uid("series", folder, name if "separate" in tags else "")
    tags.pop("separate", None)
    header = DicomHeader(patient_id if patient_id is not None else folder, study, series,
                         sop or make_uid("sop", folder, name), description, "20160720", "L", "CC")  # fmt: skip
    ds = build_dataset(pixels, header)
    for key, value in tags.items():
        setattr(ds, key, value)
    if syntax is not None:
        ds.compress(syntax, pixels)
    path = root / "CBIS-DDSM" / folder / study / series / name
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _crop(seed: int) -> np.ndarray:
    return _image(seed)[5:30, 5:25].copy()


@pytest.fixture()
def bad_tree(tmp_path) -> Path:
    root = tmp_path / "bad"
    t = "Mass-Training_P_{:05d}_LEFT_CC"
    # 1 good: image + ROI with swapped numbering (mask 000000, crop 000001)
    _write(root, t.format(1), "000000.dcm", _image(1), description="full mammogram images")
    _write(root, t.format(1) + "_1", "000000.dcm", _mask())
    _write(root, t.format(1) + "_1", "000001.dcm", _crop(1), description="cropped images")
    # 2 image without any mask
    _write(root, t.format(2), "000000.dcm", _image(2), description="full mammogram images")
    # 3 mask without image
    _write(root, t.format(3) + "_1", "000001.dcm", _mask())
    _write(root, t.format(3) + "_1", "000000.dcm", _crop(3), description="cropped images")
    # 4 empty mask (its image then has no kept ROI)
    _write(root, t.format(4), "000000.dcm", _image(4), description="full mammogram images")
    _write(root, t.format(4) + "_1", "000001.dcm", np.zeros((ROWS, COLS), np.uint8))
    # 5 non-binary mask: kept, thresholded, noted; MONOCHROME1 image; JPEG 2000 mask
    _write(root, t.format(5), "000000.dcm", _image(5), description="full mammogram images",
           PhotometricInterpretation="MONOCHROME1", WindowCenter=2000, WindowWidth=500)  # fmt: skip
    noisy = _mask(value=250)
    noisy[12, 10] = 90
    noisy[30, 30] = 200
    _write(root, t.format(5) + "_2", "000001.dcm", noisy)
    # 6 mask of the wrong size, in its own series (separate-series quirk); a second, good ROI on the same image
    _write(root, t.format(6), "000000.dcm", _image(6), description="full mammogram images")
    _write(root, t.format(6) + "_1", "000000.dcm", _mask((ROWS - 4, COLS)), separate=True)
    _write(root, t.format(6) + "_1", "000000.dcm", _crop(6), description="cropped images")
    _write(root, t.format(6) + "_3", "000000.dcm", _mask(), syntax=JPEG2000Lossless)
    # 7 broken files inside the good ROI's series
    series_dir = next((root / "CBIS-DDSM" / (t.format(1) + "_1")).rglob("000000.dcm")).parent
    (series_dir / "000002.dcm").write_bytes(b"")
    (series_dir / "000003.dcm").write_text("not a DICOM file at all\n" * 10)
    whole = (series_dir / "000000.dcm").read_bytes()
    (series_dir / "000004.dcm").write_bytes(whole[: len(whole) // 2])
    # 8 the same case twice: a copy of image 1 under another folder name
    original = next((root / "CBIS-DDSM" / t.format(1)).rglob("*.dcm"))
    copy = root / "CBIS-DDSM" / (t.format(1) + " (copy)") / "s" / "x" / "000000.dcm"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(original.read_bytes())
    # 9 hostile header values: unusable PatientID in an unusable folder; usable folder rescues a bad PatientID
    evil = "../../../../tmp/evil/\x00" + "A" * 300
    _write(root, "Mass-Training_evil_..", "000000.dcm", _mask(), patient_id=evil)
    _write(root, t.format(7), "000000.dcm", _image(7), patient_id="/etc/passwd\x00",
           description="full mammogram images")
    _write(root, t.format(7) + "_1", "000000.dcm", _mask(), patient_id="..")
    # 10 another collection's file inside a Mass-Training folder
    _write(root, t.format(8), "000000.dcm", _image(8), patient_id="Calc-Training_P_00008_LEFT_CC")
    # 11 the CSV lists an ROI that is not on disk, and gives pathology for ROI 1
    csv_dir = root / "csv"
    csv_dir.mkdir()
    rows = []
    for roi, folder in (("P_00001_LEFT_CC_1", t.format(1)), ("P_00009_LEFT_CC_1", t.format(9))):
        mask_file = next((root / "CBIS-DDSM" / (folder + "_1")).rglob("000000.dcm"), None)
        series = mask_file.parent.name if mask_file else "1.2.3"
        rows.append({"patient_id": roi[:7], "breast_density": 2, "left or right breast": "LEFT", "image view": "CC",
                     "abnormality id": 1, "abnormality type": "mass", "mass shape": "OVAL", "mass margins": "NA",
                     "assessment": 4, "pathology": "MALIGNANT", "subtlety": 3,
                     "image file path": f"{folder}/1.2/1.3/000000.dcm",
                     "cropped image file path": f"{folder}_1/1.2/{series}/000001.dcm",
                     "ROI mask file path": f"{folder}_1/1.2/{series}/000000.dcm\n"})  # fmt: skip
    synth.write_case_csv(csv_dir / "mass_case_description_train_set.csv", rows, "mass")
    return root


def test_bad_inputs_each_have_their_fate(bad_tree, tmp_path):
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "results" / "restructured"
    summary = restructure_collection(bad_tree, out, abnormality="mass", split="train", progress=False)
    manifest, skipped = _check_accounting(summary, out)

    assert sorted(manifest["roi_id"]) == ["P_00001_LEFT_CC_1", "P_00005_LEFT_CC_2", "P_00006_LEFT_CC_3",
                                          "P_00007_LEFT_CC_1"]  # fmt: skip
    roi_level = skipped[skipped["reason"].map(lambda r: SKIP_REASONS[r][0]) == "roi"]
    roi_reasons = set(roi_level["roi_id"] + "/" + roi_level["reason"])
    expected_roi = {"P_00003_LEFT_CC_1/mask_without_image", "P_00004_LEFT_CC_1/empty_mask",
                    "P_00006_LEFT_CC_1/mask_size_mismatch", "P_00009_LEFT_CC_1/mask_missing"}  # fmt: skip
    assert set(roi_reasons) == expected_roi
    image_skips = skipped[skipped["reason"] == "image_without_mask"]
    assert set(image_skips["image_id"]) == {"P_00002_LEFT_CC", "P_00004_LEFT_CC"}
    file_reasons = skipped.groupby("reason")["source_path"].apply(list).to_dict()
    assert [Path(p).name for p in file_reasons["zero_byte"]] == ["000002.dcm"]
    assert [Path(p).name for p in file_reasons["not_dicom"]] == ["000003.dcm"]
    assert [Path(p).name for p in file_reasons["truncated"]] == ["000004.dcm"]
    assert len(file_reasons["duplicate"]) == 1 and "(copy)" in file_reasons["duplicate"][0]
    assert len(file_reasons["bad_identifier"]) == 1 and len(file_reasons["other_collection"]) == 1
    # P_00007's image and ROI are named after their folders: their PatientIDs were '/etc/passwd\0' and '..'
    assert (out / "images" / "P_00007_LEFT_CC.dcm").exists() and (out / "masks" / "P_00007_LEFT_CC_1.dcm").exists()

    row = manifest.set_index("roi_id").loc["P_00005_LEFT_CC_2"]
    assert "thresholded" in row["mask_note"] and "max=250" in row["mask_note"]
    row1 = manifest.set_index("roi_id").loc["P_00001_LEFT_CC_1"]
    assert row1["pathology"] == "MALIGNANT" and row1["margins"] == "NA"
    assert Path(row1["mask_source"]).name == "000000.dcm"  # swapped numbering: decided by content
    assert read_mask(out / row1["mask_path"]).mask.sum() == (_mask() > 0).sum()
    # MONOCHROME1 + windowing tags: read through the link, inverted, no VOI
    stored = _image(5).astype(np.float32)
    image5 = read_mammogram(out / "images" / "P_00005_LEFT_CC.dcm")
    np.testing.assert_array_equal(image5, stored.max() + stored.min() - stored)

    # nothing was written outside the output folder
    after = {p for p in tmp_path.rglob("*")}
    assert all(p == out or out in p.parents or p in out.parents for p in after - before), sorted(after - before)
    assert not Path("/tmp/evil").exists()
    for name in os.listdir(out / "images") + os.listdir(out / "masks"):
        assert "/" not in name and not name.startswith(".")


def test_every_file_of_the_collection_is_accounted_for(tmp_path):
    """Hidden and system files are `ignored` rows; a stray file beside the case folders is a row too."""
    root = tmp_path / "src"
    synth.generate_dataset(root, n_train=2, n_test=1, seed=17, layout="doi", **SIZE)
    case_root = root / "CBIS-DDSM"
    series = next(next(case_root.glob("Mass-Training_*")).rglob("*.dcm")).parent
    (case_root / ".DS_Store").write_bytes(b"\0" * 32)
    (series / "._000000.dcm").write_bytes(b"\0" * 32)
    (series / "Thumbs.db").write_bytes(b"\0" * 32)
    (case_root / "README.txt").write_text("downloaded with the NBIA Data Retriever\n")
    out = tmp_path / "out"
    summary = restructure_collection(root, out, abnormality="mass", split="train", progress=False)
    _, skipped = _check_accounting(summary, out)
    # every file on disk except the other collection's case folders (Mass-Test: its own run accounts for them)
    on_disk = [p for p in case_root.rglob("*")
               if p.is_file() and not p.relative_to(case_root).parts[0].startswith("Mass-Test_")]
    assert summary["files_found"] == len(on_disk)
    reasons = dict(zip(skipped["source_path"], skipped["reason"]))
    for name in (case_root / ".DS_Store", series / "._000000.dcm", series / "Thumbs.db"):
        assert reasons[str(name)] == "ignored"
    assert reasons[str(case_root / "README.txt")] == "not_dicom"
    assert summary["skipped_by_reason"]["ignored"] == 3


def test_patient_identifiers_other_than_digits_are_kept_refused_names_recorded(tmp_path):
    root = tmp_path / "tree"
    for case in ("Mass-Training_P_M0001_LEFT_MLO", "Mass-Training_P_00002_LEFT_CC"):
        _write(root, case, "000000.dcm", _image(1), description="full mammogram images")
        _write(root, case + "_1", "000000.dcm", _mask())
    _write(root, "Mass-Training_P_M0003!_LEFT_CC", "000000.dcm", _image(3), description="full mammogram images")
    out = tmp_path / "out"
    summary = restructure_collection(root, out, abnormality="mass", split="train", progress=False)
    manifest, skipped = _check_accounting(summary, out)
    assert sorted(manifest["roi_id"]) == ["P_00002_LEFT_CC_1", "P_M0001_LEFT_MLO_1"]
    assert manifest.set_index("roi_id").loc["P_M0001_LEFT_MLO_1", "patient_id"] == "P_M0001"
    assert (out / "images" / "P_M0001_LEFT_MLO.dcm").exists() and (out / "masks" / "P_M0001_LEFT_MLO_1.dcm").exists()
    refused = skipped[skipped["reason"] == "bad_identifier"]
    assert len(refused) == 1
    assert "'Mass-Training_P_M0003!_LEFT_CC'" in refused["message"].iloc[0]
    assert "_P_<id>_<LEFT|RIGHT>_<CC|MLO>" in refused["message"].iloc[0]  # the pattern it did not match


def _break_jpeg2000_codestream_header(path: Path) -> None:
    """Overwrite the SIZ segment after the SOC marker: the file stays complete, its codestream header is garbage."""
    data = bytearray(path.read_bytes())
    start = data.index(b"\xff\x4f\xff\x51")  # SOC then SIZ: the start of a JPEG 2000 codestream
    data[start + 2:start + 12] = b"\xff" * 10
    path.write_bytes(bytes(data))


@pytest.fixture()
def undecodable_tree(tmp_path) -> Path:
    """Two JPEG 2000 full images with one ROI each; the codestream header of image 2 is broken."""
    root = tmp_path / "j2k"
    t = "Mass-Training_P_{:05d}_LEFT_CC"
    for k in (1, 2):
        image = _write(root, t.format(k), "000000.dcm", _image(k), description="full mammogram images",
                       syntax=JPEG2000Lossless)  # fmt: skip
        _write(root, t.format(k) + "_1", "000000.dcm", _mask())
        if k == 2:
            _break_jpeg2000_codestream_header(image)
    return root


def test_undecodable_full_image_is_skipped_and_its_roi_too(undecodable_tree, tmp_path):
    from mammoseg.io.dicom import header_record

    broken = next((undecodable_tree / "CBIS-DDSM" / "Mass-Training_P_00002_LEFT_CC").rglob("*.dcm"))
    assert header_record(broken)["readable"], "the header checks must pass: only a decode finds this"
    out = tmp_path / "out"
    summary = restructure_collection(undecodable_tree, out, abnormality="mass", split="train", threads=2,
                                     progress=False)  # fmt: skip
    manifest, skipped = _check_accounting(summary, out)
    assert manifest["roi_id"].tolist() == ["P_00001_LEFT_CC_1"]
    assert not (out / "images" / "P_00002_LEFT_CC.dcm").exists()
    row = skipped[skipped["source_path"] == str(broken)]
    assert row["reason"].tolist() == ["undecodable"] and row["image_id"].tolist() == ["P_00002_LEFT_CC"]
    assert "JPEG 2000" in row["message"].iloc[0]  # the decoder's message
    roi = skipped[skipped["roi_id"] == "P_00002_LEFT_CC_1"]
    assert roi["reason"].tolist() == ["mask_without_image"]


def test_decoding_threads_change_nothing_but_speed(bad_tree, tmp_path):
    outputs = []
    for threads in (1, 3):
        out = tmp_path / f"out-{threads}"
        restructure_collection(bad_tree, out, abnormality="mass", split="train", threads=threads, progress=False)
        outputs.append(((out / "manifest.csv").read_bytes(), (out / "skipped.csv").read_bytes()))
    assert outputs[0] == outputs[1]
    with pytest.raises(ValueError, match="threads"):
        restructure_collection(bad_tree, tmp_path / "x", abnormality="mass", split="train", threads=0, progress=False)


def test_links_keep_working_when_results_and_download_move_together(tmp_path):
    project = tmp_path / "project"
    synth.generate_dataset(project / "data", n_train=2, n_test=1, seed=18, layout="doi", **SIZE)
    out = project / "results" / "restructured" / "mass" / "train"
    restructure_collection(project / "data", out, abnormality="mass", split="train", progress=False)
    before = {p.name: read_mammogram(p) for p in (out / "images").iterdir()}
    assert before and all(not os.path.isabs(os.readlink(p)) for p in (out / "images").iterdir())
    moved = tmp_path / "elsewhere" / "renamed-project"
    moved.parent.mkdir()
    os.rename(project, moved)
    out = moved / "results" / "restructured" / "mass" / "train"
    for name, pixels in before.items():
        np.testing.assert_array_equal(read_mammogram(out / "images" / name), pixels)
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert all(read_mask(out / path).mask.any() for path in manifest["mask_path"])


def test_link_text_relative_below_a_common_folder_absolute_across_the_root(tmp_path):
    from mammoseg.data.restructure import link_text

    images = tmp_path / "project" / "results" / "restructured" / "mass" / "train" / "images"
    source = tmp_path / "project" / "data" / "CBIS-DDSM" / "case" / "000000.dcm"
    assert link_text(source, images) == "../../../../../data/CBIS-DDSM/case/000000.dcm"
    # only the root in common (a download on another disk): absolute, so that the project can move without it
    elsewhere = "/mammoseg-no-such-disk/CBIS-DDSM/case/000000.dcm"
    assert link_text(elsewhere, "/mammoseg-no-such-home/project/results/images") == elsewhere
    # the system follows a relative link from where it physically is: a linked results/ folder is resolved first
    (tmp_path / "scratch" / "results").mkdir(parents=True)
    (tmp_path / "project" / "results-link").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "project" / "results-link").symlink_to(tmp_path / "scratch" / "results")
    assert link_text(source, tmp_path / "project" / "results-link") == "../../project/data/CBIS-DDSM/case/000000.dcm"


def test_summary_line_names_counts_reasons_layout_and_csv(bad_tree, tmp_path, capsys):
    from mammoseg.data.restructure import summary_text

    summary = restructure_collection(bad_tree, tmp_path / "out", abnormality="mass", split="train", progress=False)
    printed = capsys.readouterr().out
    assert printed == summary_text(summary) + "\n"
    assert len(printed.splitlines()) == 1  # one line per collection when the CSV was found
    line = printed.strip()
    assert line.startswith(f"restructure Mass-Training: found {summary['found']} = kept {summary['kept']} + "
                           f"skipped {summary['skipped']} (")
    for reason, count in summary["skipped_by_reason"].items():
        assert f"{reason} {count}" in line
    assert "layout doi" in line and f"case CSV {bad_tree / 'csv' / 'mass_case_description_train_set.csv'}" in line


def test_summary_warns_without_csv_and_names_the_empty_columns(tmp_path, capsys):
    from mammoseg.data.restructure import summary_text

    root = tmp_path / "src"
    synth.generate_dataset(root, n_train=2, n_test=1, seed=16, layout="nbia", **SIZE)
    (root / "csv" / "mass_case_description_train_set.csv").unlink()
    summary = restructure_collection(root, tmp_path / "out", abnormality="mass", split="train", progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines == summary_text(summary).splitlines() and len(lines) == 2
    assert "case CSV none" in lines[0] and "layout nbia" in lines[0]
    warning = lines[1]
    assert warning.startswith("restructure Mass-Training: warning: no case CSV mass_case_description_train_set.csv")
    assert str(root / "csv") in warning
    assert "pathology, assessment, subtlety, breast_density, shape, margins stay empty" in warning


# --- lesion-free (normal) images ---------------------------------------------------------------------------------


def test_normal_images_are_kept_without_roi_and_every_file_is_accounted_for(tmp_path):
    root = tmp_path / "src"
    synth.generate_dataset(root, n_train=3, n_test=1, seed=21, layout="doi", **SIZE)
    normals = tmp_path / "normals"
    rng = np.random.default_rng(0)
    write_test_dicom(normals / "Normal_P_90003_LEFT_MLO.dcm", rng.integers(100, 900, (256, 160)),
                     patient_id="Normal_P_90003_LEFT_MLO")
    scan = write_test_dicom(normals / "scan 17.dcm", rng.integers(100, 900, (256, 160)), patient_id="anonymous 17")
    header = pydicom.dcmread(scan)
    header.ViewPosition = "cc"  # its view only in the header: the index record carries it to the manifest
    header.save_as(scan)
    write_test_dicom(normals / "copy" / "P_90003_LEFT_MLO.dcm", rng.integers(100, 900, (256, 160)),
                     patient_id="whoever")  # the same image id from its file name: a duplicate
    (normals / "chart.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    (normals / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (normals / "empty.dcm").write_bytes(b"")
    summary = restructure_collection(root, tmp_path / "out", abnormality="mass", split="train", progress=False,
                                     normals=[normals])
    manifest, skipped = _check_accounting(summary, tmp_path / "out")
    kept = manifest[manifest["roi_id"] == ""]
    assert sorted(kept["image_id"]) == ["P_90003_LEFT_MLO", "scan_17"] and summary["normal_images"] == 2
    first = kept.set_index("image_id").loc["P_90003_LEFT_MLO"]
    assert (first["patient_id"], first["side"], first["view"], first["pathology"]) == ("P_90003", "LEFT", "MLO",
                                                                                       "NORMAL")
    assert first["mask_path"] == "" and first["abnormality_id"] == "0"
    assert (tmp_path / "out" / first["image_path"]).resolve() == (normals / "Normal_P_90003_LEFT_MLO.dcm").resolve()
    assert tuple(kept.set_index("image_id").loc["scan_17", ["patient_id", "view"]]) == ("scan_17", "CC")
    fates = {Path(r.source_path).name: r.reason for r in skipped.itertuples() if str(r.source_path).startswith(
        str(normals.resolve())) or str(normals) in str(r.source_path)}
    assert fates == {"P_90003_LEFT_MLO.dcm": "duplicate", "chart.png": "not_dicom", ".DS_Store": "ignored",
                     "empty.dcm": "zero_byte"}
    assert "(2 normal)" in summary_text(summary)


def test_a_normals_folder_that_is_not_there_names_the_key(tmp_path):
    root = tmp_path / "src"
    synth.generate_dataset(root, n_train=2, n_test=1, seed=22, layout="doi", **SIZE)
    with pytest.raises(InputError, match="data.normals.train"):
        restructure_collection(root, tmp_path / "out", abnormality="mass", split="train", progress=False,
                               normals=[tmp_path / "nowhere"])
