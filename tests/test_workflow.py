"""Snakemake end to end on the tiny config, in a temporary folder: tables written and consistent, caching exact.

One real run of the whole DAG (module fixture), then dry runs that check what a change re-schedules:
nothing after a finished run; one test image's jobs after that image changes; training and what follows (but
no extraction) after a training parameter changes; one shard after one training case changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny.yaml"


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the repository's workflow with the tiny config in ``workdir``."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(workdir / "config.yaml"), "--cores", "2", "--resources", "gpu=1", *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def scheduled_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Parse the 'Job stats' table of a dry run into {rule: count}; {} when nothing is scheduled."""
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if not match:
            break
        counts[match.group(1)] = int(match.group(2))
    counts.pop("total", None)
    counts.pop("all", None)  # the default target, re-run whenever anything is
    return counts


@contextlib.contextmanager
def changed_pixel(path: Path):
    """Change one pixel of a DICOM in place, then restore the original bytes.

    The content must change, not just the mtime: Snakemake compares checksums of small inputs and ignores a
    bare touch.
    """
    original = path.read_bytes()
    ds = pydicom.dcmread(path)
    ds.decompress()
    pixels = ds.pixel_array.copy()
    pixels[0, 0] ^= 1
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    later = time.time() + 2
    os.utime(path, (later, later))
    try:
        yield path
    finally:
        path.write_bytes(original)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny-run")
    shutil.copy(TINY, workdir / "config.yaml")
    result = snakemake(workdir)
    assert result.returncode == 0, f"workflow failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    config = yaml.safe_load(TINY.read_text())
    return workdir, config, result


def test_tables_are_written_and_consistent(finished_run):
    workdir, config, _ = finished_run
    results = workdir / "results"
    model = config["model"]["name"]
    test_manifest = pd.read_csv(results / "restructured/mass/test/manifest.csv", dtype=str, keep_default_na=False)
    per_image = pd.read_csv(results / f"metrics/{model}/per_image.csv")
    # one row per test image that kept at least one ROI, no more, no less
    assert sorted(per_image["image_id"]) == sorted(set(test_manifest["image_id"]))
    for column in ("dice", "iou"):
        assert per_image[column].between(0, 1).all()
    summary = pd.read_csv(results / f"metrics/{model}/summary.csv")
    assert not summary.empty
    # every test image has its prediction map, overlay and per-image JSON
    for image_id in set(test_manifest["image_id"]):
        assert (results / f"predictions/{model}/{image_id}.prob.npz").is_file()
        assert (results / f"overlays/{model}/{image_id}.png").is_file()
        assert (results / f"metrics/{model}/images/{image_id}.json").is_file()


def test_restructure_counts_reconcile(finished_run):
    workdir, _, _ = finished_run
    truth = json.loads((workdir / "results/synth/truth.json").read_text())
    for split in ("train", "test"):
        folder = workdir / "results/restructured/mass" / split
        kept = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
        skipped = pd.read_csv(folder / "skipped.csv", dtype=str, keep_default_na=False)
        assert len(kept) > 0
        # every restructured path resolves to a readable file
        for relative in list(kept["image_path"]) + list(kept["mask_path"]):
            assert (folder / relative).resolve().is_file(), relative
        # the synthetic truth knows which ROIs must be kept: all of them are, and nothing else
        expected = {r["roi_id"] for r in truth["rois"] if r["split"] == split and r["fate"] == "kept"}
        assert set(kept["roi_id"]) == expected
        expected_reasons = {r["reason"] for r in truth["rois"] + truth["files"] if r.get("reason")}
        assert set(skipped["reason"]) <= expected_reasons | {"image_without_mask"}


def test_patch_count_matches_rois(finished_run):
    workdir, config, _ = finished_run
    results = workdir / "results"
    kept = pd.read_csv(results / "restructured/mass/train/manifest.csv", dtype=str, keep_default_na=False)
    patches = pd.read_csv(results / "patches/mass/patches.csv", dtype=str, keep_default_na=False)
    skipped = pd.read_csv(results / "patches/mass/skipped.csv", dtype=str, keep_default_na=False)
    lesion_patches = patches[patches["copy_index"].astype(int) >= 0]
    negatives = patches[patches["copy_index"].astype(int) < 0]
    copies = 1 + config["patches"]["n_shifted"]
    assert len(lesion_patches) == copies * (len(kept) - len(skipped))
    assert set(lesion_patches["roi_id"]) | set(skipped["roi_id"]) == set(kept["roi_id"])
    # lesion-free windows: at most n_negative per image, only from images that have patches
    per_image = negatives.groupby("image_id").size()
    assert (per_image <= config["patches"]["n_negative"]).all() and len(per_image) > 0
    assert set(negatives["image_id"]) <= set(lesion_patches["image_id"])


def test_second_dry_run_schedules_nothing(finished_run):
    workdir, _, _ = finished_run
    assert scheduled_jobs(snakemake(workdir, "-n")) == {}


def test_changed_test_image_reruns_only_its_jobs(finished_run):
    workdir, _, _ = finished_run
    manifest = pd.read_csv(workdir / "results/restructured/mass/test/manifest.csv", dtype=str, keep_default_na=False)
    image = workdir / "results/restructured/mass/test" / manifest["image_path"].iloc[0]
    with changed_pixel(image.resolve()):
        jobs = scheduled_jobs(snakemake(workdir, "-n"))
    assert jobs == {"predict": 1, "evaluate_image": 1, "summarise": 1}


def test_changed_training_parameter_retrains_but_does_not_extract(finished_run):
    workdir, config, _ = finished_run
    n_images = len(set(pd.read_csv(workdir / "results/restructured/mass/test/manifest.csv")["image_id"]))
    changed = yaml.safe_load((workdir / "config.yaml").read_text())
    changed.setdefault("train", {})["learning_rate"] = 0.0005
    (workdir / "changed.yaml").write_text(yaml.safe_dump(changed))
    jobs = scheduled_jobs(snakemake(workdir, "-n", "--configfile", str(workdir / "changed.yaml")))
    assert jobs.get("extract_shard", 0) == 0 and jobs.get("restructure", 0) == 0
    assert jobs["train"] == 1
    assert jobs["predict"] == n_images and jobs["evaluate_image"] == n_images and jobs["summarise"] == 1


def test_changed_training_case_reextracts_one_shard(finished_run):
    workdir, config, _ = finished_run
    folder = workdir / "results/restructured/mass/train"
    manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    with changed_pixel((folder / manifest["image_path"].iloc[0]).resolve()):
        jobs = scheduled_jobs(snakemake(workdir, "-n"))
    assert jobs["extract_shard"] == 1
    assert jobs["train"] == 1 and jobs.get("restructure", 0) == 0
