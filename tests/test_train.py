"""Training: the leak-free split, a tiny end-to-end fit with every output, reload, and kill -9 + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammoseg.config import validate_config
from mammoseg.model.folds import assign_folds
from mammoseg.model.train import split_for_fold, split_train_val
from mammoseg.patches.shards import PROVENANCE_COLUMNS

SIDE = 32  # patch side in pixels: patches n=5, downscale 1
PATCH_CFG = {"n": 5, "downscale": 1, "n_shifted": 2}
MODEL_CFG = {"name": "tiny", "depth": 2, "filters": 4, "batch_norm": True, "dropout": 0.0,
             "upsampling": "transpose", "kernel_size": 3, "max_filters": 1024, "convs_per_level": 2}


def _train_cfg(**overrides):
    cfg = {"loss": "bce_dice", "batch_size": 8, "epochs": 2, "learning_rate": 0.01, "val_fraction": 0.25,
           "split_by": "patient", "early_stopping_patience": 0, "lr_schedule": "none", "mixed_precision": "off",
           "deterministic": False, "jit_compile": False, "seed": 0}  # XLA: its compile costs more than 2 tiny epochs
    return {**cfg, **overrides}


def write_tiny_shard(path: Path, n_patients: int = 6, lesions: int = 2, copies: int = 3, seed: int = 0,
                     test_patients: int = 1) -> Path:
    """An HDF5 shard in the extract stage's layout: bright discs (lesions) on noise, with provenance."""
    import h5py

    rng = np.random.default_rng(seed)
    images, masks, prov = [], [], {c: [] for c in PROVENANCE_COLUMNS}
    yy, xx = np.mgrid[:SIDE, :SIDE]
    for p in range(n_patients + test_patients):
        split = "train" if p < n_patients else "test"
        for lesion in range(lesions):
            for copy in range(copies):
                cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(4, 8)
                mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
                image = np.clip(0.3 * rng.random((SIDE, SIDE)) + 0.6 * mask, 0, 1).astype(np.float32)
                images.append(image)
                masks.append(mask)
                values = {"roi_id": f"P_{p:05d}_LEFT_CC_{lesion + 1}", "image_id": f"P_{p:05d}_LEFT_CC",
                          "patient_id": f"P_{p:05d}", "split": split, "abnormality_id": lesion + 1,
                          "copy_index": copy}
                for column, kind in PROVENANCE_COLUMNS.items():
                    prov[column].append(values.get(column, 0 if kind == "int" else ""))
    with h5py.File(path, "w") as h5:
        h5.attrs["normalise"] = "window"  # patches in [0, 1] as the paper's min-max leaves them
        h5.create_dataset("images", data=np.stack(images))
        h5.create_dataset("masks", data=np.stack(masks))
        group = h5.create_group("provenance")
        for column, kind in PROVENANCE_COLUMNS.items():
            if kind == "str":
                group.create_dataset(column, data=np.array(prov[column], dtype=object),
                                     dtype=h5py.string_dtype("utf-8"))
            else:
                group.create_dataset(column, data=np.asarray(prov[column], dtype=np.int64))
    return path


def _provenance(n_patients=20, lesions=2, copies=5):
    rows = [{"patient_id": f"P_{p:05d}", "roi_id": f"P_{p:05d}_LEFT_CC_{k}", "copy_index": c}
            for p in range(n_patients) for k in range(lesions) for c in range(copies)]
    return pd.DataFrame(rows)


# --- the split --------------------------------------------------------------------------------------------------


def test_patient_split_keeps_patients_and_lesion_copies_on_one_side():
    prov = _provenance()
    train, val = split_train_val(prov, 0.15, "patient", seed=3)
    assert len(train) + len(val) == len(prov)
    assert set(train.index).isdisjoint(val.index)
    assert set(train["patient_id"]).isdisjoint(val["patient_id"])
    assert set(train["roi_id"]).isdisjoint(val["roi_id"])
    assert val["patient_id"].nunique() == 3  # round(0.15 * 20)
    # every lesion keeps all of its 5 copies on its side
    assert (val.groupby("roi_id").size() == 5).all() and (train.groupby("roi_id").size() == 5).all()


def test_patient_split_is_seeded():
    prov = _provenance()
    a = split_train_val(prov, 0.15, "patient", seed=1)[1]
    b = split_train_val(prov, 0.15, "patient", seed=1)[1]
    c = split_train_val(prov, 0.15, "patient", seed=2)[1]
    assert list(a.index) == list(b.index)
    assert set(a["patient_id"]) != set(c["patient_id"])


