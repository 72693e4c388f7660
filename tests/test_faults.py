"""Fault injection: kill -9 mid-write, truncated artefacts, a full disk.

What each fault must leave behind (docs/reliability.md):

* ``kill -9`` during extraction: nothing under the shard's name (only a ``.tmp-*`` file beside it), and a rerun
  writes a shard byte-identical to an uninterrupted run.
* ``kill -9`` during training then a rerun resumes after the last finished epoch: that test lives in
  ``tests/test_train.py::test_kill_9_then_rerun_resumes_at_the_last_completed_epoch`` and is not repeated here.
* A truncated shard or model: the CLI (``mammoseg train`` / ``mammoseg predict``) exits 2 with one line that names
  the file, no traceback; Snakemake schedules the file's rule again when asked (``--forcerun``) or when the file
  is deleted.
* A full disk (``ENOSPC``, simulated inside :func:`mammoseg.atomic.atomic_path`'s block, and for real on a 1 MiB
  tmpfs when the tests run as root): a clear error naming the target, and no output (nor temporary file) left.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tinyrun import scheduled_jobs, snakemake

from mammoseg.io.atomic import atomic_path, write_csv_atomic, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "mammoseg.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
       "PYTHONWARNINGS": "ignore"}
ENV.pop("MAMMOSEG_DEBUG", None)
PATCHES = {"n": 8, "downscale": 2, "n_shifted": 4, "max_shift": 0.25, "n_shards": 1, "seed": 0,
           "compression": "lzf"}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def configfile(folder: Path, sections: dict) -> list[str]:
    """``--configfile`` arguments for a YAML file holding ``sections`` (over the schema's defaults)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(sections))
    return ["--configfile", str(path)]


def plan_for(manifest: Path, patches: dict, out: Path) -> Path:
    """A plan.json for ``patches`` (over the defaults) and a training manifest, as the plan rule writes it."""
    from mammoseg.config import validate_config
    from mammoseg.config.plan import build_plan
    from mammoseg.data.manifest import read_manifest

    build_plan(validate_config({"patches": patches})["patches"], "test-patches", read_manifest(manifest)).write(out)
    return out


# TensorFlow's C++ start-up notices, printed through absl before its logging is set up, whatever
# TF_CPP_MIN_LOG_LEVEL says (e.g. "oneDNN custom operations are on", only on CPUs with AVX-512): not ours.
TF_STARTUP_NOTICE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWE]\d{4} \d\d:\d\d:)")


def assert_one_line_error(done: subprocess.CompletedProcess, names: Path) -> None:
    """Exit 2, one stderr line of ours naming ``names``, no traceback."""
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip() and not TF_STARTUP_NOTICE.match(line)]
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert str(names) in lines[0], lines[0]


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """A restructured synthetic training collection (16 images 1024x640, RLE): its manifest.csv."""
    from mammoseg.data.restructure import restructure_collection
    from mammoseg.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("faults")
    generate_dataset(root / "tree", n_train=16, n_test=1, rows=1024, cols=640, seed=3, quirks=False)
    restructure_collection(root / "tree", root / "restructured", abnormality="mass", split="train", progress=False)
    return root / "restructured" / "manifest.csv"


def extract_command(manifest: Path, out: Path) -> list[str]:
    # 40 shifted copies per ROI: ~8x the paper's work, so that the write lasts seconds even on a fast machine
    patches = {**PATCHES, "n_shifted": 40}
    plan = plan_for(manifest, patches, out.parent.parent / f"{out.parent.name}-plan.json")
    return [*CLI, "extract", *configfile(out.parent.parent / f"{out.parent.name}-config", {"patches": patches}),
            "--plan", str(plan), "--manifest", str(manifest), "--out", str(out), "--shard", "0"]


