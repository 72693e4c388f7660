# Helpers shared by all rules -- the validated config, result paths, and the input functions that read the
# restructured manifests once the `restructure` checkpoint has run.

import functools
import json
import os

import pandas as pd

from mammoseg.config import validate_config
from mammoseg.patches.shards import shard_of

# Fills every default and fails with the key and the allowed values on a bad config.
config.update(validate_config(config))

R = config["results"]
ABN = config["data"]["abnormality"]
MODEL = config["model"]["name"]
SYNTHETIC = config["data"]["source"] == "synthetic"
SOURCE = f"{R}/synth/CBIS-DDSM" if SYNTHETIC else config["data"]["root"]
N_SHARDS = config["patches"]["n_shards"]


def config_json(*sections):
    """The config sections a rule depends on, as JSON for `mammoseg --config-json`.

    Passed as a param, so changing a key re-runs exactly the rules whose sections contain it.
    """
    return json.dumps({name: config[name] for name in sections}, sort_keys=True)


def restructure_inputs(wildcards):
    # The demo tree is a rule's output; a real download is an existing folder that Snakemake does not track
    # file by file (re-run with --forcerun restructure after adding files to it).
    return [rules.synth.output.csv_train, rules.synth.output.csv_test] if SYNTHETIC else []


def manifest_path(split):
    return checkpoints.restructure.get(split=split).output.manifest


def read_manifest(split):
    path = manifest_path(split)
    return _files_by_image(path, os.path.getmtime(path))[0]


@functools.lru_cache(maxsize=8)
def _files_by_image(path, mtime):
    """The manifest and {image_id: (image path, [mask paths])}, parsed once per manifest version.

    Input functions run once per job while the DAG is built (hundreds of test images at CBIS scale): parsing
    the CSV once, not per call, keeps a dry run within seconds.
    """
    manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    files = {}
    for image_id, rows in manifest.groupby("image_id", sort=True):
        files[image_id] = (rows["image_path"].iloc[0], list(rows["mask_path"]))
    return manifest, files


def image_files(split, image_id):
    path = manifest_path(split)
    return _files_by_image(path, os.path.getmtime(path))[1][image_id]


def restructured(split, relative):
    return f"{R}/restructured/{ABN}/{split}/{relative}"


def shard_files(wildcards):
    """The image and mask files of the cases that hash to shard k: one changed case re-extracts one shard."""
    manifest = read_manifest("train")
    mine = manifest[[shard_of(i, N_SHARDS) == int(wildcards.k) for i in manifest["image_id"]]]
    return [restructured("train", f) for f in sorted(set(mine["image_path"]) | set(mine["mask_path"]))]


def test_image_ids():
    return sorted(set(read_manifest("test")["image_id"]))


def test_image(wildcards):
    # From the manifest, not a fixed suffix: the Kaggle layout restructures to .jpg/.png files.
    return restructured("test", image_files("test", wildcards.image_id)[0])


def test_masks(wildcards):
    return [restructured("test", p) for p in image_files("test", wildcards.image_id)[1]]


def all_image_jsons(wildcards):
    return expand(f"{R}/metrics/{MODEL}/images/{{image_id}}.json", image_id=test_image_ids())


def all_overlays(wildcards):
    return expand(f"{R}/overlays/{MODEL}/{{image_id}}.png", image_id=test_image_ids())


def print_run_summary():
    """Print the evaluation summary (written by `summarise`) as the last thing a successful run shows."""
    log = f"{R}/logs/summarise/{MODEL}.log"
    if os.path.exists(log):
        print(f"\n{open(log).read().strip()}")
        print(
            "  (paper, CBIS-DDSM mass test set: Dice 0.29 whole image / 0.70 at lesions, "
            "IoU 0.17 / 0.534, TPR 0.77 at 3.65 FPPI)"
        )
