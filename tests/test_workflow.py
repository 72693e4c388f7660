"""Snakemake end to end on the tiny config, in a temporary folder: tables written and consistent, caching exact.

One real run of the whole DAG (the session's ``tiny_run``, conftest.py), then dry runs that check what a change
re-schedules:
nothing after a finished run; one test image's jobs after that image changes; training and what follows (but
no extraction) after a training parameter changes; one shard after one training case changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml
from tinyrun import scheduled_jobs, snakemake

from mammoseg.config.keys import stage_keys
from mammoseg.config.resolve import resolve_config
from mammoseg.data.manifest import bucket_of, chunk_count, read_manifest

pytestmark = [pytest.mark.workflow, pytest.mark.slow]



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


def keys_of(*configfiles: Path, **overrides):
    """The stage keys (result folders) of a configuration, resolved as the workflow resolves it."""
    return stage_keys(resolve_config(list(configfiles), overrides))


@pytest.fixture()
def finished_run(tiny_run):
    """The session's finished tiny run (conftest.py)."""
    return tiny_run


def n_test_chunks(workdir: Path, config) -> int:
    rows = read_manifest(folders(workdir, stage_keys(config))["data"] / "test" / "manifest.csv")
    return chunk_count(rows, config["infer"]["chunk_size"])


def folders(workdir: Path, keys) -> dict[str, Path]:
    results = workdir / "results"
    return {"data": results / "restructured" / keys.data, "patches": results / "patches" / keys.patches,
            "models": results / "models" / keys.model,
            "predictions": results / "predictions" / keys.model / keys.inference,
            "experiment": results / "experiments" / keys.experiment, "synth": results / "synth" / keys.synth}


def test_tables_are_written_and_consistent(finished_run):
    workdir, config, result = finished_run
    where = folders(workdir, stage_keys(config))
    test_manifest = pd.read_csv(where["data"] / "test/manifest.csv", dtype=str, keep_default_na=False)
    per_image = pd.read_csv(where["experiment"] / "test/per_image.csv")
    # one row per test image that kept at least one ROI, no more, no less
    as_predicted = per_image[per_image["min_area"] == 0]
    assert sorted(as_predicted["image_id"]) == sorted(set(test_manifest["image_id"]))
    for column in ("dice", "iou"):
        assert per_image[column].between(0, 1).all()
    summary = pd.read_csv(where["experiment"] / "test/summary.csv")
    assert {"cpm", "tpr_at_1_fppi", "pooled_dice"} <= set(summary["metric"])
    candidates = pd.read_csv(where["experiment"] / "test/candidates.csv")
    assert set(candidates["image_id"]) <= set(test_manifest["image_id"])
    # every test image has its probability map (prediction), and its mask, overlay and JSON (evaluation)
    n_chunks = n_test_chunks(workdir, config)
    assert n_chunks == 2
    for image_id in set(test_manifest["image_id"]):
        chunk = f"chunk-{bucket_of(image_id, n_chunks)}"
        assert (where["predictions"] / "test" / chunk / f"{image_id}.prob.npz").is_file()
        for suffix in (".mask.png", ".overlay.png", ".json"):
            assert (where["experiment"] / "test" / chunk / f"{image_id}{suffix}").is_file()
    # the run's resolved configuration lies beside its results, and the run printed its summary
    assert yaml.safe_load((where["experiment"] / "config.yaml").read_text()) == config
    assert "mammoseg evaluation of" in result.stdout and str(where["experiment"].relative_to(workdir)) in result.stdout


def test_restructure_counts_reconcile(finished_run):
    workdir, config, _ = finished_run
    where = folders(workdir, stage_keys(config))
    truth = json.loads((where["synth"] / "truth.json").read_text())
    for split in ("train", "test"):
        folder = where["data"] / split
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
        # Snakemake marks the synthetic download (a directory output) with a hidden timestamp file: recorded, too
        ignored = skipped[skipped["reason"] == "ignored"]
        assert all(Path(source).name == ".snakemake_timestamp" for source in ignored["source_path"]), ignored
        assert set(skipped["reason"]) <= expected_reasons | {"image_without_mask", "ignored"}


