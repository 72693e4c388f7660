"""The ``mammoseg`` command: one subcommand per workflow stage, for use without Snakemake.

Each subcommand calls the same stage function a rule's script calls (``workflow/scripts/``). The configuration is
resolved exactly as the workflow resolves it (:mod:`mammoseg.config.resolve`): the schema's defaults, then the
``--configfile`` files (the repository's demo, ``config/config.yaml`` in the current folder, when none is given),
then ``--config KEY=VALUE`` (VALUE read as YAML). ``mammoseg config show`` prints the result.

Bad input (a bad config, an unreadable or foreign file, a full disk) ends with one line naming the file or key
and the reason, and exit status 2; any other error is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

from mammoseg import __version__
from mammoseg.errors import InputError

__all__ = ["main", "build_parser", "resolved_config"]


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration of ``--configfile``/``--config``, resolved as the workflow resolves it."""
    from mammoseg.config.resolve import default_configfiles, parse_overrides, resolve_config

    files = args.configfile or default_configfiles(Path.cwd())
    return resolve_config(files, parse_overrides(args.config))


# --- subcommands: each parses nothing itself and calls one stage function ---------------------------------------


def _config_show(args, config):
    from mammoseg.config.keys import stage_keys
    from mammoseg.config.resolve import config_yaml

    print(config_yaml(config), end="")
    if args.keys:
        print("# stage keys (folder names under results/):")
        for stage, key in stage_keys(config).as_dict().items():
            print(f"#   {stage}: {key}")


def _config_reference(args, config):
    from mammoseg.config.schema import config_reference_markdown

    print(config_reference_markdown())


def _synth(args, config):
    from mammoseg.data.synth import run_synth

    run_synth(config, Path(args.out))


def _restructure(args, config):
    from mammoseg.data.restructure import run_restructure

    run_restructure(config, Path(args.source), Path(args.out), args.split)


def _fingerprint(args, config):
    from mammoseg.config.fingerprint import run_fingerprint

    run_fingerprint(args.manifests, args.out)


def _plan(args, config):
    from mammoseg.config.keys import stage_keys
    from mammoseg.config.plan import run_plan

    run_plan(config["patches"], stage_keys(config).patches, args.manifest, args.out)


def _extract(args, config):
    from mammoseg.patches.shards import run_extract

    patches = config["patches"]
    run_extract(args.plan, args.manifest, args.out, args.shard, compression=patches["compression"],
                image_compression=patches["image_compression"])


def _patch_manifest(args, config):
    from mammoseg.patches.shards import run_patch_manifest

    run_patch_manifest(args.plan, args.shards, args.out, args.skipped, args.grid)


def _patch_show(args, config):
    from mammoseg.patches.shards import render_grid

    out = Path(args.out) if args.out else Path(args.shard).with_suffix(".png")
    render_grid(Path(args.shard), out, n=args.n)
    print(f"wrote {out}")


def _train(args, config):
    from mammoseg.model.train import run_train

    run_train(config, args.shards, Path(args.out_dir), fold=args.fold, plan=args.plan, splits=args.splits)


def _splits(args, config):
    from mammoseg.model.folds import run_splits

    run_splits(args.manifest, args.out, folds=config["train"]["folds"], seed=config["train"]["seed"])


def _model_summary(args, config):
    from mammoseg.model.unet import run_summary

    print(json.dumps(run_summary(config), indent=2))


def _config_source(args: argparse.Namespace) -> str:
    """Where the resolved configuration came from, in words (for messages that depend on it)."""
    from mammoseg.config.resolve import default_configfiles

    files = args.configfile or default_configfiles(Path.cwd())
    if files:
        return "the configuration " + " + ".join(map(str, files)) + (" with --config" if args.config else "")
    return (f"the schema's defaults (no --configfile given, and no config/config.yaml in {Path.cwd()})"
            + (" with --config" if args.config else ""))


