"""Stage ``train``: fit the U-Net on patch shards with Keras' own callbacks, resumably, and write the model folder.

Outputs in ``out_dir`` (``results/models/<name>/``, one folder per fold), each written atomically:
``best.keras`` (the model with optimizer state after the epoch with the best monitored Dice), ``last.keras``
(the model after the last epoch run), ``history.csv`` (one row per epoch, :data:`HISTORY_COLUMNS`),
``curves.png`` (loss, accuracy and Dice, training vs validation, like the paper's figures 4 and 5),
``tensorboard/`` (epoch scalars) and ``report.json`` (written last).

Training is ``model.fit`` with stock Keras callbacks, built in :func:`make_callbacks`: ``LearningRateScheduler``
over ``keras.optimizers.schedules.CosineDecay`` (``lr_schedule: cosine``: the rate of epoch e, counted from 1, is
``lr * (1 + cos(pi * (e - 1) / epochs)) / 2``), ``ReduceLROnPlateau`` (``lr_schedule: plateau``), ``EarlyStopping``,
``ModelCheckpoint(save_best_only=True)``, ``TensorBoard`` and ``BackupAndRestore``; the monitored quantity
(:func:`monitor_of`, ``train.monitor``) is the validation Dice (``val_dice``, the mean over patches, maximised),
the pooled validation Dice (``val_pooled_dice``, over all pixels of all patches, maximised) or the validation
loss (``val_loss``, minimised); the training quantity when there is no validation set. With many lesion-free
patches the mean Dice rewards a model that predicts nothing (an empty answer on an empty patch scores 1), so
its best epoch can be an early, under-confident one; the pooled Dice does not.

Resume
------
``out_dir/_resume/`` is deliberately not a declared output, so Snakemake does not delete it when a job fails or
is retried. It holds ``backup/`` (``BackupAndRestore``: model weights, optimizer variables including the learning
rate, the iteration count and the mixed-precision loss scale, and the epoch number), ``best-<epoch>.keras``
(``ModelCheckpoint``), ``tensorboard/``, ``last.keras`` once ``fit`` has returned, and ``state.json``.

``BackupAndRestore`` alone cannot resume this training, so :class:`ResumeState` adds what it lacks:

* the state of the other callbacks: ``EarlyStopping`` and ``ReduceLROnPlateau`` reset their ``wait`` and
  ``best`` in ``on_train_begin``, and ``ModelCheckpoint.best`` starts empty, so the first resumed epoch would
  overwrite the best model with a worse one (keras-team/keras#17012, open);
* the history (one row per epoch, each epoch once) and the accumulated wall time;
* atomicity: ``BackupAndRestore`` overwrites its weights file, then its metadata file, in place. A ``kill -9``
  during the weights write leaves a half-written file, one in between the weights of epoch e+1 with the epoch
  number e (one epoch trained twice), one during the metadata write a truncated JSON file that stops every rerun.

``state.json`` is written atomically after the backup of each epoch and is the commit point: it records the
epoch, the history, the callbacks' counters and the SHA-256 of the backup's weights file. Before a rerun's
``fit``, :func:`reconcile_backup` makes the backup folder agree with it: the weights file if its hash matches,
else ``BackupAndRestore``'s previous copy (``double_checkpoint=True``) if that matches, and the epoch number
rewritten from ``state.json``; if neither matches, or the config hash (config sections, data, fold) differs,
training starts afresh. A rerun therefore continues after the last committed epoch and ends with the same
number of epochs; only the order in which batches are shuffled differs from an uninterrupted run.
``_resume/`` is removed after a successful run, so a later rerun with changed data retrains. TensorBoard's
event files are appended to, not committed: a kill between an epoch's scalars and its commit leaves that epoch's
points twice in ``tensorboard/`` (``history.csv`` is the record).

The split
---------
``folds: 1``: ``split_by: patient`` (default): patients are shuffled with ``seed`` and ``round(val_fraction *
n_patients)`` (at least 1) go to validation. Every patch of a patient, hence every shifted copy of each of its
lesions, lies on one side only, so the validation figures are honest. ``split_by: sample``: the paper's split of
its 6,265 augmented samples: patches are shuffled individually, so the five copies of one lesion (and other
lesions of the same patient) land on both sides, and validation figures are optimistic. For reproduction only.
``folds: k > 1``: k-fold cross-validation by patient (:func:`mammoseg.model.folds.assign_folds`): fold f trains
on the other folds' patients and validates on fold f's; ``val_fraction`` is not used.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mammoseg import __version__
from mammoseg.config import section_hash, validate_config
from mammoseg.config.plan import Plan, patch_geometry, read_plan
from mammoseg.errors import InputError
from mammoseg.io.atomic import atomic_path, write_csv_atomic, write_json_atomic, write_text_atomic
from mammoseg.io.checksum import sha256_of
from mammoseg.model.dataset import make_dataset, read_provenance, shards_normalisation
from mammoseg.model.folds import assign_folds, read_splits
from mammoseg.model.unet import build_unet, model_kwargs, parameter_counts

__all__ = [
    "split_train_val",
    "split_by_fold",
    "split_for_fold",
    "run_identity",
    "mask_pixel_counts",
    "configure_runtime",
    "prepare_data",
    "build_model",
    "make_callbacks",
    "monitor_of",
    "make_resume_callback",
    "open_resume_state",
    "fit",
    "export_outputs",
    "reconcile_backup",
    "train_model",
    "run_train",
    "HISTORY_COLUMNS",
]

RESUME_DIR = "_resume"
STATE_FILE = "state.json"
BACKUP_DIR = "backup"
TENSORBOARD_DIR = "tensorboard"
LAST_FILE = "last.keras"
BEST_TEMPLATE = "best-{epoch:03d}.keras"  # ModelCheckpoint's file name pattern; epoch counted from 1
BEST_GLOB = "best-*.keras"  # every file BEST_TEMPLATE names
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "dice", "iou", "pooled_dice", "val_loss", "val_accuracy", "val_dice",
                   "val_iou", "val_pooled_dice", "learning_rate", "seconds")
PLATEAU_FACTOR = 0.5  # learning rate multiplier when the monitored Dice stalls
MIN_LEARNING_RATE = 1e-6


def _log(message: str) -> None:
    """One line on stdout, flushed, so the Snakemake log shows progress while the job runs."""
    print(f"[mammoseg train] {message}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Data: split, class balance, identity
# --------------------------------------------------------------------------------------------------------------


def split_train_val(provenance, val_fraction: float, split_by: str = "patient", seed: int = 0):
    """Split the training patches into training and validation rows (the ``folds: 1`` split).

    Parameters
    ----------
    provenance : pandas.DataFrame, one row per patch, with at least ``patient_id`` and ``roi_id``.
    val_fraction : fraction of patients (``patient``) or patches (``sample``) for validation; 0 = none.
    split_by : ``"patient"`` (no patient, hence no lesion copy, on both sides) or ``"sample"`` (the paper's
        leaky split of the augmented patches).
    seed : shuffling seed.

    Returns
    -------
    (train, val) : two DataFrames, a partition of ``provenance`` (original index kept).
    """
    if split_by not in ("patient", "sample"):
        raise ValueError(f"split_by must be 'patient' or 'sample', got {split_by!r}")
    if len(provenance) == 0:
        raise ValueError("no training patches: the shards hold no rows with split == 'train'")
    rng = np.random.default_rng(seed)
    if val_fraction <= 0:
        return provenance, provenance.iloc[0:0]
    if split_by == "sample":
        order = rng.permutation(len(provenance))
        n_val = max(1, int(round(val_fraction * len(provenance))))
        if n_val >= len(provenance):
            raise ValueError(f"val_fraction {val_fraction} leaves no training sample of {len(provenance)}")
        is_val = np.zeros(len(provenance), dtype=bool)
        is_val[order[:n_val]] = True
        return provenance[~is_val], provenance[is_val]
    patients = np.array(sorted(provenance["patient_id"].astype(str).unique()))
    if len(patients) < 2:
        raise ValueError(f"a patient split needs at least 2 patients, the training patches have {len(patients)}")
    n_val = min(len(patients) - 1, max(1, int(round(val_fraction * len(patients)))))
    val_patients = set(rng.permutation(patients)[:n_val])
    is_val = provenance["patient_id"].astype(str).isin(val_patients).to_numpy()
    return provenance[~is_val], provenance[is_val]


def split_by_fold(provenance, folds: int, fold: int, seed: int, fold_of: dict[str, int] | None = None):
    """Training and validation rows of fold ``fold`` of a k-fold split by patient.

    Parameters
    ----------
    provenance : pandas.DataFrame, one row per patch, with ``patient_id``.
    folds : k >= 2; fold : 0..k-1; seed : permutes the patients (:func:`mammoseg.model.folds.assign_folds`).
    fold_of : the workflow's splits ({patient: fold}, ``splits.json`` over every training patient); without it
        the patients of ``provenance`` are dealt here (the same function, but over the patients with patches).

    Returns
    -------
    (train, val) : the patches of the other folds' patients and those of fold ``fold``'s patients.
    """
    patient = provenance["patient_id"].astype(str)
    assignment = fold_of if fold_of is not None else assign_folds(patient, folds, seed)
    unknown = sorted(set(patient) - set(assignment))
    if unknown:
        raise InputError(f"the splits give no fold to patient(s) {', '.join(unknown[:5])}: they were written for "
                         "another training manifest")
    is_val = (patient.map(assignment) == fold).to_numpy()
    return provenance[~is_val], provenance[is_val]


def split_for_fold(provenance, train_cfg: dict[str, Any], fold: int, fold_of: dict[str, int] | None = None):
    """The split of one training run: ``split_train_val`` for ``folds: 1``, ``split_by_fold`` otherwise.

    Parameters
    ----------
    provenance : the ``split == 'train'`` patches (DataFrame with ``patient_id``, ``roi_id``).
    train_cfg : the validated ``train`` section (``folds``, ``val_fraction``, ``split_by``, ``seed``).
    fold : 0..folds-1.
    """
    folds = train_cfg["folds"]
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1} for train.folds = {folds}, got {fold}")
    if folds == 1:
        return split_train_val(provenance, train_cfg["val_fraction"], train_cfg["split_by"], train_cfg["seed"])
    if train_cfg["split_by"] != "patient":
        raise ValueError(f"train.folds = {folds} splits by patient; train.split_by: {train_cfg['split_by']} "
                         "is only for folds: 1")
    return split_by_fold(provenance, folds, fold, train_cfg["seed"], fold_of)


def mask_pixel_counts(rows) -> tuple[int, int]:
    """Background (black) and lesion (white) pixel counts over the masks of ``rows``.

    Parameters
    ----------
    rows : DataFrame with ``shard_path`` and ``row`` (index into the shard's ``masks`` dataset).

    Returns
    -------
    (n_black, n_white) : ints, pixels of value 0 and of value 1.
    """
    import h5py

    n_black = n_white = 0
    for shard_path, group in rows.groupby("shard_path", sort=True):
        indices = np.sort(group["row"].to_numpy(dtype=np.int64))
        try:
            with h5py.File(shard_path, "r") as h5:
                masks = h5["masks"]
                for index in indices:  # one patch at a time: bounded memory on shards of any size
                    mask = masks[int(index)]
                    white = int(np.count_nonzero(mask))
                    n_white += white
                    n_black += mask.size - white
        except (OSError, KeyError) as exc:
            raise InputError(f"{shard_path}: cannot read masks: {exc}") from exc
    return n_black, n_white


def run_identity(model_cfg: dict, train_cfg: dict, patch_cfg: dict, data_fingerprint: str, fold: int) -> str:
    """The config hash of a training run (``report.json``, ``state.json``): a resumed run must match it.

    Covers the validated ``model``, ``train`` and ``patches`` sections, the training data and the fold, so an
    interrupted run of another fold (or config, or data) in the same folder is never continued.
    """
    return section_hash(model_cfg, train_cfg, patch_cfg, data_fingerprint, {"fold": fold})


def _data_fingerprint(provenance) -> str:
    """A cheap identity of the training data (which patches of which shards) for the resume hash."""
    ids = sorted(f"{Path(str(p)).name}:{r}:{roi}" for p, r, roi in
                 zip(provenance["shard_path"], provenance["row"], provenance["roi_id"]))
    return section_hash(ids)


@dataclass(frozen=True)
class TrainingData:
    """The patches of one training run (DataFrames of ``read_provenance`` rows) and their class balance."""

    shard_paths: list[str]
    train_rows: Any
    val_rows: Any
    n_black: int  # background pixels of the training masks
    n_white: int  # lesion pixels of the training masks
    fingerprint: str  # identity of every ``split == 'train'`` patch, for the resume hash
    normalise: str  # how the shards normalised their patches (``patches.normalise``), which augmentation keeps

    @property
    def pos_weight(self) -> float | None:
        """``n_black / n_white`` (the paper's class balance, :mod:`mammoseg.model.losses`); None without lesions."""
        return self.n_black / self.n_white if self.n_white else None


def prepare_data(shard_paths: Sequence[str | Path], train_cfg: dict[str, Any], fold: int,
                 fold_of: dict[str, int] | None = None) -> TrainingData:
    """Read the shards' provenance, keep the ``split == 'train'`` patches, split them, count mask pixels."""
    shard_paths = [str(p) for p in shard_paths]
    if not shard_paths:
        raise ValueError("train: no shard files given")
    provenance = read_provenance(shard_paths)
    if "split" in provenance.columns:
        provenance = provenance[provenance["split"].astype(str) == "train"]
    train_rows, val_rows = split_for_fold(provenance, train_cfg, fold, fold_of)
    n_black, n_white = mask_pixel_counts(train_rows)
    return TrainingData(shard_paths, train_rows, val_rows, n_black, n_white, _data_fingerprint(provenance),
                        shards_normalisation(shard_paths))


# --------------------------------------------------------------------------------------------------------------
# Runtime: device, precision, strategy, seeds
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    strategy: Any
    device: str
    n_gpus: int
    mixed_precision: bool
    cuda_visible_devices: str | None
    jit_compile: bool  # XLA for the training step: train.jit_compile, unless op determinism rules it out


def op_determinism_enabled() -> bool:
    """Whether TensorFlow's op determinism is on in this process (a process-wide switch)."""
    from tensorflow.python.framework.config import is_op_determinism_enabled  # what Keras itself reads

    return bool(is_op_determinism_enabled())


def set_op_determinism(enabled: bool) -> None:
    """Turn TensorFlow's process-wide op determinism on or off (a second training in the same process must not
    inherit the first one's setting: it would also silently lose XLA)."""
    import tensorflow as tf
    from tensorflow.python.framework.config import disable_op_determinism

    if enabled:
        tf.config.experimental.enable_op_determinism()
    else:
        disable_op_determinism()


def configure_runtime(train_cfg: dict[str, Any]) -> Runtime:
    """Seeds, op determinism, precision policy and distribution strategy from the validated ``train`` section.

    TensorFlow only sees the GPUs listed in ``CUDA_VISIBLE_DEVICES`` (Snakemake's ``gpu`` resource and SLURM set
    it); several visible GPUs use ``MirroredStrategy``, one GPU or the CPU the default strategy. Mixed precision
    (``mixed_float16``) is used with ``auto`` when a GPU is visible, always with ``on``, never with ``off``.
    Op determinism is set as ``train.deterministic`` says (a process-wide switch: :func:`train_model` restores it
    afterwards). XLA (``train.jit_compile``) only without op determinism: Keras refuses XLA under it (not every
    XLA kernel is deterministic), so ``train.deterministic`` wins.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(train_cfg["seed"])
    set_op_determinism(train_cfg["deterministic"])
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:  # share the GPU politely with other jobs instead of grabbing all its memory
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
    mode = train_cfg["mixed_precision"]
    mixed = mode == "on" or (mode == "auto" and bool(gpus))
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if gpus:
        names = []
        for gpu in gpus:
            try:
                names.append(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
            except (RuntimeError, ValueError):
                names.append(gpu.name)
        device = f"GPU x{len(gpus)}: " + ", ".join(names)
    else:
        device = f"CPU ({os.cpu_count()} logical cores visible)"
    jit_compile = train_cfg["jit_compile"] and not op_determinism_enabled()
    return Runtime(strategy, device, len(gpus), mixed, os.environ.get("CUDA_VISIBLE_DEVICES"), jit_compile)


# --------------------------------------------------------------------------------------------------------------
# Resume state
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What ``BackupAndRestore`` does not keep (``_resume/state.json``); see the module docstring, "Resume"."""

    config_hash: str
    epochs_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch, HISTORY_COLUMNS
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)  # {callback: {attribute: value}}
    best_epoch: int = 0  # epoch (from 1) of the ModelCheckpoint file best-<epoch>.keras
    stopped_early: bool = False
    finished: bool = False  # fit returned and last.keras is written
    backup_sha256: str = ""  # of BackupAndRestore's weights file after epoch ``epochs_done``
    parameters: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    run_starts: list[int] = field(default_factory=list)  # epochs_done at the start of each (re)run

    @classmethod
    def load(cls, resume_dir: Path, config_hash: str) -> "TrainState | None":
        """The saved state if it belongs to ``config_hash`` and its model files exist, else None (start afresh)."""
        path = resume_dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            _log(f"ignoring unreadable resume state {path}: {exc}")
            return None
        if state.config_hash != config_hash:
            _log(f"config hash changed ({state.config_hash} -> {config_hash}): starting afresh")
            return None
        needed = [BEST_TEMPLATE.format(epoch=state.best_epoch)] + ([LAST_FILE] if state.finished else [])
        missing = [name for name in needed if not (resume_dir / name).is_file()]
        if missing:
            _log(f"resume state names missing file(s) {missing} in {resume_dir}: starting afresh")
            return None
        return state

    def save(self, resume_dir: Path) -> None:
        """The commit point: everything the state names is on disk before this atomic write."""
        write_json_atomic(resume_dir / STATE_FILE, asdict(self))


def _backup_files(backup) -> tuple[Path, Path, Path]:
    """(weights, previous weights, metadata) files of a ``keras.callbacks.BackupAndRestore``.

    They are private attributes of Keras 3's implementation (``latest.weights.h5``, its ``.bkp`` copy kept with
    ``double_checkpoint=True``, ``training_metadata.json`` = ``{"epoch": completed epochs, "batch": 0}``);
    this is the only place that names them. The kill -9 test fails if Keras changes them.
    """
    return Path(backup._weights_path), Path(backup._prev_weights_path), Path(backup._training_metadata_path)


def reconcile_backup(state: TrainState, backup) -> bool:
    """Make ``backup``'s files agree with ``state`` (the commit point) before ``fit`` restores from them.

    The weights file is kept if its SHA-256 is the committed one, else replaced by the previous copy if that
    one's is; the epoch number is rewritten from ``state``. Returns False if neither file matches (start afresh).
    """
    weights, previous, metadata = _backup_files(backup)
    if not (weights.is_file() and sha256_of(weights) == state.backup_sha256):
        if not (previous.is_file() and sha256_of(previous) == state.backup_sha256):
            return False
        _log(f"the backup of epoch {state.epochs_done + 1} was interrupted: restoring that of epoch "
             f"{state.epochs_done}")
        with atomic_path(weights) as tmp:
            shutil.copyfile(previous, tmp)
    write_text_atomic(metadata, json.dumps({"epoch": state.epochs_done, "batch": 0}))
    return True


def _clear(folder: Path) -> None:
    for stale in folder.iterdir():
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


# --------------------------------------------------------------------------------------------------------------
# Model and callbacks
# --------------------------------------------------------------------------------------------------------------


def build_model(model_cfg: dict[str, Any], side: int, loss, learning_rate: float, jit_compile: bool = False):
    """The configured U-Net for ``side`` x ``side`` x 1 float32 inputs, compiled with Adam, ``loss`` and the
    accuracy/Dice/IoU metrics (history keys ``accuracy``, ``dice``, ``iou``); ``jit_compile``: the training and
    validation steps compiled by XLA."""
    import keras

    from mammoseg.model.losses import get_metrics

    model = build_unet((side, side, 1), **model_kwargs(model_cfg))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate), loss=loss, metrics=get_metrics(),
                  jit_compile=jit_compile)
    return model


