"""Hard-negative mining (mammoseg.mining): windows on planted false positives, and the mined shard."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest

from mammoseg.mining import fp_components, mine_windows, run_mine
from mammoseg.patches.geometry import preprocess_window
from mammoseg.patches.shards import PROVENANCE_COLUMNS, read_table

WINDOW = 64
LESION = (slice(20, 40), slice(20, 40))


def scene(shape=(200, 300)):
    """(prob uint8, lesion bool, image uint16): tissue (1000) in columns < 160, background (0) beyond; a lesion
    at rows/cols 20..39 predicted at 240 (a true positive, never mined); no false positive yet."""
    image = np.zeros(shape, np.uint16)
    image[:, :160] = 1000
    lesion = np.zeros(shape, bool)
    lesion[LESION] = True
    prob = np.zeros(shape, np.uint8)
    prob[LESION] = 240
    return prob, lesion, image


def mine(prob, lesion, image, count=5, seed=0, min_prob=0.5):
    return mine_windows(prob, lesion, image, window=WINDOW, count=count, min_prob=min_prob, min_mean=0.05,
                        rng=np.random.default_rng(seed))


def holds(corner, rows: slice, cols: slice) -> bool:
    r, c = corner
    return r <= rows.start and rows.stop <= r + WINDOW and c <= cols.start and cols.stop <= c + WINDOW


def test_a_planted_false_positive_on_tissue_is_mined_and_the_true_positive_is_not():
    prob, lesion, image = scene()
    blob = (slice(120, 131), slice(100, 111))
    prob[blob] = 230
    corners = mine(prob, lesion, image)
    assert corners == [(93, 73)]  # centred on the blob's box (125, 105) minus half the window
    assert holds(corners[0], *blob)


def test_highest_score_first_and_count():
    prob, lesion, image = scene()
    prob[150:157, 100:107] = 180
    prob[120:131, 20:31] = 230
    corners = mine(prob, lesion, image)
    assert holds(corners[0], slice(120, 131), slice(20, 31)) and holds(corners[1], slice(150, 157), slice(100, 107))
    assert mine(prob, lesion, image, count=1) == corners[:1]
    assert mine(prob, lesion, image, count=0) == []


def test_false_positives_below_min_prob_are_not_mined():
    prob, lesion, image = scene()
    prob[120:131, 100:111] = 127  # p < 0.5
    assert mine(prob, lesion, image) == []
    assert len(mine(prob, lesion, image, min_prob=0.4)) == 1


def test_a_false_positive_next_to_a_lesion_gets_a_shifted_lesion_free_window():
    prob, lesion, image = scene()
    prob[20:31, 58:67] = 230  # the centred window (cols 30..93) would hold lesion columns 30..39
    corners = mine(prob, lesion, image)
    assert len(corners) == 1
    r, c = corners[0]
    assert not lesion[r : r + WINDOW, c : c + WINDOW].any()
    assert r <= 20 < r + WINDOW and c <= 58 < c + WINDOW  # the blob's peak stays inside


def test_windows_stay_inside_the_image_at_a_corner():
    prob, lesion, image = scene()
    prob[195:200, 0:5] = 230
    assert mine(prob, lesion, image) == [(136, 0)]


def test_a_false_positive_on_dark_background_is_not_mined():
    prob, lesion, image = scene()
    prob[100:110, 250:260] = 250  # every window around it has mean 0 < 0.05 * max
    assert mine(prob, lesion, image) == []


def test_one_window_for_false_positives_it_already_holds():
    prob, lesion, image = scene()
    prob[120:126, 100:106] = 230
    prob[130:136, 112:118] = 200  # inside the first blob's window
    prob[60:64, 130:134] = 150  # outside it
    corners = mine(prob, lesion, image)
    assert len(corners) == 2 and holds(corners[0], slice(130, 136), slice(112, 118))


def test_fp_components_order_ties_and_peaks():
    prob, lesion, _ = scene()
    prob[100:103, 50:53] = 200
    prob[101, 51] = 210
    prob[150:152, 10:12] = 210  # ties with the first: later in raster order
    found = fp_components(prob, lesion, 0.5)
    assert [(c["score_u8"], c["peak"]) for c in found] == [(210, (101, 51)), (210, (150, 10))]
    assert found[0]["bbox"] == (100, 50, 103, 53)


@pytest.mark.parametrize("seed", range(12))
def test_random_scenes_never_put_a_lesion_or_the_dark_inside_and_are_deterministic(seed):
    rng = np.random.default_rng(seed)
    shape = (160, 220)
    image = rng.integers(0, 3000, size=shape).astype(np.uint16)
    image[:, 180:] = 0
    lesion = np.zeros(shape, bool)
    for _ in range(3):
        r, c = rng.integers(0, 140), rng.integers(0, 200)
        lesion[r : r + 20, c : c + 20] = True
    prob = rng.integers(0, 256, size=shape).astype(np.uint8)  # speckle: many components
    kwargs = dict(window=48, count=6, min_prob=0.9, min_mean=0.3)
    corners = mine_windows(prob, lesion, image, rng=np.random.default_rng(1), **kwargs)
    assert corners == mine_windows(prob, lesion, image, rng=np.random.default_rng(1), **kwargs)
    assert 1 <= len(corners) <= 6
    for r, c in corners:
        assert 0 <= r <= shape[0] - 48 and 0 <= c <= shape[1] - 48
        assert not lesion[r : r + 48, c : c + 48].any()
        assert image[r : r + 48, c : c + 48].mean() >= 0.3 * image.max()


def test_shapes_must_agree():
    prob, lesion, image = scene()
    with pytest.raises(ValueError, match="differ"):
        mine(prob[:10], lesion, image)


# --------------------------------------------------------------------------------------------------------------
# the stage: one extra shard with extraction's layout
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def mined(tmp_path):
    """Two training images with one lesion each, one normal image (no ROI) and a test image; first-round
    predictions with one planted false positive per training image."""
    from test_shards import Lesion, extract_all, write_collection, write_dicom

    from mammoseg.config.plan import build_plan
    from mammoseg.config.schema import validate_config
    from mammoseg.data.manifest import read_manifest
    from mammoseg.inference.predict import save_prediction

    shape = (192, 160)
    images = {"P_00001_LEFT_MLO": (shape, [Lesion(20, 20, 40, 44)]),
              "P_00002_RIGHT_CC": (shape, [Lesion(120, 90, 140, 110)])}
    manifest = write_collection(tmp_path / "data", images, smooth=True)
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    normal = {**frame.iloc[0].to_dict(), "roi_id": "", "image_id": "P_00003_LEFT_MLO", "patient_id": "P_00003",
              "abnormality_id": "0", "image_path": "images/P_00003_LEFT_MLO.dcm", "mask_path": ""}
    write_dicom(tmp_path / "data" / normal["image_path"], np.full(shape, 1500, np.uint16))
    test = {**frame.iloc[0].to_dict(), "roi_id": "P_00004_LEFT_MLO_1", "image_id": "P_00004_LEFT_MLO",
            "patient_id": "P_00004", "split": "test"}
    pd.DataFrame([*frame.to_dict("records"), normal, test]).to_csv(manifest, index=False)
    config = validate_config({"patches": {"n": 6, "downscale": 4, "n_shards": 1, "n_shifted": 1},
                              "train": {"folds": 2, "hard_negatives": {"per_image": 2, "min_prob": 0.5}}})
    plan_path = tmp_path / "plan.json"
    build_plan(config["patches"], "mass-test-key",
               [r for r in read_manifest(manifest) if r["split"] == "train"]).write(plan_path)
    chunks = [tmp_path / "pred" / "chunk-0", tmp_path / "pred" / "chunk-1"]
    planted = {"P_00001_LEFT_MLO": (slice(150, 160), slice(100, 110)), "P_00002_RIGHT_CC": (slice(30, 40),
               slice(30, 40)), "P_00003_LEFT_MLO": (slice(90, 96), slice(60, 66))}
    for k, (image_id, blob) in enumerate(planted.items()):
        prob = np.zeros(shape, np.uint8)
        prob[blob] = 220
        save_prediction(prob, chunks[k % 2] / f"{image_id}.prob.npz", {})
    out = tmp_path / "hard.h5"
    summary = run_mine(plan_path, manifest, chunks, out, config=config, log=lambda _: None)
    extraction = extract_all(manifest, tmp_path / "patches", **{"n_negative": 1})
    return summary, out, planted, extraction, tmp_path


def test_run_mine_writes_extraction_layout_with_named_zero_mask_patches(mined):
    from mammoseg.io.dicom import read_mammogram

    summary, out, planted, extraction, tmp_path = mined
    assert (summary["n_images"], summary["n_patches"], summary["n_skipped"]) == (3, 3, 0)  # the test image is not mined
    with h5py.File(out, "r") as h5, h5py.File(extraction[0], "r") as ref:
        for name in ("images", "masks"):
            assert h5[name].dtype == ref[name].dtype and h5[name].chunks == ref[name].chunks
            assert h5[name].shape[1:] == ref[name].shape[1:] == (16, 16)
        assert set(h5["provenance"]) == set(ref["provenance"]) == set(PROVENANCE_COLUMNS)
        assert set(ref.attrs) <= set(h5.attrs) and json.loads(h5.attrs["hard_negatives"])["per_image"] == 2
        geometry = ("n", "window_size", "patch_size", "downscale", "normalise", "seed", "negative_min_mean")
        assert {k: h5.attrs[k] for k in geometry} == {k: ref.attrs[k] for k in geometry}
        counts = ("n_shifted", "max_shift", "n_negative", "n_normal", "shard_index", "n_shards")
        assert [h5.attrs[k] for k in counts] == [0, 0.0, 0, 0, 0, 1]  # mined windows only, in one shard
        prov, images, masks = read_table(h5, "provenance"), h5["images"][()], h5["masks"][()]
    assert not masks.any()
    assert prov.roi_id.tolist() == ["P_00001_LEFT_MLO_hard0", "P_00002_RIGHT_CC_hard0", "P_00003_LEFT_MLO_hard0"]
    assert set(prov.copy_index) == {-1} and set(prov.split) == {"train"} and set(prov.rois_in_window) == {""}
    for (_, row), patch in zip(prov.iterrows(), images):
        image = read_mammogram(tmp_path / "data" / "images" / f"{row.image_id}.dcm")
        window = image[row.crop_row : row.crop_row + 64, row.crop_col : row.crop_col + 64]
        np.testing.assert_array_equal(patch, preprocess_window(window, 4))  # the stored pixels are the window's
        blob = planted[row.image_id]
        assert row.crop_row <= blob[0].start and blob[0].stop <= row.crop_row + 64
        assert row.crop_col <= blob[1].start and blob[1].stop <= row.crop_col + 64



def test_mined_patches_are_normalised_as_the_plan_says():
    from mammoseg.config.plan import PatchGeometry
    from mammoseg.mining import mined_patches
    from mammoseg.patches.geometry import image_intensity_range

    image = np.random.default_rng(6).uniform(100, 200, (128, 96)).astype(np.float32)
    image[:32, :32] += 300
    roi = {"image_id": "P_1_LEFT_CC", "patient_id": "P_1", "split": "train"}
    corners = [(0, 0), (64, 32)]
    plain = mined_patches(image, corners, roi, PatchGeometry(64, 4, 16, "window"))
    ranged = mined_patches(image, corners, roi, PatchGeometry(64, 4, 16, "image"))
    low, high = image_intensity_range(image)
    for (r, c), (_, window_patch, _), (_, image_patch, _) in zip(corners, plain, ranged):
        window = image[r : r + 64, c : c + 64]
        np.testing.assert_array_equal(window_patch, preprocess_window(window, 4))
        np.testing.assert_array_equal(image_patch, preprocess_window(window, 4, (low, high)))
    assert ranged[1][1].max() < 0.9 <= plain[1][1].max()  # the darker window stays darker than the dense corner


def test_the_mined_shard_trains_beside_the_extraction_shards(mined):
    from mammoseg.model.dataset import read_provenance

    _, out, _, extraction, _ = mined
    prov = read_provenance([*extraction, out])
    assert prov.roi_id.str.endswith("_hard0").sum() == 3 and prov.roi_id.str.contains("_neg").sum() >= 1


def test_images_without_a_prediction_are_recorded(mined, tmp_path):
    from mammoseg.config.schema import validate_config

    _, _, _, _, root = mined
    config = validate_config({"train": {"folds": 2, "hard_negatives": {"per_image": 2}}})
    empty = root / "no-predictions"
    empty.mkdir()
    summary = run_mine(root / "plan.json", root / "data" / "manifest.csv", empty, root / "none.h5", config=config,
                       log=lambda _: None)
    assert summary["n_patches"] == 0 and summary["skipped_reasons"] == {"not_predicted": 3}
    with h5py.File(root / "none.h5", "r") as h5:
        assert h5["images"].shape == (0, 16, 16)


def test_the_first_round_is_the_plain_runs_model_whatever_the_mining_settings():
    from mammoseg.config.keys import first_round_config, stage_keys
    from mammoseg.config.schema import validate_config

    plain = validate_config({"train": {"folds": 3, "epochs": 7}})
    mining = validate_config({"train": {"folds": 3, "epochs": 7, "hard_negatives": {"per_image": 4, "min_prob": 0.3}}})
    assert stage_keys(mining).model != stage_keys(plain).model
    assert stage_keys(first_round_config(mining)) == stage_keys(plain)
    assert first_round_config(mining)["train"] == plain["train"]  # the same settings, in the same order
