"""Stage ``predict``: probability maps for a chunk of full mammograms, the model loaded once per chunk.

A prediction job handles every image of one chunk (:func:`mammoseg.data.manifest.bucket_of`, the stable hash that also
assigns shards, over :func:`~mammoseg.data.manifest.chunk_count` chunks), so TensorFlow is imported and each model
loaded once per chunk instead of once per image, and the next image is read and decoded in a background thread while the
network runs on the current one. An image whose file cannot be read is recorded in the chunk's ``predictions.csv`` with
its reason and the others are still predicted: one bad file never stops the workflow.

Outputs of a chunk (a folder, written under a temporary name and renamed when complete):
``{image_id}.prob.npz`` (``prob``: uint8 (rows, cols) = round(p × 255); ``meta``: JSON text) per predicted image,
and ``predictions.csv`` (:data:`PREDICTION_COLUMNS`), one row per image of the chunk.

Several models (the folds of a cross-validation) form an ensemble: the predictor returns the mean of their
probabilities for each batch of windows (nnU-Net's ensembling of folds).
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from mammoseg.config.plan import PatchGeometry, patch_geometry, read_plan
from mammoseg.data.manifest import chunk_count, read_manifest, rows_of_bucket
from mammoseg.data.restructure import view_position
from mammoseg.errors import InputError
from mammoseg.inference.anatomy import apply_anatomy
from mammoseg.inference.sliding import Prediction, Predictor, predict_blended, predict_paper, quantise
from mammoseg.io.atomic import atomic_directory, atomic_path, write_csv_atomic
from mammoseg.io.dicom import read_mammogram
from mammoseg.io.names import safe_name
from mammoseg.model.folds import fit_set_fold, folds_predicting, read_splits
from mammoseg.model.unet import load_model
from mammoseg.patches.geometry import intensity_range_for

__all__ = [
    "PREDICTION_COLUMNS",
    "ImageTask",
    "check_input_size",
    "make_predictor",
    "predict_image",
    "predict_images",
    "save_prediction",
    "load_prediction",
]

#: Columns of a chunk's ``predictions.csv``: ``status`` is ``predicted`` or ``failed`` (then ``reason`` is a skip
#: code such as ``undecodable`` and ``message`` names the file and the decoder's words).
PREDICTION_COLUMNS = ("image_id", "status", "reason", "message", "models", "seconds", "windows_predicted",
                      "windows_skipped_dark", "windows_skipped_flat")


# --------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------
def check_input_size(model, geometry: PatchGeometry, source: str = "model") -> None:
    """Refuse a model whose input is not (batch, s, s, 1) with s = the plan's network input side."""
    shape = tuple(model.input_shape)
    s = geometry.input_px
    if len(shape) != 4 or shape[-1] != 1 or any(dim not in (None, s) for dim in shape[1:3]):
        raise InputError(f"{source}: input shape {shape} does not match windows of {geometry.window_px} px "
                         f"downscaled by {geometry.downscale} (expected (None, {s}, {s}, 1))")