def test_patch_count_matches_rois_and_the_plan(finished_run):
    workdir, config, _ = finished_run
    where = folders(workdir, stage_keys(config))
    kept = pd.read_csv(where["data"] / "train/manifest.csv", dtype=str, keep_default_na=False)
    patches = pd.read_csv(where["patches"] / "patches.csv", dtype=str, keep_default_na=False)
    skipped = pd.read_csv(where["patches"] / "skipped.csv", dtype=str, keep_default_na=False)
    lesion_patches = patches[patches["copy_index"].astype(int) >= 0]
    negatives = patches[patches["copy_index"].astype(int) < 0]
    copies = 1 + config["patches"]["n_shifted"]
    assert len(lesion_patches) == copies * (len(kept) - len(skipped))
    assert set(lesion_patches["roi_id"]) | set(skipped["roi_id"]) == set(kept["roi_id"])
    # lesion-free windows: at most n_negative per image, only from images that have patches
    per_image = negatives.groupby("image_id").size()
    assert (per_image <= config["patches"]["n_negative"]).all() and len(per_image) > 0
    assert set(negatives["image_id"]) <= set(lesion_patches["image_id"])
    # the plan counted what extraction would make, negatives included
    plan = json.loads((where["patches"] / "plan.json").read_text())
    images = kept["image_id"].nunique()
    assert plan["expected_patches"] == copies * len(kept) + config["patches"]["n_negative"] * images
    assert len(patches) <= plan["expected_patches"]


def test_second_dry_run_schedules_nothing(finished_run):
    workdir, _, _ = finished_run
    assert scheduled_jobs(snakemake(workdir, "-n")) == {}


def test_changed_test_image_reruns_only_its_chunk(finished_run):
    workdir, config, _ = finished_run
    where = folders(workdir, stage_keys(config))
    manifest = pd.read_csv(where["data"] / "test/manifest.csv", dtype=str, keep_default_na=False)
    image = where["data"] / "test" / manifest["image_path"].iloc[0]
    with changed_pixel(image.resolve()):
        jobs = scheduled_jobs(snakemake(workdir, "-n"))
    assert jobs == {"predict_chunk": 1, "evaluate_chunk": 1, "summarise": 1, "report_pages": 1}


def test_a_new_threshold_reruns_evaluation_only(finished_run):
    workdir, config, _ = finished_run
    # the exact command line of issue 15: Snakemake passes the nested value as text, the resolver reads YAML
    jobs = scheduled_jobs(snakemake(workdir, "-n", "--config", "infer={threshold: 0.4}"))
    # a new experiment folder: its tables, report and model package (whose card states the threshold)
    assert jobs == {"evaluate_chunk": n_test_chunks(workdir, config), "summarise": 1, "experiment_config": 1,
                    "report_pages": 1, "export_model": 1}


def test_a_variant_writes_beside_the_original_and_leaves_it_complete(finished_run):
    """Run a blended-inference variant for real; the original's dry run then schedules nothing."""
    workdir, config, _ = finished_run
    original = folders(workdir, stage_keys(config))
    before = {p: p.stat().st_mtime_ns for p in original["experiment"].rglob("*") if p.is_file()}
    done = snakemake(workdir, "--config", "infer={mode: blended}")
    assert done.returncode == 0, done.stderr[-4000:]
    variant = folders(workdir, keys_of(workdir / "config.yaml", infer={"mode": "blended"}))
    assert variant["experiment"] != original["experiment"] and variant["models"] == original["models"]
    assert (variant["experiment"] / "test/summary.csv").is_file()
    assert scheduled_jobs(snakemake(workdir, "-n")) == {}
    assert {p: p.stat().st_mtime_ns for p in original["experiment"].rglob("*") if p.is_file()} == before


