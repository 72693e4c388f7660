"""mammoseg.data.layouts: case names, layout detection, header indexing, collection filtering, benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mammoseg.data.layouts import (
    INDEX_COLUMNS,
    LAYOUTS,
    detect_layout,
    index_tree,
    parse_case_name,
)
from mammoseg.errors import InputError

synth = pytest.importorskip("mammoseg.data.synth", reason="mammoseg.data.synth (the tree generator) is not there yet")

SIZE = {"rows": 256, "cols": 160}


@pytest.fixture(scope="module", params=LAYOUTS)
def tree(request, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp(f"tree-{request.param}")
    synth.generate_dataset(root, n_train=4, n_test=2, seed=3, layout=request.param, **SIZE)
    return request.param, root


def test_parse_case_name():
    case = parse_case_name("Mass-Training_P_00016_LEFT_CC_2")
    assert (case.collection, case.abnormality, case.split, case.patient_id, case.side, case.view) == (
        "Mass-Training", "mass", "train", "P_00016", "LEFT", "CC")  # fmt: skip
    assert case.abnormality_id == 2 and case.image_id == "P_00016_LEFT_CC" and case.roi_id == "P_00016_LEFT_CC_2"
    full = parse_case_name("Calc-Test_P_00038_RIGHT_MLO")
    assert full.abnormality == "calc" and full.split == "test" and full.roi_id is None


@pytest.mark.parametrize("name", ["../Mass-Training_P_00016_LEFT_CC", "Mass-Training_P_00016_LEFT_CC/..",
                                  "Mass-Training_P_00016_LEFT_CC\x00", "Mass-Training_P_00016_UP_CC", "",
                                  "Mass-Training_P_00016_LEFT_CC_1" + "1" * 500, "Mass-Train_P_00016_LEFT_CC"])
def test_parse_case_name_rejects_hostile(name):
    assert parse_case_name(name) is None


def test_detect_layout(tree):
    layout, root = tree
    assert detect_layout(root) == layout
    assert detect_layout(root / "CBIS-DDSM") == layout  # pointing at the inner folder works too


def test_detect_layout_errors(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        detect_layout(tmp_path / "absent")
    (tmp_path / "random").mkdir()
    with pytest.raises(InputError, match="no CBIS-DDSM case folder found"):
        detect_layout(tmp_path)


def test_no_case_folder_error_names_what_it_saw_and_the_pattern(tmp_path):
    root = tmp_path / "download"
    inner = root / "CBIS-DDSM"  # the names shown are those where the case folders would be
    for name in ["Mass_P_00001_LEFT_CC", "Mass-Training_P_1.5_LEFT_CC", "scan_001", "scan_002", "scan_003",
                 "scan_004", "scan_005", "scan_006", "scan_007"]:
        (inner / name).mkdir(parents=True)
    (inner / "notes.txt").write_text("x")
    with pytest.raises(InputError) as caught:
        detect_layout(root)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{root}: no CBIS-DDSM case folder found")
    assert "Mass-Training_P_1.5_LEFT_CC/, Mass_P_00001_LEFT_CC/, notes.txt, scan_001/" in message
    assert "and 2 more" in message  # 10 entries, 8 shown
    assert "<Mass|Calc>-<Training|Test>_P_<id>_<LEFT|RIGHT>_<CC|MLO>[_<abnormality id>]" in message
    with pytest.raises(InputError, match="Mass-Training_P_1.5_LEFT_CC/"):
        index_tree(root, layout="doi")


def test_patient_identifiers_other_than_digits(tmp_path):
    case = parse_case_name("Mass-Training_P_M0001_LEFT_MLO")
    assert (case.collection, case.patient_id, case.image_id, case.roi_id) == (
        "Mass-Training", "P_M0001", "P_M0001_LEFT_MLO", None)  # fmt: skip
    roi = parse_case_name("Calc-Test_P_site-2_a7_RIGHT_CC_3")
    assert (roi.patient_id, roi.roi_id) == ("P_site-2_a7", "P_site-2_a7_RIGHT_CC_3")
    for refused in ["Mass-Training_P_M0001!_LEFT_MLO", "Mass-Training_P_M.1_LEFT_CC", "Mass-Training_P__LEFT_CC",
                    "Mass-Training_P_-x_LEFT_CC", "Mass-Training_P_" + "A" * 33 + "_LEFT_CC",
                    "Mass-Training_P_M 1_LEFT_CC", "Mass-Training_P_M\u00e91_LEFT_CC"]:
        assert parse_case_name(refused) is None, refused


def _doi_file(case_root: Path, case: str, name: str = "000000.dcm") -> Path:
    from mammoseg.io.dicomwrite import DicomHeader, build_dataset, make_uid

    header = DicomHeader(case, make_uid("st", case), make_uid("se", case), make_uid("sop", case, name),
                         "full mammogram images", "20160720", "L", "CC")
    path = case_root / case / header.study_uid / header.series_uid / name
    path.parent.mkdir(parents=True, exist_ok=True)
    build_dataset(np.full((8, 8), 7, np.uint16), header).save_as(path, enforce_file_format=True)
    return path


def test_hidden_and_system_entries_are_listed_as_ignored_and_never_read(tmp_path):
    case_root = tmp_path / "CBIS-DDSM"
    image = _doi_file(case_root, "Mass-Training_P_00001_LEFT_CC")
    _doi_file(case_root, "Mass-Test_P_00002_LEFT_CC")  # another collection's: its own run accounts for it
    hidden = {
        case_root / ".DS_Store": "macOS Finder",
        case_root / "Thumbs.db": "Windows Explorer",
        image.parent / "DESKTOP.INI": "Windows folder settings",
        image.parent / "._000000.dcm": "AppleDouble",
        image.parent / ".partial-download": "hidden",
    }
    for path in hidden:
        path.write_bytes(b"\x00" * 16)
    (case_root / ".Trashes" / "deep").mkdir(parents=True)
    (case_root / ".Trashes" / "deep" / "x.dcm").write_bytes(b"")  # inside a hidden folder: never listed
    index = index_tree(tmp_path, layout="doi", collection_prefix="Mass-Training")
    ignored = index[index["reason"] == "ignored"].set_index("path")
    assert set(ignored.index) == {str(p) for p in hidden} | {str(case_root / ".Trashes")}
    for path, words in hidden.items():
        assert words in ignored.loc[str(path), "error"]
    assert ignored.loc[str(case_root / ".Trashes"), "error"].endswith("folder, not searched")
    assert not ignored["readable"].any()
    readable = index[index["readable"]]
    assert readable["path"].tolist() == [str(image)]


def test_links_that_lead_nowhere_or_loop_are_unreadable_entries(tmp_path):
    case_root = tmp_path / "CBIS-DDSM"
    image = _doi_file(case_root, "Mass-Training_P_00001_LEFT_CC")
    (image.parent / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    (image.parent / "loop").symlink_to(case_root / "Mass-Training_P_00001_LEFT_CC")
    index = index_tree(tmp_path, layout="doi", collection_prefix="Mass-Training").set_index("path")
    assert index.loc[str(image.parent / "gone.dcm"), "reason"] == "unreadable"
    assert "not a regular file" in index.loc[str(image.parent / "gone.dcm"), "error"]
    assert index.loc[str(image.parent / "loop"), "reason"] == "unreadable"
    assert "already searched" in index.loc[str(image.parent / "loop"), "error"]
    assert index["readable"].sum() == 1


def test_index_tree_matches_truth(tree):
    layout, root = tree
    truth = json.loads((root / "truth.json").read_text())
    index = index_tree(root, collection_prefix="Mass-Training")
    assert list(index.columns) == INDEX_COLUMNS
    assert index["readable"].all()
    train_images = {i["image_id"] for i in truth["images"] if i["split"] == "train"}
    expected = {str((root / f["path"]).resolve()) for f in truth["files"] if f["image_id"] in train_images}
    assert {str(Path(p).resolve()) for p in index["path"]} == expected
    assert (index["PatientID"].str.startswith("Mass-Training_")).all()
    images = {i["path"]: i for i in truth["images"]}
    for row in index.itertuples():
        relative = str(Path(row.path).resolve().relative_to(root.resolve()))
        if relative in images:  # a full image: header sizes are the written sizes
            assert (row.Rows, row.Columns) == (images[relative]["rows"], images[relative]["cols"])


def test_collection_filter_reads_no_other_headers(tmp_path):
    """A broken file in another collection's folder is never opened when one collection is indexed."""
    synth.generate_dataset(tmp_path, n_train=2, n_test=2, seed=5, layout="nbia", **SIZE)
    test_case = next((tmp_path / "CBIS-DDSM").glob("Mass-Test_*"))
    (test_case / "broken.dcm").write_bytes(b"")
    train = index_tree(tmp_path, collection_prefix="Mass-Training")
    assert not train["path"].str.contains("Mass-Test_").any() and train["readable"].all()
    test = index_tree(tmp_path, collection_prefix="Mass-Test")
    assert test.loc[test["path"].str.endswith("broken.dcm"), "reason"].tolist() == ["zero_byte"]
    with pytest.raises(ValueError):
        index_tree(tmp_path, collection_prefix="Mass-Somewhere")