def plateau_patience(early_stopping_patience: int) -> int:
    """Epochs without a better Dice before ``ReduceLROnPlateau`` halves the rate: half the early-stopping
    patience (at least 2), so the rate is cut before training stops; 5 when early stopping is off."""
    return max(2, early_stopping_patience // 2) if early_stopping_patience else 5


#: ``train.monitor`` -> (history key, Keras mode) of the quantity that selects the best epoch.
MONITORS = {"dice": ("dice", "max"), "pooled_dice": ("pooled_dice", "max"), "loss": ("loss", "min")}


def monitor_of(train_cfg: dict[str, Any], has_validation: bool) -> tuple[str, str]:
    """(quantity, mode) watched by checkpointing, early stopping and the plateau schedule: ``train.monitor`` on
    the validation patches (``val_`` prefix), on the training patches when there is no validation set.
    ``train_cfg``: the validated ``train`` section (its default ``monitor`` is the schema's)."""
    key, mode = MONITORS[train_cfg["monitor"]]
    return ("val_" + key if has_validation else key), mode


def make_callbacks(train_cfg: dict[str, Any], monitor: str, resume_dir: Path, mode: str = "max") -> dict[str, Any]:
    """The stock Keras callbacks of a training run, by name, in the order ``fit`` must call them.

    Order matters at the end of an epoch: ``TensorBoard`` logs the rate the epoch used before
    ``ReduceLROnPlateau`` cuts it; ``BackupAndRestore`` saves after the cut, so a resumed run gets the cut rate.
    :class:`ResumeState` goes after all of them.
    """
    import importlib.util

    import keras

    if importlib.util.find_spec("tensorboard") is None:  # fail now, not at the end of the first epoch
        raise ImportError("training writes tensorboard/ with Keras' TensorBoard callback, which needs the "
                          "tensorboard package: pip install tensorboard (included in mammoseg[tf] and [gpu])")
    epochs = train_cfg["epochs"]
    patience = train_cfg["early_stopping_patience"]
    callbacks: dict[str, Any] = {}
    if train_cfg["lr_schedule"] == "cosine":
        cosine = keras.optimizers.schedules.CosineDecay(train_cfg["learning_rate"], decay_steps=epochs)
        callbacks["cosine"] = keras.callbacks.LearningRateScheduler(
            lambda epoch, _rate: float(cosine(epoch)))
    callbacks["tensorboard"] = keras.callbacks.TensorBoard(resume_dir / TENSORBOARD_DIR, write_graph=False)
    if patience:
        callbacks["early_stopping"] = keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience)
    if train_cfg["lr_schedule"] == "plateau":
        callbacks["plateau"] = keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, mode=mode, factor=PLATEAU_FACTOR, patience=plateau_patience(patience),
            min_delta=0.0, min_lr=MIN_LEARNING_RATE)
    callbacks["best_checkpoint"] = keras.callbacks.ModelCheckpoint(
        resume_dir / BEST_TEMPLATE, monitor=monitor, mode=mode, save_best_only=True)
    callbacks["backup"] = keras.callbacks.BackupAndRestore(
        resume_dir / BACKUP_DIR, double_checkpoint=True, delete_checkpoint=False)
    return callbacks