def test_changed_training_parameter_retrains_but_does_not_extract(finished_run):
    workdir, config, _ = finished_run
    changed = workdir / "changed.yaml"
    changed.write_text(yaml.safe_dump({"train": {"learning_rate": 0.0005}}))
    jobs = scheduled_jobs(snakemake(workdir, "-n", "--configfile", str(workdir / "config.yaml"), str(changed)))
    n_chunks = n_test_chunks(workdir, config)
    assert jobs == {"splits": 1, "train": 1, "predict_chunk": n_chunks, "evaluate_chunk": n_chunks, "summarise": 1,
                    "experiment_config": 1, "report_pages": 1, "export_model": 1}


def test_changed_training_case_reextracts_one_shard(finished_run):
    workdir, config, _ = finished_run
    folder = folders(workdir, stage_keys(config))["data"] / "train"
    manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    with changed_pixel((folder / manifest["image_path"].iloc[0]).resolve()):
        jobs = scheduled_jobs(snakemake(workdir, "-n"))
    assert jobs["extract_shard"] == 1
    assert jobs["train"] == 1 and jobs.get("restructure", 0) == 0


def test_new_studies_are_predicted_without_ground_truth(finished_run, tmp_path):
    """studies.root: any folder of mammograms, no truth: masks, overlays, DICOM SEGs and candidate tables; a file
    that is not a mammogram is a recorded skip. Two folders in a row are each predicted as themselves and their
    findings coexist; the test split's results are not touched and the run's own dry run still schedules nothing."""
    from mammoseg.studies import studies_set

    workdir, config, _ = finished_run
    where = folders(workdir, stage_keys(config))
    manifest = pd.read_csv(where["data"] / "test/manifest.csv", dtype=str, keep_default_na=False)
    images = sorted(set(manifest["image_path"]))
    first, second = tmp_path / "new studies", tmp_path / "second"
    for k, relative in enumerate(images[:2]):
        (first / f"visit {k}").mkdir(parents=True)
        shutil.copy((where["data"] / "test" / relative).resolve(), first / f"visit {k}" / "scan.dcm")
    (first / "report.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    second.mkdir()
    shutil.copy((where["data"] / "test" / images[2]).resolve(), second / "scan.dcm")
    before = {p: p.stat().st_mtime_ns for p in (where["experiment"] / "test").rglob("*") if p.is_file()}
    record = (where["experiment"] / "config.yaml").read_bytes()
    findings = {}
    for folder, n in ((first, 2), (second, 1)):
        done = snakemake(workdir, "--config", f"studies={{root: '{folder}'}}")
        assert done.returncode == 0, done.stderr[-4000:]
        image_set = studies_set(folder)
        assert f"new studies of {folder}" in done.stdout + done.stderr
        table = pd.read_csv(where["experiment"] / image_set / "findings.csv", dtype=str, keep_default_na=False)
        assert len(table) == n and set(table["status"]) == {"evaluated"}
        findings[folder] = (image_set, table)
        for image_id in table["image_id"]:
            chunk = next((where["experiment"] / image_set).glob(f"chunk-*/{image_id}.json")).parent
            for suffix in (".mask.png", ".overlay.png", ".seg.dcm"):
                assert (chunk / f"{image_id}{suffix}").is_file(), suffix
            assert json.loads((chunk / f"{image_id}.json").read_text())["truth"] == "unknown"
        # the tiny model was trained on the synthetic demo: its findings say so
        assert "warning: this model was trained on the synthetic demo data" in (
            where["experiment"] / image_set / "summary.txt").read_text()
    # each folder predicted as itself: its own images, named as the test split names them, findings side by side
    test_ids = dict(zip(manifest["image_path"], manifest["image_id"]))
    assert set(findings[first][1]["image_id"]) == {test_ids[p] for p in images[:2]}
    assert set(findings[second][1]["image_id"]) == {test_ids[images[2]]}
    assert findings[first][0] != findings[second][0]
    again = pd.read_csv(where["experiment"] / findings[first][0] / "findings.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(again, findings[first][1])
    skipped = workdir / "results" / "studies" / findings[first][0] / "skipped.csv"
    assert pd.read_csv(skipped)["reason"].tolist() == ["not_dicom"]
    assert {p: p.stat().st_mtime_ns for p in (where["experiment"] / "test").rglob("*") if p.is_file()} == before
    assert (where["experiment"] / "config.yaml").read_bytes() == record
    assert scheduled_jobs(snakemake(workdir, "-n")) == {}
    assert scheduled_jobs(snakemake(workdir, "-n", "--config", f"studies={{root: '{second}'}}")) == {}
    # a file added to a folder makes it other studies: indexed and predicted again
    shutil.copy((where["data"] / "test" / images[0]).resolve(), second / "added.dcm")
    jobs = scheduled_jobs(snakemake(workdir, "-n", "--config", f"studies={{root: '{second}'}}"))
    assert jobs["index_studies"] == 1 and jobs["summarise_studies"] == 1


def test_the_dry_run_refuses_a_studies_folder_without_mammograms(finished_run, tmp_path):
    """As for data.root: a missing folder, an empty one or one without a DICOM file fails the dry run with one
    line naming it and exit status 2, as mammoseg predict does (test_studies.py)."""
    workdir, _, _ = finished_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "report.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (tmp_path / "files" / "notes.txt").write_text("no image\n")
    for name, reason in (("missing", "no such folder"), ("empty", "no file in this folder"),
                         ("files", "none of its 2 files is a DICOM file")):
        done = snakemake(workdir, "-n", "--config", f"studies={{root: '{tmp_path / name}'}}")
        assert done.returncode == 2
        (line,) = [line for line in done.stderr.splitlines() if line.startswith("mammoseg: error:")]
        assert line.startswith(f"mammoseg: error: 'studies.root' = '{tmp_path / name}': {reason}"), line
        assert "Traceback" not in done.stderr and 'File "' not in done.stderr


# Two folds with hard-negative mining and a calibrated operating point: one variant run serves the mining test
# and the calibration test (each of the two would otherwise train the same two round-1 models).
MINING = {"folds": 2, "hard_negatives": {"per_image": 2}}
CALIBRATION = {"target_fppi": 1.0}
VARIANT_OVERRIDES = ("train={folds: 2, hard_negatives: {per_image: 2}}", "evaluate={target_fppi: 1.0}")


@pytest.fixture(scope="module")
def mined_calibrated_run(tiny_run):
    """The session's run, then its variant with ``MINING`` and ``CALIBRATION``: (workdir, config, dry-run jobs
    the variant scheduled before it ran)."""
    workdir, config, _ = tiny_run
    jobs = scheduled_jobs(snakemake(workdir, "-n", "--config", *VARIANT_OVERRIDES))
    done = snakemake(workdir, "--config", *VARIANT_OVERRIDES)
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir, config, jobs


def test_a_calibrated_variant_binarises_the_test_images_at_the_out_of_fold_threshold(mined_calibrated_run):
    """evaluate.target_fppi: two folds, the threshold read off their out-of-fold candidates (rule calibrate), then
    the test images binarised at it and the out-of-fold ones at infer.threshold."""
    workdir, config, jobs = mined_calibrated_run
    assert jobs["calibrate"] == 1 and jobs["summarise"] == 2
    where = folders(workdir, keys_of(workdir / "config.yaml", train=MINING, evaluate=CALIBRATION))
    point = json.loads((where["experiment"] / "operating_point.json").read_text())
    assert point["source"] == "calibrated" and point["calibration"]["expected_fppi"] <= 1.0
    thresholds = {image_set: {json.loads(p.read_text())["threshold"]
                              for p in (where["experiment"] / image_set).glob("chunk-*/*.json")}
                  for image_set in ("test", "oof")}
    assert thresholds == {"test": {point["threshold"]}, "oof": {config["infer"]["threshold"]}}
    # the exported model carries the point and says at which threshold its out-of-fold figures were taken
    card = json.loads((where["experiment"] / "model" / "model_card.json").read_text())
    assert json.loads((where["experiment"] / "model" / "operating_point.json").read_text()) == point
    assert card["validation"]["operating_point"] == point
    assert card["validation"]["out_of_fold_threshold"] == config["infer"]["threshold"]
    assert card["config"]["values"]["infer"]["threshold"] == point["threshold"]
    assert card["sliding_window"]["parameters"]["threshold"] == point["threshold"]
    # the calibration saw the out-of-fold candidates only: recompute it from the oof per-image records
    from mammoseg.evaluation.calibrate import calibrate_threshold
    from mammoseg.evaluation.summary import read_image_records

    records = [r for r in read_image_records(sorted((where["experiment"] / "oof").glob("chunk-*")))
               if r["status"] == "evaluated"]
    fp = [c["score"] for r in records for c in r["candidates"] if c["false_positive"]]
    hits = [les["hit_score"] for r in records for les in r["lesion_hits"]]
    again = calibrate_threshold(fp, hits, sum(r["n_lesions"] for r in records), len(records), 1.0)
    assert again["threshold"] == point["threshold"]


def test_hard_negative_mining_trains_a_second_round_on_the_first_rounds_false_positives(mined_calibrated_run):
    """train.hard_negatives: round 1 is the same run without mining (shared models); per fold f, round-1 model f's
    maps of the images it was fit on give fold f's mined shard (rule mine), round-2 model f trains on the shards
    plus it, and the experiment uses round 2. No window of a fold's validation patients reaches its training."""
    workdir, config, jobs = mined_calibrated_run
    assert jobs["mine"] == 2 and jobs["train"] == 4, jobs
    first = keys_of(workdir / "config.yaml", train={"folds": 2})
    second = keys_of(workdir / "config.yaml", train=MINING, evaluate=CALIBRATION)
    assert first.model != second.model and first.patches == second.patches
    results = workdir / "results"
    round1, round2 = results / "models" / first.model, results / "models" / second.model
    fold_of = json.loads((round1 / "splits.json").read_text())["fold_of"]
    assert json.loads((round2 / "splits.json").read_text())["fold_of"] == fold_of
    import h5py

    from mammoseg.patches.shards import read_table

    mined_patches = 0
    for fold in (0, 1):
        assert (round1 / f"fold-{fold}" / "best.keras").is_file()
        mined = round2 / f"fold-{fold}" / "hard_negatives.h5"
        report = json.loads((round2 / f"fold-{fold}" / "report.json").read_text())
        assert mined.name in report["data"]["shards"], report["data"]
        assert mined.name not in json.loads((round1 / f"fold-{fold}" / "report.json").read_text())["data"]["shards"]
        with h5py.File(mined) as handle:
            provenance = read_table(handle, "provenance")
            assert handle["masks"].shape[0] == len(provenance) and not handle["masks"][:].any()  # negatives
        assert provenance["roi_id"].str.contains("_hard").all()
        # the windows come from the patients fold `fold`'s model was fit on, never from its validation patients
        assert {fold_of[p] for p in provenance["patient_id"]} <= {1 - fold}
        # and from round-1 model `fold`'s own maps of exactly those images
        maps = {p.name.removesuffix(".prob.npz") for p in
                (results / "predictions" / first.model / first.inference / f"fit-{fold}").glob("chunk-*/*.prob.npz")}
        train_rows = read_manifest(folders(workdir, second)["data"] / "train" / "manifest.csv")
        assert maps == {r["image_id"] for r in train_rows if fold_of[r["patient_id"]] != fold}
        mined_patches += len(provenance)
    assert mined_patches > 0
    assert (results / "experiments" / second.experiment / "test" / "summary.csv").is_file()
    # a plain two-fold run reuses round 1: nothing is trained again
    assert "train" not in scheduled_jobs(snakemake(workdir, "-n", "--config", "train={folds: 2}"))
    # one changed training image: its shard is cut again, and both rounds (every fold trains on every shard) and
    # the mining between them run again; nothing is restructured
    folder = folders(workdir, second)["data"] / "train"
    manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    with changed_pixel((folder / manifest["image_path"].iloc[0]).resolve()):
        jobs = scheduled_jobs(snakemake(workdir, "-n", "--config", *VARIANT_OVERRIDES))
    assert jobs["extract_shard"] == 1 and jobs["mine"] == 2 and jobs["train"] == 4, jobs
    assert "restructure" not in jobs and "synth" not in jobs