def test_raster_files_outside_the_kaggle_layout_are_not_dicom(tmp_path):
    """A PNG chart or a JPEG left in a DICOM download is indexed as not_dicom, never read as an image."""
    from PIL import Image

    synth.generate_dataset(tmp_path, n_train=2, n_test=1, seed=5, layout="doi", **SIZE)
    case = next((tmp_path / "CBIS-DDSM").glob("Mass-Training_*"))
    Image.new("L", (64, 48), 200).save(case / "chart.png")
    Image.new("L", (64, 48), 100).save(case / "photo.jpg")
    index = index_tree(tmp_path)
    strays = index[index["path"].str.endswith(("chart.png", "photo.jpg"))]
    assert len(strays) == 2 and not strays["readable"].any()
    assert set(strays["reason"]) == {"not_dicom"} and strays["error"].str.contains("JPEG/PNG").all()
    assert index.loc[~index["path"].isin(strays["path"]), "readable"].all()


def test_kaggle_missing_file_is_recorded(tmp_path):
    synth.generate_dataset(tmp_path, n_train=2, n_test=1, seed=6, layout="kaggle", **SIZE)
    victim = sorted((tmp_path / "CBIS-DDSM" / "jpeg").rglob("*.jpg"))[0]
    victim.unlink()
    index = index_tree(tmp_path)
    row = index.loc[index["path"] == str(victim)]
    assert row["reason"].tolist() == ["missing_file"] and not row["readable"].any()


def test_benchmark_indexing(tmp_path):
    from measures import benchmark_indexing

    synth.generate_dataset(tmp_path, n_train=4, n_test=2, seed=7, layout="doi", **SIZE)
    result = benchmark_indexing(tmp_path, repeats=2)
    assert result["n_files"] == len(list((tmp_path / "CBIS-DDSM").rglob("*.dcm")))
    assert result["bare_s"] > 0 and result["index_s"] > 0
    assert result["ratio"] == pytest.approx(result["index_files_per_s"] / result["bare_files_per_s"])