def test_sample_split_is_the_papers_leaky_split():
    prov = _provenance()
    train, val = split_train_val(prov, 0.15, "sample", seed=0)
    assert len(val) == round(0.15 * len(prov))
    # copies of the same lesion end up on both sides: exactly the leak the patient split avoids
    assert set(train["roi_id"]) & set(val["roi_id"])


def test_split_errors_are_clear():
    with pytest.raises(ValueError, match="at least 2 patients"):
        split_train_val(_provenance(n_patients=1), 0.15, "patient")
    with pytest.raises(ValueError, match="split_by"):
        split_train_val(_provenance(), 0.15, "image")


# --- k-fold by patient ------------------------------------------------------------------------------------------


def test_each_fold_validates_on_its_patients_and_never_trains_on_them():
    prov = _provenance(n_patients=11)
    train_cfg = validate_config({"train": {"folds": 4, "seed": 5}})["train"]
    folds = assign_folds(prov["patient_id"], 4, seed=5)
    validated = []
    for fold in range(4):
        train, val = split_for_fold(prov, train_cfg, fold)
        assert set(val["patient_id"]) == {p for p, f in folds.items() if f == fold}
        assert set(train["patient_id"]).isdisjoint(val["patient_id"])
        assert sorted([*train.index, *val.index]) == list(prov.index)
        validated += sorted(set(val["patient_id"]))
    # over the k runs every patient is validated exactly once
    assert sorted(validated) == sorted(prov["patient_id"].unique())


def test_one_fold_is_the_val_fraction_split():
    prov = _provenance()
    train_cfg = validate_config({"train": {"val_fraction": 0.15, "seed": 3}})["train"]
    assert train_cfg["folds"] == 1
    val = split_for_fold(prov, train_cfg, 0)[1]
    assert list(val.index) == list(split_train_val(prov, 0.15, "patient", seed=3)[1].index)


def test_fold_errors_are_clear():
    prov = _provenance()
    with pytest.raises(ValueError, match=r"fold must be in 0\.\.2"):
        split_for_fold(prov, validate_config({"train": {"folds": 3}})["train"], 3)
    with pytest.raises(ValueError, match="split_by: sample"):
        split_for_fold(prov, validate_config({"train": {"folds": 3, "split_by": "sample"}})["train"], 0)


# --- training ---------------------------------------------------------------------------------------------------


def test_two_epoch_training_writes_every_output_and_reloads(tmp_path):
    pytest.importorskip("tensorflow")
    import keras

    from mammoseg.model.dataset import read_provenance
    from mammoseg.model.train import HISTORY_COLUMNS, mask_pixel_counts, train_model

    shard = write_tiny_shard(tmp_path / "shard-0.h5")
    out = tmp_path / "models" / "tiny"
    train_model([shard], out, model_cfg=MODEL_CFG, train_cfg=_train_cfg(loss="weighted_bce"),
                patch_cfg=PATCH_CFG)
    for name in ("best.keras", "last.keras", "history.csv", "curves.png", "report.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    # Keras' TensorBoard callback wrote the epoch scalars of both epochs (steps count epochs from 0)
    import tensorflow as tf

    steps = {}
    for events in (out / "tensorboard").rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                steps.setdefault(f"{events.parent.name}/{value.tag}", set()).add(event.step)
    for tag in ("train/epoch_dice", "train/epoch_learning_rate", "validation/epoch_dice"):
        assert steps.get(tag) == {0, 1}, (tag, steps)
    assert not (out / "_resume").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]

    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert set(HISTORY_COLUMNS) <= set(history.columns)
    saved = json.loads((out / "report.json").read_text())
    assert saved["epochs_run"] == 2 and saved["run_starts"] == [0]
    # 6 training patients x 2 lesions x 3 copies; the test-split patient is left out
    assert saved["data"]["train_patches"] + saved["data"]["val_patches"] == 36
    assert saved["data"]["train_patients"] + saved["data"]["val_patients"] == 6
    # pos_weight is n_black / n_white over the training-side masks only: recompute them with h5py
    import h5py

    prov = read_provenance([shard])
    train_rows, val_rows = split_train_val(prov[prov["split"] == "train"], 0.25, "patient", 0)
    assert saved["data"]["train_patches"] == len(train_rows) and saved["data"]["val_patches"] == len(val_rows)
    with h5py.File(shard, "r") as h5:
        train_masks = h5["masks"][()][np.sort(train_rows["row"].to_numpy())]
    white = int(train_masks.sum())
    black = train_masks.size - white
    assert mask_pixel_counts(train_rows) == (black, white)
    assert saved["data"]["pos_weight"] == pytest.approx(black / white)
    assert saved["parameters"]["trainable"] > 0 and saved["device"].startswith("CPU")

    # both checkpoints reload in safe mode, with the class-balanced loss they were trained with
    for name in ("best.keras", "last.keras"):
        model = keras.saving.load_model(out / name, safe_mode=True)
        assert model.loss.get_config()["pos_weight"] == pytest.approx(black / white), name