#: The counters of the stock callbacks that their ``on_train_begin`` resets (or that start empty) and that a
#: resumed run must continue from.
RESUMED_ATTRIBUTES = {
    "early_stopping": ("wait", "best"),
    "plateau": ("wait", "best", "cooldown_counter"),
    "best_checkpoint": ("best",),
}


def _plain(value: Any) -> Any:
    """A callback counter as a JSON value (Keras keeps metric values as Python or NumPy floats)."""
    return value if value is None or isinstance(value, int) else float(value)


def _counters(resumed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{callback name: {attribute: value}} of the :data:`RESUMED_ATTRIBUTES` of ``resumed`` callbacks."""
    return {name: {attribute: _plain(getattr(callback, attribute)) for attribute in RESUMED_ATTRIBUTES[name]}
            for name, callback in resumed.items()}


def _history_row(epoch: int, logs: dict[str, Any], learning_rate: float, seconds: float) -> dict[str, float]:
    """One ``history.csv`` row: the epoch counted from 1, Keras' logs, the rate the epoch ran with, its time."""
    metrics = {key: float(logs[key]) for key in HISTORY_COLUMNS[1:-2] if key in logs}
    return {"epoch": epoch + 1, **metrics, "learning_rate": learning_rate, "seconds": seconds}


def _remove_stale_best_files(resume_dir: Path, best_epoch: int) -> None:
    """Keep only ModelCheckpoint's file of the committed best epoch (older ones, or one cut short by a kill)."""
    keep = BEST_TEMPLATE.format(epoch=best_epoch)
    for path in resume_dir.glob(BEST_GLOB):
        if path.name != keep:
            path.unlink()


def _epoch_line(row: dict[str, float], epochs: int, improved: bool, stopped_early: bool) -> str:
    shown = " ".join(f"{key}={row[key]:.4f}" for key in HISTORY_COLUMNS[1:-2] if key in row)
    return (f"epoch {row['epoch']}/{epochs} {shown} lr={row['learning_rate']:.3g} {row['seconds']:.1f}s"
            + (" *best*" if improved else "") + (" early stop" if stopped_early else ""))


def make_resume_callback(state: TrainState, resume_dir: Path, callbacks: dict[str, Any], epochs: int):
    """:class:`ResumeState` for the callbacks of :func:`make_callbacks`; it must come after all of them."""
    import keras

    weights_file = _backup_files(callbacks["backup"])[0]
    checkpoint = callbacks["best_checkpoint"]
    resumed = {name: callbacks[name] for name in RESUMED_ATTRIBUTES if name in callbacks}

    class ResumeState(keras.callbacks.Callback):
        """Restores the other callbacks' counters, records each epoch and commits ``state.json`` after its
        backup; writes ``last.keras`` when ``fit`` ends."""

        def on_train_begin(self, logs=None):
            for name, callback in resumed.items():  # after their own on_train_begin has reset them
                for attribute, value in state.callbacks.get(name, {}).items():
                    setattr(callback, attribute, value)

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()
            self.learning_rate = float(self.model.optimizer.learning_rate)  # as set by a schedule for this epoch
            self.best_before = checkpoint.best

        def on_epoch_end(self, epoch, logs=None):
            row = _history_row(epoch, logs or {}, self.learning_rate, time.perf_counter() - self.started)
            improved = checkpoint.best is not self.best_before  # ModelCheckpoint assigns `best` iff it saves
            if improved:
                state.best_epoch = epoch + 1
            state.history.append(row)
            state.epochs_done = epoch + 1
            state.wall_seconds += row["seconds"]
            state.stopped_early = bool(self.model.stop_training)
            state.callbacks = _counters(resumed)
            state.backup_sha256 = sha256_of(weights_file)
            state.save(resume_dir)
            _remove_stale_best_files(resume_dir, state.best_epoch)
            _log(_epoch_line(row, epochs, improved, state.stopped_early))

        def on_train_end(self, logs=None):
            with atomic_path(resume_dir / LAST_FILE) as tmp:
                self.model.save(tmp)
            state.finished = True
            state.save(resume_dir)

    return ResumeState()


# --------------------------------------------------------------------------------------------------------------
# Final outputs
# --------------------------------------------------------------------------------------------------------------


def _history_frame(history: Sequence[dict[str, float]]):
    import pandas as pd

    frame = pd.DataFrame(list(history))
    return frame.reindex(columns=[c for c in HISTORY_COLUMNS if c in frame.columns])


def plot_curves(history: Sequence[dict[str, float]], out_png: Path, title: str = "") -> None:
    """Loss, accuracy and Dice per epoch, training vs validation (the paper's figures 4 and 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = _history_frame(history)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("loss", "accuracy", "dice"), ("loss", "accuracy", "Dice (threshold 0.5)")):
        ax.plot(frame["epoch"], frame[key], label="training", color="tab:blue")
        if f"val_{key}" in frame:
            ax.plot(frame["epoch"], frame[f"val_{key}"], label="validation", color="tab:orange")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _copy_file_atomic(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def _copy_dir_atomic(source: Path, target: Path) -> None:
    """Copy a folder to ``target`` under a temporary name, then swap it in."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    shutil.rmtree(tmp)
    if source.is_dir():
        shutil.copytree(source, tmp)
    else:
        tmp.mkdir()
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _versions() -> dict[str, str]:
    import h5py
    import keras
    import tensorflow as tf

    return {"mammoseg": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "h5py": h5py.__version__, "python": sys.version.split()[0]}


def export_outputs(out_dir: Path, resume_dir: Path, state: TrainState, report: dict[str, Any], title: str) -> None:
    """Write the model folder from a finished ``_resume/`` (``report.json`` last), then remove ``_resume/``."""
    _copy_file_atomic(resume_dir / BEST_TEMPLATE.format(epoch=state.best_epoch), out_dir / "best.keras")
    _copy_file_atomic(resume_dir / LAST_FILE, out_dir / "last.keras")
    write_csv_atomic(out_dir / "history.csv", _history_frame(state.history))
    plot_curves(state.history, out_dir / "curves.png", title=title)
    _copy_dir_atomic(resume_dir / TENSORBOARD_DIR, out_dir / TENSORBOARD_DIR)
    write_json_atomic(out_dir / "report.json", report)
    shutil.rmtree(resume_dir)  # done: a later rerun (e.g. with new data) must train afresh


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def _validated_sections(model_cfg, train_cfg, patch_cfg) -> tuple[dict, dict, dict]:
    """The three sections with every default of the schema filled in (the schema is the only place of defaults)."""
    config = validate_config({"model": dict(model_cfg), "train": dict(train_cfg), "patches": dict(patch_cfg)})
    return config["model"], config["train"], config["patches"]


def open_resume_state(resume_dir: Path, config_hash: str, backup) -> TrainState:
    """The committed state of an interrupted run of this config (its backup reconciled), or a fresh one."""
    state = TrainState.load(resume_dir, config_hash)
    if state is not None and not state.finished and state.epochs_done and not reconcile_backup(state, backup):
        _log(f"no backup in {resume_dir} matches the state of epoch {state.epochs_done}: starting afresh")
        state = None
    if state is None:
        _clear(resume_dir)  # a snapshot of another config, data or fold, or an unusable one
        state = TrainState(config_hash=config_hash)
    elif state.finished:
        _log(f"training already finished ({state.epochs_done} epochs): writing the outputs")
    else:
        _log(f"resuming after epoch {state.epochs_done} from {resume_dir / BACKUP_DIR}")
    state.run_starts.append(state.epochs_done)
    return state


def _compiled_model(model_cfg: dict[str, Any], train_cfg: dict[str, Any], side: int, data: TrainingData,
                    runtime: Runtime):
    """The U-Net with the configured loss (class-balanced by ``data`` for ``weighted_bce``), in the strategy's
    scope; its weights are those of a fresh run until ``BackupAndRestore`` restores the backup in ``fit``."""
    from mammoseg.model.losses import get_loss

    loss_name = train_cfg["loss"]
    loss = get_loss(loss_name, data.pos_weight if loss_name == "weighted_bce" else None)
    with runtime.strategy.scope():
        return build_model(model_cfg, side, loss, train_cfg["learning_rate"], runtime.jit_compile)


def training_datasets(data: TrainingData, train_cfg: dict[str, Any], epochs_done: int):
    """(training batches, validation batches or None) of one run; only training batches are shuffled and
    augmented (``train.augment``), both seeded by ``train.seed`` plus the epochs already done (a resumed run does
    not replay the first run's batch order)."""
    batch_size = train_cfg["batch_size"]
    train_ds = make_dataset(data.shard_paths, data.train_rows, batch_size, shuffle=True,
                            seed=train_cfg["seed"] + epochs_done, repeat=False, augment=train_cfg["augment"],
                            normalise=data.normalise)
    val_ds = (make_dataset(data.shard_paths, data.val_rows, batch_size, shuffle=False, seed=0, repeat=False)
              if len(data.val_rows) else None)
    return train_ds, val_ds


def fit(model, data: TrainingData, state: TrainState, callbacks: dict[str, Any], train_cfg: dict[str, Any],
        resume_dir: Path) -> None:
    """``model.fit`` from the epoch after ``state.epochs_done`` to the last planned epoch, updating ``state``.

    With early stopping already decided, no epoch runs and only ``on_train_end`` (which writes ``last.keras``)
    does.
    """
    state.parameters = parameter_counts(model)
    epochs, batch_size = train_cfg["epochs"], train_cfg["batch_size"]
    train_ds, val_ds = training_datasets(data, train_cfg, state.epochs_done)
    fit_until = state.epochs_done if state.stopped_early else epochs
    _log(f"training epochs {state.epochs_done + 1}..{fit_until}, batch size {batch_size}, "
         f"monitor {callbacks['best_checkpoint'].monitor}")
    resume = make_resume_callback(state, resume_dir, callbacks, epochs)
    model.fit(train_ds, validation_data=val_ds, epochs=fit_until, callbacks=[*callbacks.values(), resume],
              verbose=0, shuffle=False)  # the dataset shuffles itself; BackupAndRestore sets the initial epoch


def train_model(shard_paths: Sequence[str | Path], out_dir: str | Path, *, model_cfg: dict[str, Any],
                train_cfg: dict[str, Any], patch_cfg: dict[str, Any], fold: int = 0, plan: Plan | None = None,
                fold_of: dict[str, int] | None = None) -> dict[str, Any]:
    """Train (or resume training) a U-Net on the ``split == 'train'`` patches of ``shard_paths``.

    Parameters
    ----------
    shard_paths : HDF5 patch shards (``images`` float32 (N, s, s), ``masks`` uint8 (N, s, s), ``provenance/``).
    out_dir : the model folder, ``results/models/<name>/`` (one per fold).
    model_cfg, train_cfg, patch_cfg : the ``model``, ``train`` and ``patches`` config sections; keys left out
        take the schema's defaults.
    fold : which fold validates (0..``train.folds`` - 1); 0 for ``folds: 1``.
    plan : the plan the shards were cut by (``plan.json``): the network input side comes from it; without one it
        is derived from ``patch_cfg`` by the same function (:func:`mammoseg.config.plan.patch_geometry`).
    fold_of : the workflow's splits ({patient: fold}, ``splits.json``) for ``folds`` > 1.

    Returns
    -------
    dict : the content of ``report.json``.
    """
    import keras

    from mammoseg.model import losses  # noqa: F401 - registers the custom objects for saving and loading
    model_cfg, train_cfg, patch_cfg = _validated_sections(model_cfg, train_cfg, patch_cfg)
    out_dir = Path(out_dir)
    resume_dir = out_dir / RESUME_DIR
    resume_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(shard_paths, train_cfg, fold, fold_of)
    config_hash = run_identity(model_cfg, train_cfg, patch_cfg, data.fingerprint, fold)
    geometry = plan.geometry if plan is not None else patch_geometry(patch_cfg)
    if geometry.normalise != data.normalise:  # inference would feed windows unlike every training patch
        raise InputError(f"the shards were normalised per '{data.normalise}' but the plan says "
                         f"patches.normalise: {geometry.normalise}; re-run extraction")
    side = geometry.input_px
    monitor, mode = monitor_of(train_cfg, bool(len(data.val_rows)))
    deterministic_before = op_determinism_enabled()
    runtime = configure_runtime(train_cfg)
    _log(f"device: {runtime.device}; CUDA_VISIBLE_DEVICES={runtime.cuda_visible_devices!r}; "
         f"mixed precision: {runtime.mixed_precision}; XLA: {runtime.jit_compile}; "
         f"replicas: {runtime.strategy.num_replicas_in_sync}")
    _log(f"fold {fold} of {train_cfg['folds']}: {len(data.train_rows)} training / {len(data.val_rows)} validation "
         f"patches of {side}x{side} px ({data.train_rows['patient_id'].nunique()} / "
         f"{data.val_rows['patient_id'].nunique()} patients); loss {train_cfg['loss']}"
         + (f" (pos_weight = n_black/n_white = {data.pos_weight:.3f})" if train_cfg["loss"] == "weighted_bce"
            else ""))
    try:
        callbacks = make_callbacks(train_cfg, monitor, resume_dir, mode)
        state = open_resume_state(resume_dir, config_hash, callbacks["backup"])
        if not state.finished:
            model = _compiled_model(model_cfg, train_cfg, side, data, runtime)
            fit(model, data, state, callbacks, train_cfg, resume_dir)
        report = _report(state, data, runtime, monitor, fold, model_cfg, train_cfg, patch_cfg, side)
        export_outputs(out_dir, resume_dir, state, report, title=f"{model_cfg['name']}: {train_cfg['loss']}")
    finally:
        keras.mixed_precision.set_global_policy("float32")  # the policy is global: leave it as found
        set_op_determinism(deterministic_before)  # so is op determinism, which also rules out XLA
    _log(f"done: {state.epochs_done} epochs, best {monitor} {report['best_value']:.4f} at epoch "
         f"{state.best_epoch}; outputs in {out_dir}")
    return report


def _report(state: TrainState, data: TrainingData, runtime: Runtime, monitor: str, fold: int,
            model_cfg: dict, train_cfg: dict, patch_cfg: dict, side: int) -> dict[str, Any]:
    """The content of ``report.json``."""
    train_rows, val_rows = data.train_rows, data.val_rows
    return {
        "model": model_cfg["name"],
        "config_hash": state.config_hash,
        "fold": fold,
        "folds": train_cfg["folds"],
        "parameters": state.parameters,
        "input_shape": [side, side, 1],
        "data": {
            "shards": [Path(p).name for p in data.shard_paths],
            "train_patches": int(len(train_rows)), "val_patches": int(len(val_rows)),
            "train_patients": int(train_rows["patient_id"].nunique()),
            "val_patients": int(val_rows["patient_id"].nunique()),
            "train_lesions": int(train_rows["roi_id"].nunique()), "val_lesions": int(val_rows["roi_id"].nunique()),
            "split_by": train_cfg["split_by"],
            "mask_pixels": {"black": int(data.n_black), "white": int(data.n_white)},
            "pos_weight": data.pos_weight,
        },
        "loss": train_cfg["loss"],
        "monitor": monitor,
        "epochs_run": state.epochs_done,
        "epochs_planned": train_cfg["epochs"],
        "stopped_early": state.stopped_early,
        "best_epoch": state.best_epoch,
        "best_value": state.callbacks["best_checkpoint"]["best"],
        "checkpoints": {"best": "best.keras", "last": "last.keras"},
        "run_starts": state.run_starts,
        "wall_seconds": round(state.wall_seconds, 3),
        "device": runtime.device,
        "cuda_visible_devices": runtime.cuda_visible_devices,
        "mixed_precision": runtime.mixed_precision,
        "jit_compile": runtime.jit_compile,
        "replicas": int(runtime.strategy.num_replicas_in_sync),
        "versions": _versions(),
        "config": {"model": model_cfg, "train": train_cfg, "patches": patch_cfg},
    }


def run_train(config: dict[str, Any], shard_paths: Sequence[str | Path], out_dir: str | Path, fold: int = 0,
              plan: str | Path | None = None, splits: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Stage entry (rule ``train``, ``mammoseg train``): the ``model``, ``train`` and ``patches`` sections of a
    validated config, the plan (``plan.json``) and, with cross-validation, the splits (``splits.json``)."""
    return train_model(shard_paths, out_dir, model_cfg=config["model"], train_cfg=config["train"],
                       patch_cfg=config["patches"], fold=fold, plan=read_plan(plan) if plan else None,
                       fold_of=read_splits(splits).fold_of if splits else None)
