# Helpers shared by all rules: the resolved configuration, the keyed result folders, and the input functions
# that read the restructured manifests once the `restructure` checkpoint has run.

import functools
import math
import os
import re
import sys
from pathlib import Path

from mammoseg.config.checks import check_data_paths
from mammoseg.config.keys import first_round_config, stage_keys, stage_settings
from mammoseg.config.resolve import default_configfiles, resolve_workflow_config
from mammoseg.data.manifest import chunk_count, files_of, images_of, read_manifest, rows_of_bucket
from mammoseg.errors import InputError
from mammoseg.studies import experiment_config, is_studies_set, studies_set
from mammoseg.model.folds import FIT_SET, fit_set

# Schema defaults <- the `config` Snakemake hands over (the --configfile files, or the config a calling workflow
# passes to its `module` statement; the demo, config/config.yaml beside this workflow, when neither gives one)
# <- --config, parsed as YAML. `config` is then the resolved configuration, which the scripts receive.
# A bad configuration, or a data or studies folder that is not there, is the user's to fix: one line naming the
# key or file and exit status 2, as from the mammoseg command, instead of Snakemake's report of an exception.
try:
    _resolved = resolve_workflow_config(
        config,
        config_args=workflow.config_settings.config_args,
        configfiles=workflow.config_settings.configfiles,
        demo_files=default_configfiles(Path(workflow.current_basedir).parents[1]),
    )
    check_data_paths(_resolved)
except InputError as exc:
    print(f"mammoseg: error: {exc}", file=sys.stderr)
    sys.exit(2)
config.clear()
config.update(_resolved)

KEYS = stage_keys(config)
SETTINGS = stage_settings(config)
R = config["results"]
ABN = config["data"]["abnormality"]
SYNTHETIC = config["data"]["source"] == "synthetic"
N_SHARDS = config["patches"]["n_shards"]
FOLDS = list(range(config["train"]["folds"]))
# out-of-fold predictions of the training images exist only with cross-validation
IMAGE_SETS = ["test", "oof"] if len(FOLDS) > 1 else ["test"]
# new studies (studies.root): predicted by the experiment's model(s), no ground truth. Their image set is named
# after the folder and the files in it (mammoseg.studies.studies_set): another folder, or a changed one,
# is another image set, indexed and predicted anew, and the findings of every folder coexist.
STUDIES_ROOT = config["studies"]["root"]
STUDIES_SET = studies_set(STUDIES_ROOT) if STUDIES_ROOT else ""

# One folder per stage key (mammoseg.config.keys): the path of an artefact says what made it.
SYNTH = f"{R}/synth/{KEYS.synth}"
DATA = f"{R}/restructured/{KEYS.data}"
FINGERPRINT = f"{DATA}/fingerprint.json"
PATCHES = f"{R}/patches/{KEYS.patches}"
PLAN = f"{PATCHES}/plan.json"
MODELS = f"{R}/models/{KEYS.model}"
PREDICTIONS = f"{R}/predictions/{KEYS.model}/{KEYS.inference}"
# Hard-negative mining (train.hard_negatives.per_image > 0) trains twice: round 1 is the same configuration
# without mining (its models are a plain run's); per fold f, round-1 model f's maps of the images it was fit on
# (image set fit-f) give fold f's mined shard, and round-2 model f trains on the shards plus it. Training and
# prediction rules take the model key as a wildcard; each key has its configuration.
MINING = config["train"]["hard_negatives"]["per_image"] > 0
FIRST_ROUND = first_round_config(config) if MINING else None
ROUND1 = stage_keys(FIRST_ROUND) if MINING else None
CONFIG_OF_MODEL = {KEYS.model: config, **({ROUND1.model: FIRST_ROUND} if MINING else {})}
# the prediction folders ({model}/{inference}) there are: the experiment's and, with mining, round 1's
PREDICTION_RUNS = [f"{KEYS.model}/{KEYS.inference}"] + ([f"{ROUND1.model}/{ROUND1.inference}"] if MINING else [])
EXPERIMENT = f"{R}/experiments/{KEYS.experiment}"
# evaluate.target_fppi > 0: the threshold calibrated on the out-of-fold candidates (rule calibrate)
CALIBRATED = config["evaluate"]["target_fppi"] > 0
OPERATING_POINT = f"{EXPERIMENT}/operating_point.json"
SOURCE = f"{SYNTH}/CBIS-DDSM" if SYNTHETIC else config["data"]["root"]
STUDIES = f"{R}/studies/{STUDIES_SET}" if STUDIES_ROOT else ""
# what the experiment records (config.yaml): the run's configuration without the studies folder, so a studies run
# leaves the experiment's record, its report and the demo's dry run as they were
EXPERIMENT_CONFIG = experiment_config(config)


def log_path(rule_name, *parts):
    """The log of one job of a rule: results/logs/<rule>/<parts...>.log."""
    return os.path.join(R, "logs", rule_name, *parts) + ".log"


def benchmark_path(rule_name, *parts):
    """The benchmark table of one job of a rule: results/benchmarks/<rule>/<parts...>.tsv."""
    return os.path.join(R, "benchmarks", rule_name, *parts) + ".tsv"


