"""``make bench-real``: the workflow on real mammograms (mias-dev), out-of-fold figures in one table.

Runs the whole workflow (``config/mias-dev.yaml``: restructure, patches, k-fold training, out-of-fold and test
prediction, evaluation) on a CBIS-DDSM-like tree of real mammograms in a scratch folder, then reads the
out-of-fold results (``results/experiments/<E>/oof/``: ``summary.csv``, ``froc.csv``, ``candidates.csv``,
``per_image.csv``) and prints:

* the FROC: TPR at 1/8 … 8 false positives per image (FPPI) and the CPM (their mean), with its 95 % interval;
* TPR and FPPI at the operating point and the pooled Dice there: out of fold at ``infer.threshold``; on the test
  split at the calibrated threshold when ``evaluate.target_fppi`` is set (the table names which);
* with ``evaluate.target_fppi``, the threshold calibrated on the out-of-fold candidates (``operating_point.json``),
  which binarises the test split and new studies;
* the **screening operating point**: the highest candidate-score threshold at which the lesion TPR is at least
  ``--target-tpr`` (0.9), and there the FPPI, the false positives per normal (lesion-free) image and the fraction
  of normal images without a mark; "not reached" when no threshold gives that TPR (then the figures at the most
  permissive threshold are shown, with the TPR it reaches);
* the wall time of the workflow run.

The table goes to stdout and to ``benchmarks/results/real-YYYY-MM-DD.md`` (between the markers
``<!-- bench-real -->`` … ``<!-- /bench-real -->``, so text around them, such as an ablation table, is kept) and
``real-YYYY-MM-DD.json`` (every number). Test-split figures are never printed unless ``--with-test`` is given:
settings are chosen on the out-of-fold figures only.

Data: ``--data``, else ``$MAMMOSEG_MIAS_DEV``, else ``../shared/data/mias-dev`` beside the repository. Without
it the benchmark is skipped with a message (exit status 0). ``--parse EXPERIMENT_DIR`` only reads an existing
experiment folder (no run). ``--set KEY=VALUE`` passes configuration overrides to the workflow (as
``snakemake --config``), for ablations in one ``--work`` folder, which then reuses every stage the variants share.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from mammoseg.evaluation.froc import FPPI_POINTS  # the points summary.csv reports
from mammoseg.evaluation.summary import read_image_records, read_summary_csv, screening_point

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONFIG = REPO / "config" / "mias-dev.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mias-dev"
ENV_DATA = "MAMMOSEG_MIAS_DEV"
MARK_BEGIN, MARK_END = "<!-- bench-real -->", "<!-- /bench-real -->"
CASE_CSV = "mass_case_description_train_set.csv"


# ----------------------------------------------------------------------------------------------------------
# Data and configuration
# ----------------------------------------------------------------------------------------------------------
def data_root(explicit: str | None = None) -> Path:
    """``--data``, else ``$MAMMOSEG_MIAS_DEV``, else ``../shared/data/mias-dev`` beside the repository."""
    return Path(explicit or os.environ.get(ENV_DATA) or DEFAULT_DATA).expanduser().resolve()


def missing_data_reason(root: Path) -> str:
    """Why ``root`` is not a usable mias-dev tree ('' when it is)."""
    if not root.is_dir():
        return f"no folder {root}"
    if not (root / CASE_CSV).is_file():
        return f"{root} holds no {CASE_CSV} (not a CBIS-DDSM-like tree)"
    return ""


def bench_config(config_file: Path, root: Path) -> dict[str, Any]:
    """``config_file`` with ``data.root`` and every ``data.normals`` folder moved to ``root``.

    The shipped config names the data relative to the repository (``../shared/data/mias-dev``); paths inside
    that folder keep their place inside ``root`` (``normals/train`` stays ``root/normals/train``).
    """
    import yaml

    config = yaml.safe_load(config_file.read_text()) or {}
    data = config.setdefault("data", {})
    old_root = (REPO / data.get("root", str(DEFAULT_DATA))).resolve()

    def moved(path: str) -> str:
        absolute = (REPO / path).resolve()
        try:
            return str(root / absolute.relative_to(old_root))
        except ValueError:
            return str(absolute)

    data["root"] = str(root)
    normals = data.get("normals") or {}
    for split, folders in normals.items():
        normals[split] = [moved(folder) for folder in folders]
    return config


def resolved(config_file: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The workflow's resolved configuration for ``config_file`` and ``--config`` ``overrides``."""
    from mammoseg.config.resolve import parse_overrides, resolve_config

    return resolve_config([config_file], parse_overrides(list(overrides)))


