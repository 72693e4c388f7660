"""New studies: mammograms outside the CBIS splits, without ground truth, through a trained model.

Both routes go through this module, so they name, check and report new studies alike: the workflow
(``studies.root``: rules ``index_studies``, ``predict_chunk``, ``evaluate_chunk``, ``summarise_studies``) and
``mammoseg predict`` (:func:`run_studies`).

- :func:`studies_set` names the image set of a studies folder after the folder *and the files in it* (path, size,
  modification time of each), as every stage key names what made an artefact: another folder, or the same folder
  with a file added or changed, is another set of studies, indexed and predicted anew, and the findings of two
  folders coexist under the experiment.
- :func:`mammoseg.data.studies.check_studies_folder` refuses, before anything runs, a folder that does not exist
  or holds no DICOM file; indexing then refuses one in which no DICOM file is a readable mammogram
  (:func:`mammoseg.data.restructure.run_index_studies`). Images are named by the same rule on both routes
  (:func:`mammoseg.data.restructure.normal_identity`: ``P_<id>_<SIDE>_<VIEW>`` from the PatientID or file name).
- :func:`synthetic_model_warning`: a model trained on the synthetic demo says so beside its findings.

Only the standard library is imported at module level: the workflow calls :func:`studies_set` and
:func:`check_studies_folder` while it plans the DAG.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from mammoseg.data.studies import check_studies_folder, study_files
from mammoseg.errors import InputError

__all__ = [
    "STUDIES_PREFIX",
    "is_studies_set",
    "studies_set",
    "experiment_config",
    "trained_on_synthetic",
    "synthetic_model_warning",
    "run_summarise_studies",
    "configured_models",
    "run_studies",
]

#: Image sets of new studies are named ``studies-<folder name>-<hash>`` (:func:`studies_set`).
STUDIES_PREFIX = "studies-"
#: Characters of the folder's own name kept in the image set's name (readability only: the hash identifies it).
_NAME_LENGTH = 40
_HASH_LENGTH = 8


def is_studies_set(image_set: str) -> bool:
    """Whether an image set holds new studies (no ground truth) rather than a split of the collection."""
    return image_set.startswith(STUDIES_PREFIX)


def _listing(root: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, modification time in ns) of every file below ``root``; a broken link by its own."""
    rows = []
    for path in study_files(root):
        try:
            stat = path.stat()
        except OSError:  # a broken link: indexing skips it as unreadable; its own entry still keys the folder
            stat = path.lstat()
        rows.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return rows


def studies_set(root: str | Path) -> str:
    """The image set (and folder name) of the new studies in ``root``: ``studies-<folder name>-<hash>``, the hash
    over the absolute path and the listing (path, size, modification time) of every file in it."""
    from mammoseg.config.schema import section_hash
    from mammoseg.io.names import safe_name

    root = Path(os.path.abspath(root))
    try:
        name = safe_name(root.name, max_length=_NAME_LENGTH)
    except ValueError:  # the filesystem root, or a name of symbols only
        name = "folder"
    return f"{STUDIES_PREFIX}{name}-{section_hash(str(root), _listing(root))[:_HASH_LENGTH]}"


def experiment_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration an experiment records (its ``config.yaml``): the run's, without the studies folder.

    Predicting new studies with an experiment's models does not change the experiment, so a studies run leaves
    its record, and everything made from it, as it was.
    """
    return {**config, "studies": {**config["studies"], "root": ""}}


# --------------------------------------------------------------------------------------------------------------
# what the model was trained on
# --------------------------------------------------------------------------------------------------------------
#: The model card's name (mammoseg.export.MODEL_CARD_FILE); looked for beside a model or plan file.
_MODEL_CARD = "model_card.json"


def trained_on_synthetic(config: Mapping[str, Any], near: Sequence[str | Path] = ()) -> bool:
    """Whether the model was trained on the synthetic demo data: from a model card (``model_card.json``) in the
    folder of any file of ``near`` (the model files, the plan), else from the configuration it is applied with
    (``data.source``), which must be the model's anyway for its geometry to match."""
    for path in near:
        card = Path(path).parent / _MODEL_CARD
        if card.is_file():
            try:
                return json.loads(card.read_text())["config"]["values"]["data"]["source"] == "synthetic"
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InputError(f"{card}: not a mammoseg model card: {type(exc).__name__}: {exc}") from None
    return config["data"]["source"] == "synthetic"


def synthetic_model_warning(synthetic: bool) -> str:
    """The one line said beside the findings of a model trained on the synthetic demo ('' for any other)."""
    if not synthetic:
        return ""
    return ("warning: this model was trained on the synthetic demo data (data.source: synthetic), drawn blobs "
            "on smooth backgrounds, not on mammograms: its marks on real mammograms mean nothing")


