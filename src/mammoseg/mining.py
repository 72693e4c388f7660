"""Hard-negative mining (beyond the paper): lesion-free training windows where a first model was wrong.

On real mammograms paper-mode false positives sat on round fibroglandular nodules and dense tissue. Random lesion-free
windows (``patches.n_negative``) rarely land on them; these windows do. The rule chain, per fold f: round-1 model
f -> probability maps of the training images it was fit on (image set ``fit-<f>``) -> :func:`run_mine` -> one
extra shard -> round-2 model f trains on the extraction shards plus it. Classic in-sample mining: the windows are
where the model still fires after training on those images. Per fold, so that fold f's validation patients
influence neither the windows nor the model that chose them, and the second round's out-of-fold figures stay
out of fold.

A mined window (:func:`mine_windows`) is placed on a false-positive component of the probability map: an
8-connected component of ``prob_u8 >= ceil(min_prob * 255)`` without a lesion pixel, scored by its maximum.
Components are taken highest score first (ties: the first in raster order); each gets one window of side
``window`` centred on the component's bounding box (as extraction centres a lesion) and moved inside the image
(:func:`mammoseg.patches.geometry.place_window`). A window qualifies as extraction's negatives do
(:func:`mammoseg.patches.geometry.plan_negative_windows`): no lesion pixel inside and a mean of at least
``min_mean`` of the image maximum; when the centred window does not, up to :data:`MINING_TRIES` centres shifted by
at most :data:`MINING_SHIFT` of the window (drawn from ``rng``) are tried, keeping the component's peak inside. A
component whose peak already lies in a chosen window is skipped (it is mined already).

Mined patches are stored exactly as extraction's negatives (:mod:`mammoseg.patches.shards`: same datasets,
provenance columns, ``copy_index`` -1, all-zero masks) through the same writer, named ``<image_id>_hard<k>``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.ndimage import find_objects

from mammoseg.config.plan import PatchGeometry, read_plan
from mammoseg.data.manifest import lesion_rows, read_manifest
from mammoseg.errors import InputError
from mammoseg.evaluation import metrics
from mammoseg.evaluation.froc import component_max
from mammoseg.inference.predict import load_prediction
from mammoseg.io.dicom import read_mammogram
from mammoseg.model.folds import fit_on, read_splits
from mammoseg.patches.geometry import bbox_centre, crop, intensity_range_for, place_window, preprocess_window, roi_rng
from mammoseg.patches.shards import PatchParams, PatchTables, image_lesions, store_shard

__all__ = ["MINING_TRIES", "MINING_SHIFT", "fp_components", "mine_windows", "mined_patches",
           "run_mine"]

#: Shifted centres tried for a component whose centred window holds a lesion pixel or is too dark.
MINING_TRIES = 16
#: Largest shift of those centres per axis, as a fraction of the window (as patches.max_shift's default).
MINING_SHIFT = 0.25


def fp_components(prob_u8: np.ndarray, lesion_union: np.ndarray, min_prob: float) -> list[dict[str, Any]]:
    """The false-positive components of a probability map, highest score first.

    Parameters
    ----------
    prob_u8 : uint8 (rows, cols), ``round(p * 255)``
    lesion_union : bool (rows, cols), every lesion pixel of the image
    min_prob : float in (0, 1], components are those of ``prob_u8 >= ceil(min_prob * 255)``, 8-connected

    Returns
    -------
    list of dict ``score_u8`` (int, the component's maximum), ``peak`` ((row, col) of its first maximal pixel in
    raster order), ``bbox`` ((r0, c0, r1, c1), half-open), for every component without a lesion pixel; sorted by
    score descending, then by label (raster order of the component's first pixel).
    """
    if metrics.threshold_level(min_prob) < 1:
        raise ValueError(f"min_prob must select pixels above probability 0, got {min_prob}")
    if lesion_union.shape != prob_u8.shape:
        raise ValueError(f"lesions {lesion_union.shape} and probability map {prob_u8.shape} differ in shape")
    labels, count = metrics.label_components(metrics.binarise(prob_u8, min_prob))
    if count == 0:
        return []
    on_lesion = np.zeros(count + 1, dtype=bool)
    on_lesion[np.unique(labels[lesion_union])] = True
    scores = component_max(prob_u8, labels, count)
    found = []
    for label, box in enumerate(find_objects(labels), start=1):
        if on_lesion[label]:
            continue
        inside = (labels[box] == label) & (prob_u8[box] == scores[label - 1])
        r, c = np.argwhere(inside)[0]  # the first maximal pixel in raster order
        found.append({"label": label, "score_u8": int(scores[label - 1]),
                      "peak": (int(r) + box[0].start, int(c) + box[1].start),
                      "bbox": (box[0].start, box[1].start, box[0].stop, box[1].stop)})
    found.sort(key=lambda comp: (-comp["score_u8"], comp["label"]))
    return [{k: v for k, v in comp.items() if k != "label"} for comp in found]


def _qualifies(row: int, col: int, window: int, lesion_union: np.ndarray, image: np.ndarray, floor: float) -> bool:
    """No lesion pixel inside the window and a pixel sum of at least ``floor`` (min_mean x max x window**2)."""
    if crop(lesion_union, row, col, window).any():
        return False
    return float(crop(image, row, col, window).sum(dtype=np.float64)) >= floor


def _inside(point: tuple[int, int], row: int, col: int, window: int) -> bool:
    return row <= point[0] < row + window and col <= point[1] < col + window


def _place(component: dict, window: int, lesion_union: np.ndarray, image: np.ndarray, floor: float,
           rng: np.random.Generator) -> tuple[int, int] | None:  # fmt: skip
    """A qualifying window for one component (centred first, then shifted centres), or None."""
    centre = bbox_centre(component["bbox"])
    row, col = place_window(centre, window, image.shape)
    if _qualifies(row, col, window, lesion_union, image, floor):
        return row, col
    limit = int(MINING_SHIFT * window)
    for dr, dc in rng.integers(-limit, limit, size=(MINING_TRIES, 2), endpoint=True):
        row, col = place_window((centre[0] + int(dr), centre[1] + int(dc)), window, image.shape)
        if _inside(component["peak"], row, col, window) and _qualifies(row, col, window, lesion_union, image, floor):
            return row, col
    return None


def mine_windows(prob_u8: np.ndarray, lesion_union: np.ndarray, image: np.ndarray, *, window: int, count: int,
                 min_prob: float, min_mean: float, rng: np.random.Generator) -> list[tuple[int, int]]:  # fmt: skip
    """Top-left corners of up to ``count`` lesion-free windows on the strongest false positives of one image.

    Parameters
    ----------
    prob_u8 : uint8 (rows, cols), a first-round prediction of a training image, ``round(p * 255)``
    lesion_union : bool (rows, cols), every lesion pixel of the image (all False for a normal image)
    image : (rows, cols), the image's raw intensities
    window : window side in full-resolution pixels (the plan's ``window_px``); must fit the image
    count : most windows to return (``train.hard_negatives.per_image``); 0 = none
    min_prob : false positives are components at or above this probability (``train.hard_negatives.min_prob``)
    min_mean : a window's mean must reach this fraction of the image maximum (the plan's ``negative_min_mean``)
    rng : generator for the shifted centres (seed it from the image id for determinism)

    Returns
    -------
    list of (row, col), full-image pixels, in the order of their components' scores (module docstring).
    """
    if prob_u8.shape != image.shape:
        raise ValueError(f"probability map {prob_u8.shape} and image {image.shape} differ in shape")
    rows, cols = image.shape
    if count <= 0 or window > rows or window > cols:
        return []
    floor = min_mean * float(image.max()) * window * window
    chosen: list[tuple[int, int]] = []
    for component in fp_components(prob_u8, lesion_union, min_prob):
        if any(_inside(component["peak"], r, c, window) for r, c in chosen):
            continue
        corner = _place(component, window, lesion_union, image, floor, rng)
        if corner is not None:
            chosen.append(corner)
            if len(chosen) == count:
                break
    return chosen


def mined_patches(image: np.ndarray, corners: Sequence[tuple[int, int]], roi: Mapping[str, str],
                  geometry: PatchGeometry) -> list[tuple[dict, np.ndarray, np.ndarray]]:  # fmt: skip
    """The shard rows of mined windows: (provenance row, image patch float32 (s, s), all-zero mask uint8 (s, s)).

    Stored as extraction stores its negatives (``copy_index`` -1, no lesion box, normalised as
    ``geometry.normalise`` says), named ``<image_id>_hard<k>``.
    """
    window, downscale, s = geometry.window_px, geometry.downscale, geometry.input_px
    intensity_range = intensity_range_for(image, geometry.normalise)
    image_id = roi["image_id"]
    rows = []
    for k, (r, c) in enumerate(corners):
        row = {
            "roi_id": f"{image_id}_hard{k}", "image_id": image_id, "patient_id": roi["patient_id"],
            "split": roi["split"], "abnormality_id": 0, "copy_index": -1, "crop_row": int(r), "crop_col": int(c),
            "crop_size": window, "shift_row": 0, "shift_col": 0, "downscale": downscale,
            "bbox_r0": -1, "bbox_c0": -1, "bbox_r1": -1, "bbox_c1": -1, "rois_in_window": "",
        }
        rows.append((row, preprocess_window(crop(image, r, c, window), downscale, intensity_range),
                     np.zeros((s, s), np.uint8)))
    return rows


# --------------------------------------------------------------------------------------------------------------
# stage
# --------------------------------------------------------------------------------------------------------------
def _prediction_files(predictions: str | Path | Sequence[str | Path]) -> dict[str, Path]:
    """``{image_id: path}`` of every ``{image_id}.prob.npz`` in the folder(s) given (the predict stage's chunks)."""
    folders = [predictions] if isinstance(predictions, (str, Path)) else list(predictions)
    found: dict[str, Path] = {}
    for folder in map(Path, folders):
        for path in sorted(folder.glob("*.prob.npz")):
            found[path.name[: -len(".prob.npz")]] = path
    return found


def _image_batches(groups: dict[str, list[dict]], base: Path, files: dict[str, Path], plan, settings, tables,
                   log):  # fmt: skip
    """Per training image, its mined patches (one list per image, for :func:`mammoseg.patches.shards.store_shard`)."""
    for image_id, rows in groups.items():
        if image_id not in files:
            tables.skip(f"{image_id}_hard", image_id, "not_predicted", "no probability map in the predictions")
            yield []
            continue
        image_path = base / rows[0]["image_path"]
        try:
            image = read_mammogram(image_path)
        except Exception as exc:  # noqa: BLE001 - one unreadable file is recorded, as extraction does
            tables.skip(f"{image_id}_hard", image_id, "unreadable_image", f"{image_path}: {type(exc).__name__}: {exc}")
            yield []
            continue
        prob, _ = load_prediction(files[image_id])
        if prob.shape != image.shape:
            tables.skip(f"{image_id}_hard", image_id, "prediction_size_mismatch",
                        f"{files[image_id]}: map {prob.shape} differs from image {image.shape} ({image_path})")
            yield []
            continue
        lesions = lesion_rows(rows)  # a normal image's row has no ROI (no mask)
        union = (image_lesions(image_path, image.shape, lesions, base, tables)[1] if lesions
                 else np.zeros(image.shape, dtype=bool))
        corners = mine_windows(prob, union, image, window=plan.window_px, count=int(settings["per_image"]),
                               min_prob=float(settings["min_prob"]), min_mean=plan.negative_min_mean,
                               rng=roi_rng(plan.seed, f"{image_id}#hard"))
        log(f"{image_id}: {len(corners)} hard negatives")
        yield mined_patches(image, corners, rows[0], plan.geometry)


def run_mine(plan: str | Path, manifest: str | Path, predictions_dir: str | Path | Sequence[str | Path],
             out_shard: str | Path, *, config: Mapping[str, Any], fold: int | None = None,
             splits: str | Path | None = None, training_splits: str | Path | None = None,
             log=print) -> dict[str, Any]:  # fmt: skip
    """Stage ``mine``: hard negatives of the training images of ``manifest`` into one extra shard.

    Parameters
    ----------
    plan : ``plan.json`` (window, downscale, ``negative_min_mean``, seed)
    manifest : the restructured training manifest (rows with ``split == 'train'`` are mined; a row without
        ``roi_id`` is a normal image, mined with no lesion)
    predictions_dir : a folder, or several (the predict stage's chunk folders), holding ``{image_id}.prob.npz``
        of first-round predictions of those images; an image without one is recorded as skipped
    fold, splits : with cross-validation, mine only the images fold ``fold``'s model is fit on (patients outside
        fold ``fold`` in ``splits.json``), from that model's own maps (image set ``fit-<fold>``): the shard then
        trains fold ``fold`` of the second round, and nothing of its validation patients (not their images, not
        a model that saw them) decides which windows it gets
    training_splits : the ``splits.json`` the second round trains by; it must deal the patients as ``splits``
        does (both follow from the same manifest, ``train.folds`` and ``train.seed``; checked, not assumed)
    out_shard : the shard to write (layout of :mod:`mammoseg.patches.shards`, ``config_hash`` = the plan's
        patches key, plus the root attribute ``hard_negatives`` = the settings as JSON)
    config : the resolved configuration (its ``train.hard_negatives`` and ``patches`` storage filters are read)

    Returns
    -------
    dict with ``path``, ``n_images``, ``n_patches``, ``n_skipped``, ``skipped_reasons`` and ``seconds``.
    """
    started = time.perf_counter()
    p = read_plan(plan)
    settings = config["train"]["hard_negatives"]
    manifest = Path(manifest)
    rows = sorted((row for row in read_manifest(manifest) if row["split"] == "train"),
                  key=lambda row: (row["image_id"], row["roi_id"]))
    if fold is not None:
        fold_of = read_splits(splits).fold_of
        if training_splits is not None and read_splits(training_splits).fold_of != fold_of:
            raise InputError(f"{training_splits}: deals the patients into folds unlike {splits}, whose models chose "
                             f"the windows; delete both and rerun")
        rows = [row for row in rows if fit_on(fold_of, row["patient_id"], fold)]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["image_id"], []).append(row)
    params = PatchParams(p.n, p.downscale, n_shifted=0, max_shift=0.0, seed=p.seed, n_negative=0,
                         negative_min_mean=p.negative_min_mean, n_normal=0, normalise=p.normalise)
    tables = PatchTables()
    batches = _image_batches(groups, manifest.resolve().parent, _prediction_files(predictions_dir), p, settings,
                             tables, log)
    stored = store_shard(out_shard, batches, params=params, tables=tables,
                         max_patches=len(groups) * int(settings["per_image"]), config_hash=p.patches_key,
                         shard_index=0, n_shards=1, compression=config["patches"]["compression"],
                         image_compression=config["patches"]["image_compression"],
                         extra_attrs={"hard_negatives": json.dumps(dict(settings), sort_keys=True)})
    summary = {"path": str(out_shard), "n_images": len(groups), **stored,
               "seconds": round(time.perf_counter() - started, 3)}
    print(f"mine: {summary['n_patches']} hard negatives from {len(groups)} training images"
          + (f" of fold {fold}'s model" if fold is not None else "") + f", {summary['n_skipped']} skipped "
          f"{summary['skipped_reasons']} ({summary['seconds']} s) -> {out_shard}")
    return summary
