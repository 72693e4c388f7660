"""mammoseg.data.layouts: case names, layout detection, header indexing, collection filtering, benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mammoseg.data.layouts import (
    INDEX_COLUMNS,
    LAYOUTS,
    detect_layout,
    index_tree,
    parse_case_name,
)

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
    with pytest.raises(FileNotFoundError):
        detect_layout(tmp_path / "absent")
    (tmp_path / "random").mkdir()
    with pytest.raises(ValueError, match="no CBIS-DDSM case folders"):
        detect_layout(tmp_path)


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

