"""Stage ``train``: fit the U-Net on patch shards, resumably, and write the model folder.

Outputs in ``out_dir`` (``results/models/<name>/``), each written atomically:
``model.keras`` (the final model = the best weights by the monitored Dice), ``best.keras`` (the best checkpoint,
with optimizer state), ``history.csv`` (one row per epoch), ``curves.png`` (loss, accuracy and Dice, training vs
validation, like the paper's figures 4 and 5), ``tensorboard/`` (epoch scalars) and ``report.json``.

Resume
------
``out_dir/_resume/`` is deliberately not a declared output, so Snakemake does not delete it when a job fails or
is retried. After every completed epoch it receives the full model with its optimizer state
(``epoch-<k>.keras``), the best checkpoint so far (``best-<k>.keras``) and ``state.json`` (epoch number, history,
early-stopping and learning-rate-schedule state, accumulated wall time, the config hash). ``state.json`` is
written last and names the files it belongs to, so a ``kill -9`` at any instant leaves a consistent state. A
rerun with the same config hash continues from the last completed epoch and ends with the same total number of
epochs; a different hash starts afresh. The folder is removed after a successful run (its TensorBoard logs are
copied to ``tensorboard/``), so a later rerun with changed data retrains. Only the order in which batches are
shuffled differs between a resumed and an uninterrupted run.

The split
---------
``split_by: patient`` (default): patients are shuffled with ``seed`` and the first ``round(val_fraction *
n_patients)`` (at least 1) go to validation. Every patch of a patient, hence every shifted copy of each of its
lesions, lies on one side only, so the validation figures are honest.
``split_by: sample``: the paper's split of its 6,265 augmented samples: patches are shuffled individually, so the
five copies of one lesion (and other lesions of the same patient) land on both sides, and validation figures are
optimistic. Offered for reproduction only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mammoseg.errors import InputError
from mammoseg import __version__
from mammoseg.io.atomic import atomic_path, write_csv_atomic, write_json_atomic
from mammoseg.config import section_hash

__all__ = [
    "split_train_val",
    "mask_pixel_counts",
    "configure_runtime",
    "train_model",
    "run_train",
    "HISTORY_COLUMNS",
]

RESUME_DIR = "_resume"
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "dice", "iou", "val_loss", "val_accuracy", "val_dice", "val_iou",
                   "learning_rate", "seconds")
PLATEAU_FACTOR = 0.5  # learning rate multiplier when the monitored Dice stalls
MIN_LEARNING_RATE = 1e-6


def _log(message: str) -> None:
    """One line on stdout, flushed, so the Snakemake log shows progress while the job runs."""
    print(f"[mammoseg train] {message}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Data: provenance, split, class balance
# --------------------------------------------------------------------------------------------------------------


def _dataset_module():
    try:
        from mammoseg.model import dataset
    except ImportError as exc:  # pragma: no cover - only while the package is incomplete
        raise ImportError(f"mammoseg.model.dataset (read_provenance, make_dataset) is needed for training: {exc}") from exc
    return dataset


def split_train_val(provenance, val_fraction: float, split_by: str = "patient", seed: int = 0):
    """Split the training patches into training and validation rows.

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
        val_pos = np.sort(order[:n_val])
        is_val = np.zeros(len(provenance), dtype=bool)
        is_val[val_pos] = True
        return provenance[~is_val], provenance[is_val]
    patients = np.array(sorted(provenance["patient_id"].astype(str).unique()))
    if len(patients) < 2:
        raise ValueError(f"a patient split needs at least 2 patients, the training patches have {len(patients)}")
    n_val = min(len(patients) - 1, max(1, int(round(val_fraction * len(patients)))))
    val_patients = set(rng.permutation(patients)[:n_val])
    is_val = provenance["patient_id"].astype(str).isin(val_patients).to_numpy()
    return provenance[~is_val], provenance[is_val]


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


def _data_fingerprint(provenance) -> str:
    """A cheap identity of the training data (which patches of which shards) for the resume hash."""
    ids = sorted(f"{Path(str(p)).name}:{r}:{roi}" for p, r, roi in
                 zip(provenance["shard_path"], provenance["row"], provenance["roi_id"]))
    return section_hash(ids)


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


