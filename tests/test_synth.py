"""Tests of the synthetic CBIS-DDSM dataset and the fixture trees built from the real CSVs.

Checks are independent of the generator: headers are read back with pydicom, paths are matched against
regexes written from LAYOUTS.md, CSVs are read with pandas and with a plain line reader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import CBIS_CSV_DIR
from scipy import ndimage

from mammoseg.data.synth import LAYOUTS, generate_dataset, run_synth, write_case_csv
from mammoseg.testing.trees import tree_from_csv

UID = r"1\.3\.6\.1\.4\.1\.9590\.100\.1\.2\.\d+"
TOP = r"(Mass|Calc)-(Training|Test)_P_\d{5}_(LEFT|RIGHT)_(CC|MLO)(_\d+)?"
LABEL = r"(full mammogram images|ROI mask images|cropped images)"
DATE = r"\d{2}-\d{2}-\d{4}"
LAYOUT_PATTERNS = {
    "doi": rf"CBIS-DDSM/{TOP}/{UID}/{UID}/00000\d\.dcm",
    "nbia-old": rf"CBIS-DDSM/{TOP}/{DATE}-DDSM-\d{{5}}/1-{LABEL}-\d{{5}}/00000\d\.dcm",
    "nbia": rf"CBIS-DDSM/{TOP}/{DATE}-DDSM-NA-\d{{5}}/1\.000000-{LABEL}-\d{{5}}/1-\d+\.dcm",
    "nbia-no-na": rf"CBIS-DDSM/{TOP}/{DATE}-DDSM-\d{{5}}/1\.000000-{LABEL}-\d{{5}}/1-\d+\.dcm",
    "kaggle": rf"CBIS-DDSM/jpeg/{UID}/1-\d+\.jpg",
}
SMALL = dict(n_train=6, n_test=3, rows=512, cols=320, seed=3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, **SMALL)
    return root, json.loads((root / "truth.json").read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def test_same_seed_gives_byte_identical_files(tmp_path):
    kwargs = dict(n_train=3, n_test=2, rows=256, cols=160, seed=7)
    generate_dataset(tmp_path / "a", **kwargs)
    generate_dataset(tmp_path / "b", **kwargs)
    generate_dataset(tmp_path / "c", **{**kwargs, "seed": 8})
    first, second, other = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(first) > 10 and first == second
    assert sorted(first) != sorted(other)  # another seed, other UIDs


def test_regenerating_into_the_same_folder_replaces_the_tree(tmp_path):
    generate_dataset(tmp_path, n_train=2, n_test=1, rows=256, cols=160, seed=1)
    generate_dataset(tmp_path, n_train=2, n_test=1, rows=256, cols=160, seed=2)
    truth = json.loads((tmp_path / "truth.json").read_text())
    on_disk = {str(p.relative_to(tmp_path)) for p in (tmp_path / "CBIS-DDSM").rglob("*.dcm")}
    assert on_disk == {f["path"] for f in truth["files"]}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_headers_match_folders_csv_and_sizes(demo):
    root, truth = demo
    for entry in truth["files"]:
        path = root / entry["path"]
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        top, study, series, _name = entry["path"].split("/")[1:]
        assert ds.PatientID == top, entry["path"]
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (study, series)
        assert ds.Modality == "MG" and ds.PixelRepresentation == 0 and ds.PhotometricInterpretation == "MONOCHROME2"
        expected = {"image": "full mammogram images", "mask": "ROI mask images", "crop": "cropped images"}
        assert ds.SeriesDescription == expected[entry["role"]]
        assert ds.BitsAllocated == (8 if entry["role"] == "mask" else 16)
        assert ds.HighBit == ds.BitsStored - 1
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
        if entry["role"] == "image":
            assert (ds.Rows, ds.Columns) == (SMALL["rows"], SMALL["cols"])
            assert top.startswith("Mass-Training_" if "Training" in top else "Mass-Test_")
    # Every CSV row points at files whose headers carry the UIDs of the path (DOI layout = CSV paths).
    for split in ("train", "test"):
        frame = pd.read_csv(root / "csv" / f"mass_case_description_{split}_set.csv", dtype=str,
                            keep_default_na=False)
        for column in ("image file path", "cropped image file path", "ROI mask file path"):
            for text in frame[column]:
                top, study, series, _ = text.strip().split("/")
                ds = pydicom.dcmread(root / "CBIS-DDSM" / text.strip(), stop_before_pixels=True)
                assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == (top, study, series)


def test_masks_are_binary_inside_the_breast_and_masses_are_brighter(demo):
    root, truth = demo
    images = {image["image_id"]: _pixels(root / image["path"]).astype(np.float64) for image in truth["images"]}
    full_scale = 65535.0
    contrasts = []
    for roi in truth["rois"]:
        mask_pixels = _pixels(root / roi["mask_path"])
        assert set(np.unique(mask_pixels)) == {0, 255}
        image = images[roi["image_id"]]
        if roi["fate"] != "kept":
            assert mask_pixels.shape != image.shape
            continue
        assert mask_pixels.shape == image.shape
        lesion = mask_pixels > 0
        # Inside the breast: every lesion pixel and a ring around it are far above the black background.
        radius = max(4, int(np.sqrt(lesion.sum()) * 0.3))
        ring = ndimage.binary_dilation(lesion, iterations=radius) & ~lesion
        assert image[lesion].min() > 0.15 * full_scale
        assert image[ring].min() > 0.10 * full_scale
        contrasts.append(image[lesion].mean() / image[ring].mean())
        # The crop is the image region around the lesion.
        crop = _pixels(root / roi["crop_path"])
        r0, c0, r1, c1 = roi["crop_box"]
        np.testing.assert_array_equal(crop, image[r0:r1, c0:c1])
    assert len(contrasts) >= 8
    assert min(contrasts) > 1.0, contrasts  # every mass is brighter than its surroundings on average
    assert np.median(contrasts) > 1.05


def test_masses_do_not_overlap_and_sizes_vary(demo):
    root, truth = demo
    by_image: dict[str, np.ndarray] = {}
    diameters = []
    for roi in truth["rois"]:
        if roi["fate"] != "kept":
            continue
        lesion = _pixels(root / roi["mask_path"]) > 0
        previous = by_image.get(roi["image_id"])
        if previous is not None:
            assert not (previous & lesion).any(), roi["roi_id"]
            by_image[roi["image_id"]] = previous | lesion
        else:
            by_image[roi["image_id"]] = lesion
        diameters.append(2 * np.sqrt(lesion.sum() / np.pi) / SMALL["rows"])
    assert 0.02 < min(diameters) and max(diameters) < 0.16
    assert max(diameters) / min(diameters) > 1.5


def test_breast_lies_against_the_declared_edge(demo):
    root, truth = demo
    edges = set()
    for image in truth["images"]:
        pixels = _pixels(root / image["path"]).astype(np.float64)
        strip = pixels.shape[1] // 10
        left, right = pixels[:, :strip].mean(), pixels[:, -strip:].mean()
        assert (left > 3 * right) if image["breast_edge"] == "left" else (right > 3 * left), image["image_id"]
        # The breast reaches at most ~75% of the width from its edge: the far quarter is background.
        far = pixels[:, -pixels.shape[1] // 4:] if image["breast_edge"] == "left" else pixels[:, : pixels.shape[1] // 4]
        assert far.mean() < 0.05 * 65535
        edges.add(image["breast_edge"])
    assert edges == {"left", "right"}


def test_every_quirk_is_on_disk_and_recorded(demo):
    root, truth = demo
    rois = truth["rois"]
    quirks = {q for item in truth["images"] + rois for q in item["quirks"]}
    assert {"swapped_numbering", "separate_series", "abnormality_id_gap", "mask_size_mismatch",
            "mislabelled_folder", "literal_na"} <= quirks

    swapped = [r for r in rois if "swapped_numbering" in r["quirks"]]
    for roi in swapped:  # on disk the mask is 000000; the CSV still says crop 000000 / mask 000001
        assert roi["mask_path"].endswith("000000.dcm") and roi["crop_path"].endswith("000001.dcm")
        assert roi["csv_mask_path"].endswith("000001.dcm")
        header = pydicom.dcmread(root / roi["mask_path"], stop_before_pixels=True)
        assert header.SeriesDescription == "ROI mask images" and header.BitsAllocated == 8

    for roi in (r for r in rois if "separate_series" in r["quirks"]):
        assert roi["mask_study_uid"] != roi["crop_study_uid"] and roi["mask_series_uid"] != roi["crop_series_uid"]
        assert roi["mask_path"].endswith("/000000.dcm") and roi["crop_path"].endswith("/000000.dcm")
        assert Path(roi["mask_path"]).parent != Path(roi["crop_path"]).parent
        assert Path(roi["mask_path"]).parts[1] == Path(roi["crop_path"]).parts[1] == roi["top_folder"]

    frames = {s: pd.read_csv(root / "csv" / f"mass_case_description_{s}_set.csv", keep_default_na=False)
              for s in ("train", "test")}
    ids = {s: f.groupby("image file path")["abnormality id"].apply(sorted).tolist() for s, f in frames.items()}
    assert [1, 3] in ids["train"] and [2] in ids["test"]
    assert (frames["train"]["mass margins"] == "NA").any()

    mismatched = [r for r in rois if "mask_size_mismatch" in r["quirks"]]
    assert len(mismatched) == 1
    roi = mismatched[0]
    assert (roi["fate"], roi["reason"]) == ("skipped", "mask_size_mismatch")
    image = next(i for i in truth["images"] if i["image_id"] == roi["image_id"])
    assert _pixels(root / roi["mask_path"]).shape != (image["rows"], image["cols"])
    # The image keeps another ROI, so only the ROI is skipped.
    assert any(r["fate"] == "kept" for r in rois if r["image_id"] == roi["image_id"])

    # found = kept + skipped: truth lists exactly the files on disk.
    on_disk = {str(p.relative_to(root)) for p in (root / "CBIS-DDSM").rglob("*") if p.is_file()}
    assert on_disk == {f["path"] for f in truth["files"]}
    summary = truth["summary"]
    assert summary["n_rois"] == summary["n_rois_kept"] + summary["n_rois_skipped"] == len(rois)


def test_csv_format_quirks(demo):
    root, truth = demo
    path = root / "csv" / "mass_case_description_train_set.csv"
    raw = path.read_bytes()
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    lines = raw.split(b"\n")[:-1]
    assert len(frame) == sum(r["split"] == "train" for r in truth["rois"])
    assert len(lines) == 2 * len(frame) + 1  # each row's mask path ends in a bare newline
    assert raw.count(b"\r\n") == len(frame) + 1
    assert all(value.endswith("\n") for value in frame["ROI mask file path"])
    assert pd.read_csv(path)["mass margins"].isna().any()  # pandas' default turns 'NA' into NaN
    assert list(frame.columns) == list(pd.read_csv(CBIS_CSV_DIR / "mass_case_description_train_set.csv",
                                                   nrows=0).columns)


@pytest.mark.parametrize("name", ["mass_case_description_test_set.csv", "calc_case_description_test_set.csv"])
def test_case_csv_writer_reproduces_the_real_file_bytes(tmp_path, name):
    source = CBIS_CSV_DIR / name
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    abnormality = name.split("_")[0]
    write_case_csv(tmp_path / name, frame.to_dict("records"), abnormality)
    assert (tmp_path / name).read_bytes() == source.read_bytes()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_paths_match_layouts_md(tmp_path, layout):
    summary = generate_dataset(tmp_path, n_train=5, n_test=2, rows=256, cols=160, seed=5, layout=layout)
    truth = json.loads((tmp_path / "truth.json").read_text())
    pattern = re.compile(LAYOUT_PATTERNS[layout])
    suffix = ".jpg" if layout == "kaggle" else ".dcm"
    on_disk = {str(p.relative_to(tmp_path)) for p in (tmp_path / "CBIS-DDSM").rglob(f"*{suffix}")}
    assert on_disk == {f["path"] for f in truth["files"]} and len(on_disk) == summary["n_files"]
    for path in on_disk:
        assert pattern.fullmatch(path), path
    images = {i["image_id"]: i for i in truth["images"]}
    for roi in truth["rois"]:
        mask, crop = Path(roi["mask_path"]), Path(roi["crop_path"])
        if layout == "kaggle":
            assert mask.parts[2] == roi["mask_series_uid"] and crop.parts[2] == roi["crop_series_uid"]
            continue
        assert mask.parts[1] == crop.parts[1] == roi["top_folder"] == images[roi["image_id"]]["top_folder"] + \
            f"_{roi['abnormality_id']}"
        if layout == "doi":
            continue
        # Study/series folders end with the last 5 digits of the UIDs.
        assert mask.parts[2].endswith(roi["mask_study_uid"][-5:])
        assert mask.parts[3].endswith(roi["mask_series_uid"][-5:])
        if "separate_series" in roi["quirks"]:
            assert "ROI mask images" in mask.parts[3] and "cropped images" in crop.parts[3]
        else:
            assert mask.parent == crop.parent
            label = "cropped images" if "mislabelled_folder" in roi["quirks"] else "ROI mask images"
            assert label in mask.parts[3]
            if layout in ("nbia", "nbia-no-na"):
                numbers = {mask.name, crop.name}
                assert numbers == {"1-1.dcm", "1-2.dcm"}
    if layout == "kaggle":
        info = pd.read_csv(tmp_path / "CBIS-DDSM" / "csv" / "dicom_info.csv", dtype=str)
        assert set(info["image_path"]) == on_disk
        assert set(info["SeriesDescription"]) == {"full mammogram images", "ROI mask images", "cropped images"}
        meta = pd.read_csv(tmp_path / "CBIS-DDSM" / "csv" / "meta.csv", dtype=str)
        assert set(meta["SeriesInstanceUID"]) == set(info["SeriesInstanceUID"])
        for row in info.itertuples():  # PatientID is the case folder; the series folder is the series UID
            assert row.image_path.split("/")[2] == row.SeriesInstanceUID and re.fullmatch(TOP, row.PatientID)
        assert (tmp_path / "CBIS-DDSM" / "csv" / "mass_case_description_train_set.csv").exists()


@pytest.mark.parametrize("layout", ["doi", "nbia"])
def test_tree_from_real_csv_rows_keeps_their_uids_and_ids(tmp_path, layout):
    source = CBIS_CSV_DIR / "mass_case_description_test_set.csv"
    summary = tree_from_csv([source], tmp_path, layout=layout, limit=30)
    expected = pd.read_csv(source, dtype=str, keep_default_na=False)
    first_images = set(expected["image file path"].iloc[:30])
    expected = expected[expected["image file path"].isin(first_images)]
    assert len(expected) >= 30 and summary["n_rois"] == len(expected)
    assert summary["n_images"] == len(first_images)
    truth = json.loads((tmp_path / "truth.json").read_text())
    written = pd.read_csv(tmp_path / "csv" / source.name, dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(written.reset_index(drop=True), expected.reset_index(drop=True))
    # Abnormality ids per image, as in the CSV.
    expected_ids = expected.groupby("image file path")["abnormality id"].apply(lambda s: sorted(map(int, s)))
    truth_ids = {i["csv_path"]: sorted(i["abnormality_ids"]) for i in truth["images"]}
    assert truth_ids == expected_ids.to_dict()
    # Headers carry the CSV's UIDs and the case folder as PatientID; paths follow the layout.
    by_csv_path = {}
    for roi in truth["rois"]:
        by_csv_path[roi["csv_mask_path"]] = roi["mask_path"]
        by_csv_path[roi["csv_crop_path"]] = roi["crop_path"]
    for image in truth["images"]:
        by_csv_path[image["csv_path"]] = image["path"]
    pattern = re.compile(LAYOUT_PATTERNS[layout])
    for column in ("image file path", "cropped image file path", "ROI mask file path"):
        for text in expected[column].str.strip():
            top, study, series, name = text.split("/")
            disk = by_csv_path[text]
            assert pattern.fullmatch(disk)
            if layout == "doi":
                assert disk == f"CBIS-DDSM/{text}"
            ds = pydicom.dcmread(tmp_path / disk, stop_before_pixels=True)
            assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == (top, study, series)
            role = {"image file path": "full mammogram images", "cropped image file path": "cropped images",
                    "ROI mask file path": "ROI mask images"}[column]
            assert ds.SeriesDescription == role


def test_run_synth_reads_the_config_sections(tmp_path, capsys):
    config = {"synth": {"n_train": 2, "n_test": 1, "rows": 256, "cols": 160, "seed": 4, "quirks": False},
              "data": {"abnormality": "calc", "layout": "auto"}}
    summary = run_synth(config, tmp_path)
    assert "3 images" in capsys.readouterr().out
    assert summary["layout"] == "doi" and summary["quirks"] == {}
    frame = pd.read_csv(tmp_path / "csv" / "calc_case_description_train_set.csv", dtype=str, keep_default_na=False)
    test_frame = pd.read_csv(tmp_path / "csv" / "calc_case_description_test_set.csv", dtype=str)
    assert len(frame) + len(test_frame) == summary["n_rois"]
    assert "calc type" in frame.columns and "breast density" in frame.columns
    assert frame["image file path"].str.startswith("Calc-Training_P_").all()
    assert all(v.endswith("\n") for v in frame["cropped image file path"])


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        generate_dataset(tmp_path, layout="zip")
    with pytest.raises(ValueError, match="abnormality"):
        generate_dataset(tmp_path, abnormality="cyst")
    bogus = tmp_path / "notes.csv"
    bogus.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="notes.csv"):
        tree_from_csv([bogus], tmp_path / "tree")
