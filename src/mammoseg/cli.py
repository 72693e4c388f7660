"""The ``mammoseg`` command: one subcommand per workflow stage.

Snakemake rules call these subcommands and hold no logic themselves; users call them to run or inspect one
stage by hand. Each subcommand takes the configuration either as a YAML file (``--config``) or as JSON
(``--config-json``, what the rules pass: only the sections a stage depends on, so that changing an unrelated
key never re-runs it). Both are validated against the same schema and filled with the same defaults.

Errors in the input (a bad config, an unreadable file) end with one line naming the file and the reason and
exit status 2; set ``MAMMOSEG_DEBUG=1`` for the full traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from mammoseg import __version__
from mammoseg.config import ConfigError, load_config, validate_config

__all__ = ["main", "build_parser"]


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The validated config from ``--config`` (YAML file) overlaid with ``--config-json``."""
    config = load_config(args.config) if args.config else validate_config({})
    if args.config_json:
        try:
            override = json.loads(args.config_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config-json is not valid JSON: {exc}") from None
        config = validate_config(_merge(config, override))
    return config


# --- subcommands: each one parses nothing itself and calls one stage function -------------------------------


def _synth(args, config):
    from mammoseg.data.synth import run_synth

    return run_synth(config, Path(args.out))


def _restructure(args, config):
    from mammoseg.data.restructure import run_restructure

    return run_restructure(config, Path(args.source), Path(args.out), args.split)


def _extract(args, config):
    from mammoseg.patches.shards import run_extract

    return run_extract(config, Path(args.manifest), Path(args.out), args.shard)


def _patch_manifest(args, config):
    from mammoseg.patches.shards import run_patch_manifest

    return run_patch_manifest(config, [Path(p) for p in args.shards], Path(args.out), Path(args.skipped))


def _patch_show(args, config):
    from mammoseg.patches.shards import render_grid

    out = Path(args.out) if args.out else Path(args.shard).with_suffix(".png")
    render_grid(Path(args.shard), out, n=args.n)
    print(f"wrote {out}")
    return {"png": str(out)}


def _fingerprint(args, config):
    from mammoseg.config.fingerprint import run_fingerprint

    return run_fingerprint(config, [Path(p) for p in args.manifests], Path(args.out_fingerprint), Path(args.out_plan))


def _train(args, config):
    from mammoseg.model.train import run_train

    return run_train(config, [Path(p) for p in args.shards], Path(args.out_dir))


def _model_summary(args, config):
    from mammoseg.model.unet import run_summary

    counts = run_summary(config)
    print(json.dumps(counts, indent=2))
    return counts


def _predict(args, config):
    from mammoseg.inference.sliding import run_predict

    return run_predict(config, Path(args.model), Path(args.image), Path(args.out_prob), Path(args.out_mask))


def _evaluate(args, config):
    from mammoseg.evaluation.evaluate import run_evaluate

    return run_evaluate(
        config, Path(args.prob), Path(args.manifest), args.image_id, Path(args.out_json), Path(args.out_overlay)
    )


def _summarise(args, config):
    from mammoseg.evaluation.evaluate import run_summarise

    return run_summarise(config, [Path(p) for p in args.image_jsons], Path(args.out_dir), args.model_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mammoseg", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"mammoseg {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config file (default: all defaults)")
    common.add_argument("--config-json", help="config sections as JSON, overriding --config")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable, help_text: str, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("synth", _synth, "write the synthetic CBIS-DDSM-like demo dataset (DICOM tree + case CSVs)")
    p.add_argument("--out", required=True, help="output folder (gets CBIS-DDSM/, csv/, truth.json)")

    p = add("restructure", _restructure, "index a CBIS-DDSM tree and restructure one collection")
    p.add_argument("--source", required=True, help="root of the download (any supported layout)")
    p.add_argument("--out", required=True, help="output folder for this collection (results/restructured/ABN/SPLIT)")
    p.add_argument("--split", required=True, choices=["train", "test"])

    p = add("fingerprint", _fingerprint, "dataset fingerprint and training plan (nnU-Net style)")
    p.add_argument("--out-fingerprint", required=True)
    p.add_argument("--out-plan", required=True)
    p.add_argument("manifests", nargs="+", help="restructured manifest.csv files")

    p = add("extract", _extract, "extract the patches of one shard into HDF5")
    p.add_argument("--manifest", required=True, help="manifest.csv of the training collection")
    p.add_argument("--out", required=True, help="shard file to write (.h5)")
    p.add_argument("--shard", required=True, type=int, help="shard index, 0-based")

    patches = sub.add_parser("patches", help="inspect patch shards").add_subparsers(dest="patches_command", required=True)
    p = add("manifest", _patch_manifest, "one table over all shards (patches.csv) and their skipped ROIs", patches)
    p.add_argument("--out", required=True)
    p.add_argument("--skipped", required=True)
    p.add_argument("shards", nargs="+")
    p = add("show", _patch_show, "PNG grid of patches with mask contours", patches)
    p.add_argument("shard")
    p.add_argument("--n", type=int, default=16, help="number of patches")
    p.add_argument("--out", help="PNG path (default: beside the shard)")

    p = add("train", _train, "train the U-Net on patch shards")
    p.add_argument("--out-dir", required=True, help="results/models/NAME")
    p.add_argument("shards", nargs="+")

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="model_command", required=True)
    add("summary", _model_summary, "print trainable and non-trainable parameter counts as JSON", model)

    p = add("predict", _predict, "sliding-window inference on one full mammogram")
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--out-prob", required=True, help=".npz with the uint8 probability map")
    p.add_argument("--out-mask", required=True, help=".png with the binary mask")

    p = add("evaluate", _evaluate, "pixel and lesion metrics and overlay for one image")
    p.add_argument("--prob", required=True)
    p.add_argument("--manifest", required=True, help="manifest.csv of the test collection")
    p.add_argument("--image-id", required=True)
    p.add_argument("--out-json", required=True)
    p.add_argument("--out-overlay", required=True)

    p = add("summarise", _summarise, "tables over all evaluated images: per image, lesions, summary, FROC")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("image_jsons", nargs="+")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolve_config(args)
        args.func(args, config)
    except (ConfigError, FileNotFoundError, ValueError, OSError, KeyError) as exc:
        if os.environ.get("MAMMOSEG_DEBUG"):
            raise
        print(f"mammoseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