def test_run_identity_includes_the_fold():
    from mammoseg.model.train import run_identity

    cfg = validate_config({"train": {"folds": 3}})
    sections = (cfg["model"], cfg["train"], cfg["patches"], "data-fingerprint")
    assert run_identity(*sections, fold=1) == run_identity(*sections, fold=1)
    assert run_identity(*sections, fold=0) != run_identity(*sections, fold=1)


@pytest.mark.slow  # a real training: tracing the step alone costs about a reference epoch
def test_fold_training_validates_on_the_folds_patients(tmp_path):
    pytest.importorskip("tensorflow")
    from mammoseg.model.dataset import read_provenance
    from mammoseg.model.train import train_model

    shard = write_tiny_shard(tmp_path / "shard-0.h5")
    report = train_model([shard], tmp_path / "fold-1", model_cfg=MODEL_CFG, patch_cfg=PATCH_CFG,
                         train_cfg=_train_cfg(epochs=1, folds=3), fold=1)
    assert (report["fold"], report["folds"]) == (1, 3)
    prov = read_provenance([shard])
    prov = prov[prov["split"] == "train"]
    fold_patients = {p for p, f in assign_folds(prov["patient_id"], 3, seed=0).items() if f == 1}
    assert report["data"]["val_patients"] == len(fold_patients) == 2  # 6 patients in 3 folds
    assert report["data"]["val_patches"] == int(prov["patient_id"].isin(fold_patients).sum())
    assert report["data"]["train_patients"] == 4
    assert json.loads((tmp_path / "fold-1" / "report.json").read_text())["fold"] == 1


def _dice_on(model_path: Path, shard: Path, val_rows, batch_size: int) -> float:
    """The validation Dice of a saved checkpoint, computed as fit computes val_dice."""
    import keras

    from mammoseg.model.dataset import make_dataset

    model = keras.saving.load_model(model_path, safe_mode=True)
    dataset = make_dataset([str(shard)], val_rows, batch_size, shuffle=False)
    return float(model.evaluate(dataset, verbose=0, return_dict=True)["dice"])


@pytest.mark.slow  # a real training: tracing the step alone costs about a reference epoch
def test_best_and_last_reproduce_their_epochs_and_the_rate_follows_the_cosine(tmp_path):
    pytest.importorskip("tensorflow")
    from mammoseg.model.dataset import read_provenance
    from mammoseg.model.train import train_model

    shard = write_tiny_shard(tmp_path / "shard-0.h5")
    out = tmp_path / "model"
    # a rate high enough that the validation Dice falls after epoch 1 (checked below), so best != last
    cfg = _train_cfg(epochs=4, learning_rate=0.03, lr_schedule="cosine", deterministic=True)
    report = train_model([shard], out, model_cfg=MODEL_CFG, train_cfg=cfg, patch_cfg=PATCH_CFG)
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4]
    best_row = history.loc[history["val_dice"].idxmax()]
    last_row = history.iloc[-1]
    assert report["best_epoch"] == best_row["epoch"] and report["best_value"] == pytest.approx(best_row["val_dice"])
    assert best_row["epoch"] != last_row["epoch"] and abs(best_row["val_dice"] - last_row["val_dice"]) > 1e-3

    prov = read_provenance([shard])
    val_rows = split_train_val(prov[prov["split"] == "train"], 0.25, "patient", 0)[1]
    assert _dice_on(out / "best.keras", shard, val_rows, 8) == pytest.approx(best_row["val_dice"], abs=1e-6)
    assert _dice_on(out / "last.keras", shard, val_rows, 8) == pytest.approx(last_row["val_dice"], abs=1e-6)

    # the epoch-e rate is lr0 * (1 + cos(pi * (e - 1) / epochs)) / 2
    expected = [0.03 * 0.5 * (1 + np.cos(np.pi * e / 4)) for e in range(4)]
    np.testing.assert_allclose(history["learning_rate"], expected, rtol=1e-6)