def run_summarise_studies(chunk_dirs: Sequence[str | Path], out_dir: str | Path, *, config: Mapping[str, Any],
                          image_set: str, experiment: str,
                          operating_point: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Stage ``summarise_studies``: the findings tables of the evaluated chunks of the studies of ``studies.root``
    (:func:`mammoseg.evaluation.summary.summarise_findings`), at the threshold they were binarised at, naming the
    folder, with the warning of a model trained on the synthetic demo (the workflow trains on ``data.source``)."""
    from mammoseg.evaluation.calibrate import evaluation_threshold
    from mammoseg.evaluation.summary import summarise_findings

    return summarise_findings(chunk_dirs, out_dir, experiment=experiment,
                              threshold=evaluation_threshold(config, image_set, operating_point),
                              source=config["studies"]["root"],
                              warning=synthetic_model_warning(config["data"]["source"] == "synthetic"))


# --------------------------------------------------------------------------------------------------------------
# mammoseg predict
# --------------------------------------------------------------------------------------------------------------
def configured_models(config: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """The models the workflow predicts new studies with under this configuration (every fold's
    ``infer.checkpoint``, their mean when there are several) and their plan, where the workflow wrote them
    (``results/models/<model key>/``, ``results/patches/<patches key>/plan.json``).

    Raises
    ------
    InputError
        A fold model is missing: the configuration has not been trained (here).
    """
    from mammoseg.config.keys import stage_keys

    keys = stage_keys(config)
    results = Path(config["results"])
    models = [results / "models" / keys.model / f"fold-{f}" / f"{config['infer']['checkpoint']}.keras"
              for f in range(config["train"]["folds"])]
    missing = [str(path) for path in models if not path.is_file()]
    if missing:
        raise InputError(f"{missing[0]}: no trained model of this configuration (run the workflow with it first, "
                         f"or give --model and --configfile/--plan of the model to use)")
    plan = results / "patches" / keys.patches / "plan.json"
    return [str(path) for path in models], str(plan) if plan.is_file() else None


def _check_models(models: Sequence[str], geometry, geometry_source: str) -> None:
    """Load every model once before anything is written, and refuse one whose input does not take the windows of
    ``geometry``, saying where that geometry came from and how to give the model's own."""
    from mammoseg.inference.predict import check_input_size, load_model

    for path in models:
        try:
            check_input_size(load_model(path), geometry, str(path))
        except InputError as exc:
            if "input shape" not in str(exc):  # a missing or damaged file: its own message says it all
                raise
            raise InputError(f"{exc}; the windows are those of {geometry_source}: give the model's plan "
                             f"(--plan .../plan.json of its patches) or its configuration (--configfile)") from None


def run_studies(inputs: Sequence[str | Path], models: Sequence[str], out_dir: str | Path, *,
                config: Mapping[str, Any], plan: str | Path | None = None, experiment: str = "",
                operating_point: str | Path | None = None, geometry_source: str = "",
                threads: int = 1) -> dict[str, Any]:  # fmt: skip
    """``mammoseg predict``: new studies (DICOM files or folders, no ground truth) through a trained model or fold
    ensemble, outside the workflow and as the workflow does it.

    Writes ``out_dir/studies/`` (``manifest.csv`` and ``skipped.csv``: what was read, found = kept + skipped, the
    images named as the workflow names them), ``out_dir/probabilities/`` (maps and ``predictions.csv``),
    ``out_dir/findings/`` (per image: mask, overlay, DICOM SEG, JSON with candidates and marks) and
    ``out_dir/findings.csv``, ``candidates.csv``, ``summary.txt``. The window geometry comes from ``plan``, else
    from ``config['patches']``; ``geometry_source`` says which, in the error when a model does not match it.
    Every model is checked before anything is written.
    """
    from mammoseg.config.plan import patch_geometry, read_plan
    from mammoseg.data.manifest import read_manifest
    from mammoseg.data.restructure import run_index_studies
    from mammoseg.evaluation.calibrate import evaluation_threshold
    from mammoseg.evaluation.evaluate import evaluate_chunk
    from mammoseg.evaluation.summary import summarise_findings
    from mammoseg.inference.predict import chunk_tasks, predict_images

    for entry in map(Path, inputs):
        if entry.is_dir():
            check_studies_folder(entry)
        elif not entry.is_file():
            raise InputError(f"{entry}: no such file or folder")
    threshold = evaluation_threshold(config, "studies", operating_point)
    geometry = read_plan(plan).geometry if plan else patch_geometry(config["patches"])
    _check_models(models, geometry, geometry_source or (f"the plan {plan}" if plan else "the configuration"))
    out_dir = Path(out_dir)
    index = run_index_studies(dict(config), out_dir / "studies", threads=threads, roots=list(inputs))
    manifest = out_dir / "studies" / "manifest.csv"
    rows = read_manifest(manifest)
    infer = config["infer"]
    tasks = chunk_tasks(rows, manifest.parent, models, image_set="studies")
    predict_images(tasks, out_dir / "probabilities", geometry=geometry, infer=infer, batch_size=infer["batch_size"])
    evaluate_chunk(out_dir / "probabilities", rows, manifest.parent, out_dir / "findings", threshold=threshold,
                   evaluate=config["evaluate"], experiment=experiment)
    synthetic = trained_on_synthetic(config, [*models, *([plan] if plan else [])])
    summary = summarise_findings([out_dir / "findings"], out_dir, experiment=experiment or "mammoseg",
                                 threshold=threshold, source=", ".join(map(str, inputs)),
                                 warning=synthetic_model_warning(synthetic))
    return {**summary, "index": index}
