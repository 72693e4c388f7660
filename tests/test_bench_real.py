"""benchmarks/real.py (``make bench-real``): a clean skip without data, and its reading of a results folder."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real():
    spec = importlib.util.spec_from_file_location("bench_real", REPO / "benchmarks" / "real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def fabricated_experiment(root: Path) -> Path:
    """An experiment folder with 4 images: 2 with one lesion each (A, B), 2 normal (N1, N2).

    Candidates: A: hit 0.9, FP 0.3; B: hit 0.4, FP 0.8; N1: FP 0.6, FP 0.2; N2: none.
    FROC over the candidate scores (TPR, FP count): 0.9 -> (0.5, 0), 0.8 -> (0.5, 1), 0.6 -> (0.5, 2),
    0.4 -> (1.0, 2), 0.3 -> (1.0, 3), 0.2 -> (1.0, 4).
    """
    exp = root / "results" / "experiments" / "mias-dev-0123abcd"
    oof = exp / "oof"
    metrics = {"n_images": 4, "n_lesions": 2, "n_normal_images": 2, "tpr": 0.5, "fppi": 0.75,
               "pooled_dice": 0.41, "fp_per_normal_image": 0.5, "normal_images_without_mark": 0.5,
               "tpr_at_0.125_fppi": 0.5, "tpr_at_0.25_fppi": 0.5, "tpr_at_0.5_fppi": 0.5, "tpr_at_1_fppi": 1.0,
               "tpr_at_2_fppi": 1.0, "tpr_at_4_fppi": 1.0, "tpr_at_8_fppi": 1.0, "cpm": 0.7857}
    cis = {"cpm": (0.5, 0.9), "pooled_dice": (0.2, 0.6), "tpr_at_1_fppi": (0.5, 1.0)}
    rows = [["mias-dev-0123abcd", "oof", 0, m, v, *cis.get(m, ("", ""))] for m, v in metrics.items()]
    rows += [["mias-dev-0123abcd", "oof", 50, "cpm", 0.1, "", ""]]  # another min_area: ignored
    _write(oof / "summary.csv", ["experiment", "image_set", "min_area", "metric", "value", "ci_low", "ci_high"], rows)
    froc = [(0.9, 1, 0), (0.8, 1, 1), (0.6, 1, 2), (0.4, 2, 2), (0.3, 2, 3), (0.2, 2, 4), ("inf", 0, 0)]
    _write(oof / "froc.csv", ["experiment", "image_set", "score_threshold", "detected", "false_positives", "tpr",
                              "fppi", "n_lesions", "n_images"],
           [["e", "oof", s, d, f, d / 2, f / 4, 2, 4] for s, d, f in froc])
    cands = [("A", 0, 0.9, "A_1", False), ("A", 1, 0.3, "", True), ("B", 0, 0.4, "B_1", False),
             ("B", 1, 0.8, "", True), ("N1", 0, 0.6, "", True), ("N1", 1, 0.2, "", True)]
    _write(oof / "candidates.csv", ["experiment", "image_set", "image_id", "candidate", "score", "area",
                                    "matched_roi", "false_positive", "duplicate"],
           [["e", "oof", i, k, s, 10, roi, fp, False] for i, k, s, roi, fp in cands])
    _write(oof / "per_image.csv", ["experiment", "image_set", "image_id", "patient_id", "normal", "status"],
           [["e", "oof", "A", "P1", False, "evaluated"], ["e", "oof", "B", "P2", False, "evaluated"],
            ["e", "oof", "N1", "P3", True, "evaluated"], ["e", "oof", "N2", "P4", True, "evaluated"]])
    return exp


def test_skips_cleanly_without_data(tmp_path):
    env = {"MAMMOSEG_MIAS_DEV": str(tmp_path / "absent"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "real.py")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stdout and str(tmp_path / "absent") in done.stdout
    assert not list((REPO / "benchmarks" / "results").glob("real-*-absent*"))


def test_a_folder_without_case_csvs_is_not_data(real, tmp_path):
    reason = real.missing_data_reason(tmp_path)
    assert reason and "mass_case_description_train_set.csv" in reason
    (tmp_path / "mass_case_description_train_set.csv").write_text("")
    assert real.missing_data_reason(tmp_path) == ""


def test_data_root_order(real, tmp_path, monkeypatch):
    monkeypatch.setenv("MAMMOSEG_MIAS_DEV", str(tmp_path / "env"))
    assert real.data_root(str(tmp_path / "arg")) == (tmp_path / "arg").resolve()
    assert real.data_root() == (tmp_path / "env").resolve()
    monkeypatch.delenv("MAMMOSEG_MIAS_DEV")
    assert real.data_root() == (REPO.parent / "shared" / "data" / "mias-dev").resolve()


def test_bench_config_moves_the_data_and_the_normals(real, tmp_path):
    config = real.bench_config(REPO / "config" / "mias-dev.yaml", tmp_path / "mias")
    assert config["data"]["root"] == str(tmp_path / "mias")
    assert config["data"]["normals"] == {"train": [str(tmp_path / "mias" / "normals" / "train")],
                                         "test": [str(tmp_path / "mias" / "normals" / "test")]}
    shipped = yaml.safe_load((REPO / "config" / "mias-dev.yaml").read_text())
    assert config["train"] == shipped["train"] and config["patches"] == shipped["patches"]


def test_reads_the_results_folder(real, tmp_path):
    exp = fabricated_experiment(tmp_path)
    result = real.read_experiment(exp, "oof", target_tpr=0.9)
    assert result["experiment"] == "mias-dev-0123abcd"
    assert (result["n_images"], result["n_lesions"], result["n_normal_images"]) == (4, 2, 2)
    assert result["froc"] == {"0.125": 0.5, "0.25": 0.5, "0.5": 0.5, "1.0": 1.0, "2.0": 1.0, "4.0": 1.0, "8.0": 1.0}
    assert result["cpm"] == 0.7857 and result["cpm_ci"] == [0.5, 0.9]  # min_area 0 only
    assert result["pooled_dice"] == 0.41 and result["operating"]["tpr"] == 0.5
    s = result["screening"]
    # TPR 1.0 first at score 0.4: FPs there are B's 0.8 and N1's 0.6 -> 2 / 4 images; on normals 1 FP of 2 images
    assert s["reached"] and s["threshold"] == 0.4 and s["tpr"] == 1.0 and s["fppi"] == 0.5
    assert s["fp_per_normal_image"] == 0.5 and s["normal_images_without_mark"] == 0.5
    text = real.table(result, wall_seconds=90)
    assert "0.786 [0.50, 0.90]" in text and "TPR ≥ 0.9 at score ≥ 0.400" in text and "1.5 min" in text
    # with the reference epoch of the same run, the wall time is also a multiple of it
    text = real.table(result, wall_seconds=90, reference={"seconds": 7.5, "epochs": [7.0, 7.5, 9.0], "cpu": "Some CPU"})
    assert "| 1.5 min = 12 reference epochs of 7.50 s (Some CPU) |" in text


def test_table_names_the_configured_and_the_calibrated_threshold(real, tmp_path):
    exp = fabricated_experiment(tmp_path)
    text = real.table(real.read_experiment(exp, "oof"))
    assert "operating point (infer.threshold):" in text and "calibrated threshold" not in text  # neither file
    (exp / "config.yaml").write_text(yaml.safe_dump({"infer": {"threshold": 0.9}}))
    (exp / "operating_point.json").write_text(
        '{"calibration": {"threshold": 0.9019607843137255, "expected_tpr": 0.6896551724137931, '
        '"expected_fppi": 0.98, "target_fppi": 1.0}, "source": "calibrated", "threshold": 0.9019607843137255}')
    result = real.read_experiment(exp, "oof")
    assert result["threshold"] == {"value": 0.9, "source": "infer.threshold"}  # no threshold row: the config's
    assert result["calibration"]["expected_fppi"] == 0.98
    text = real.table(result)
    assert "operating point (infer.threshold 0.9): TPR / FPPI | 0.500 / 0.75 |" in text
    assert "target_fppi 1;" in text and "| 0.902: 0.690 / 0.98 |" in text


def test_table_names_the_threshold_the_image_set_was_binarised_at(real, tmp_path):
    """With evaluate.target_fppi the test split is binarised at the calibrated threshold, not infer.threshold:
    the table takes the threshold from the image set's summary.csv and says which one it is."""
    exp = fabricated_experiment(tmp_path)
    (exp / "config.yaml").write_text(yaml.safe_dump({"infer": {"threshold": 0.9}}))
    (exp / "operating_point.json").write_text(
        '{"calibration": {"threshold": 0.9215686274509803, "expected_tpr": 0.5, "expected_fppi": 1.0, '
        '"target_fppi": 1.0}, "source": "calibrated", "threshold": 0.9215686274509803}')
    # tables written before summary.csv recorded the threshold: the per-image JSONs' (a failed image has none)
    (exp / "oof" / "chunk-0").mkdir()
    (exp / "oof" / "chunk-0" / "A.json").write_text('{"image_id": "A", "status": "failed"}')
    (exp / "oof" / "chunk-0" / "B.json").write_text(
        '{"image_id": "B", "status": "evaluated", "threshold": 0.9215686274509803}')
    text = real.table(real.read_experiment(exp, "oof"))
    assert "operating point (calibrated threshold 0.922): TPR / FPPI | 0.500 / 0.75 |" in text
    assert "infer.threshold 0.9)" not in text
    with open(exp / "oof" / "summary.csv", "a") as handle:  # summary.csv's record comes first
        handle.write("mias-dev-0123abcd,oof,0,threshold,0.5,,\n")
    assert "operating point (infer.threshold 0.5): TPR" in real.table(real.read_experiment(exp, "oof"))
    with open(exp / "oof" / "summary.csv", "a") as handle:  # 0.0 is a recorded threshold, not a missing one
        handle.write("mias-dev-0123abcd,oof,0,threshold,0.0,,\n")
    assert "operating point (infer.threshold 0): TPR" in real.table(real.read_experiment(exp, "oof"))