def _findings_label(models: list[str], keys) -> str:
    """What names the findings (tables, DICOM SEG algorithm version): the configuration's experiment when the
    models are its own (they lie in its model folder), else ``model-<hash of the model files>``."""
    from mammoseg.io.checksum import sha256_of

    if all(f"/{keys.model}/" in Path(model).resolve().as_posix() for model in models):
        return keys.experiment
    paths = [Path(model) for model in models]
    if not all(path.is_file() for path in paths):
        return "model"  # a missing file is refused, with its name, when the models are loaded
    return "model-" + hashlib.sha256(";".join(sha256_of(path) for path in paths).encode()).hexdigest()[:8]


def _predict(args, config):
    from mammoseg.config.keys import stage_keys
    from mammoseg.studies import configured_models, run_studies

    if args.model and len(args.model) > 1 and not args.ensemble:
        raise InputError(f"{len(args.model)} --model files given ({', '.join(args.model)}): give one, or add "
                         f"--ensemble to predict with the mean of them (the folds of one cross-validation)")
    models, plan = (args.model, args.plan) if args.model else configured_models(config)
    plan = args.plan or plan
    source = f"the plan {plan}" if plan else _config_source(args)
    print(f"mammoseg predict: {len(models)} model(s) ({', '.join(models)}); windows and normalisation from {source}")
    keys = stage_keys(config)
    operating_point = args.operating_point
    if not args.model and operating_point is None and config["evaluate"]["target_fppi"] > 0:
        operating_point = Path(config["results"]) / "experiments" / keys.experiment / "operating_point.json"
    run_studies(args.inputs, models, args.out, config=config, plan=plan, experiment=_findings_label(models, keys),
                operating_point=operating_point, geometry_source=source)


def _evaluate(args, config):
    from mammoseg.config.keys import stage_keys
    from mammoseg.evaluation.evaluate import run_evaluate_chunk

    run_evaluate_chunk(args.predictions, args.manifest, args.out, chunk=args.chunk, config=config,
                       image_set=args.image_set, experiment=stage_keys(config).experiment,
                       operating_point=args.operating_point)