def experiment_dir(workdir: Path, config_file: Path, overrides: Sequence[str] = ()) -> Path:
    """``results/experiments/<E>`` of the resolved configuration (the workflow's own keys)."""
    from mammoseg.config.keys import stage_keys

    config = resolved(config_file, overrides)
    return workdir / config["results"] / "experiments" / stage_keys(config).experiment


def calibrated(config_file: Path, overrides: Sequence[str] = ()) -> bool:
    """Whether the resolved configuration calibrates an operating point (``evaluate.target_fppi`` > 0)."""
    return float(resolved(config_file, overrides)["evaluate"]["target_fppi"] or 0) > 0


# ----------------------------------------------------------------------------------------------------------
# Reading an experiment
# ----------------------------------------------------------------------------------------------------------
def read_experiment(exp_dir: Path, image_set: str = "oof", target_tpr: float = 0.9) -> dict[str, Any]:
    """Every figure of the table for one image set of an experiment folder."""
    folder = Path(exp_dir) / image_set
    summary = read_summary_csv(folder / "summary.csv")

    def value(metric: str) -> float | None:
        return (summary.get(metric) or {}).get("value")

    cpm = summary.get("cpm", {})
    dice = summary.get("pooled_dice", {})
    tpr1 = summary.get("tpr_at_1_fppi", {})
    recorded = value("threshold")  # a 0.0 threshold is a threshold: only a missing row falls back
    if recorded is None:
        recorded = _chunk_threshold(folder)
    calibration = _calibration(Path(exp_dir))
    return {
        "experiment": Path(exp_dir).name, "image_set": image_set, "match": _match_criterion(folder),
        "n_images": value("n_images"), "n_lesions": value("n_lesions"), "n_normal_images": value("n_normal_images"),
        "froc": {str(x): value(f"tpr_at_{x:g}_fppi") for x in FPPI_POINTS},
        "cpm": cpm.get("value"), "cpm_ci": [cpm.get("ci_low"), cpm.get("ci_high")],
        "tpr_at_1_fppi": tpr1.get("value"), "tpr_at_1_fppi_ci": [tpr1.get("ci_low"), tpr1.get("ci_high")],
        "operating": {"tpr": value("tpr"), "fppi": value("fppi"), "fp_per_normal_image": value("fp_per_normal_image"),
                      "normal_images_without_mark": value("normal_images_without_mark")},
        "pooled_dice": dice.get("value"), "pooled_dice_ci": [dice.get("ci_low"), dice.get("ci_high")],
        "screening": screening_point(folder, target_tpr),
        "threshold": _operating_threshold(recorded, _configured_threshold(Path(exp_dir)), calibration),
        "calibration": calibration,
    }


MATCH_WORDS = {"iou": "IoU ≥ {tau:g}", "centroid": "the mark holds the lesion's centroid",
               "centre_in_lesion": "the mark's centre lies inside the lesion"}


def _match_criterion(image_set_dir: Path) -> str | None:
    """How a mark finds a lesion in this image set (``evaluate.match``, recorded in every per-image JSON), in
    words; None when no image was evaluated."""
    records = read_image_records(sorted(image_set_dir.glob("chunk-*")))
    record = next((r for r in records if r["status"] == "evaluated" and "match" in r), None)
    if record is None:
        return None
    return MATCH_WORDS.get(record["match"], record["match"]).format(tau=float(record.get("iou_threshold", 0)))


def _chunk_threshold(image_set_dir: Path) -> float | None:
    """The threshold of the image set's first evaluated per-image JSON (``chunk-*/``): for tables written before
    ``summary.csv`` recorded it."""
    records = read_image_records(sorted(image_set_dir.glob("chunk-*")))
    return next((float(r["threshold"]) for r in records if r["status"] == "evaluated" and "threshold" in r), None)


def _operating_threshold(recorded: float | None, configured: float | None,
                         calibration: dict[str, Any] | None) -> dict[str, Any] | None:  # fmt: skip
    """The threshold an image set's operating point is at, and where it comes from: ``calibrated`` when it is
    the experiment's calibrated one (``evaluate.target_fppi``: the test split and new studies), else
    ``infer.threshold``. Without a recorded threshold (no per-image JSONs either) it is the configuration's."""
    value = recorded if recorded is not None else configured
    if value is None:
        return None
    calibrated = (recorded is not None and calibration is not None and abs(value - calibration["threshold"]) < 1e-9
                  and (configured is None or abs(value - configured) > 1e-9))
    return {"value": value, "source": "calibrated" if calibrated else "infer.threshold"}


def _configured_threshold(exp_dir: Path) -> float | None:
    """``infer.threshold`` of the experiment's resolved configuration (``config.yaml``), if it is there."""
    path = exp_dir / "config.yaml"
    if not path.is_file():
        return None
    return ((yaml.safe_load(path.read_text()) or {}).get("infer") or {}).get("threshold")