def test_screening_point_not_reached_reports_the_most_permissive_threshold(real, tmp_path):
    exp = fabricated_experiment(tmp_path)
    s = real.read_experiment(exp, "oof", target_tpr=1.01)["screening"]
    assert not s["reached"] and s["threshold"] == 0.2 and s["tpr"] == 1.0
    assert s["fp_per_normal_image"] == 1.0 and s["normal_images_without_mark"] == 0.5  # N1's two FPs, N2 clean
    assert "not reached" in real.table(real.read_experiment(exp, "oof", target_tpr=1.01))


def test_write_results_keeps_the_text_around_the_table(real, tmp_path):
    md, js = real.write_results("first", {"a": 1}, tmp_path, "2026-12-01")
    assert "first" in md.read_text() and js.read_text().strip().startswith("{")
    md.write_text(md.read_text() + "\n## Ablation\nkept\n")
    real.write_results("second", {"a": 2}, tmp_path, "2026-12-01")
    text = md.read_text()
    assert "second" in text and "first" not in text and "## Ablation\nkept" in text


def test_parse_only_prints_the_table(real, tmp_path, capsys):
    exp = fabricated_experiment(tmp_path)
    assert real.main(["--parse", str(exp), "--no-write"]) == 0
    assert "CPM | 0.786" in capsys.readouterr().out


