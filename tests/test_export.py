"""Model export (mammoseg.export): SavedModel served in a fresh process, ONNX, fold means, the model card."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from mammoseg.config import validate_config  # noqa: E402
from mammoseg.config.plan import Plan, build_plan  # noqa: E402
from mammoseg.errors import InputError  # noqa: E402
from mammoseg.export import MODEL_CARD_FIELDS, export_model  # noqa: E402
from mammoseg.model.unet import build_unet, count_parameters, model_kwargs, parameter_counts  # noqa: E402

#: 128 px windows downscaled by 4: a 32 px network input, as small as a depth-2 U-Net allows comfortably
CONFIG = validate_config({
    "experiment": "tiny",
    "data": {"source": "cbis", "root": "/home/someone/CBIS-DDSM", "abnormality": "mass"},
    "patches": {"n": 7, "downscale": 4},
    "model": {"name": "tiny", "depth": 2, "filters": 4},
    "infer": {"mode": "blended", "threshold": 0.4},
})
SIDE = 32
FINGERPRINT = {"train": {"rois": 12, "images": 10, "patients": 9, "image_rows_px": {"min": 256, "median": 256.0,
                                                                                  "max": 256}}}  # fmt: skip
VALIDATION = {"dice_mean": np.float32(0.61), "froc": {"sensitivity_at_1_fppi": 0.7}, "images": 12}


def plan() -> Plan:
    rows = [{"roi_id": f"P_{i}_LEFT_CC_1", "image_id": f"P_{i}_LEFT_CC", "patient_id": f"P_{i}", "image_rows": "256",
             "image_cols": "256"}
            for i in range(10)]
    return build_plan(CONFIG["patches"], "mass-n7d4-00000000", rows)


def save_fold(path: Path, seed: int) -> Path:
    import keras

    keras.utils.set_random_seed(seed)
    build_unet((SIDE, SIDE, 1), **model_kwargs(CONFIG["model"])).save(path)
    return path


def keras_output(path: Path, batch: np.ndarray) -> np.ndarray:
    from mammoseg.inference.predict import load_model

    return np.asarray(load_model(path)(batch, training=False))


@pytest.fixture(scope="module")
def folds(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("folds")
    return [save_fold(root / f"fold-{k}.keras", seed=k) for k in range(2)]


@pytest.fixture(scope="module")
def exports(folds, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """{"single": (folder, card), "ensemble": (folder, card)}"""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, paths in (("single", folds[:1]), ("ensemble", folds)):
        card = export_model(paths, root / name, plan=plan(), config=CONFIG, validation=VALIDATION,
                            fingerprint=FINGERPRINT)  # fmt: skip
        out[name] = (root / name, card)
    return out


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(42).random((3, SIDE, SIDE, 1), dtype=np.float32)


SERVE_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    batch = np.load(sys.argv[1], allow_pickle=False)
    report = {}
    for index, folder in enumerate(sys.argv[3:]):
        loaded = tf.saved_model.load(folder)
        signature = loaded.signatures["serving_default"]
        report[folder] = {"signatures": sorted(loaded.signatures),
                          "inputs": {k: [v.dtype.name, v.shape.as_list()]
                                     for k, v in signature.structured_input_signature[1].items()},
                          "outputs": {k: [v.dtype.name, v.shape.as_list()]
                                      for k, v in signature.structured_outputs.items()}}
        np.save(f"{sys.argv[2]}-{index}.npy", signature(patch=tf.constant(batch))["probability"].numpy())
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def served(exports, batch, tmp_path_factory) -> dict[str, tuple[np.ndarray, dict]]:
    """Each SavedModel run in a fresh Python that imports only TensorFlow: {name: (output, signature report)}."""
    root = tmp_path_factory.mktemp("served")
    np.save(root / "batch.npy", batch)
    folders = [str(exports[name][0] / "saved_model") for name in ("single", "ensemble")]
    done = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, str(root / "batch.npy"), str(root / "out"), *folders],
                          capture_output=True, text=True, timeout=300, env={"TF_CPP_MIN_LOG_LEVEL": "2",
                                                                             "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: (np.load(root / f"out-{i}.npy"), report[folder])
            for i, (name, folder) in enumerate(zip(("single", "ensemble"), folders))}


@pytest.mark.slow  # ~20 s: a second Python importing TensorFlow (the in-process check is in the card test)
def test_saved_model_reproduces_keras_in_a_fresh_process(served, folds, batch):
    output, report = served["single"]
    assert report["signatures"] == ["serving_default"]
    assert report["inputs"] == {"patch": ["float32", [None, SIDE, SIDE, 1]]}
    assert report["outputs"] == {"probability": ["float32", [None, SIDE, SIDE, 1]]}
    assert output.shape == batch.shape and output.dtype == np.float32
    np.testing.assert_allclose(output, keras_output(folds[0], batch), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_folds_serve_their_mean(served, folds, batch):
    first, second = keras_output(folds[0], batch), keras_output(folds[1], batch)
    assert np.abs(first - second).max() > 1e-3  # different weights: the mean is not either fold
    output, report = served["ensemble"]
    assert report["outputs"] == {"probability": ["float32", [None, SIDE, SIDE, 1]]}
    np.testing.assert_allclose(output, (first + second) / 2, rtol=0, atol=1e-5)


def test_onnx_reproduces_the_fold_mean(exports, folds, batch):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    folder, card = exports["ensemble"]
    assert card["files"]["onnx"]["written"] is True
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["patch"]
    assert [o.name for o in session.get_outputs()] == ["probability"]
    (output,) = session.run(["probability"], {"patch": batch})
    expected = (keras_output(folds[0], batch) + keras_output(folds[1], batch)) / 2
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-5)
    assert card["checks"]["onnx_max_abs_difference"] <= 1e-5


def test_model_card_has_every_field_and_true_parameter_counts(exports, folds):
    folder, card = exports["ensemble"]
    on_disk = json.loads((folder / "model_card.json").read_text())
    assert on_disk == card
    assert tuple(card) == MODEL_CARD_FIELDS
    expected = parameter_counts(build_unet((SIDE, SIDE, 1), **model_kwargs(CONFIG["model"])))
    assert card["architecture"]["parameters_per_fold"] == expected
    assert expected == count_parameters(1, **model_kwargs(CONFIG["model"]))  # the formula agrees with Keras
    assert card["architecture"]["input_shape"] == [SIDE, SIDE, 1]
    assert card["plan"]["window_px"] == 128 and card["plan"]["patches_key"] == "mass-n7d4-00000000"
    assert (card["plan"]["downscale"], card["plan"]["input_px"]) == (4, SIDE)
    prep = card["preprocessing"]
    assert (prep["window_side_px"], prep["downscale_factor"], prep["network_input_px"]) == (128, 4, SIDE)
    assert card["sliding_window"]["mode"] == "blended" and card["sliding_window"]["parameters"]["threshold"] == 0.4
    assert card["ensemble"]["folds"] == 2
    assert [m["file"] for m in card["ensemble"]["models"]] == ["fold-0.keras", "fold-1.keras"]
    import hashlib

    assert card["ensemble"]["models"][1]["sha256"] == hashlib.sha256(folds[1].read_bytes()).hexdigest()
    assert card["training_data"]["fingerprint"] == FINGERPRINT and len(card["training_data"]["sha256"]) == 64
    assert card["validation"] == {"dice_mean": pytest.approx(0.61), "froc": {"sensitivity_at_1_fppi": 0.7},
                                  "images": 12}  # fmt: skip
    assert card["checks"]["saved_model_max_abs_difference"] <= 1e-5
    assert {"tensorflow", "keras", "numpy", "mammoseg", "python"} <= set(card["versions"])
    assert card["name"] == "tiny" and card["signature"]["input"]["name"] == "patch"
    assert len(card["config"]["config_hash"]) == 16


def test_folds_with_one_file_name_are_told_apart(folds, tmp_path):
    paths = []
    for k, fold in enumerate(folds):
        (tmp_path / f"fold-{k}").mkdir()
        paths.append(tmp_path / f"fold-{k}" / "model.keras")
        paths[-1].write_bytes(fold.read_bytes())
    card = export_model(paths, tmp_path / "out", plan=plan(), config=CONFIG, validation={})
    assert [m["file"] for m in card["ensemble"]["models"]] == ["fold-0/model.keras", "fold-1/model.keras"]


def test_model_card_preprocessing_describes_preprocess_window(exports):
    """Following the card's words by hand gives what mammoseg feeds the network."""
    from mammoseg.patches.geometry import preprocess_window

    prep = exports["single"][1]["preprocessing"]
    window = np.random.default_rng(3).integers(0, 65535, (prep["window_side_px"],) * 2).astype(np.uint16)
    d = prep["downscale_factor"]
    blocks = window.astype(np.float64).reshape(window.shape[0] // d, d, window.shape[1] // d, d).mean(axis=(1, 3))
    by_hand = (blocks - blocks.min()) / (blocks.max() - blocks.min())
    np.testing.assert_allclose(preprocess_window(window, d), by_hand, atol=1e-6)
    assert by_hand.shape == (prep["network_input_px"],) * 2


def test_model_card_describes_image_normalisation(folds, tmp_path):
    """The card of a model trained on image-normalised patches says so, and its words by hand give what mammoseg
    feeds the network: the whole image's percentiles, not the window's min and max."""
    import dataclasses
    import re

    from mammoseg.patches.geometry import intensity_range_for, preprocess_window

    image_plan = dataclasses.replace(plan(), normalise="image")
    prep = export_model(folds[:1], tmp_path / "out", plan=image_plan, config=CONFIG, validation={})["preprocessing"]
    assert prep["normalise"] == "image"
    low_p, high_p = (float(v) for v in re.search(r"the ([0-9.]+)th and ([0-9.]+)th percentiles", prep["steps"][2])
                     .groups())
    image = np.random.default_rng(4).integers(0, 65535, (512, 384)).astype(np.uint16)
    low, high = np.percentile(image[::4, ::4].astype(np.float64), [low_p, high_p])
    d, w = prep["downscale_factor"], prep["window_side_px"]
    window = image[100 : 100 + w, 60 : 60 + w].astype(np.float64)
    blocks = window.reshape(w // d, d, w // d, d).mean(axis=(1, 3))
    by_hand = np.clip((blocks - low) / (high - low), 0, 1)
    np.testing.assert_allclose(preprocess_window(image[100 : 100 + w, 60 : 60 + w], d,
                                                 intensity_range_for(image, "image")), by_hand, atol=1e-5)

def test_model_card_keeps_no_local_paths(exports):
    folder, card = exports["single"]
    text = (folder / "model_card.json").read_text()
    assert "/home/someone" not in text and str(folder.parent) not in text
    assert "root" not in card["config"]["values"]["data"] and card["config"]["values"]["data"]["source"] == "cbis"


def test_without_tf2onnx_the_card_says_so(folds, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # import tf2onnx now raises ImportError
    card = export_model(folds[:1], tmp_path / "out", plan=plan(), config=CONFIG, validation={})
    assert card["files"]["onnx"]["written"] is False and "tf2onnx" in card["files"]["onnx"]["reason"]
    assert not (tmp_path / "out" / "model.onnx").exists() and (tmp_path / "out" / "saved_model").is_dir()
    assert card["training_data"]["fingerprint"] is None and card["checks"]["onnx_max_abs_difference"] is None


def test_blurmax_model_exports_and_reproduces_keras(tmp_path, batch):
    """model.downsampling: blurmax (frozen depthwise blur kernels) goes through the SavedModel and ONNX checks."""
    import keras

    keras.utils.set_random_seed(3)
    path = tmp_path / "fold-0.keras"
    build_unet((SIDE, SIDE, 1), **model_kwargs({**CONFIG["model"], "downsampling": "blurmax"})).save(path)
    card = export_model([path], tmp_path / "out", plan=plan(), config=CONFIG, validation={})
    assert card["checks"]["saved_model_max_abs_difference"] <= 1e-5
    if importlib.util.find_spec("tf2onnx"):
        assert card["files"]["onnx"]["written"] is True, card["files"]["onnx"]
    if importlib.util.find_spec("onnxruntime") and card["files"]["onnx"]["written"]:
        assert card["checks"]["onnx_max_abs_difference"] <= 1e-5


def test_onnx_can_be_left_out(folds, tmp_path):
    card = export_model(folds[:1], tmp_path / "out", plan=plan(), config=CONFIG, validation={}, onnx=False)
    assert card["files"]["onnx"] == {"written": False, "reason": "not requested (export_model(onnx=False))"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model_card.json", "saved_model"]


def test_mismatched_plan_is_refused_and_nothing_is_left(folds, tmp_path):
    wrong = build_plan({**CONFIG["patches"], "downscale": 2}, "mass-n7d2-00000000", [])
    with pytest.raises(ValueError, match="disagree"):
        export_model(folds, tmp_path / "out", plan=wrong, config=CONFIG, validation={})
    assert list(tmp_path.iterdir()) == []


def test_folds_of_different_models_are_refused(folds, tmp_path):
    other = tmp_path / "other.keras"
    build_unet((SIDE, SIDE, 1), depth=2, filters=8).save(other)
    with pytest.raises(ValueError, match="not folds of one model"):
        export_model([folds[0], other], tmp_path / "out", plan=plan(), config=CONFIG, validation={})
    with pytest.raises(ValueError, match="at least one"):
        export_model([], tmp_path / "out", plan=plan(), config=CONFIG, validation={})


def test_model_with_python_code_is_refused(tmp_path):
    import keras

    inputs = keras.Input((SIDE, SIDE, 1))
    path = tmp_path / "evil.keras"
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 0.5)(inputs)).save(path)
    with pytest.raises(InputError, match="evil.keras"):
        export_model([path], tmp_path / "out", plan=plan(), config=CONFIG, validation={})


def test_export_replaces_an_earlier_one(folds, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    export_model(folds[:1], out, plan=plan(), config=CONFIG, validation={"run": 2})
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "model_card.json").read_text())["validation"] == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


def test_failed_check_leaves_no_folder(folds, tmp_path, monkeypatch):
    """A failure inside the export (here: the SavedModel check) leaves neither the folder nor a temporary one."""
    from mammoseg import export

    monkeypatch.setattr(export, "MAX_EXPORT_DIFFERENCE", -1.0)
    with pytest.raises(ValueError, match="SavedModel differs"):
        export_model(folds[:1], tmp_path / "out", plan=plan(), config=CONFIG, validation={})
    assert list(tmp_path.iterdir()) == []


def test_saved_model_stores_each_weight_once(exports):
    """keras-team/keras#23553: Keras' own export writes every weight twice; this one must not."""
    import tensorflow as tf

    folder, card = exports["ensemble"]
    stored = sum(int(np.prod(shape)) for name, shape in
                 tf.train.list_variables(str(folder / "saved_model" / "variables" / "variables"))
                 if name != "_CHECKPOINTABLE_OBJECT_GRAPH")  # fmt: skip
    per_fold = card["architecture"]["parameters_per_fold"]
    assert stored == 2 * (per_fold["trainable"] + per_fold["non_trainable"])