@pytest.mark.slow  # a real training: tracing the step alone costs about a reference epoch
def test_deterministic_training_twice_gives_bit_identical_weights_and_history(tmp_path):
    """train.deterministic (the demo's setting): with shuffling, augmentation and dropout, two trainings from
    the same seed end with the same weights, bit for bit, and the same history."""
    pytest.importorskip("tensorflow")
    import keras

    from mammoseg.model.train import train_model

    shard = write_tiny_shard(tmp_path / "shard-0.h5")
    cfg = _train_cfg(epochs=2, deterministic=True, augment={"flip": True, "rotate_deg": 10, "gamma": 0.2})
    model_cfg = {**MODEL_CFG, "dropout": 0.25}
    weights, histories = [], []
    for run in ("a", "b"):
        train_model([shard], tmp_path / run, model_cfg=model_cfg, train_cfg=cfg, patch_cfg=PATCH_CFG)
        weights.append(keras.saving.load_model(tmp_path / run / "last.keras", compile=False).get_weights())
        histories.append(pd.read_csv(tmp_path / run / "history.csv").drop(columns=["seconds"]))
    assert len(weights[0]) == len(weights[1]) > 0
    for first, second in zip(*weights):
        np.testing.assert_array_equal(first, second)
    pd.testing.assert_frame_equal(histories[0], histories[1])
    # and the seed matters: a different one trains a different model (so the equality above is not vacuous)
    train_model([shard], tmp_path / "c", model_cfg=model_cfg, train_cfg={**cfg, "seed": 1}, patch_cfg=PATCH_CFG)
    other = keras.saving.load_model(tmp_path / "c" / "last.keras", compile=False).get_weights()
    assert any(not np.array_equal(first, third) for first, third in zip(weights[0], other))


@pytest.mark.slow  # a real training: tracing the step alone costs about a reference epoch
def test_xla_compiles_the_training_step_unless_op_determinism_is_on(tmp_path, capsys, monkeypatch):
    """train.jit_compile: the model is compiled for XLA, the log and the report say so, the checkpoint reloads;
    train.deterministic turns it off (Keras refuses XLA under op determinism), and the run says so instead of a
    silent downgrade; a training after a deterministic one in the same process is not deterministic."""
    pytest.importorskip("tensorflow")
    import keras

    from mammoseg.model import train as train_module

    compiled = []
    build = train_module.build_model

    def recording_build(*args, **kwargs):
        model = build(*args, **kwargs)
        compiled.append(model.jit_compile)
        return model

    monkeypatch.setattr(train_module, "build_model", recording_build)
    shard = write_tiny_shard(tmp_path / "shard-0.h5")
    xla = train_module.train_model([shard], tmp_path / "xla", model_cfg=MODEL_CFG, patch_cfg=PATCH_CFG,
                                   train_cfg=_train_cfg(epochs=1, jit_compile=True))
    assert compiled == [True] and xla["jit_compile"] is True and "XLA: True" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "xla" / "history.csv")["loss"].notna().all()
    keras.saving.load_model(tmp_path / "xla" / "last.keras", safe_mode=True)
    plain = train_module.train_model([shard], tmp_path / "deterministic", model_cfg=MODEL_CFG, patch_cfg=PATCH_CFG,
                                     train_cfg=_train_cfg(epochs=1, jit_compile=True, deterministic=True))
    assert compiled == [True, False] and plain["jit_compile"] is False and "XLA: False" in capsys.readouterr().out
    # op determinism is process-wide: the deterministic training leaves it off again, so XLA works after it
    assert not train_module.op_determinism_enabled()
    assert train_module.configure_runtime(_train_cfg(jit_compile=True)).jit_compile is True


def test_monitor_of_names_the_quantity_and_its_direction():
    from mammoseg.model.train import monitor_of

    assert monitor_of({"monitor": "dice"}, True) == ("val_dice", "max")
    assert monitor_of({"monitor": "pooled_dice"}, True) == ("val_pooled_dice", "max")
    assert monitor_of({"monitor": "loss"}, True) == ("val_loss", "min")
    assert monitor_of({"monitor": "pooled_dice"}, False) == ("pooled_dice", "max")
    from mammoseg.config import validate_config

    assert monitor_of(validate_config({})["train"], True) == ("val_dice", "max")  # the schema's default