def configure_runtime(train_cfg: dict[str, Any]) -> Runtime:
    """Seeds, op determinism, precision policy and distribution strategy from the ``train`` section.

    TensorFlow only sees the GPUs listed in ``CUDA_VISIBLE_DEVICES`` (Snakemake's ``gpu`` resource and SLURM set
    it); several visible GPUs use ``MirroredStrategy``, one GPU or the CPU the default strategy. Mixed precision
    (``mixed_float16``) is used with ``auto`` when a GPU is visible, always with ``on``, never with ``off``.
    """
    import keras
    import tensorflow as tf

    seed = int(train_cfg.get("seed", 0))
    keras.utils.set_random_seed(seed)
    if train_cfg.get("deterministic", False):
        tf.config.experimental.enable_op_determinism()
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:  # share the GPU politely with other jobs instead of grabbing all its memory
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
    mode = str(train_cfg.get("mixed_precision", "auto"))
    mixed = mode == "on" or (mode == "auto" and bool(gpus))
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    if len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
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
    return Runtime(strategy, device, len(gpus), mixed, os.environ.get("CUDA_VISIBLE_DEVICES"))


# --------------------------------------------------------------------------------------------------------------
# Resume state
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything needed to continue training after the last completed epoch (``_resume/state.json``)."""

    config_hash: str
    epochs_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = 0
    wait: int = 0  # epochs since the last improvement (early stopping)
    plateau_wait: int = 0  # epochs since the last improvement or learning-rate cut (plateau schedule)
    learning_rate: float = 0.0
    stopped_early: bool = False
    finished: bool = False
    model_file: str = ""
    best_file: str = ""
    wall_seconds: float = 0.0
    run_starts: list[int] = field(default_factory=list)  # epochs_done at the start of each (re)run

    @classmethod
    def load(cls, resume_dir: Path, config_hash: str) -> "TrainState | None":
        """The saved state if it belongs to ``config_hash`` and its files exist, else ``None`` (start afresh)."""
        path = resume_dir / "state.json"
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            state = cls(**raw)
        except (OSError, ValueError, TypeError) as exc:
            _log(f"ignoring unreadable resume state {path}: {exc}")
            return None
        if state.config_hash != config_hash:
            _log(f"config hash changed ({state.config_hash} -> {config_hash}): starting afresh")
            return None
        for name in (state.model_file, state.best_file):
            if name and not (resume_dir / name).is_file():
                _log(f"resume state names missing file {resume_dir / name}: starting afresh")
                return None
        return state

    def save(self, resume_dir: Path) -> None:
        write_json_atomic(resume_dir / "state.json", asdict(self))
        keep = {self.model_file, self.best_file, "state.json", "tensorboard"}
        for stale in resume_dir.iterdir():  # older snapshots, now superseded by state.json
            if stale.name not in keep and not stale.name.startswith(".tmp-"):
                stale.unlink()


def _save_model_atomic(model, target: Path) -> None:
    with atomic_path(target) as tmp:
        model.save(tmp)


# --------------------------------------------------------------------------------------------------------------
# The per-epoch callback: early stopping, LR schedule, snapshots, progress lines, TensorBoard scalars
# --------------------------------------------------------------------------------------------------------------


def _make_callback(state: TrainState, resume_dir: Path, *, monitor: str, epochs: int, patience: int,
                   schedule: str, base_lr: float, tensorboard_dir: Path):
    import keras
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    scalar_metadata = summary_pb2.SummaryMetadata()
    scalar_metadata.plugin_data.plugin_name = "scalars"  # TensorBoard shows these as scalar plots
    plateau_patience = max(2, patience // 2) if patience else 5

    class ResumableEpochs(keras.callbacks.Callback):
        """Saves a consistent resume snapshot after every epoch and applies early stopping and LR schedules."""

        def __init__(self):
            super().__init__()
            self.writer = tf.summary.create_file_writer(str(tensorboard_dir))
            self.started = 0.0

        def _set_lr(self, value: float) -> None:
            self.model.optimizer.learning_rate.assign(value)

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()
            if schedule == "cosine":
                self._set_lr(base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)))

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            seconds = time.perf_counter() - self.started
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items() if k in HISTORY_COLUMNS},
                   "learning_rate": lr, "seconds": seconds}
            value = float(logs.get(monitor, float("nan")))
            improved = state.best_value is None or (not math.isnan(value) and value > state.best_value)
            if improved:
                state.best_value, state.best_epoch, state.wait, state.plateau_wait = value, epoch + 1, 0, 0
                state.best_file = f"best-{epoch + 1}.keras"
                _save_model_atomic(self.model, resume_dir / state.best_file)
            else:
                state.wait += 1
                state.plateau_wait += 1
            if schedule == "plateau" and state.plateau_wait >= plateau_patience:
                new_lr = max(MIN_LEARNING_RATE, lr * PLATEAU_FACTOR)
                if new_lr < lr:
                    _log(f"{monitor} has not improved for {state.plateau_wait} epochs: learning rate {lr:.3g} -> {new_lr:.3g}")
                    self._set_lr(new_lr)
                state.plateau_wait = 0
            state.history.append(row)
            state.epochs_done = epoch + 1
            state.learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            state.wall_seconds += seconds
            if patience and state.wait >= patience:
                state.stopped_early = True
                self.model.stop_training = True
            state.finished = state.stopped_early or state.epochs_done >= epochs
            state.model_file = f"epoch-{epoch + 1}.keras"
            _save_model_atomic(self.model, resume_dir / state.model_file)
            state.save(resume_dir)  # the commit point: everything it names is already on disk
            with self.writer.as_default():
                for key, val in row.items():
                    if key not in ("epoch",):
                        tf.summary.write(f"epoch_{key}", tf.constant(val, tf.float32), step=epoch + 1,
                                         metadata=scalar_metadata)
            self.writer.flush()
            shown = " ".join(f"{k}={row[k]:.4f}" for k in HISTORY_COLUMNS[1:-2] if k in row)
            _log(f"epoch {epoch + 1}/{epochs} {shown} lr={lr:.3g} {seconds:.1f}s"
                 + (" *best*" if improved else "") + (" early stop" if state.stopped_early else ""))

    return ResumableEpochs()


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


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def _build_and_compile(model_cfg, side: int, loss, learning_rate: float):
    import keras

    from mammoseg.model.losses import get_metrics
    from mammoseg.model.unet import build_unet, model_kwargs

    model = build_unet((side, side, 1), **model_kwargs(model_cfg))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate), loss=loss, metrics=get_metrics())
    return model


def train_model(shard_paths: Sequence[str | Path], out_dir: str | Path, *, model_cfg: dict[str, Any],
                train_cfg: dict[str, Any], patch_cfg: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume training) a U-Net on the ``split == 'train'`` patches of ``shard_paths``.

    Parameters
    ----------
    shard_paths : HDF5 patch shards (``images`` float32 (N, s, s), ``masks`` uint8 (N, s, s), ``provenance/``).
    out_dir : the model folder, ``results/models/<name>/``.
    model_cfg, train_cfg, patch_cfg : the validated ``model``, ``train`` and ``patches`` config sections.

    Returns
    -------
    dict : the content of ``report.json``.
    """
    import keras

    from mammoseg.model import losses as _losses  # noqa: F401 - registers the custom objects for loading snapshots
    from mammoseg.model.unet import input_size, parameter_counts

    out_dir = Path(out_dir)
    resume_dir = out_dir / RESUME_DIR
    resume_dir.mkdir(parents=True, exist_ok=True)
    dataset = _dataset_module()
    shard_paths = [str(p) for p in shard_paths]
    if not shard_paths:
        raise ValueError("train: no shard files given")

    provenance = dataset.read_provenance(shard_paths)
    if "split" in provenance.columns:
        provenance = provenance[provenance["split"].astype(str) == "train"]
    train_rows, val_rows = split_train_val(provenance, float(train_cfg.get("val_fraction", 0.15)),
                                           str(train_cfg.get("split_by", "patient")), int(train_cfg.get("seed", 0)))
    config_hash = section_hash(model_cfg, train_cfg, patch_cfg, _data_fingerprint(provenance))
    side = input_size(patch_cfg)
    epochs = int(train_cfg.get("epochs", 100))
    batch_size = int(train_cfg.get("batch_size", 8))
    base_lr = float(train_cfg.get("learning_rate", 1e-3))
    patience = int(train_cfg.get("early_stopping_patience", 10))
    schedule = str(train_cfg.get("lr_schedule", "none"))
    loss_name = str(train_cfg.get("loss", "bce_dice"))
    monitor = "val_dice" if len(val_rows) else "dice"

    runtime = configure_runtime(train_cfg)
    _log(f"device: {runtime.device}; CUDA_VISIBLE_DEVICES={runtime.cuda_visible_devices!r}; "
         f"mixed precision: {runtime.mixed_precision}; replicas: {runtime.strategy.num_replicas_in_sync}")
    n_black, n_white = mask_pixel_counts(train_rows)
    pos_weight = n_black / n_white if n_white else None
    from mammoseg.model.losses import get_loss

    loss = get_loss(loss_name, pos_weight if loss_name == "weighted_bce" else None)
    _log(f"{len(train_rows)} training / {len(val_rows)} validation patches of {side}x{side} px "
         f"({train_rows['patient_id'].nunique()} / {val_rows['patient_id'].nunique()} patients, split by "
         f"{train_cfg.get('split_by', 'patient')}); loss {loss_name}"
         + (f" (pos_weight = n_black/n_white = {pos_weight:.3f})" if loss_name == "weighted_bce" else ""))

    state = TrainState.load(resume_dir, config_hash)
    with runtime.strategy.scope():
        if state is not None and state.epochs_done > 0:
            _log(f"resuming after epoch {state.epochs_done} from {resume_dir / state.model_file}")
            model = keras.saving.load_model(resume_dir / state.model_file, compile=True, safe_mode=True)
        else:
            for stale in resume_dir.iterdir():  # a snapshot of another config or data
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            state = TrainState(config_hash=config_hash, learning_rate=base_lr)
            model = _build_and_compile(model_cfg, side, loss, base_lr)
    state.run_starts.append(state.epochs_done)

    if not state.finished:
        train_ds = dataset.make_dataset(shard_paths, train_rows, batch_size, shuffle=True,
                                        seed=int(train_cfg.get("seed", 0)) + state.epochs_done, repeat=False)
        val_ds = (dataset.make_dataset(shard_paths, val_rows, batch_size, shuffle=False, seed=0, repeat=False)
                  if len(val_rows) else None)
        callback = _make_callback(state, resume_dir, monitor=monitor, epochs=epochs, patience=patience,
                                  schedule=schedule, base_lr=base_lr, tensorboard_dir=resume_dir / "tensorboard")
        _log(f"training epochs {state.epochs_done + 1}..{epochs}, batch size {batch_size}, monitor {monitor}")
        model.fit(train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=state.epochs_done,
                  callbacks=[callback], verbose=0, shuffle=False)  # the dataset shuffles itself
    else:
        _log(f"training already finished ({state.epochs_done} epochs): writing the outputs")

    # final model = the best weights by the monitored Dice
    best = keras.saving.load_model(resume_dir / state.best_file, compile=True, safe_mode=True)
    _save_model_atomic(best, out_dir / "best.keras")
    _save_model_atomic(best, out_dir / "model.keras")
    write_csv_atomic(out_dir / "history.csv", _history_frame(state.history))
    plot_curves(state.history, out_dir / "curves.png", title=f"{model_cfg.get('name', 'unet')}: {loss_name}")
    _copy_dir_atomic(resume_dir / "tensorboard", out_dir / "tensorboard")
    report = {
        "model": model_cfg.get("name", "unet"),
        "config_hash": config_hash,
        "parameters": parameter_counts(best),
        "input_shape": [side, side, 1],
        "data": {
            "shards": [Path(p).name for p in shard_paths],
            "train_patches": int(len(train_rows)), "val_patches": int(len(val_rows)),
            "train_patients": int(train_rows["patient_id"].nunique()),
            "val_patients": int(val_rows["patient_id"].nunique()),
            "train_lesions": int(train_rows["roi_id"].nunique()), "val_lesions": int(val_rows["roi_id"].nunique()),
            "split_by": train_cfg.get("split_by", "patient"),
            "mask_pixels": {"black": int(n_black), "white": int(n_white)},
            "pos_weight": pos_weight,
        },
        "loss": loss_name,
        "monitor": monitor,
        "epochs_run": state.epochs_done,
        "epochs_planned": epochs,
        "stopped_early": state.stopped_early,
        "best_epoch": state.best_epoch,
        "best_value": state.best_value,
        "run_starts": state.run_starts,
        "wall_seconds": round(state.wall_seconds, 3),
        "device": runtime.device,
        "cuda_visible_devices": runtime.cuda_visible_devices,
        "mixed_precision": runtime.mixed_precision,
        "replicas": int(runtime.strategy.num_replicas_in_sync),
        "versions": _versions(),
        "config": {"model": model_cfg, "train": train_cfg, "patches": patch_cfg},
    }
    write_json_atomic(out_dir / "report.json", report)
    shutil.rmtree(resume_dir)  # done: a later rerun (e.g. with new data) must train afresh
    keras.mixed_precision.set_global_policy("float32")
    _log(f"done: {state.epochs_done} epochs, best {monitor} {state.best_value:.4f} at epoch {state.best_epoch}; "
         f"outputs in {out_dir}")
    return report


def run_train(config: dict[str, Any], shard_paths: Sequence[str | Path], out_dir: str | Path,
              fold: int = 0) -> dict[str, Any]:  # fmt: skip
    """Stage entry (``mammoseg train``): the ``model``, ``train`` and ``patches`` sections of a validated config."""
    report = train_model(shard_paths, out_dir, model_cfg=dict(config.get("model", {})),
                         train_cfg=dict(config.get("train", {})), patch_cfg=dict(config.get("patches", {})))
    shutil.copyfile(Path(out_dir) / "model.keras", Path(out_dir) / "last.keras")  # interim, until resume rework
    return report
