"""Seed ensembles out of fold: the mean of several trainings' out-of-fold maps, scored as bench-real scores one.

The run-to-run spread of the real-data benchmark (out-of-fold CPM ± 0.05) is as large as every effect measured on
it. nnU-Net averages several models; this measures what averaging trainings that differ only in ``train.seed``
gives on mias-dev, before the workflow grows an ensemble setting:

1. each member is a ``benchmarks/real.py`` run of the configuration with ``train.seed`` (or other training
   settings) changed, in one ``--work`` folder (the data and patch stages are shared; a finished member is not
   trained again);
2. the per-pixel mean of the seeds' out-of-fold probability maps (each image's map is already its own fold
   model's; a mean of uint8 maps, rounded) goes to ``results/ensembles/<name>/predictions/oof/``;
3. those maps are evaluated, summarised and calibrated by the workflow's own stage functions
   (:func:`mammoseg.evaluation.evaluate.run_evaluate_chunk`, :func:`~mammoseg.evaluation.summary.run_summarise`,
   :func:`~mammoseg.evaluation.calibrate.run_calibrate`) with the configuration's evaluation settings;
4. the table of each seed and of the ensemble is printed (and with ``--json``, appended as JSON lines).

    .venv/bin/python benchmarks/ensemble.py --work /tmp/real --seeds 0 1        # runs what is missing, then scores
    .venv/bin/python benchmarks/ensemble.py --work /tmp/real --seeds 0 --member '{train: {seed: 1, jit_compile: true}}'

Every figure is out of fold (the test split is not predicted). Cost: one ``make bench-real`` training per seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import real  # noqa: E402  (benchmarks/real.py: the run and the table)

from mammoseg.config.schema import section_hash  # noqa: E402


def member_config(base: dict[str, Any], member: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a bench configuration) with one member's settings merged in (``{"train": {"seed": 1}}``)."""
    from mammoseg.config.resolve import merge

    return merge(base, member)


def member_label(member: dict[str, Any]) -> str:
    """A member's settings in one line, as YAML flow style (``{train: {seed: 1}}``)."""
    return yaml.safe_dump(member, default_flow_style=True, sort_keys=True).strip()


def oof_prediction_dir(workdir: Path, config: dict[str, Any]) -> Path:
    """``results/predictions/<model>/<inference>/oof`` of a resolved configuration (the workflow's keys)."""
    from mammoseg.config.keys import stage_keys

    keys = stage_keys(config)
    return workdir / config["results"] / "predictions" / keys.model / keys.inference / "oof"


def mean_maps(members: Sequence[Path], out: Path) -> int:
    """Write the per-pixel mean of the members' ``chunk-*/<image>.prob.npz`` maps under ``out`` (same layout).

    Every member must hold the same chunks and images (the same data and folds, another seed); the first member's
    ``predictions.csv`` (which images were predicted or failed) is copied. Returns the number of maps written.

    Raises
    ------
    SystemExit
        When a member lacks a chunk or an image the first one has, naming it.
    """
    from mammoseg.inference.predict import load_prediction, save_prediction
    from mammoseg.io.atomic import atomic_directory

    written = 0
    for chunk in sorted(members[0].glob("chunk-*")):
        with atomic_directory(out / chunk.name) as tmp:
            for path in sorted(chunk.glob("*.prob.npz")):
                maps, meta = [], {}
                for member in members:
                    other = member / chunk.name / path.name
                    if not other.is_file():
                        raise SystemExit(f"[ensemble] {other} is missing: the members do not hold the same images")
                    prob, meta_k = load_prediction(other)
                    maps.append(prob.astype(np.float32))
                    meta = meta or meta_k
                mean = np.rint(np.mean(maps, axis=0)).astype(np.uint8)
                save_prediction(mean, Path(tmp) / path.name, {**meta, "ensemble": [str(m) for m in members]})
                written += 1
            (Path(tmp) / "predictions.csv").write_bytes((chunk / "predictions.csv").read_bytes())
    return written


