"""Export trained models for use outside mammoseg: a TensorFlow SavedModel, ONNX, and a model card.

``export_model`` takes one ``.keras`` file per fold (several = an ensemble whose probabilities are averaged,
as the workflow predicts test images with the mean of its k fold models) and writes, atomically, a folder::

    saved_model/      TensorFlow SavedModel, one signature ``serving_default``:
                      {"patch": float32 (batch, s, s, 1) in [0, 1]} -> {"probability": float32 (batch, s, s, 1)}
                      (the mean of the folds' sigmoid outputs; batch size free)
    model.onnx        the same function as ONNX (input "patch", output "probability"), when tf2onnx is installed
    model_card.json   what the model is, how it was trained and validated, and the exact pre-processing and
                      sliding-window rules needed to reproduce mammoseg's predictions with it (MODEL_CARD_FIELDS)
    operating_point.json  with ``evaluate.target_fppi``: the threshold calibrated on the out-of-fold candidates

The model sees windows, not mammograms: a full image must go through the sliding-window procedure that the
model card spells out (reference implementation: :mod:`mammoseg.inference.sliding`).

ONNX
    Written with tf2onnx's ``convert.from_function`` on the very ``tf.function`` the SavedModel serves. tf2onnx
    1.17.0 converts the U-Net variants of :func:`mammoseg.model.unet.build_unet` (transposed and bilinear
    up-steps, batch norm, dropout) under TensorFlow 2.21, Keras 3.15 and NumPy 2.4 unpatched, to within 2.4e-7 of
    Keras (checked with onnxruntime); the paper's U-Net (91.2 M parameters) to within 6.9e-7, in a 348 MB file.
    Not everything in tf2onnx is NumPy-2 clean: its ``large_model`` (external data) path calls ``np.product``,
    removed in NumPy 2, so models whose weights exceed protobuf's 2 GB cannot be converted. Keras' own
    ``Model.export(format="onnx")`` was not used: it monkey-patches tf2onnx and sets ``numpy.object``
    process-wide for NumPy 2 ("remove once tf2onnx supports numpy 2"). The conversion needs about 50 times the
    weights in memory (measured: 1.8 GB for 35 MB of weights; the paper's U-Net: 22.7 GB peak and 3.5 minutes on
    a shared 2-core machine), hence ``onnx=False``. Without tf2onnx, or if it fails, the card says why and only
    the SavedModel is written.

SavedModel
    The paper's U-Net: 350 MB, 23 s, 2.2 GB peak memory without ONNX. Written by ``tf.saved_model.save``, not by
    Keras' export, which stores every weight twice (see :func:`_write_saved_model`).

Every export is checked before it is kept: the SavedModel is reloaded and, like the ONNX file (if onnxruntime
is installed), run on a fixed random batch; the largest difference from the Keras fold mean is in the card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mammoseg import __version__
from mammoseg.config import section_hash, validate_config
from mammoseg.config.plan import PatchGeometry, Plan, read_plan
from mammoseg.evaluation.summary import read_summary_csv
from mammoseg.io.atomic import atomic_directory
from mammoseg.io.checksum import sha256_of
from mammoseg.model.unet import load_model, parameter_counts
from mammoseg.patches.geometry import IMAGE_RANGE_PERCENTILES

__all__ = ["MODEL_CARD_FIELDS", "SAVED_MODEL_DIR", "ONNX_FILE", "MODEL_CARD_FILE", "OPERATING_POINT_FILE", "ONNX_OPSET",
           "export_model"]

SAVED_MODEL_DIR = "saved_model"
ONNX_FILE = "model.onnx"
MODEL_CARD_FILE = "model_card.json"
OPERATING_POINT_FILE = "operating_point.json"
#: ONNX opset: 17 is run by every onnxruntime since 1.11 and by the converters of the other frameworks
ONNX_OPSET = 17
#: an exported model that differs from Keras by more than this on the check batch is a bug, not rounding
MAX_EXPORT_DIFFERENCE = 1e-5

#: Top-level keys of model_card.json.
MODEL_CARD_FIELDS = (
    "format", "name", "created_utc", "intended_use", "files", "signature", "ensemble", "architecture", "plan",
    "preprocessing", "sliding_window", "training_data", "config", "validation", "checks", "versions",
)  # fmt: skip

_INTENDED_USE = (
    "Research on mass segmentation in mammograms (Marita et al., U-Net on CBIS-DDSM). Not a medical device and "
    "not validated for clinical use. Trained on windows of scanned film mammograms (CBIS-DDSM); other sources, "
    "digital mammography in particular, are outside the training distribution."
)
#: The intended use of a model trained on the synthetic demo data (data.source: synthetic).
_DEMO_USE = (
    "A test of the mammoseg pipeline only: trained on the synthetic demo data (data.source: synthetic), drawn blobs "
    "on smooth backgrounds, not on mammograms. Its marks on real mammograms mean nothing."
)


def export_model(keras_paths: Sequence[str | Path], out_dir: str | Path, *, plan: Plan,
                 config: dict[str, Any], validation: dict[str, Any],
                 fingerprint: dict[str, Any] | None = None, onnx: bool = True,
                 operating_point: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Export one model or an ensemble of fold models (see the module docstring for the folder it writes).

    Parameters
    ----------
    keras_paths : one ``.keras`` file per fold, all of the same architecture and input size; loaded with
        :func:`mammoseg.inference.sliding.load_model` (``safe_mode=True``)
    out_dir : the folder to write (replaced atomically if it exists)
    plan : the plan the models were trained on (:class:`mammoseg.config.plan.Plan`, ``plan.json``): window side
        ``2**n`` px, downscale factor, network input ``s`` px; must match the models
    config : the workflow config (validated here); the card keeps every section except local paths
    validation : validation figures to publish with the model (JSON-serialisable: numbers, strings, lists, dicts)
    fingerprint : the training data fingerprint (``fingerprint.json``: counts and image sizes per split)
    onnx : also write ``model.onnx`` (tf2onnx needs about 50 times the weights in memory: 22.7 GB for the paper's
        U-Net, against 2.2 GB for the export without ONNX)
    operating_point : the calibrated operating point (``evaluate.target_fppi``), written as
        ``operating_point.json`` beside the card (``mammoseg predict --operating-point`` reads it)

    Returns
    -------
    dict : the model card, as written to ``model_card.json``.

    Raises
    ------
    ValueError
        No model given; folds that differ in architecture; a plan that does not match the models;
        a SavedModel that does not reproduce Keras.
    """
    config = validate_config(config)
    paths = [Path(p) for p in keras_paths]
    if not paths:
        raise ValueError("export_model needs at least one .keras file")
    models = [load_model(path) for path in paths]
    side = _input_side(models, paths, plan)
    serve = _serving_function(models, side)
    batch = _check_batch(side)
    expected = np.mean([np.asarray(model(batch, training=False)) for model in models], axis=0)
    with atomic_directory(out_dir) as tmp:
        checks = {"batch_shape": list(batch.shape), "saved_model_max_abs_difference":
                  _write_saved_model(models, serve, tmp / SAVED_MODEL_DIR, batch, expected)}  # fmt: skip
        onnx_entry = (_write_onnx(serve, side, tmp / ONNX_FILE, batch, expected) if onnx
                      else {"written": False, "reason": "not requested (export_model(onnx=False))"})  # fmt: skip
        checks["onnx_max_abs_difference"] = onnx_entry.pop("max_abs_difference", None)
        card = _model_card(paths, models, side, plan, config, validation, fingerprint, onnx_entry, checks)
        (tmp / MODEL_CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=False, default=_json_value) + "\n")
        if operating_point is not None:
            (tmp / OPERATING_POINT_FILE).write_text(json.dumps(operating_point, indent=2, sort_keys=True) + "\n")
    return json.loads(json.dumps(card, default=_json_value))