@pytest.mark.slow  # a real training: tracing the step alone costs about a reference epoch
@pytest.mark.parametrize("monitor,key,pick", [("pooled_dice", "val_pooled_dice", "idxmax"),
                                              ("loss", "val_loss", "idxmin")])
def test_best_checkpoint_follows_train_monitor(tmp_path, monitor, key, pick):
    pytest.importorskip("tensorflow")
    from mammoseg.model.train import train_model

    shard = write_tiny_shard(tmp_path / "shard-0.h5")
    out = tmp_path / "model"
    cfg = _train_cfg(epochs=3, learning_rate=0.03, lr_schedule="cosine", deterministic=True, monitor=monitor)
    report = train_model([shard], out, model_cfg=MODEL_CFG, train_cfg=cfg, patch_cfg=PATCH_CFG)
    history = pd.read_csv(out / "history.csv")
    best_row = history.loc[getattr(history[key], pick)()]
    assert report["monitor"] == key
    assert report["best_epoch"] == best_row["epoch"] and report["best_value"] == pytest.approx(best_row[key])


@pytest.mark.slow  # a real training: tracing the step alone costs about a reference epoch
def test_plateau_halves_the_rate_early_stopping_stops_and_both_resume(tmp_path, monkeypatch):
    """A rate too small to change any weight: the validation Dice never improves after epoch 1. The plateau
    patience is 2 (half of 4), so the rate halves after epochs 3 and 5; early stopping (patience 4) stops after
    epoch 5. The same must hold when the run is interrupted after epoch 3 and resumed."""
    pytest.importorskip("tensorflow")
    import keras

    from mammoseg.model import train

    monkeypatch.setattr(train, "MIN_LEARNING_RATE", 0.0)  # the 1e-6 floor would keep 1e-12 from being halved

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 3:
                raise RuntimeError("interrupted")

    real_make_callbacks = train.make_callbacks

    def with_interrupt(*args, **kwargs):
        return {**real_make_callbacks(*args, **kwargs), "interrupt": Interrupt()}

    shard = write_tiny_shard(tmp_path / "shard-0.h5")
    model_cfg = {**MODEL_CFG, "batch_norm": False}  # batch norm's moving statistics would change without any rate
    cfg = _train_cfg(epochs=20, learning_rate=1e-12, lr_schedule="plateau", early_stopping_patience=4)
    expected_rates = [1e-12, 1e-12, 1e-12, 5e-13, 5e-13]

    runs = {}
    for name, interrupted in (("straight", False), ("resumed", True)):
        out = tmp_path / name
        if interrupted:
            monkeypatch.setattr(train, "make_callbacks", with_interrupt)
            with pytest.raises(RuntimeError, match="interrupted"):
                train.train_model([shard], out, model_cfg=model_cfg, train_cfg=cfg, patch_cfg=PATCH_CFG)
            assert json.loads((out / "_resume" / "state.json").read_text())["epochs_done"] == 3
            monkeypatch.setattr(train, "make_callbacks", real_make_callbacks)
        runs[name] = train.train_model([shard], out, model_cfg=model_cfg, train_cfg=cfg, patch_cfg=PATCH_CFG)
        history = pd.read_csv(out / "history.csv")
        assert list(history["epoch"]) == [1, 2, 3, 4, 5], name
        assert history["val_dice"].nunique() == 1, name  # the premise: nothing improved
        np.testing.assert_allclose(history["learning_rate"], expected_rates, rtol=1e-6, err_msg=name)
        assert runs[name]["stopped_early"] and runs[name]["epochs_run"] == 5, name
        # ModelCheckpoint kept epoch 1 as best; without its restored `best` the resumed epoch 4 would replace it
        assert runs[name]["best_epoch"] == 1, name
    assert runs["straight"]["run_starts"] == [0] and runs["resumed"]["run_starts"] == [0, 3]


