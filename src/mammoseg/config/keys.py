"""Where every artefact lives: one key per stage, built from exactly the settings that shape its result.

A stage's key is a readable prefix and a short hash of its own settings *and of the key of the stage before it*,
so the path of an artefact identifies everything that produced it. Any number of variants then coexist under
``results/``: a blended-inference variant writes beside the paper-mode predictions of the same model instead of
over them, and a finished variant's dry run schedules nothing after another variant ran.

=========== ================================================ ==========================================
stage       key (folder name)                                hashes
=========== ================================================ ==========================================
synth       ``{abnormality}-{hash}``                         ``synth``, ``data.abnormality``, layout
data        ``{abnormality}-{hash}``                         ``data`` (+ the synth key for the demo)
patches     ``{abnormality}-n{n}d{downscale}-{hash}``        data key, ``patches``
model       ``{model.name}-{hash}``                          patches key, ``model``, ``train``
inference   ``{infer.mode}-{hash}``                          model key, ``infer`` but the threshold
experiment  ``{experiment or model.name}-{hash}``            inference key, ``infer.threshold``, ``evaluate``
=========== ================================================ ==========================================

Settings that change how a result is stored or computed but not what it is (:data:`NOT_IN_KEYS`: compression
filters, link or copy, batch sizes, job counts) are left out of the keys: changing them re-runs nothing.
The threshold is left out of the inference key because predictions are probability maps; binarising is
evaluation, so a new threshold re-runs evaluation and summaries only.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from mammoseg.config.schema import section_hash, validate_config

__all__ = ["NOT_IN_KEYS", "StageKeys", "first_round_config", "stage_keys", "stage_settings"]

#: Settings that do not change what a stage produces, only how it is stored or scheduled.
NOT_IN_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("link",),
    "patches": ("compression", "image_compression"),
    "infer": ("batch_size", "chunk_size"),
}
#: Settings of ``infer`` that belong to evaluation (binarising a saved probability map).
EVALUATION_INFER_KEYS = ("threshold",)
HASH_LENGTH = 8


def _without(section: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k not in keys}


def stage_settings(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The settings each stage's result depends on (its own part of the key), by stage name.

    These are what the workflow passes to a stage as ``params``; the keys of :func:`stage_keys` hash them.
    """
    data = _without(config["data"], NOT_IN_KEYS["data"])
    infer = _without(config["infer"], NOT_IN_KEYS["infer"])
    return {
        "synth": {"synth": dict(config["synth"]), "abnormality": config["data"]["abnormality"],
                  "layout": "doi" if config["data"]["layout"] == "auto" else config["data"]["layout"]},
        "data": data,
        "patches": _without(config["patches"], NOT_IN_KEYS["patches"]),
        "model": {"model": dict(config["model"]), "train": dict(config["train"])},
        "inference": _without(infer, EVALUATION_INFER_KEYS),
        "evaluation": {"threshold": config["infer"]["threshold"], "evaluate": dict(config["evaluate"]),
                       "experiment": config["experiment"]},
    }


@dataclass(frozen=True)
class StageKeys:
    """Folder names of one configuration's artefacts (see the module docstring for what each one hashes)."""

    synth: str
    data: str
    patches: str
    model: str
    inference: str
    experiment: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _key(prefix: str, *parts: Any) -> str:
    return f"{prefix}-{section_hash(*parts)[:HASH_LENGTH]}"


def stage_keys(config: Mapping[str, Any]) -> StageKeys:
    """The stage keys of a validated configuration (stable: the same settings always give the same keys)."""
    settings = stage_settings(config)
    abnormality = config["data"]["abnormality"]
    synthetic = config["data"]["source"] == "synthetic"
    synth = _key(abnormality, settings["synth"])
    data = _key(abnormality, settings["data"], synth if synthetic else None)
    patches_cfg = config["patches"]
    patches = _key(f"{abnormality}-n{patches_cfg['n']}d{patches_cfg['downscale']}", data, settings["patches"])
    model = _key(config["model"]["name"], patches, settings["model"])
    inference = _key(config["infer"]["mode"], model, settings["inference"])
    experiment = _key(config["experiment"] or config["model"]["name"], inference, settings["evaluation"])
    return StageKeys(synth=synth, data=data, patches=patches, model=model, inference=inference,
                     experiment=experiment)


def first_round_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration of the first training round: ``config`` with the schema's ``train.hard_negatives`` (off),
    so its model is the one a run without mining trains (same stage key, same folder: trained once, shared)."""
    first = copy.deepcopy(dict(config))
    first["train"] = {**first["train"], "hard_negatives": validate_config({})["train"]["hard_negatives"]}
    return first