def make_predictor(models: Sequence[Any], batch_size: int = 16) -> Predictor:
    """One compiled ``tf.function`` per model; the predictor returns their mean probability.

    Returns a callable float32 (B, s, s) in [0, 1] → float32 (B, s, s); any B (split into ``batch_size`` pieces).
    """
    import tensorflow as tf

    if not models:
        raise ValueError("make_predictor needs at least one model")
    s = int(models[0].input_shape[1])
    forwards = []
    for model in models:
        forward = tf.function(lambda batch, model=model: tf.cast(model(batch, training=False), tf.float32),
                              input_signature=[tf.TensorSpec([None, s, s, 1], tf.float32)], reduce_retracing=True)
        forwards.append(forward)

    def predict(batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        outputs = []
        for start in range(0, len(batch), batch_size):
            piece = tf.convert_to_tensor(batch[start : start + batch_size, ..., None])
            total = sum(forward(piece).numpy()[..., 0] for forward in forwards)
            outputs.append(total / len(forwards))
        return np.concatenate(outputs) if outputs else np.zeros_like(batch)

    return predict


# --------------------------------------------------------------------------------------------------------------
# one image
# --------------------------------------------------------------------------------------------------------------
def predict_image(image: np.ndarray, predictor: Predictor, geometry: PatchGeometry, infer: Mapping[str, Any],
                  batch_size: int) -> Prediction:  # fmt: skip
    """The configured inference mode on one image (rows, cols), raw intensities, bright = dense, its windows
    normalised as the training patches were (``geometry.normalise``).

    ``infer`` is the ``infer`` config section (mode, strip_fraction, min_mean, stride_fraction, tta, blend).
    """
    common = dict(strip_fraction=float(infer["strip_fraction"]), min_mean=float(infer["min_mean"]),
                  batch_size=int(batch_size), intensity_range=intensity_range_for(image, geometry.normalise))
    if infer["mode"] == "paper":
        return predict_paper(image, predictor, geometry.window_px, geometry.downscale, **common)
    if infer["mode"] == "blended":
        return predict_blended(image, predictor, geometry.window_px, geometry.downscale,
                               stride_fraction=float(infer["stride_fraction"]), tta=bool(infer["tta"]),
                               blend=str(infer["blend"]), **common)
    raise ValueError(f"unknown inference mode {infer['mode']!r}; allowed: paper, blended")


def save_prediction(prob: np.ndarray, path: str | Path, meta: Mapping[str, Any]) -> None:
    """Write a probability map atomically as ``.npz``: ``prob`` uint8 (rows, cols) and ``meta`` (JSON text, no pickle).

    ``prob`` may be uint8 (round(p × 255)) or float in [0, 1] (quantised here).
    """
    prob_u8 = prob if prob.dtype == np.uint8 else quantise(prob)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # a file handle: numpy must not append its own suffix
            np.savez_compressed(handle, prob=prob_u8, meta=np.array(json.dumps(dict(meta), sort_keys=True,
                                                                                default=str)))


def load_prediction(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read ``(prob uint8 (rows, cols), meta dict)`` written by :func:`save_prediction`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            prob = data["prob"]
            meta = json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not a mammoseg prediction file: {exc}") from exc
    if prob.dtype != np.uint8 or prob.ndim != 2:
        raise InputError(f"{path}: 'prob' must be a 2-D uint8 array, got {prob.dtype} {prob.shape}")
    return prob, meta


# --------------------------------------------------------------------------------------------------------------
# a chunk of images
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageTask:
    """One image to predict: its id, its file, the model files whose mean predicts it (one per fold used) and its
    view position (``CC``, ``MLO``; the manifest's ``view`` column; ``""`` when unknown, which keeps the pectoral
    muscle in the map: see :func:`mammoseg.inference.anatomy.apply_anatomy`)."""

    image_id: str
    image_path: str
    models: tuple[str, ...]
    view: str = ""


def _read(path: str, reader: Callable[[str], np.ndarray]) -> tuple[np.ndarray | None, BaseException | None]:
    try:
        return reader(path), None
    except Exception as exc:  # noqa: BLE001 - a bad file is recorded, not raised (see predict_images)
        return None, exc


def _failure(exc: BaseException) -> tuple[str, str]:
    reason = getattr(exc, "reason", "") or "unreadable"
    return reason, f"{type(exc).__name__}: {exc}"


def predict_images(tasks: Sequence[ImageTask], out_dir: str | Path, *, geometry: PatchGeometry,
                   infer: Mapping[str, Any], batch_size: int, reader: Callable[[str], np.ndarray] | None = None,
                   log: Callable[[str], None] = print) -> list[dict[str, Any]]:  # fmt: skip
    """Predict every image of ``tasks`` into the folder ``out_dir`` (written atomically as a whole).

    Each distinct set of model files is loaded once; the next image is decoded in a background thread while the
    current one is predicted. An image that cannot be read gets a ``failed`` row (reason and message) and no
    ``.prob.npz``; a model that cannot be loaded, or that does not match the plan, is an :class:`InputError`.

    Returns
    -------
    list of dict, the rows of ``predictions.csv`` (:data:`PREDICTION_COLUMNS`), in task order.
    """
    reader = reader or read_mammogram
    predictors: dict[tuple[str, ...], Predictor] = {}

    def predictor_for(models: tuple[str, ...]) -> Predictor:
        if models not in predictors:
            loaded = [load_model(path) for path in models]
            for path, model in zip(models, loaded):
                check_input_size(model, geometry, path)
            predictors[models] = make_predictor(loaded, batch_size)
        return predictors[models]

    rows: list[dict[str, Any]] = []
    with atomic_directory(out_dir) as tmp, concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_read, tasks[0].image_path, reader) if tasks else None
        for index, task in enumerate(tasks):
            image, error = pending.result()
            if index + 1 < len(tasks):  # decode the next image while this one is predicted
                pending = pool.submit(_read, tasks[index + 1].image_path, reader)
            row = {"image_id": task.image_id, "models": ";".join(task.models)}
            if error is not None:
                reason, message = _failure(error)
                rows.append({**row, "status": "failed", "reason": reason, "message": message})
                log(f"{task.image_id}: not predicted ({reason}): {message}")
                continue
            started = time.perf_counter()
            result = predict_image(image, predictor_for(task.models), geometry, infer, batch_size)
            prob = apply_anatomy(result.prob, image, None, task.view, breast_mask=bool(infer["breast_mask"]),
                                 exclude_pectoral=bool(infer["exclude_pectoral"]))
            seconds = time.perf_counter() - started
            meta = {**result.meta, "image_id": task.image_id, "image": task.image_path, "models": list(task.models),
                    "view": task.view, "breast_mask": bool(infer["breast_mask"]),
                    "exclude_pectoral": bool(infer["exclude_pectoral"]), "seconds": round(seconds, 3)}
            save_prediction(prob, Path(tmp) / f"{task.image_id}.prob.npz", meta)
            rows.append({**row, "status": "predicted", "reason": "", "message": "", "seconds": round(seconds, 3),
                         **{k: result.meta[k] for k in PREDICTION_COLUMNS if k in result.meta}})
            log(f"{task.image_id}: {result.meta['windows_predicted']} windows, {seconds:.2f} s")
        import pandas as pd

        table = pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))
        write_csv_atomic(Path(tmp) / "predictions.csv", table)
    return rows