def _summarise(args, config):
    from mammoseg.evaluation.summary import run_summarise

    run_summarise(args.chunks, Path(args.out), experiment=args.experiment, image_set=args.image_set, config=config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mammoseg", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"mammoseg {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--configfile", nargs="+", action="extend", metavar="FILE",
                        help="YAML config file(s), applied in order over the schema's defaults "
                             "(default: config/config.yaml, the demo, if present)")
    common.add_argument("--config", nargs="+", action="extend", metavar="KEY=VALUE",
                        help="overrides, VALUE read as YAML, e.g. infer='{threshold: 0.4}'")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable, help_text: str, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    config = sub.add_parser("config", help="the resolved configuration").add_subparsers(dest="config_command",
                                                                                        required=True)
    p = add("show", _config_show, "print the configuration exactly as the workflow resolves it", config)
    p.add_argument("--keys", action="store_true", help="also print the stage keys (result folder names)")
    add("reference", _config_reference, "print config/README.md's configuration reference (from the schema)", config)

    p = add("synth", _synth, "write the synthetic CBIS-DDSM-like demo dataset (DICOM tree + case CSVs)")
    p.add_argument("--out", required=True, help="output folder (gets CBIS-DDSM/, csv/, truth.json)")

    p = add("restructure", _restructure, "index a CBIS-DDSM tree and restructure one collection")
    p.add_argument("--source", required=True, help="root of the download (any supported layout)")
    p.add_argument("--out", required=True, help="output folder for this collection")
    p.add_argument("--split", required=True, choices=["train", "test"])

    p = add("fingerprint", _fingerprint, "dataset fingerprint of restructured manifests (nnU-Net style)")
    p.add_argument("--out", required=True, help="fingerprint.json to write")
    p.add_argument("manifests", nargs="+", help="restructured manifest.csv files")

    p = add("plan", _plan, "the plan (window, downscale, network input, expected patches) of a training manifest")
    p.add_argument("--manifest", required=True, help="manifest.csv of the training collection")
    p.add_argument("--out", required=True, help="plan.json to write")

    p = add("extract", _extract, "extract the patches of one shard into HDF5")
    p.add_argument("--plan", required=True, help="plan.json")
    p.add_argument("--manifest", required=True, help="manifest.csv of the training collection")
    p.add_argument("--out", required=True, help="shard file to write (.h5)")
    p.add_argument("--shard", required=True, type=int, help="shard index, 0-based")

    patches = sub.add_parser("patches", help="inspect patch shards").add_subparsers(dest="patches_command",
                                                                                   required=True)
    p = add("manifest", _patch_manifest, "one table over all shards (patches.csv) and their skipped ROIs", patches)
    p.add_argument("--plan", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--skipped", required=True)
    p.add_argument("--grid", help="also draw a PNG grid of patches")
    p.add_argument("shards", nargs="+")
    p = add("show", _patch_show, "PNG grid of patches with mask contours", patches)
    p.add_argument("shard")
    p.add_argument("--n", type=int, default=16, help="number of patches")
    p.add_argument("--out", help="PNG path (default: beside the shard)")

    p = add("splits", _splits, "the cross-validation's folds of the training patients (splits.json)")
    p.add_argument("--manifest", required=True, help="manifest.csv of the training collection")
    p.add_argument("--out", required=True, help="splits.json to write")

    p = add("train", _train, "train the U-Net (one fold) on patch shards")
    p.add_argument("--out-dir", required=True, help="the fold's model folder")
    p.add_argument("--fold", type=int, default=0, help="fold index (train.folds > 1: cross-validation)")
    p.add_argument("--plan", help="plan.json of the shards (default: the geometry of the configuration)")
    p.add_argument("--splits", help="splits.json of the cross-validation (default: dealt over the shards' patients)")
    p.add_argument("shards", nargs="+")

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="model_command", required=True)
    add("summary", _model_summary, "print trainable and non-trainable parameter counts as JSON", model)

    p = add("predict", _predict, "new studies through a trained model: probability maps, masks, overlays, DICOM "
                                 "SEG and candidate tables of DICOM files or folders (no ground truth needed)")
    p.add_argument("--model", nargs="+", action="extend",
                   help=".keras model; several only with --ensemble (default: the models the workflow trained with "
                        "this configuration, every fold, and their plan)")
    p.add_argument("--ensemble", action="store_true",
                   help="predict with the mean of several --model files (the folds of one cross-validation)")
    p.add_argument("--plan", help="plan.json of the model's patches (default: geometry from the configuration)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--operating-point", help="operating_point.json of a calibrated experiment (needed when "
                   "evaluate.target_fppi > 0; the exported model folder holds it)")
    p.add_argument("inputs", nargs="+", help="DICOM files or folders of them")

    p = add("evaluate", _evaluate, "metrics, masks and overlays of one chunk of predictions")
    p.add_argument("--predictions", required=True, help="a prediction chunk folder (predictions.csv, *.prob.npz)")
    p.add_argument("--manifest", required=True, help="manifest.csv of the collection")
    p.add_argument("--chunk", type=int, required=True,
                   help="chunk index (the images of the manifest in chunks of infer.chunk_size)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-set", default="test", choices=["test", "oof", "studies"],
                   help="out-of-fold images are binarised at infer.threshold, the others at the calibrated one")
    p.add_argument("--operating-point", help="operating_point.json of a calibrated experiment (needed when "
                   "evaluate.target_fppi > 0; the exported model folder holds it)")

    p = add("summarise", _summarise, "tables over evaluated chunks: per image, lesions, candidates, summary, FROC")
    p.add_argument("--out", required=True)
    p.add_argument("--experiment", required=True, help="name shown in the tables")
    p.add_argument("--image-set", default="test", choices=["test", "oof"])
    p.add_argument("chunks", nargs="+", help="evaluated chunk folders")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolved_config(args)
        args.func(args, config)
    except InputError as exc:
        print(f"mammoseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
