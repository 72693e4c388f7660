"""HDF5 shard extraction: geometry on synthetic lesions, provenance, determinism, atomicity, manifests."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from mammoseg.data.manifest import bucket_of
from mammoseg.errors import InputError
from mammoseg.io.dicom import read_mammogram
from mammoseg.io.masks import read_mask
from mammoseg.patches import shards
from mammoseg.patches.geometry import downscale_mask, preprocess_window
from mammoseg.patches.shards import (
    PROVENANCE_COLUMNS,
    extract_shard,
    read_table,
    render_grid,
    run_extract,
    run_patch_manifest,
)

# --------------------------------------------------------------------------------------------------------------
# Synthetic collection helpers (also imported by test_dataset.py)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lesion:
    """A rectangular lesion: box (r0, c0, r1, c1) in pixels, r1/c1 exclusive."""

    r0: int
    c0: int
    r1: int
    c1: int


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    """A minimal uncompressed MONOCHROME2 DICOM holding ``pixels`` (uint8 or uint16)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path.name)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _smooth_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Tissue-like uint16 texture: a coarse random field upsampled bilinearly, plus mild noise (compresses like
    a mammogram rather than like white noise)."""
    from skimage.transform import resize

    coarse = rng.random((max(2, h // 64), max(2, w // 64)))
    field = resize(coarse, (h, w), order=1, mode="edge", anti_aliasing=False) * 2000 + 500
    return np.clip(field + rng.normal(0, 20, size=(h, w)), 0, 4095).astype(np.uint16)


def write_collection(root: Path, images: dict[str, tuple[tuple[int, int], list[Lesion]]], *, seed: int = 0,
                     split: str = "train", smooth: bool = False) -> Path:
    """Write images, one mask per lesion and a manifest.csv in the restructured layout; return the manifest path.

    ``images`` maps image_id (``P_<patient>_<side>_<view>``) to ((rows, cols), lesions). Image pixels are uint16
    noise (or a smooth texture with ``smooth=True``) with brighter lesion rectangles; masks are uint8 0/255
    rectangles.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for image_id, ((h, w), lesions) in images.items():
        if smooth:
            pixels = _smooth_background(rng, h, w)
        else:
            pixels = rng.integers(500, 1500, size=(h, w), dtype=np.uint16)
        for les in lesions:
            pixels[les.r0 : les.r1, les.c0 : les.c1] += 2000
        image_rel = f"images/{image_id}.dcm"
        write_dicom(root / image_rel, pixels)
        for k, les in enumerate(lesions, start=1):
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[les.r0 : les.r1, les.c0 : les.c1] = 255
            roi_id = f"{image_id}_{k}"
            write_dicom(root / f"masks/{roi_id}.dcm", mask)
            patient = "_".join(image_id.split("_")[:2])
            rows.append({
                "roi_id": roi_id, "image_id": image_id, "patient_id": patient, "abnormality": "mass",
                "split": split, "side": image_id.split("_")[2], "view": image_id.split("_")[3],
                "abnormality_id": k, "image_rows": h, "image_cols": w, "mask_rows": h, "mask_cols": w,
                "image_path": image_rel, "mask_path": f"masks/{roi_id}.dcm",
            })
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def random_collection(root: Path, n_images: int, *, shape=(320, 256), seed: int = 0, smooth: bool = False,
                      max_lesion: int = 40) -> Path:
    """``n_images`` images, each with 1-2 random lesions of 4..max_lesion pixels (some touching a border)."""
    rng = np.random.default_rng(seed)
    images = {}
    for i in range(n_images):
        lesions = []
        for _ in range(1 + i % 2):
            h, w = rng.integers(4, max_lesion, size=2)
            r0 = int(rng.integers(0, shape[0] - h + 1))
            c0 = int(rng.integers(0, shape[1] - w + 1))
            lesions.append(Lesion(r0, c0, r0 + int(h), c0 + int(w)))
        images[f"P_{i:05d}_{'LEFT' if i % 2 else 'RIGHT'}_{'CC' if i % 3 else 'MLO'}"] = (shape, lesions)
    return write_collection(root, images, seed=seed, smooth=smooth)