def tasks_for(images: Iterable[tuple[str, str]], models: Sequence[str], *, views: bool = False) -> list[ImageTask]:
    """Every (image_id, path) predicted by the mean of the same ``models`` (files given to :func:`run_predict_files`).

    ``views``: read each file's view (:func:`mammoseg.data.restructure.view_position`, the manifest's rule),
    needed only to exclude the pectoral muscle.
    """
    return [ImageTask(image_id, str(path), tuple(str(m) for m in models), view_position(path) if views else "")
            for image_id, path in images]


def chunk_tasks(rows: Sequence[Mapping[str, str]], base: str | Path, models: Sequence[str], *, image_set: str,
                fold_of: Mapping[str, int] | None = None) -> list[ImageTask]:  # fmt: skip
    """The images of manifest ``rows`` with the models that predict them, sorted by image id.

    ``image_set`` ``test``, ``studies`` or ``studies-<folder key>`` (new studies): every image by the mean of all
    ``models`` (one per fold). ``oof``: each
    training image by the one model whose fold holds its patient (``fold_of``: patient → fold, the
    cross-validation's splits), i.e. the model that never trained on it; ``models[f]`` is fold f's.
    ``fit-<f>`` (:func:`mammoseg.model.folds.fit_set`): the training images fold f's model was fit on (patients of
    the other folds), by that model: where hard-negative mining looks for its false positives.
    """
    images: dict[str, Mapping[str, str]] = {}
    for row in rows:
        images.setdefault(row["image_id"], row)
    base = Path(base)

    def task(image_id: str, row: Mapping[str, str], chosen: Sequence[str]) -> ImageTask:
        return ImageTask(image_id, str(base / row["image_path"]), tuple(map(str, chosen)), row.get("view", "") or "")

    tasks = []
    for image_id, row in sorted(images.items()):
        chosen = folds_predicting(image_set, row["patient_id"], fold_of, len(models))
        if chosen:
            tasks.append(task(image_id, row, [models[fold] for fold in chosen]))
    return tasks