def test_screening_point_without_any_candidate_marks_nothing(real, tmp_path):
    exp = fabricated_experiment(tmp_path)
    oof = exp / "oof"
    _write(oof / "froc.csv", ["experiment", "image_set", "score_threshold", "detected", "false_positives", "tpr",
                              "fppi", "n_lesions", "n_images"], [["e", "oof", "inf", 0, 0, 0.0, 0.0, 2, 4]])
    _write(oof / "candidates.csv", ["experiment", "image_set", "image_id", "candidate", "score", "area",
                                    "matched_roi", "false_positive", "duplicate"], [])
    s = real.read_experiment(exp, "oof", target_tpr=0.9)["screening"]
    assert not s["reached"] and s["threshold"] is None and (s["tpr"], s["fppi"]) == (0.0, 0.0)
    assert s["fp_per_normal_image"] == 0.0 and s["normal_images_without_mark"] == 1.0 and s["n_normal_images"] == 2


@pytest.mark.slow  # two Snakemake dry runs: about 10 s on 2 cores
def test_bench_asks_the_workflow_only_for_what_it_prints(real, tmp_path):
    """The targets are the out-of-fold summary and the calibrated operating point; a dry run for them schedules
    neither the exported model nor the report, which ``rule all`` does (and ``--with-test`` adds the test split)."""
    overrides = ["train={folds: 2}", "evaluate={target_fppi: 1}"]
    config_file = REPO / "config" / "config.yaml"
    exp = real.experiment_dir(tmp_path, config_file, overrides)
    assert real.calibrated(config_file, overrides) and not real.calibrated(config_file)
    targets = real.bench_targets(exp, tmp_path, True, with_test=False)
    relative = exp.relative_to(tmp_path)
    assert targets == [str(relative / "oof" / "summary.csv"), str(relative / "config.yaml"),
                       str(relative / "operating_point.json")]
    assert real.bench_targets(exp, tmp_path, False, with_test=True) == [
        str(relative / "oof" / "summary.csv"), str(relative / "config.yaml"), str(relative / "test" / "summary.csv")]

    def scheduled(*targets: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
             "--configfile", str(config_file), "--cores", "1", "--config", *overrides, "--dry-run", "--", *targets],
            cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    everything, bench = scheduled(), scheduled(*targets)
    for rule in ("export_model", "report_pages"):
        assert f"rule {rule}:" in everything and f"rule {rule}:" not in bench
    for rule in ("summarise", "calibrate", "experiment_config"):
        assert f"rule {rule}:" in bench


@pytest.mark.parametrize("match, tau, words", [("iou", 0.1, "IoU ≥ 0.1"), ("iou", 0.25, "IoU ≥ 0.25"),
                                               ("centre_in_lesion", 0.1, "the mark's centre lies inside the lesion")])
def test_table_names_the_criterion_that_found_the_lesions(real, tmp_path, match, tau, words):
    """Figures under different matching criteria are not comparable: the table says which one its images used
    (read from the per-image records, so an ensemble folder or an old run says it too)."""
    exp = fabricated_experiment(tmp_path)
    assert "a lesion is found" not in real.table(real.read_experiment(exp, "oof"))  # no per-image records
    chunk = exp / "oof" / "chunk-0"
    chunk.mkdir()
    (chunk / "N2.json").write_text(json.dumps({"image_id": "N2", "status": "failed"}))
    (chunk / "A.json").write_text(json.dumps({"image_id": "A", "status": "evaluated", "match": match,
                                              "iou_threshold": tau, "threshold": 0.9}))
    header = real.table(real.read_experiment(exp, "oof")).splitlines()[0]
    assert header == f"| figure (oof: 4 images, 2 lesions, 2 normal; a lesion is found when {words}) | value |"