PARAMS = dict(n=6, downscale=4, n_shifted=4, max_shift=0.25, seed=0)  # 64-pixel windows -> 16-pixel patches


def extract_all(manifest: Path, out_dir: Path, n_shards: int = 1, **overrides) -> list[Path]:
    params = {**PARAMS, **overrides}
    paths = []
    for k in range(n_shards):
        path = out_dir / f"shard-{k}.h5"
        extract_shard(manifest, path, shard_index=k, n_shards=n_shards, **params)
        paths.append(path)
    return paths


def load_shard(path: Path):
    with h5py.File(path, "r") as h5:
        return h5["images"][()], h5["masks"][()], read_table(h5, "provenance"), read_table(h5,
                                                                                           "skipped"), dict(h5.attrs)


def read_table_attrs(path: Path) -> dict:
    with h5py.File(path, "r") as h5:
        return dict(h5.attrs)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------


def test_lesions_at_known_places_centred_and_border(tmp_path):
    lesions = {
        "P_00001_LEFT_CC": ((200, 160), [Lesion(90, 70, 110, 94)]),  # interior: exactly centred
        "P_00002_LEFT_MLO": ((200, 160), [Lesion(0, 0, 10, 12)]),  # top-left corner
        "P_00003_RIGHT_CC": ((200, 160), [Lesion(185, 150, 200, 160)]),  # bottom-right corner
    }
    manifest = write_collection(tmp_path, lesions)
    (path,) = extract_all(manifest, tmp_path / "out", n_shifted=0)
    images, masks, prov, skipped, attrs = load_shard(path)
    assert len(prov) == 3 and skipped.empty
    by_roi = prov.set_index("roi_id")
    # interior lesion: window start = centre - 32 with centre = ((90+110)//2, (70+94)//2) = (100, 82)
    assert (by_roi.loc["P_00001_LEFT_CC_1", "crop_row"], by_roi.loc["P_00001_LEFT_CC_1", "crop_col"]) == (68, 50)
    # corners: window moved inside, flush with the border
    assert (by_roi.loc["P_00002_LEFT_MLO_1", "crop_row"], by_roi.loc["P_00002_LEFT_MLO_1", "crop_col"]) == (0, 0)
    assert (by_roi.loc["P_00003_RIGHT_CC_1", "crop_row"], by_roi.loc["P_00003_RIGHT_CC_1", "crop_col"]) == (136, 96)
    for i, row in prov.iterrows():
        les = lesions[row.image_id][1][0]
        # independent expectation: the lesion rectangle in window coordinates, downscaled by majority
        expected = np.zeros((64, 64), dtype=np.uint8)
        expected[les.r0 - row.crop_row : les.r1 - row.crop_row, les.c0 - row.crop_col : les.c1 - row.crop_col] = 1
        assert masks[i].sum() > 0
        np.testing.assert_array_equal(masks[i], downscale_mask(expected, 4))
        # whole lesion inside the centred window
        assert row.crop_row <= les.r0 and les.r1 <= row.crop_row + 64
        assert row.crop_col <= les.c0 and les.c1 <= row.crop_col + 64
    assert images.dtype == np.float32 and masks.dtype == np.uint8 and images.shape == (3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1 and set(np.unique(masks)) <= {0, 1}
    assert attrs["patch_size"] == 16 and attrs["n"] == 6


def test_a_second_mass_inside_the_window_is_a_mass_in_the_target(tmp_path):
    """Two masses 40 px apart: every window around either holds both, and both are foreground in its mask."""
    image_id = "P_00005_LEFT_CC"
    first, second = Lesion(100, 100, 120, 124), Lesion(150, 130, 166, 150)
    manifest = write_collection(tmp_path / "c", {image_id: ((320, 256), [first, second])})
    (path,) = extract_all(manifest, tmp_path / "s", n=7, downscale=1, n_shifted=2, max_shift=0.05)
    images, masks, prov, skipped, _ = load_shard(path)
    assert skipped.empty and len(prov) == 2 * 3
    for k, row in prov.iterrows():
        assert set(row["rois_in_window"].split(";")) == {f"{image_id}_1", f"{image_id}_2"}
        # the target is the union of both lesions, re-cut independently from their boxes
        truth = np.zeros((320, 256), dtype=np.uint8)
        for les in (first, second):
            truth[les.r0 : les.r1, les.c0 : les.c1] = 1
        r, c = int(row["crop_row"]), int(row["crop_col"])
        np.testing.assert_array_equal(masks[k], truth[r : r + 128, c : c + 128])
        assert masks[k].sum() == (20 * 24 + 16 * 20)


def test_a_window_that_misses_the_other_mass_names_only_its_own(tmp_path):
    image_id = "P_00006_RIGHT_MLO"
    near, far = Lesion(20, 20, 40, 40), Lesion(280, 200, 300, 230)
    manifest = write_collection(tmp_path / "c", {image_id: ((320, 256), [near, far])})
    (path,) = extract_all(manifest, tmp_path / "s", n=6, downscale=1, n_shifted=0)
    _, masks, prov, _, _ = load_shard(path)
    assert prov["rois_in_window"].tolist() == [f"{image_id}_1", f"{image_id}_2"]
    assert [int(m.sum()) for m in masks] == [400, 600]


def test_patch_larger_than_image_is_skipped_with_reason(tmp_path):
    manifest = write_collection(tmp_path, {
        "P_00001_LEFT_CC": ((200, 60), [Lesion(10, 10, 20, 20)]),  # 64 > 60 columns
        "P_00002_LEFT_CC": ((64, 64), [Lesion(10, 10, 20, 20)]),  # exactly fits
    })
    (path,) = extract_all(manifest, tmp_path / "out")
    _, _, prov, skipped, _ = load_shard(path)
    assert skipped.roi_id.tolist() == ["P_00001_LEFT_CC_1"]
    assert skipped.reason.tolist() == ["patch_larger_than_image"]
    assert "larger than the image" in skipped.message[0]
    assert set(prov.roi_id) == {"P_00002_LEFT_CC_1"} and len(prov) == 5
    assert (prov.crop_row == 0).all() and (prov.crop_col == 0).all()


def test_shifted_copies_within_max_shift_and_inside(tmp_path):
    manifest = random_collection(tmp_path, 12, shape=(200, 150))
    (path,) = extract_all(manifest, tmp_path / "out", max_shift=0.25)
    images, masks, prov, skipped, _ = load_shard(path)
    assert skipped.empty
    limit = int(0.25 * 64)
    assert prov.shift_row.abs().max() <= limit and prov.shift_col.abs().max() <= limit
    shifted = prov[prov.copy_index > 0]
    assert (shifted.shift_row != 0).any() and (shifted.shift_col != 0).any()
    assert ((prov.crop_row >= 0) & (prov.crop_row + 64 <= 200)).all()
    assert ((prov.crop_col >= 0) & (prov.crop_col + 64 <= 150)).all()
    assert (prov.groupby("roi_id").copy_index.apply(sorted).map(tuple) == (0, 1, 2, 3, 4)).all()
    # independent placement rule: clip(centre + shift - 32, 0, dim - 64)
    centre_r = (prov.bbox_r0 + prov.bbox_r1) // 2
    centre_c = (prov.bbox_c0 + prov.bbox_c1) // 2
    np.testing.assert_array_equal(prov.crop_row, np.clip(centre_r + prov.shift_row - 32, 0, 200 - 64))
    np.testing.assert_array_equal(prov.crop_col, np.clip(centre_c + prov.shift_col - 32, 0, 150 - 64))
    # lesions of at most 40 px with shifts of at most 16 px keep part of the lesion in every patch
    assert (masks.reshape(len(masks), -1).sum(axis=1) > 0).all()


def test_provenance_recrops_the_exact_stored_pixels(tmp_path):
    manifest = random_collection(tmp_path, 6, shape=(256, 192), seed=3)
    (path,) = extract_all(manifest, tmp_path / "out")
    images, masks, prov, _, _ = load_shard(path)
    frame = pd.read_csv(manifest).set_index("roi_id")
    for i, row in prov.iterrows():
        image = read_mammogram(tmp_path / frame.loc[row.roi_id, "image_path"])
        mask = read_mask(tmp_path / frame.loc[row.roi_id, "mask_path"]).mask
        window = np.s_[row.crop_row : row.crop_row + row.crop_size, row.crop_col : row.crop_col + row.crop_size]
        np.testing.assert_array_equal(images[i], preprocess_window(image[window], row.downscale))
        np.testing.assert_array_equal(masks[i], downscale_mask(mask[window], row.downscale))


def test_image_normalisation_maps_every_patch_through_its_images_range(tmp_path):
    from mammoseg.patches.geometry import image_intensity_range

    manifest = random_collection(tmp_path, 6, shape=(256, 192), seed=3)
    (path,) = extract_all(manifest, tmp_path / "out", n_negative=2, normalise="image")
    images, _, prov, _, attrs = load_shard(path)
    assert attrs["normalise"] == "image"
    frame = pd.read_csv(manifest).drop_duplicates("image_id").set_index("image_id")
    stretched = 0
    for i, row in prov.iterrows():
        image = read_mammogram(tmp_path / frame.loc[row.image_id, "image_path"])
        low, high = image_intensity_range(image)  # the whole image's range, not the window's
        window = image[row.crop_row : row.crop_row + row.crop_size, row.crop_col : row.crop_col + row.crop_size]
        blocks = window.reshape(row.crop_size // row.downscale, row.downscale, -1, row.downscale).mean(axis=(1, 3))
        np.testing.assert_allclose(images[i], np.clip((blocks - low) / (high - low), 0, 1), atol=1e-5)
        stretched += images[i].min() == 0 and images[i].max() == 1
    assert stretched < len(prov)  # not every patch spans [0, 1], as min-max would make it

def test_same_seed_byte_identical_different_seed_differs(tmp_path):
    manifest = random_collection(tmp_path, 8)
    (a,) = extract_all(manifest, tmp_path / "a")
    (b,) = extract_all(manifest, tmp_path / "b")
    assert sha256(a) == sha256(b)
    (c,) = extract_all(manifest, tmp_path / "c", seed=1)
    assert sha256(a) != sha256(c)
    prov_a, prov_c = load_shard(a)[2], load_shard(c)[2]
    assert (prov_a.shift_row.to_numpy() != prov_c.shift_row.to_numpy()).any()
    shuffled = tmp_path / "shuffled.csv"
    pd.read_csv(manifest).iloc[::-1].to_csv(shuffled, index=False)
    (d,) = extract_all(shuffled, tmp_path / "d")
    assert sha256(a) == sha256(d), "manifest row order must not change the shard"


def test_shard_membership_does_not_change_patches(tmp_path):
    manifest = random_collection(tmp_path, 10)
    (single,) = extract_all(manifest, tmp_path / "one")
    many = extract_all(manifest, tmp_path / "many", n_shards=3)
    img1, msk1, prov1, _, _ = load_shard(single)
    seen = 0
    for path in many:
        imgs, msks, prov, _, attrs = load_shard(path)
        for i, row in prov.iterrows():
            j = prov1.index[(prov1.roi_id == row.roi_id) & (prov1.copy_index == row.copy_index)][0]
            np.testing.assert_array_equal(imgs[i], img1[j])
            np.testing.assert_array_equal(msks[i], msk1[j])
            assert (prov1.loc[j, ["crop_row", "crop_col"]].tolist() == [row.crop_row, row.crop_col])
            assert bucket_of(row.image_id, 3) == attrs["shard_index"]
            seen += 1
    assert seen == len(prov1)


def test_bucket_of_stable_and_groups_images(tmp_path):
    # independent computation of the documented rule
    for image_id in ["P_00001_LEFT_CC", "P_01234_RIGHT_MLO", "x"]:
        expected = int(hashlib.sha1(image_id.encode()).hexdigest(), 16) % 7
        assert bucket_of(image_id, 7) == expected
    counts = np.bincount([bucket_of(f"P_{i:05d}_LEFT_CC", 4) for i in range(400)], minlength=4)
    assert counts.min() > 60  # roughly balanced
    manifest = random_collection(tmp_path, 10)
    paths = extract_all(manifest, tmp_path / "out", n_shards=4)
    owner: dict[str, int] = {}
    for k, path in enumerate(paths):
        for image_id in load_shard(path)[2].image_id:
            assert owner.setdefault(image_id, k) == k
    assert sorted(owner) == sorted(pd.read_csv(manifest).image_id.unique())


def test_empty_shard_is_valid(tmp_path):
    manifest = write_collection(tmp_path, {"P_00001_LEFT_CC": ((128, 128), [Lesion(10, 10, 20, 20)])})
    n_shards = 5
    empty_index = next(k for k in range(n_shards) if k != bucket_of("P_00001_LEFT_CC", n_shards))
    path = tmp_path / "empty.h5"
    info = extract_shard(manifest, path, shard_index=empty_index, n_shards=n_shards, **PARAMS)
    images, masks, prov, skipped, attrs = load_shard(path)
    assert info["n_patches"] == 0 and images.shape == (0, 16, 16) and masks.shape == (0, 16, 16)
    assert prov.empty and list(prov.columns) == list(PROVENANCE_COLUMNS) and skipped.empty
    assert attrs["shard_index"] == empty_index


def test_manifest_without_rows_gives_empty_shards(tmp_path):
    """A collection whose every ROI was skipped in restructuring has a header-only manifest: still valid."""
    manifest = write_collection(tmp_path, {"P_00001_LEFT_CC": ((128, 128), [Lesion(10, 10, 20, 20)])})
    frame = pd.read_csv(manifest)
    frame.iloc[:0].to_csv(manifest, index=False)
    info = extract_shard(manifest, tmp_path / "s.h5", shard_index=0, n_shards=2, **PARAMS)
    images, _, prov, skipped, _ = load_shard(tmp_path / "s.h5")
    assert info["n_patches"] == info["n_rois"] == 0 and images.shape == (0, 16, 16) and prov.empty and skipped.empty


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_killed_write_leaves_no_shard(tmp_path, monkeypatch, error):
    manifest = random_collection(tmp_path, 4)
    out = tmp_path / "out" / "shard-0.h5"
    calls = {"n": 0}
    original = shards.preprocess_window

    def failing(window, factor, intensity_range):
        calls["n"] += 1
        if calls["n"] == 3:
            raise error("simulated kill")
        return original(window, factor, intensity_range)

    monkeypatch.setattr(shards, "preprocess_window", failing)
    with pytest.raises(error, match="simulated kill"):
        extract_shard(manifest, out, shard_index=0, n_shards=1, **PARAMS)
    assert not out.exists()
    assert list(out.parent.iterdir()) == [], "no temporary file left behind either"


def test_unreadable_and_mismatched_inputs_are_recorded(tmp_path):
    manifest = write_collection(tmp_path, {
        "P_00001_LEFT_CC": ((128, 128), [Lesion(10, 10, 20, 20)]),
        "P_00002_LEFT_CC": ((128, 128), [Lesion(10, 10, 20, 20), Lesion(50, 50, 60, 60)]),
        "P_00003_LEFT_CC": ((128, 128), [Lesion(10, 10, 20, 20)]),
    })
    (tmp_path / "images/P_00001_LEFT_CC.dcm").write_bytes(b"not a dicom")
    write_dicom(tmp_path / "masks/P_00002_LEFT_CC_2.dcm", np.zeros((100, 128), dtype=np.uint8))
    write_dicom(tmp_path / "masks/P_00003_LEFT_CC_1.dcm", np.zeros((128, 128), dtype=np.uint8))
    (path,) = extract_all(manifest, tmp_path / "out")
    _, _, prov, skipped, _ = load_shard(path)
    reasons = dict(zip(skipped.roi_id, skipped.reason))
    assert reasons == {"P_00001_LEFT_CC_1": "unreadable_image", "P_00002_LEFT_CC_2": "mask_size_mismatch",
                       "P_00003_LEFT_CC_1": "empty_mask"}
    assert all(str(tmp_path) in m for m in skipped.message)
    assert set(prov.roi_id) == {"P_00002_LEFT_CC_1"}


def test_bad_manifest_and_parameters_raise_clear_errors(tmp_path):
    bad = tmp_path / "manifest.csv"
    pd.DataFrame({"roi_id": ["a"], "image_id": ["b"]}).to_csv(bad, index=False)
    with pytest.raises(InputError, match=r"manifest\.csv.*image_path"):
        extract_shard(bad, tmp_path / "s.h5", shard_index=0, n_shards=1, **PARAMS)
    manifest = random_collection(tmp_path / "ok", 1)
    with pytest.raises(ValueError, match="divide"):
        extract_shard(manifest, tmp_path / "s.h5", shard_index=0, n_shards=1, **{**PARAMS, "downscale": 3})
    with pytest.raises(ValueError, match="shard_index"):
        extract_shard(manifest, tmp_path / "s.h5", shard_index=2, n_shards=2, **PARAMS)
    assert not (tmp_path / "s.h5").exists()


def test_patch_manifest_grid_and_stage_entries(tmp_path):
    from mammoseg.config import validate_config
    from mammoseg.config.plan import build_plan
    from mammoseg.data.manifest import read_manifest

    manifest = write_collection(tmp_path, {
        "P_00001_LEFT_CC": ((128, 128), [Lesion(10, 10, 30, 30)]),
        "P_00002_LEFT_CC": ((128, 60), [Lesion(10, 10, 20, 20)]),
        "P_00003_RIGHT_MLO": ((160, 128), [Lesion(100, 90, 130, 120), Lesion(5, 5, 15, 15)]),
    })
    patches = validate_config({"patches": {"n": 6, "downscale": 4, "n_shifted": 2, "max_shift": 0.2, "n_shards": 2,
                                           "seed": 5}})["patches"]
    plan = build_plan(patches, "mass-n6d4-00000000", read_manifest(manifest))
    plan.write(tmp_path / "plan.json")
    assert (plan.train_rois, plan.train_images, plan.expected_patches) == (4, 3, 4 * 3)
    assert not plan.window_fits_every_train_image and plan.smallest_train_image_px == (128, 60)
    paths = [tmp_path / "patches" / f"shard-{k}.h5" for k in range(2)]
    infos = [run_extract(tmp_path / "plan.json", manifest, p, k) for k, p in enumerate(paths)]
    assert sum(i["n_patches"] for i in infos) == 3 * 3 and sum(i["n_skipped"] for i in infos) == 1
    assert {read_table_attrs(p)["config_hash"] for p in paths} == {"mass-n6d4-00000000"}
    out_csv, skipped_csv = tmp_path / "patches.csv", tmp_path / "skipped.csv"
    summary = run_patch_manifest(tmp_path / "plan.json", paths, out_csv, skipped_csv, tmp_path / "grid0.png")
    table = pd.read_csv(out_csv)
    assert summary == {"n_shards": 2, "n_patches": 9, "n_skipped": 1}
    assert list(table.columns[:2]) == ["shard", "row"] and len(table) == 9
    for shard, group in table.groupby("shard"):
        assert sorted(group.row) == list(range(len(group)))
    assert pd.read_csv(skipped_csv).reason.tolist() == ["patch_larger_than_image"]
    assert (tmp_path / "grid0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    build_plan({**patches, "seed": 6}, "mass-n6d4-11111111", read_manifest(manifest)).write(tmp_path / "other.json")
    with pytest.raises(InputError, match="mass-n6d4-00000000"):
        run_patch_manifest(tmp_path / "other.json", paths, out_csv, skipped_csv)
    # grid picture
    png = tmp_path / "grid.png"
    nonempty = next(p for p in paths if load_shard(p)[0].shape[0])
    info = render_grid(nonempty, png, n=4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 1 <= len(info["rows"]) <= 4


def test_import_is_tensorflow_free():
    import subprocess
    import sys

    code = "import sys, mammoseg.patches.shards; print('tensorflow' in sys.modules, 'h5py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split() == ["False", "False"]


def test_filters_per_dataset_and_recorded(tmp_path):
    """Masks lzf and images raw by default (lzf does not shrink float32 patches); both settable, both recorded."""
    manifest = random_collection(tmp_path, 3, smooth=True)
    default, both = tmp_path / "default.h5", tmp_path / "both.h5"
    extract_shard(manifest, default, shard_index=0, n_shards=1, **PARAMS)
    extract_shard(manifest, both, shard_index=0, n_shards=1, **PARAMS, image_compression="lzf")
    with h5py.File(default) as h5:
        assert h5["masks"].compression == "lzf" and h5["images"].compression is None
        assert (h5.attrs["compression"], h5.attrs["image_compression"]) == ("lzf", "none")
        images, masks = h5["images"][()], h5["masks"][()]
    with h5py.File(both) as h5:
        assert h5["images"].compression == "lzf" and h5.attrs["image_compression"] == "lzf"
        np.testing.assert_array_equal(h5["images"][()], images)  # the filter never changes a value
        np.testing.assert_array_equal(h5["masks"][()], masks)
    with pytest.raises(ValueError, match="image_compression"):
        extract_shard(manifest, tmp_path / "x.h5", shard_index=0, n_shards=1, **PARAMS, image_compression="zstd")


def test_normal_images_give_only_lesion_free_windows(tmp_path):
    """A manifest row without ROI (data.normals): n_normal tissue windows with empty masks, nothing else."""
    from mammoseg.config import validate_config
    from mammoseg.config.plan import build_plan
    from mammoseg.data.manifest import read_manifest

    manifest = write_collection(tmp_path / "c", {"P_00007_LEFT_CC": ((320, 256), [Lesion(100, 100, 130, 130)])},
                                smooth=True)
    write_dicom(tmp_path / "c" / "images" / "P_00008_RIGHT_MLO.dcm", _smooth_background(np.random.default_rng(1),
                                                                                      320, 256))
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    normal = {column: "" for column in table.columns}
    normal.update({"image_id": "P_00008_RIGHT_MLO", "patient_id": "P_00008", "split": "train", "abnormality_id": "0",
                   "image_rows": "320", "image_cols": "256", "image_path": "images/P_00008_RIGHT_MLO.dcm"})
    pd.concat([table, pd.DataFrame([normal])]).to_csv(manifest, index=False)
    (path,) = extract_all(manifest, tmp_path / "s", n=6, downscale=2, n_shifted=1, n_negative=1, n_normal=3)
    images, masks, prov, skipped, attrs = load_shard(path)
    assert skipped.empty and attrs["n_normal"] == 3
    of_normal = prov[prov["image_id"] == "P_00008_RIGHT_MLO"]
    assert len(of_normal) == 3 and (of_normal["copy_index"] == -1).all()
    assert not masks[of_normal.index].any() and (of_normal["rois_in_window"] == "").all()
    of_lesion = prov[prov["image_id"] == "P_00007_LEFT_CC"]
    assert (of_lesion["copy_index"] >= 0).sum() == 2 and (of_lesion["copy_index"] == -1).sum() == 1
    patches = validate_config({"patches": {"n": 6, "downscale": 2, "n_shifted": 1, "n_negative": 1,
                                           "n_normal": 3}})["patches"]
    plan = build_plan(patches, "k", read_manifest(manifest))
    assert (plan.train_rois, plan.train_images, plan.train_normal_images) == (1, 2, 1)
    assert plan.expected_patches == 1 * 2 + 1 * 1 + 1 * 3 == len(prov)


def test_kaggle_set_is_extracted_from_its_jpeg_files(tmp_path):
    """A restructured Kaggle set lists JPEG images and masks: extraction reads them (and only extraction and
    restructuring ask for raster input; see test_dicom.py for the readers that refuse it)."""
    from mammoseg.data.restructure import restructure_collection
    from mammoseg.data.synth import generate_dataset

    generate_dataset(tmp_path / "tree", n_train=3, n_test=1, rows=256, cols=160, seed=4, layout="kaggle")
    restructure_collection(tmp_path / "tree", tmp_path / "out", abnormality="mass", split="train", progress=False)
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv", dtype=str)
    assert len(manifest) > 0 and manifest["image_path"].str.endswith(".jpg").all()
    info = extract_shard(tmp_path / "out" / "manifest.csv", tmp_path / "shard.h5", shard_index=0, n_shards=1, n=4,
                         downscale=2, n_shifted=2, max_shift=0.25, seed=0)  # fmt: skip
    assert info["n_skipped"] == 0 and info["n_rois"] == len(manifest) and info["n_patches"] == 3 * len(manifest)