# --- kill -9 during extraction ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_during_extraction_leaves_no_shard_and_rerun_is_byte_identical(collection, tmp_path):
    clean = tmp_path / "clean" / "shard-0.h5"
    done = subprocess.run(extract_command(collection, clean), capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr

    target = tmp_path / "killed" / "shard-0.h5"
    target.parent.mkdir()
    child = subprocess.Popen(extract_command(collection, target), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    temporaries: list[Path] = []
    while time.monotonic() < deadline and child.poll() is None and not temporaries:
        temporaries = list(target.parent.glob(".tmp-*"))
        time.sleep(0.02)
    time.sleep(0.2)  # inside the write: patches are being appended
    assert child.poll() is None, "extraction finished before it could be killed; enlarge the collection"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not target.exists(), "a killed extraction left a file under the shard's name"
    leftovers = list(target.parent.glob(".tmp-*"))
    assert leftovers, "the kill should have interrupted a temporary file"  # proves the kill happened mid-write

    done = subprocess.run(extract_command(collection, target), capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sha256(target) == sha256(clean)


# --- truncated shard and model: clear CLI errors ---------------------------------------------------------------


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


@pytest.fixture(scope="module")
def small_shard(collection, tmp_path_factory) -> Path:
    from mammoseg.patches.shards import run_extract

    out = tmp_path_factory.mktemp("shard") / "shard-0.h5"
    run_extract(plan_for(collection, {**PATCHES, "n": 6, "downscale": 2}, out.with_name("plan.json")), collection,
                out, 0)
    return out


def cli_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """``mammoseg ARGS`` in this process (TensorFlow is imported once for all cases); a traceback would raise."""
    from mammoseg import cli

    capsys.readouterr()
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["mammoseg", *args], code, captured.out, captured.err)


TRAIN_CONFIG = {"patches": {**PATCHES, "n": 6}, "model": {"name": "t", "depth": 2, "filters": 4},
                "train": {"epochs": 1, "batch_size": 4}}


@pytest.mark.slow  # a fresh process imports TensorFlow: ~30 s on a busy 2-core machine
def test_truncated_shard_train_cli_subprocess_exit_2_one_line(small_shard, tmp_path):
    shard = tmp_path / "shard-0.h5"
    shutil.copy(small_shard, shard)
    truncate(shard, 0.5)
    done = run_cli("train", *configfile(tmp_path, TRAIN_CONFIG), "--out-dir", str(tmp_path / "m"), str(shard))
    assert_one_line_error(done, shard)
    assert not (tmp_path / "m" / "best.keras").exists()


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.9, 0.999])
def test_truncated_shard_train_cli_names_the_file(small_shard, tmp_path, capsys, keep):
    shard = tmp_path / "shard-0.h5"
    shutil.copy(small_shard, shard)
    truncate(shard, keep)
    done = cli_in_process(capsys, "train", *configfile(tmp_path, TRAIN_CONFIG), "--out-dir",
                          str(tmp_path / "model"), str(shard))
    assert_one_line_error(done, shard)
    assert not (tmp_path / "model" / "best.keras").exists()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from mammoseg.model.unet import build_unet

    path = tmp_path_factory.mktemp("model") / "model.keras"
    build_unet((32, 32, 1), depth=2, filters=4).save(path)
    return path


def predict_args(model: Path, collection: Path, out: Path) -> list[str]:
    import pandas as pd

    manifest = pd.read_csv(collection, dtype=str)
    image = collection.parent / manifest["image_path"].iloc[0]
    return ["predict", *configfile(out.parent / "predict-config", {"patches": {"n": 6, "downscale": 2}}), "--model",
            str(model), "--out", str(out), str(image)]


@pytest.mark.slow
def test_truncated_model_predict_cli_subprocess_exit_2_one_line(small_model, collection, tmp_path):
    model = tmp_path / "model.keras"
    shutil.copy(small_model, model)
    truncate(model, 0.5)
    done = run_cli(*predict_args(model, collection, tmp_path / "pred"))
    assert_one_line_error(done, model)
    assert not (tmp_path / "pred").exists() or not any((tmp_path / "pred").iterdir())


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.9, 0.999])
def test_truncated_model_predict_cli_names_the_file(small_model, collection, tmp_path, capsys, keep):
    model = tmp_path / "model.keras"
    shutil.copy(small_model, model)
    truncate(model, keep)
    out = tmp_path / "pred"
    done = cli_in_process(capsys, *predict_args(model, collection, out))
    assert_one_line_error(done, model)
    # the probability maps' folder appears whole or not at all: nothing of it is left
    assert not (out / "probabilities").exists() and not list(tmp_path.rglob("*.npz"))


# --- Snakemake re-creates a damaged artefact on request ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.workflow
def test_snakemake_recreates_truncated_shard_and_model_on_request(tmp_path):
    # its own run up to training: after a whole run Snakemake does not rebuild a deleted intermediate file whose
    # downstream outputs are complete, so the session's finished run would not show the deletion case
    run = tmp_path
    shutil.copy(REPO / "tests" / "data" / "tiny.yaml", run / "config.yaml")
    done = snakemake(run, "--until", "train")
    assert done.returncode == 0, done.stderr[-5000:]
    (shard,) = run.glob("results/patches/*/shard-0.h5")
    (model,) = run.glob("results/models/*/fold-0/best.keras")
    assert scheduled_jobs(snakemake(run, "-n", "--until", "train")) == {}

    truncate(shard)
    truncate(model)
    # on request: the damaged file's rule (and only what depends on it) is scheduled
    jobs = scheduled_jobs(snakemake(run, "-n", "--until", "train", "--forcerun", str(shard.relative_to(run))))
    assert jobs.get("extract_shard") == 1 and "train" in jobs
    jobs = scheduled_jobs(snakemake(run, "-n", "--until", "train", "--forcerun", str(model.relative_to(run))))
    assert jobs.get("train") == 1 and "extract_shard" not in jobs
    # deleting a damaged file has the same effect
    shard.unlink()
    jobs = scheduled_jobs(snakemake(run, "-n", "--until", "train"))
    assert jobs.get("extract_shard") == 1 and "train" in jobs
    # and a real rerun rebuilds it whole
    done = snakemake(run, "--until", "train", "--forcerun", str(model.relative_to(run)))
    assert done.returncode == 0, done.stderr[-5000:]
    from mammoseg.inference.predict import load_model
    from mammoseg.model.dataset import read_provenance

    assert len(read_provenance([shard])) > 0
    load_model(model)