# --------------------------------------------------------------------------------------------------------------
# the served function and its exports
# --------------------------------------------------------------------------------------------------------------
def _input_side(models: list, paths: list[Path], plan: Plan) -> int:
    """The network input side ``s`` in pixels, checked across the folds and against the plan."""
    shapes = {tuple(model.input_shape) for model in models}
    counts = {tuple(parameter_counts(model).values()) for model in models}
    if len(shapes) != 1 or len(counts) != 1:
        raise ValueError(f"the folds differ in input shape {sorted(shapes)} or parameter counts {sorted(counts)}: "
                         f"{[p.name for p in paths]} are not folds of one model")  # fmt: skip
    (shape,) = shapes
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 1 or shape[1] is None:
        raise ValueError(f"model input shape {shape} is not (batch, s, s, 1)")
    side = int(shape[1])
    if plan.input_px != side:
        raise ValueError(f"the plan's network input ({plan.input_px} px: {plan.window_px} px windows downscaled by "
                         f"{plan.downscale}) and the model input ({side} px) disagree")
    return side


def _serving_function(models: list, side: int):
    """The served ``tf.function``: {"patch": (B, s, s, 1)} -> {"probability": mean over folds, (B, s, s, 1)}."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, side, side, 1], tf.float32, name="patch")

    @tf.function(input_signature=[spec])
    def serve(patch):
        probabilities = [tf.cast(model(patch, training=False), tf.float32) for model in models]
        return {"probability": tf.reduce_mean(tf.stack(probabilities, axis=0), axis=0)}

    return serve


def _check_batch(side: int) -> np.ndarray:
    """A fixed float32 (2, s, s, 1) batch in [0, 1] on which every export is compared with Keras."""
    return np.random.default_rng(0).random((2, side, side, 1), dtype=np.float32)


def _write_saved_model(models: list, serve, path: Path, batch: np.ndarray, expected: np.ndarray) -> float:
    """Write the SavedModel, reload it and return its largest difference from Keras.

    ``tf.saved_model.save`` on a ``tf.Module`` holding the folds, not Keras' ``ExportArchive``/``Model.export``:
    those store every weight twice in TF 2.21 / Keras 3.15 (keras-team/keras#23553, open), doubling the file
    (the paper's U-Net: 697 MB instead of 365 MB) and the memory of whoever loads it.
    """
    import tensorflow as tf

    module = tf.Module()
    module.folds = models  # tracked: the variables are saved once, by the folds that own them
    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    served = tf.saved_model.load(str(path)).signatures["serving_default"]
    difference = float(np.abs(served(patch=tf.constant(batch))["probability"].numpy() - expected).max())
    if difference > MAX_EXPORT_DIFFERENCE:
        raise ValueError(f"the SavedModel differs from Keras by {difference:.3g} (> {MAX_EXPORT_DIFFERENCE})")
    return difference


def _write_onnx(serve, side: int, path: Path, batch: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    """Convert ``serve`` with tf2onnx; the card's ``files.onnx`` entry (why not, when it is not written)."""
    try:
        import tf2onnx
    except ImportError:
        return {"written": False, "reason": "tf2onnx is not installed (pip install 'mammoseg[onnx]')"}
    import tensorflow as tf

    converter = f"tf2onnx {tf2onnx.__version__}"
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.WARNING)  # tf2onnx narrates every graph pass at INFO
    try:
        spec = tf.TensorSpec([None, side, side, 1], tf.float32, name="patch")
        tf2onnx.convert.from_function(serve, input_signature=[spec], opset=ONNX_OPSET, output_path=str(path))
    except Exception as exc:  # noqa: BLE001 - any converter failure leaves the SavedModel usable; the card says why
        path.unlink(missing_ok=True)
        return {"written": False, "reason": f"{converter} failed: {type(exc).__name__}: {exc}"[:500]}
    finally:
        logger.setLevel(level)
    entry = {"written": True, "file": ONNX_FILE, "opset": ONNX_OPSET, "converter": converter,
             "input": "patch", "output": "probability"}  # fmt: skip
    difference = _onnx_difference(path, batch, expected)
    if difference is not None and difference > MAX_EXPORT_DIFFERENCE:
        path.unlink()
        return {"written": False, "reason": f"{converter} output differs from Keras by {difference:.3g}"}
    entry["max_abs_difference"] = difference
    return entry


def _onnx_difference(path: Path, batch: np.ndarray, expected: np.ndarray) -> float | None:
    """Largest difference between onnxruntime on ``path`` and Keras; None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(["probability"], {"patch": batch})
    return float(np.abs(output - expected).max())


# --------------------------------------------------------------------------------------------------------------
# the model card
# --------------------------------------------------------------------------------------------------------------
def _model_card(paths: list[Path], models: list, side: int, plan: Plan, config: dict[str, Any],
                validation: dict[str, Any], fingerprint: dict[str, Any] | None, onnx: dict[str, Any],
                checks: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    infer = config["infer"]
    card = {
        "format": "mammoseg model card 1",
        "name": config["experiment"] or config["model"]["name"],
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "intended_use": _DEMO_USE if config["data"]["source"] == "synthetic" else _INTENDED_USE,
        "files": {"saved_model": SAVED_MODEL_DIR, "onnx": onnx},
        "signature": _signature(side),
        "ensemble": {
            "folds": len(paths),
            "combination": "mean of the folds' probabilities, per pixel" if len(paths) > 1 else "single model",
            "models": [{"file": name, "sha256": sha256_of(p)} for name, p in zip(_distinct_names(paths), paths)],
        },
        "architecture": {
            "family": "U-Net (Marita et al.); mammoseg.model.unet.build_unet",
            "model_config": config["model"],
            "input_shape": [side, side, 1],
            "output": "1 channel, sigmoid probability of mass per pixel",
            "parameters_per_fold": parameter_counts(models[0]),
        },
        "plan": plan.as_dict(),
        "preprocessing": _preprocessing(plan.geometry),
        "sliding_window": _sliding_window(infer, plan.downscale),
        "training_data": _training_data(fingerprint),
        "config": _shareable_config(config),
        "validation": validation,
        "checks": checks,
        "versions": _versions(onnx),
    }
    return card


def _signature(side: int) -> dict[str, Any]:
    return {
        "name": "serving_default",
        "input": {"name": "patch", "dtype": "float32", "shape": [None, side, side, 1], "range": [0.0, 1.0]},
        "output": {"name": "probability", "dtype": "float32", "shape": [None, side, side, 1], "range": [0.0, 1.0]},
    }


def _normalisation_step(normalise: str) -> str:
    """The card's words for ``patches.normalise`` (mammoseg.patches.geometry.intensity_range_for)."""
    if normalise == "window":
        return ("min-max normalise the window on its own: (x - min) / (max - min), float32 in [0, 1] "
                "(a flat window, max == min, would be all zeros; the sliding window skips such windows)")
    low, high = IMAGE_RANGE_PERCENTILES
    return (f"normalise with the whole image's range: low, high = the {low}th and {high}th percentiles (linear "
            "interpolation) of every 4th pixel in each direction of the full-resolution image, then "
            "(x - low) / (high - low) clipped to [0, 1], float32 (the same low and high for every window of the "
            "image; all zeros when high == low)")


def _preprocessing(geometry: PatchGeometry) -> dict[str, Any]:
    """What turns a window of a mammogram into the model's input (mammoseg.patches.geometry.preprocess_window)."""
    window, downscale, side = geometry.window_px, geometry.downscale, geometry.input_px
    return {
        "reference_implementation": "mammoseg.patches.geometry.preprocess_window",
        "image": "stored pixel values with the modality LUT (RescaleSlope/Intercept) applied and MONOCHROME1 "
                 "inverted, so that bright = dense; no VOI windowing (mammoseg.io.dicom.read_mammogram)",
        "window_side_px": window,
        "downscale_factor": downscale,
        "network_input_px": side,
        "normalise": geometry.normalise,
        "steps": [
            f"take a {window} x {window} window of the full-resolution image",
            f"downscale by {downscale} with a block mean: each input pixel is the float32 mean of a "
            f"{downscale} x {downscale} block ({window} -> {side} px)",
            _normalisation_step(geometry.normalise),
            f"stack windows as float32 (batch, {side}, {side}, 1)",
        ],
    }


def _sliding_window(infer: dict[str, Any], downscale: int) -> dict[str, Any]:
    """How mammoseg covers a full mammogram with windows (mammoseg.inference.sliding, configured values)."""
    return {
        "reference_implementation": "mammoseg.inference.sliding.predict_paper / predict_blended",
        "mode": infer["mode"],
        "parameters": {k: infer[k] for k in ("strip_fraction", "min_mean", "threshold", "stride_fraction", "tta",
                                             "blend")},
        "breast_side": "the side (left or right) whose vertical strip of strip_fraction x the image width has the "
                       "larger mean intensity; ties go to the left",
        "skip": "a window is not predicted when its mean raw intensity is below min_mean x the image maximum "
                "(background) or its maximum equals its minimum (flat); its pixels get probability 0",
        "small_images": "an image smaller than one window is padded with its minimum (bottom, and the side away "
                        "from the breast) to one window; the padding is removed from the output",
        "paper": "crop the image to whole windows: in width from the breast side (the remainder is dropped on the "
                 "other side), in height the remainder r split r // 2 at the top and r - r // 2 at the bottom; "
                 "non-overlapping windows; cropped margins get probability 0",
        "blended": "overlapping windows every round(stride_fraction x window) px (a multiple of the downscale "
                   "factor), the last row/column moved back to end at the image edge; each window's "
                   "probabilities weighted by a Gaussian (sigma = window / 8, peak 1, floored at its smallest "
                   "positive value) and the map is sum(w p) / sum(w), or with blend max the highest probability "
                   "of the windows covering the pixel; tta averages each window with the prediction of the "
                   "horizontally flipped window, flipped back",
        "postprocessing": f"probabilities back to full resolution by repeating each model pixel {downscale} x "
                          f"{downscale}; stored as uint8 round(p x 255); mask = prob_u8 >= ceil(threshold x 255)",
    }


def _training_data(fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    if fingerprint is None:
        return {"fingerprint": None, "sha256": None, "note": "no fingerprint given to export_model"}
    canonical = json.dumps(fingerprint, sort_keys=True, default=_json_value).encode()
    return {"fingerprint": fingerprint, "sha256": hashlib.sha256(canonical).hexdigest()}


#: config keys that hold local paths: meaningless to whoever receives the model, and they can name people
_LOCAL_PATHS = {("results",), ("data", "root"), ("data", "csv_dir"), ("studies", "root")}


def _shareable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without local paths, plus ``section_hash`` of the whole config (so a run can be matched)."""
    shared = json.loads(json.dumps(config))
    for key in _LOCAL_PATHS:
        section = shared
        for part in key[:-1]:
            section = section.get(part, {})
        section.pop(key[-1], None)
    return {"values": shared, "config_hash": section_hash(config)}


def _versions(onnx: dict[str, Any]) -> dict[str, str]:
    import keras
    import tensorflow as tf

    versions = {"mammoseg": __version__, "python": platform.python_version(), "tensorflow": tf.__version__,
                "keras": keras.__version__, "numpy": np.__version__}  # fmt: skip
    if onnx.get("written"):
        import onnx as onnx_package
        import tf2onnx

        versions.update({"tf2onnx": tf2onnx.__version__, "onnx": onnx_package.__version__})
        try:
            import onnxruntime

            versions["onnxruntime"] = onnxruntime.__version__
        except ImportError:
            pass
    return versions


def _distinct_names(paths: list[Path]) -> list[str]:
    """Each path relative to the folder the paths share (``fold-0/model.keras``), never the absolute path."""
    if len(paths) == 1:
        return [paths[0].name]
    common = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    return [p.resolve().relative_to(common).as_posix() for p in paths]


def _json_value(value: Any) -> Any:
    """NumPy scalars and arrays as plain JSON values; anything else is an error (the card must stay exact)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable: {value!r}")


def validation_figures(fold_reports: Sequence[str | Path], oof_summary: str | Path | None = None) -> dict[str, Any]:
    """What the model card publishes as validation: each fold's best validation Dice and epoch (from its training
    report) and, with cross-validation, the out-of-fold detection and segmentation figures (``summary.csv`` of the
    ``oof`` image set: TPR/FPPI at the operating threshold, the FROC points and CPM, pooled Dice)."""
    folds = []
    for path in fold_reports:
        report = json.loads(Path(path).read_text())
        folds.append({"fold": report.get("fold", 0), "monitor": report.get("monitor"),
                      "best_value": report.get("best_value"), "best_epoch": report.get("best_epoch"),
                      "epochs_run": report.get("epochs_run")})
    figures: dict[str, Any] = {"folds": folds}
    if oof_summary is not None:
        figures["out_of_fold"] = read_summary_csv(oof_summary)
    return figures


def run_export(models: Sequence[str | Path], plan: str | Path, fingerprint: str | Path,
               fold_reports: Sequence[str | Path], out_dir: str | Path, *, config: dict[str, Any],
               oof_summary: str | Path | None = None,
               operating_point: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Stage ``export_model``: the fold models of an experiment as SavedModel (+ ONNX with ``export.onnx``) and
    model card, with the plan, the training data fingerprint and the validation figures.

    ``operating_point``: the calibration's JSON (``evaluate.target_fppi`` > 0); the card then gives its threshold
    as ``infer.threshold`` (config and sliding-window rules) and the calibration under
    ``validation.operating_point``."""
    validation = validation_figures(fold_reports, oof_summary)
    point = None
    if oof_summary is not None:  # the out-of-fold figures are measured where out-of-fold images are binarised
        validation["out_of_fold_threshold"] = float(config["infer"]["threshold"])
    if operating_point is not None:
        point = json.loads(Path(operating_point).read_text())
        validation["operating_point"] = point
        config = {**config, "infer": {**config["infer"], "threshold": point["threshold"]}}
    card = export_model(models, out_dir, plan=read_plan(plan), config=config, validation=validation,
                        fingerprint=json.loads(Path(fingerprint).read_text()), onnx=config["export"]["onnx"],
                        operating_point=point)
    print(f"exported {len(models)} fold model(s) -> {out_dir} (ONNX: {card['files']['onnx'].get('written')})")
    return card