def score(predictions: Path, exp_dir: Path, config: dict[str, Any], manifest: Path) -> None:
    """Evaluate, summarise and calibrate the maps of ``predictions/chunk-*`` into ``exp_dir`` as the workflow does."""
    from mammoseg.evaluation.calibrate import run_calibrate
    from mammoseg.evaluation.evaluate import run_evaluate_chunk
    from mammoseg.evaluation.summary import run_summarise

    chunks = sorted(predictions.glob("chunk-*"), key=lambda p: int(p.name.split("-")[1]))
    outs = []
    for chunk in chunks:
        out = exp_dir / "oof" / chunk.name
        run_evaluate_chunk(chunk, manifest, out, chunk=int(chunk.name.split("-")[1]), config=config,
                           image_set="oof", experiment=exp_dir.name)
        outs.append(out)
    run_summarise(outs, exp_dir / "oof", experiment=exp_dir.name, image_set="oof", config=config)
    if float(config["evaluate"]["target_fppi"] or 0) > 0:
        run_calibrate(outs, exp_dir / "operating_point.json", config=config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="the bench-real scratch folder the members share")
    parser.add_argument("--seeds", type=int, nargs="+", default=[], help="members that differ in train.seed only")
    parser.add_argument("--member", action="append", default=[], metavar="YAML",
                        help="a member's settings, merged into the configuration: '{train: {seed: 1}}' (repeatable)")
    parser.add_argument("--config", default=str(real.CONFIG), help="configuration (default: config/mias-dev.yaml)")
    parser.add_argument("--data", help="the mias-dev tree (as benchmarks/real.py)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="configuration override for every member (as snakemake --config)")
    parser.add_argument("--json", metavar="FILE", help="append each table's record as one JSON line to FILE")
    args = parser.parse_args(argv)
    members = [{"train": {"seed": seed}} for seed in args.seeds] + [yaml.safe_load(m) for m in args.member]
    if len({member_label(m) for m in members}) < 2:
        parser.error("an ensemble needs at least two different members (--seeds and/or --member)")
    root = real.data_root(args.data)
    reason = real.missing_data_reason(root)
    if reason:
        print(f"[ensemble] skipped: {reason}. Point {real.ENV_DATA} (or --data) at a mias-dev tree to run it.")
        return 0
    workdir = Path(args.work).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    base = real.bench_config(Path(args.config), root)

    maps, records, configs = [], [], []
    for k, member in enumerate(members):
        config_file = workdir / f"config-member-{section_hash(member)[:8]}.yaml"
        config_file.write_text(yaml.safe_dump(member_config(base, member), sort_keys=False))
        config = real.resolved(config_file, args.overrides)
        if config["train"]["folds"] < 2:
            raise SystemExit("[ensemble] out-of-fold maps need train.folds >= 2")
        exp = real.experiment_dir(workdir, config_file, args.overrides)
        targets = real.bench_targets(exp, workdir, real.calibrated(config_file, args.overrides), with_test=False)
        log = workdir / f"ensemble-member-{k}.log"
        wall = real.run_workflow(workdir, config_file, args.cores, args.overrides, log, targets)
        if "Nothing to be done" in log.read_text():  # trained and scored by an earlier run: its time is not here
            wall = None
        maps.append(oof_prediction_dir(workdir, config))
        configs.append(config)
        records.append({"member": member_label(member), "experiment": exp.name,
                        "wall_seconds": None if wall is None else round(wall, 1),
                        "oof": real.read_experiment(exp, "oof")})

    config = configs[0]  # evaluation settings: the first member's (members differ in training only)
    name = f"ensemble-{section_hash([r['experiment'] for r in records])[:8]}"
    ensemble_dir = workdir / config["results"] / "ensembles" / name
    n_maps = mean_maps(maps, ensemble_dir / "predictions" / "oof")
    print(f"[ensemble] {n_maps} out-of-fold maps averaged over {len(maps)} members -> {ensemble_dir}")
    from mammoseg.config.keys import stage_keys

    manifest = workdir / config["results"] / "restructured" / stage_keys(config).data / "train" / "manifest.csv"
    score(ensemble_dir / "predictions" / "oof", ensemble_dir, config, manifest)
    (ensemble_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # the table's threshold
    records.append({"member": "mean of " + ", ".join(r["member"] for r in records), "experiment": name,
                    "oof": real.read_experiment(ensemble_dir, "oof")})

    for record in records:
        print(f"**{record['member']}** ({record['experiment']})"
              + (f", overrides {' '.join(args.overrides)}" if args.overrides else "") + "\n")
        print(real.table(record["oof"], record.get("wall_seconds")) + "\n")
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps({**record, "overrides": args.overrides, "work": str(workdir)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