@pytest.mark.parametrize("case", ["weights committed", "weights of the next epoch half written", "neither"])
def test_reconcile_backup_returns_to_the_committed_epoch(tmp_path, case):
    """BackupAndRestore overwrites its files in place; state.json (the commit point) decides which survive."""
    pytest.importorskip("tensorflow")
    import hashlib

    import keras

    from mammoseg.model.train import TrainState, _backup_files, reconcile_backup

    backup = keras.callbacks.BackupAndRestore(tmp_path / "backup", double_checkpoint=True)
    weights, previous, metadata = _backup_files(backup)
    weights.parent.mkdir()
    committed, next_epoch = b"weights after epoch 3", b"weights after ep"
    state = TrainState(config_hash="h", epochs_done=3, backup_sha256=hashlib.sha256(committed).hexdigest())
    if case == "weights committed":
        weights.write_bytes(committed)
        metadata.write_text('{"epo')  # a metadata write cut short must not stop the rerun
    elif case == "weights of the next epoch half written":
        previous.write_bytes(committed)
        weights.write_bytes(next_epoch)
        metadata.write_text('{"epoch": 3, "batch": 0}')  # not yet rewritten for epoch 4
    else:
        previous.write_bytes(next_epoch)
        weights.write_bytes(next_epoch)
    assert reconcile_backup(state, backup) is (case != "neither")
    if case != "neither":
        assert weights.read_bytes() == committed
        assert json.loads(metadata.read_text()) == {"epoch": 3, "batch": 0}


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    from mammoseg.model.train import train_model
    args = json.loads(sys.argv[1])
    train_model(args["shards"], args["out"], model_cfg=args["model"], train_cfg=args["train"],
                patch_cfg=args["patches"])
""")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["off", "on"])  # "on": the loss-scale optimizer's state must resume too
def test_kill_9_then_rerun_resumes_at_the_last_completed_epoch(tmp_path, precision):
    pytest.importorskip("tensorflow")
    epochs = 6
    shard = write_tiny_shard(tmp_path / "shard-0.h5", n_patients=8, copies=4)
    out = tmp_path / "models" / "tiny"
    args = json.dumps({"shards": [str(shard)], "out": str(out), "model": MODEL_CFG, "patches": PATCH_CFG,
                       "train": _train_cfg(epochs=epochs, batch_size=4, lr_schedule="cosine",
                                                         mixed_precision=precision)})
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-c", RESUME_SCRIPT, args]
    state_file = out / "_resume" / "state.json"
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None:
        if state_file.is_file() and json.loads(state_file.read_text())["epochs_done"] >= 1:
            break
        time.sleep(0.05)
    assert first.poll() is None, "training ended before it could be killed:\n" + first.stdout.read().decode()[-3000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = json.loads(state_file.read_text())["epochs_done"]
    assert 1 <= done_before < epochs
    assert not (out / "report.json").exists()

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming after epoch {done_before}" in second.stdout
    assert "Skipping variable loading for optimizer" not in second.stdout + second.stderr
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == list(range(1, epochs + 1))
    report = json.loads((out / "report.json").read_text())
    assert report["run_starts"] == [0, done_before]
    assert report["epochs_run"] == epochs
    # the cosine schedule continued where it stopped: the epoch-e rate is lr0 * (1 + cos(pi * (e-1) / epochs)) / 2
    expected = [0.01 * 0.5 * (1 + np.cos(np.pi * e / epochs)) for e in range(epochs)]
    np.testing.assert_allclose(history["learning_rate"], expected, rtol=1e-5)


def test_image_normalisation_travels_from_the_config_to_training_and_a_mismatch_is_refused(tmp_path):
    """patches.normalise is decided once, in the config: the plan carries it into the extract stage, the shards
    record it, training reads it back for augmentation; a plan that disagrees with the shards stops training."""
    from test_shards import random_collection

    from mammoseg.config.plan import build_plan, read_plan
    from mammoseg.data.manifest import read_manifest
    from mammoseg.errors import InputError
    from mammoseg.model.train import prepare_data, train_model
    from mammoseg.patches.shards import read_shard_attributes, run_extract

    manifest = random_collection(tmp_path / "data", 4, seed=1)
    config = validate_config({"patches": {"n": 6, "downscale": 4, "n_shards": 1, "normalise": "image"}})
    plan = tmp_path / "plan.json"
    build_plan(config["patches"], "test-patches", read_manifest(manifest)).write(plan)
    shard = tmp_path / "shard-0.h5"
    run_extract(plan, manifest, shard, 0)
    assert read_plan(plan).normalise == read_shard_attributes(shard)["normalise"] == "image"
    train_cfg = validate_config({"train": {"epochs": 1, "val_fraction": 0.0}})["train"]
    assert prepare_data([shard], train_cfg, fold=0).normalise == "image"
    window_plan = build_plan({**config["patches"], "normalise": "window"}, "test-patches", read_manifest(manifest))
    with pytest.raises(InputError, match="normalised per 'image' but the plan says patches.normalise: window"):
        train_model([shard], tmp_path / "model", model_cfg=config["model"], train_cfg=train_cfg,
                    patch_cfg=config["patches"], plan=window_plan)
    assert not (tmp_path / "model" / "model.keras").exists()