def _calibration(exp_dir: Path) -> dict[str, Any] | None:
    """The calibrated operating point (``operating_point.json``, ``evaluate.target_fppi`` > 0), else None."""
    path = exp_dir / "operating_point.json"
    return json.loads(path.read_text()).get("calibration") if path.is_file() else None


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------
def _f(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ci(pair: Sequence[float | None]) -> str:
    return "" if not pair or pair[0] is None else f" [{pair[0]:.2f}, {pair[1]:.2f}]"


def _threshold(threshold: dict[str, Any] | None) -> str:
    if threshold is None:
        return "infer.threshold"
    if threshold["source"] == "calibrated":
        return f"calibrated threshold {threshold['value']:.3f}"
    return f"infer.threshold {threshold['value']:g}"


def table(result: dict[str, Any], wall_seconds: float | None = None, reference: dict[str, Any] | None = None) -> str:
    """The benchmark's Markdown table of one image set; the wall time also in reference epochs (``reference``:
    mammoseg.timing's record of this run) when one was measured."""
    s = result["screening"]
    point = (f"TPR ≥ {s['target_tpr']:g} at score ≥ {_f(s['threshold'])}" if s["reached"] else
             f"not reached: TPR at most {_f(s['tpr'])} (score ≥ {_f(s['threshold'])})")
    op = result["operating"]
    lines = [
        f"| figure ({result['image_set']}: {result['n_images']:.0f} images, {result['n_lesions']:.0f} lesions, "
        f"{(result['n_normal_images'] or 0):.0f} normal"
        + (f"; a lesion is found when {result['match']}" if result.get("match") else "") + ") | value |",
        "|---|---|",
        "| FROC: TPR at 1/8, 1/4, 1/2, 1, 2, 4, 8 FPPI | "
        + ", ".join(_f(result["froc"][str(x)], 2) for x in FPPI_POINTS) + " |",
        f"| CPM | {_f(result['cpm'])}{_ci(result['cpm_ci'])} |",
        f"| TPR at 1 FPPI | {_f(result['tpr_at_1_fppi'])}{_ci(result['tpr_at_1_fppi_ci'])} |",
        f"| operating point ({_threshold(result.get('threshold'))}): TPR / FPPI | {_f(op['tpr'])} / "
        f"{_f(op['fppi'], 2)} |",
        f"| operating point: FP per normal image / normals without a mark | {_f(op['fp_per_normal_image'], 2)} / "
        f"{_f(op['normal_images_without_mark'], 2)} |",
        f"| pooled Dice (operating point) | {_f(result['pooled_dice'])}{_ci(result['pooled_dice_ci'])} |",
        f"| screening point ({point}): FPPI | {_f(s['fppi'], 2)} |",
        f"| screening point: FP per normal image / normals without a mark | {_f(s['fp_per_normal_image'], 2)} / "
        f"{_f(s['normal_images_without_mark'], 2)} |",
    ]
    c = result.get("calibration")
    if c:
        lines.append(f"| calibrated threshold (evaluate.target_fppi {c['target_fppi']:g}; binarises the test split and "
                     f"new studies): its TPR / FPPI here | {_f(c['threshold'])}: {_f(c['expected_tpr'])} / "
                     f"{_f(c['expected_fppi'], 2)} |")
    if wall_seconds is not None:
        in_reference = (f" = {wall_seconds / reference['seconds']:.0f} reference epochs of {reference['seconds']:.2f} s"
                        f" ({reference['cpu']})" if reference else "")
        lines.append(f"| wall time of the workflow run | {wall_seconds / 60:.1f} min{in_reference} |")
    return "\n".join(lines)


def write_results(text: str, record: dict[str, Any], results_dir: Path, date: str) -> tuple[Path, Path]:
    """``real-<date>.md`` (the marked section replaced, or the file created) and ``real-<date>.json``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    md, js = results_dir / f"real-{date}.md", results_dir / f"real-{date}.json"
    section = f"{MARK_BEGIN}\n{text}\n{MARK_END}"
    if md.is_file() and MARK_BEGIN in md.read_text() and MARK_END in md.read_text():
        old = md.read_text()
        head, rest = old.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1]
        md.write_text(head + section + tail)
    else:
        md.write_text(f"# Real mammograms (mias-dev): `make bench-real`, {date}\n\n{section}\n")
    js.write_text(json.dumps(record, indent=2) + "\n")
    return md, js


# ----------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------
def bench_targets(exp_dir: Path, workdir: Path, calibrated: bool, with_test: bool) -> list[str]:
    """What the table reads, relative to ``workdir``: the out-of-fold summary, the experiment's resolved
    configuration (the configured threshold) and, when ``evaluate.target_fppi`` is set, the calibrated operating
    point; the test split's summary only ``with_test``.

    Asking the workflow for these instead of ``rule all`` leaves out the test split's prediction by the mean of
    the fold models, the exported model and the report: none of them is printed unless ``--with-test``.
    """
    exp = Path(exp_dir).relative_to(workdir)
    targets = [str(exp / "oof" / "summary.csv"), str(exp / "config.yaml")]
    if calibrated:
        targets.append(str(exp / "operating_point.json"))
    if with_test:
        targets.append(str(exp / "test" / "summary.csv"))
    return targets


def run_workflow(workdir: Path, config_file: Path, cores: int, overrides: Sequence[str], log: Path,
                 targets: Sequence[str] = ()) -> float:
    """``snakemake`` of this repository's Snakefile in ``workdir`` (``targets``, else ``rule all``); returns the
    wall time in seconds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(config_file), "--cores", str(cores), "--resources", "gpu=1"]
    if overrides:
        command += ["--config", *overrides]
    command += ["--", *targets] if targets else []
    print(f"[bench-real] running the workflow in {workdir} (log: {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"[bench-real] the workflow failed (exit {done.returncode}); end of {log}:\n"
                         + "\n".join(tail))
    return seconds


