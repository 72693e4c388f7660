"""``make bench-demo``: the demo (config/config.yaml) over several seeds, its time in reference epochs, its goals.

Measures the reference epoch (mammoseg.timing) in a fresh process first, then runs the demo workflow once per
seed (``train.seed``; the synthetic data and patches stay those of ``synth.seed``/``patches.seed``, so the first
run makes them and the next ones reuse them) in one scratch folder. For each seed it prints the workflow's wall
time (the first run's includes the data stages, which the next ones reuse) and the figures the demo's goals are
about, and checks the goals:

* TPR 1.0 at 0.5 false positives per image (FROC, lesion level, IoU >= 0.1);
* pooled Dice >= 0.75 over the whole test images;
* the first seed's workflow time, data stages included (a new user's ``make demo``), <= 10 reference epochs.

Output: a Markdown table on stdout and in ``benchmarks/results/demo-YYYY-MM-DD.md`` + ``.json``.
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import describe_machine, measure_reference  # noqa: E402

GOALS = {"tpr_at_0.5_fppi": 1.0, "pooled_dice": 0.75}
BUDGET_REFERENCE_EPOCHS = 10.0


def run_demo(workdir: Path, seed: int, cores: int) -> tuple[float, Path]:
    """The demo workflow with ``train.seed`` = ``seed`` in ``workdir``: (wall seconds, experiment folder)."""
    from mammoseg.config.keys import stage_keys
    from mammoseg.config.resolve import parse_overrides, resolve_config

    overrides = [f"train={{seed: {seed}}}"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(REPO / "config" / "config.yaml"), "--cores", str(cores),
               "--resources", "gpu=1", "--config", *overrides]
    started = time.perf_counter()
    with open(workdir / f"seed-{seed}.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"[bench-demo] seed {seed}: the workflow failed; see {workdir / f'seed-{seed}.log'}")
    keys = stage_keys(resolve_config([REPO / "config" / "config.yaml"], parse_overrides(overrides)))
    return seconds, workdir / "results" / "experiments" / keys.experiment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated train.seed values")
    parser.add_argument("--work", help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    from mammoseg.evaluation.summary import read_summary_csv

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    workdir = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mammoseg-bench-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    reference = measure_reference(timeout=900)
    machine["reference_epoch"] = reference
    if not reference:
        raise SystemExit("[bench-demo] the reference epoch could not be measured")
    records = []
    for seed in seeds:
        print(f"[bench-demo] seed {seed} ...", file=sys.stderr, flush=True)
        seconds, experiment = run_demo(workdir, seed, args.cores)
        summary = read_summary_csv(experiment / "test" / "summary.csv")
        figures = {metric: summary[metric]["value"] for metric in
                   ("tpr", "fppi", "pooled_dice", "tpr_at_0.5_fppi", "tpr_at_1_fppi", "cpm")}
        goals = {metric: figures[metric] >= bound for metric, bound in GOALS.items()}
        records.append({"seed": seed, "seconds": round(seconds, 1),
                        "reference_epochs": round(seconds / reference["seconds"], 2), "figures": figures,
                        "goals_met": goals, "experiment": experiment.name})
    first = records[0]
    within = first["reference_epochs"] <= BUDGET_REFERENCE_EPOCHS
    lines = [f"# The demo over {len(seeds)} seeds, {dt.date.today().isoformat()}", "",
             f"Reference epoch {reference['seconds']:.2f} s on {reference['cpu']} (measured first, same run); "
             f"git {machine['git_commit']}.", "",
             "| seed | workflow time | TPR | FPPI | pooled Dice | TPR at 0.5 FPPI | TPR at 1 FPPI | CPM | goals |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        f = r["figures"]
        note = " (data stages included)" if r is first else " (data stages reused)"
        lines.append(f"| {r['seed']} | {r['seconds']:.0f} s = {r['reference_epochs']:.1f} ref. epochs{note} | "
                     f"{f['tpr']:.3f} | {f['fppi']:.2f} | {f['pooled_dice']:.3f} | {f['tpr_at_0.5_fppi']:.3f} | "
                     f"{f['tpr_at_1_fppi']:.3f} | {f['cpm']:.3f} | "
                     f"{'met' if all(r['goals_met'].values()) else 'MISSED'} |")
    all_met = all(all(r["goals_met"].values()) for r in records)
    lines += ["",
              f"Goals (TPR at 0.5 FPPI >= 1.0, pooled Dice >= 0.75) met by every seed: {'yes' if all_met else 'NO'}. "
              f"A new user's run (seed {first['seed']}, data stages included) within {BUDGET_REFERENCE_EPOCHS:g} "
              f"reference epochs: {'yes' if within else 'NO'} ({first['reference_epochs']:.1f})."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / f"demo-{dt.date.today().isoformat()}"
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "seeds": records}, indent=1) + "\n")
        print(f"[bench-demo] written: {stem.with_suffix('.md').relative_to(REPO)} and .json", file=sys.stderr)
    return 0 if all_met and within else 1


if __name__ == "__main__":
    sys.exit(main())