# The rules declare mem_mb (MB) and runtime (minutes) for a CBIS-DDSM-scale run on CPU nodes, defaults that a
# cluster profile's set-resources overrides per rule (profiles/slurm). Those that grow with the data are functions
# of the job's inputs, which Snakemake measures when it schedules the job.
def scaled_by_input(base, per_mb):
    """A resource of ``base`` plus ``per_mb`` per MB of the job's input files, rounded up."""
    return lambda wildcards, input: math.ceil(base + per_mb * input.size_mb)


def training_runtime(wildcards, input):
    """Minutes for one fold: every epoch reads every patch of the shards once (on CPU about 20 MB of float32
    patches a minute through the U-Net); half an hour for the start, the callbacks and the model folder."""
    return math.ceil(30 + config["train"]["epochs"] * input.size_mb / 20)


def export_memory(wildcards, input):
    """MB for exporting the fold models, mostly input.size_mb (the .keras files) times what mammoseg.export
    measured: a SavedModel peaks at about 6 times the weights (2.2 GB for the paper's 350 MB U-Net), the ONNX
    conversion at about 50 to 65 times; 8 and 65 here, plus TensorFlow itself."""
    return math.ceil(4000 + (65 if config["export"]["onnx"] else 8) * input.size_mb)


def restructure_inputs(wildcards):
    # The demo tree is a rule's output; a real download is an existing folder that Snakemake does not track
    # file by file (re-run with --forcerun restructure after adding files to it).
    return [rules.synth.output.csv_train, rules.synth.output.csv_test] if SYNTHETIC else []


def manifest_path(split):
    return checkpoints.restructure.get(split=split).output.manifest


@functools.lru_cache(maxsize=8)
def _manifest_rows(path, mtime):
    """The manifest's rows, parsed once per manifest version: input functions run once per job while the DAG
    is built, and parsing per call would make a CBIS-scale dry run slow."""
    return read_manifest(path)


def manifest_rows(split):
    path = manifest_path(split) if not is_studies_set(split) else checkpoints.index_studies.get().output.manifest
    return _manifest_rows(path, os.path.getmtime(path))


def shard_files(wildcards):
    """The image and mask files of the cases in shard k: one changed case re-extracts one shard."""
    mine = rows_of_bucket(manifest_rows("train"), int(wildcards.k), N_SHARDS)
    return files_of(mine, f"{DATA}/train")


def set_split(image_set):
    """test: the test split; oof and fit-<f> (mining): the training split."""
    return "test" if image_set == "test" else "train"


def set_manifest(image_set):
    """The manifest of an image set: the test split, the training split (out of fold) or the new studies."""
    if is_studies_set(image_set):
        return f"{R}/studies/{image_set}/manifest.csv"
    return f"{DATA}/{set_split(image_set)}/manifest.csv"


def set_rows(image_set):
    return manifest_rows(image_set if is_studies_set(image_set) else set_split(image_set))


def n_chunks(image_set):
    """How many chunks an image set is cut into (infer.chunk_size images each): known once it is restructured."""
    return chunk_count(set_rows(image_set), config["infer"]["chunk_size"])


def chunk_rows(wildcards):
    return rows_of_bucket(set_rows(wildcards.image_set), int(wildcards.c), n_chunks(wildcards.image_set))


def chunk_folders(wildcards):
    """Every evaluated chunk folder of an image set (the summary's inputs)."""
    return expand(f"{EXPERIMENT}/{wildcards.image_set}/chunk-{{c}}", c=range(n_chunks(wildcards.image_set)))


def chunk_images(wildcards):
    """The full images of chunk c of an image set: one changed image re-predicts one chunk."""
    base = os.path.dirname(set_manifest(wildcards.image_set))
    return [f"{base}/{path}" for _, path in images_of(chunk_rows(wildcards))]


def chunk_files(wildcards):
    """Images and ROI masks of chunk c (what evaluation reads)."""
    return files_of(chunk_rows(wildcards), os.path.dirname(set_manifest(wildcards.image_set)))


def operating_point_input(wildcards):
    """The calibrated operating point, for every image set but the out-of-fold one that calibrates it."""
    return [OPERATING_POINT] if CALIBRATED and wildcards.image_set != "oof" else []


def fold_models(model_key):
    """The fold models a chunk is predicted with: all of them (their mean) for the test split; for out-of-fold
    predictions every fold model too, each image then using the one fold model that never saw its patient."""
    return expand(f"{R}/models/{model_key}/fold-{{f}}/{config['infer']['checkpoint']}.keras", f=FOLDS)


def one_of(keys):
    """A wildcard constraint that matches exactly these keys."""
    return "|".join(re.escape(key) for key in keys)


def print_run_summary():
    """Print the evaluation summaries (written by `summarise`) as the last thing a successful run shows."""
    for image_set in IMAGE_SETS + ([STUDIES_SET] if STUDIES_ROOT else []):
        path = f"{EXPERIMENT}/{image_set}/summary.txt"
        if os.path.exists(path):
            print(f"\n{open(path).read().strip()}")
    print(f"\nresults of this run: {EXPERIMENT}/ (resolved configuration in config.yaml)")
    if STUDIES_ROOT:  # the report holds what its configuration makes: these findings with this studies.root
        print(f"findings of {STUDIES_ROOT}: {EXPERIMENT}/{STUDIES_SET}/ (in the report made with the same --config)")