def run_predict_chunk(plan: str | Path, manifest: str | Path, models: Sequence[str], out_dir: str | Path, *,
                      image_set: str, chunk: int, config: Mapping[str, Any],
                      splits: str | Path | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Stage ``predict_chunk``: predict the images of chunk ``chunk`` of the manifest into the folder ``out_dir``.

    ``config`` is the resolved configuration (its ``infer`` section is read); the window geometry comes from
    ``plan``; ``splits`` (the cross-validation's ``splits.json``) is needed for the ``oof`` and ``fit-<f>`` sets.
    """
    geometry = read_plan(plan).geometry
    infer = config["infer"]
    all_rows = read_manifest(manifest)
    mine = rows_of_bucket(all_rows, chunk, chunk_count(all_rows, infer["chunk_size"]))
    fold_of = None
    if image_set == "oof" or fit_set_fold(image_set) is not None:
        fold_of = read_splits(splits).fold_of
    tasks = chunk_tasks(mine, Path(manifest).parent, models, image_set=image_set, fold_of=fold_of)
    rows = predict_images(tasks, out_dir, geometry=geometry, infer=infer, batch_size=infer["batch_size"])
    failed = sum(row["status"] != "predicted" for row in rows)
    print(f"chunk {chunk} of {image_set}: {len(rows) - failed} images predicted, {failed} failed -> {out_dir}")
    return rows


def collect_images(inputs: Sequence[str | Path]) -> list[tuple[str, str]]:
    """(image_id, path) of every file given or found (recursively) in the folders given, hidden files excluded.

    The image id is the path relative to the folder given (or the file's stem), made safe as a file name: no
    header is read. New studies are named from their headers instead, as the workflow names them
    (:mod:`mammoseg.studies`). Non-DICOM files are kept here and refused, with a reason, when they are
    read.
    """
    found: dict[str, str] = {}
    for entry in map(Path, inputs):
        if entry.is_dir():
            files = [p for p in sorted(entry.rglob("*")) if p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(entry).parts)]
            named = [(safe_name(str(p.relative_to(entry).with_suffix("")).replace("/", "__")), p) for p in files]
        elif entry.is_file():
            named = [(safe_name(entry.stem), entry)]
        else:
            raise InputError(f"{entry}: no such file or folder")
        for image_id, path in named:
            if image_id in found:
                raise InputError(f"{path}: gives the same image id {image_id!r} as {found[image_id]}")
            found[image_id] = str(path)
    return sorted(found.items())


def run_predict_files(inputs: Sequence[str | Path], models: Sequence[str], out_dir: str | Path, *,
                      config: Mapping[str, Any], plan: str | Path | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Probability maps of DICOM files or folders (no ground truth needed) into ``out_dir``, nothing else: the
    prediction stage alone (the benchmarks time it); ``mammoseg predict`` is
    :func:`mammoseg.studies.run_studies`.

    The window geometry and the normalisation come from ``plan`` (the model's ``plan.json``, also in an exported
    model's folder) or else from ``config['patches']``, which must then be the model's.
    """
    geometry = read_plan(plan).geometry if plan else patch_geometry(config["patches"])
    tasks = tasks_for(collect_images(inputs), models, views=bool(config["infer"]["exclude_pectoral"]))
    if not tasks:
        raise InputError(f"no file found in {', '.join(map(str, inputs))}")
    rows = predict_images(tasks, out_dir, geometry=geometry, infer=config["infer"],
                          batch_size=config["infer"]["batch_size"])
    failed = sum(row["status"] != "predicted" for row in rows)
    print(f"{len(rows) - failed} of {len(rows)} images predicted -> {out_dir}"
          + (f"; {failed} refused, see {Path(out_dir) / 'predictions.csv'}" if failed else ""))
    return rows
