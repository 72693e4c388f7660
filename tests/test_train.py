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

from mammoseg.patches.shards import PROVENANCE_COLUMNS
from mammoseg.model.train import split_train_val

SIDE = 32  # patch side in pixels: patches n=5, downscale 1
PATCH_CFG = {"n": 5, "downscale": 1, "n_shifted": 2}
MODEL_CFG = {"name": "tiny", "depth": 2, "filters": 4, "batch_norm": True, "dropout": 0.0,
             "upsampling": "transpose", "kernel_size": 3, "max_filters": 1024, "convs_per_level": 2}


def _train_cfg(**overrides):
    cfg = {"loss": "bce_dice", "batch_size": 8, "epochs": 2, "learning_rate": 0.01, "val_fraction": 0.25,
           "split_by": "patient", "early_stopping_patience": 0, "lr_schedule": "none", "mixed_precision": "off",
           "deterministic": False, "seed": 0}
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
    rows = [{"patient_id": f"P_{p:05d}", "roi_id": f"P_{p:05d}_LEFT_CC_{l}", "copy_index": c}
            for p in range(n_patients) for l in range(lesions) for c in range(copies)]
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


# --- training ---------------------------------------------------------------------------------------------------


def test_two_epoch_training_writes_every_output_and_reloads(tmp_path):
    pytest.importorskip("tensorflow")
    import keras

    from mammoseg.model.dataset import read_provenance
    from mammoseg.model.train import HISTORY_COLUMNS, mask_pixel_counts, train_model

    shard = write_tiny_shard(tmp_path / "shard-0.h5")
    out = tmp_path / "models" / "tiny"
    report = train_model([shard], out, model_cfg=MODEL_CFG, train_cfg=_train_cfg(loss="weighted_bce"),
                         patch_cfg=PATCH_CFG)
    for name in ("model.keras", "best.keras", "history.csv", "curves.png", "report.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert any((out / "tensorboard").iterdir())
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

    # the saved model reloads in safe mode and predicts the same
    x = np.random.default_rng(1).random((3, SIDE, SIDE, 1), dtype=np.float32)
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    best = keras.saving.load_model(out / "best.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(model(x, training=False)), np.asarray(best(x, training=False)),
                               atol=1e-6)
    assert model.loss.get_config()["pos_weight"] == pytest.approx(black / white)


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