# --- a full disk ------------------------------------------------------------------------------------------------


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_enospc_inside_atomic_block_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"version": 1})
    before = target.read_bytes()
    with pytest.raises(OSError) as caught:
        with atomic_path(target) as tmp:
            tmp.write_text('{"version": 2, "trunc')  # half of the new content reached the disk ...
            enospc()  # ... then the disk filled up
    assert caught.value.errno == errno.ENOSPC
    assert str(target) in str(caught.value), "the error should name the file being written"
    assert target.read_bytes() == before  # the old, valid file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left


def test_csv_with_control_characters_reads_back_row_for_row(tmp_path):
    """Text from a damaged header (NUL, CR, LF, tab) must not split a row: each row reads back as one, shown."""
    import pandas as pd

    frame = pd.DataFrame({"reason": ["undecodable", "bad_header", "ok"],
                          "message": ["uid '\x00\r\x00\r'", "two\nlines\tand µm", None], "count": [1, 2, 3]})
    write_csv_atomic(tmp_path / "t.csv", frame)
    back = pd.read_csv(tmp_path / "t.csv", dtype=str, keep_default_na=False)
    assert list(back["reason"]) == ["undecodable", "bad_header", "ok"]
    assert list(back["message"]) == ["uid '\\x00\\r\\x00\\r'", "two\\nlines\\tand µm", ""]
    assert list(back["count"]) == ["1", "2", "3"]


def test_enospc_during_extraction_cli_clear_error_no_shard(collection, tmp_path, monkeypatch):
    from mammoseg import cli
    from mammoseg.patches import shards

    calls = {"n": 0}
    real = shards.preprocess_window

    def filling_disk(window, factor, intensity_range):  # the disk fills after a few patches have been written
        calls["n"] += 1
        if calls["n"] > 6:
            enospc()
        return real(window, factor, intensity_range)

    monkeypatch.setattr(shards, "preprocess_window", filling_disk)
    out = tmp_path / "patches" / "shard-0.h5"
    plan = plan_for(collection, PATCHES, tmp_path / "plan.json")
    code = cli.main(["extract", *configfile(tmp_path / "c", {"patches": PATCHES}), "--plan", str(plan),
                     "--manifest", str(collection), "--out", str(out), "--shard", "0"])
    assert code == 2
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def _mount_tmpfs(folder: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def test_real_full_disk_during_the_hdf5_write_cli_exit_2_no_crash(collection, tmp_path):
    """The disk fills up inside HDF5's own writes (past the free-space check): exit 2, one line, no SIGSEGV.

    1x1-pixel patches (n=4, downscale 16) and 400 shifted copies: the free-space check counts the pixels (about
    44 KiB) and lets the shard start, but the chunk index and provenance of 8,822 patches need about 3.5 MiB.
    Before the shard was written through :mod:`mammoseg.io.hdf5`, HDF5 crashed the process at exit (-11).
    """
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, "1536k"):
        pytest.skip("needs root and a mountable tmpfs for a real ENOSPC")
    try:
        out = disk / "shard-0.h5"
        patches = {**PATCHES, "n": 4, "downscale": 16, "n_shifted": 400, "compression": "none"}
        plan = plan_for(collection, patches, tmp_path / "plan.json")
        done = run_cli("extract", *configfile(tmp_path / "c", {"patches": patches}), "--plan", str(plan),
                       "--manifest", str(collection), "--out", str(out), "--shard", "0")
        assert done.returncode != -signal.SIGSEGV, "HDF5 crashed the process after the disk filled up"
        assert_one_line_error(done, out)
        assert "[Errno 28]" in done.stderr and "free space" not in done.stderr  # the write failed, not the check
        assert list(disk.iterdir()) == []  # neither the shard nor a temporary file
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_real_full_disk_tmpfs_extract_clear_error_no_shard(collection, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, "256k"):
        pytest.skip("needs root and a mountable tmpfs for a real ENOSPC")
    try:
        out = disk / "shard-0.h5"
        patches = {**PATCHES, "compression": "none"}
        plan = plan_for(collection, patches, tmp_path / "plan.json")
        done = run_cli("extract", *configfile(tmp_path / "c", {"patches": patches}), "--plan", str(plan),
                       "--manifest", str(collection), "--out", str(out), "--shard", "0")
        assert_one_line_error(done, out)
        assert "[Errno 28]" in done.stderr and "free space" in done.stderr
        assert list(disk.iterdir()) == []  # neither the shard nor a temporary file
        # the full-disk error also reaches JSON/CSV writers the same way
        filler = disk / "filler"
        with pytest.raises(OSError):
            filler.write_bytes(np.zeros(1 << 20, np.uint8).tobytes())
        filler.unlink(missing_ok=True)
        with pytest.raises(OSError) as caught:
            write_json_atomic(disk / "big.json", {"x": "y" * (1 << 20)})
        assert caught.value.errno == errno.ENOSPC and str(disk / "big.json") in str(caught.value)
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