def _bench_run():
    """benchmarks/run.py (``make bench``), whose machine record and reference epoch this benchmark shares."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # run as a script it is there already; loaded from a file path (tests) it is not
        sys.path.insert(0, here)
    import run

    return run


def _machine() -> dict[str, Any]:
    """The machine record of ``make bench`` (benchmarks/run.py: CPU model, cores, RAM, versions, commit)."""
    return _bench_run().describe_machine()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help=f"the mias-dev tree (default: ${ENV_DATA} or {DEFAULT_DATA})")
    parser.add_argument("--config", default=str(CONFIG), help="configuration file (default: config/mias-dev.yaml)")
    parser.add_argument("--work", help="scratch folder for the run (default: a new temporary folder)")
    parser.add_argument("--cores", type=int, default=int(os.environ.get("MAMMOSEG_BENCH_CORES", "2")))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="configuration override, as snakemake --config (repeatable)")
    parser.add_argument("--target-tpr", type=float, default=0.9)
    parser.add_argument("--with-test", action="store_true", help="also report the test split (once, at the end)")
    parser.add_argument("--parse", metavar="EXPERIMENT_DIR", help="only read this experiment folder")
    parser.add_argument("--no-write", action="store_true", help="print only; write nothing to benchmarks/results")
    parser.add_argument("--json", metavar="FILE", help="also append the record as one JSON line to FILE")
    args = parser.parse_args(argv)

    wall = None
    record: dict[str, Any] = {"date": dt.date.today().isoformat(), "machine": _machine(), "overrides": args.overrides}
    if args.parse:
        exp = Path(args.parse)
    else:
        root = data_root(args.data)
        reason = missing_data_reason(root)
        if reason:
            print(f"[bench-real] skipped: {reason}. Point {ENV_DATA} (or --data) at a mias-dev tree to run it.")
            return 0
        sys.path.insert(0, str(REPO / "src"))
        import yaml

        workdir = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mammoseg-bench-real-"))
        workdir.mkdir(parents=True, exist_ok=True)
        config_file = workdir / "config.yaml"
        config_file.write_text(yaml.safe_dump(bench_config(Path(args.config), root), sort_keys=False))
        # the yardstick first, measured on the same machine in the same run (mammoseg.timing)
        record["machine"]["reference_epoch"] = _bench_run().measure_reference(timeout=900)
        exp = experiment_dir(workdir, config_file, args.overrides)
        targets = bench_targets(exp, workdir, calibrated(config_file, args.overrides), args.with_test)
        wall = run_workflow(workdir, config_file, args.cores, args.overrides, workdir / "bench-real.log", targets)
        record.update({"data": str(root), "work": str(workdir), "config": str(args.config), "cores": args.cores,
                       "wall_seconds": round(wall, 1)})
    sets = ["oof"] + (["test"] if args.with_test else [])
    texts = []
    for image_set in sets:
        result = read_experiment(exp, image_set, args.target_tpr)
        record[image_set] = result
        texts.append(f"**{image_set}** — experiment `{result['experiment']}`"
                     + (f", overrides {' '.join(args.overrides)}" if args.overrides else "") + "\n\n"
                     + table(result, wall if image_set == "oof" else None, record["machine"].get("reference_epoch")))
    text = "\n\n".join(texts)
    print(text)
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    if not args.no_write and not args.parse:
        md, js = write_results(text, record, RESULTS, record["date"])
        print(f"[bench-real] written: {md.relative_to(REPO)}, {js.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
