"""k-fold cross-validation by patient (after nnU-Net): which fold each training patient belongs to.

One function decides it, so the training of fold ``f`` (validate on fold ``f``'s patients, train on the others)
and the workflow (which training images fold ``f``'s model predicts out of fold) cannot disagree. Pure Python:
no TensorFlow, so the Snakefile can import it cheaply.

Determinism: the order of the patients comes from SHA-256 of ``"<seed>:<patient_id>"``, not from a random
generator, so the same ids and seed give the same folds on every run, platform and library version (NumPy's
``Generator`` does not promise the same stream across its versions).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from mammoseg.data.manifest import read_manifest
from mammoseg.errors import InputError
from mammoseg.io.atomic import write_json_atomic

__all__ = ["FIT_SET", "assign_folds", "fit_on", "fit_set", "fit_set_fold", "folds_predicting", "Splits",
           "build_splits", "read_splits", "run_splits"]

#: The image set of the training images that fold f's model was fit on is ``fit-<f>``: hard-negative mining.
FIT_SET = "fit-"


def _shuffle_key(seed: int, patient_id: str) -> str:
    """The seeded sort key that puts the patients in a pseudo-random but reproducible order."""
    return hashlib.sha256(f"{seed}:{patient_id}".encode("utf-8")).hexdigest()


def assign_folds(patient_ids: Iterable[str], folds: int, seed: int) -> dict[str, int]:
    """Deal the unique patients into ``folds`` folds of sizes that differ by at most 1.

    Parameters
    ----------
    patient_ids : patient ids (str; duplicates allowed, e.g. one per patch or image).
    folds : number of folds k >= 1 (``train.folds``); k = 1 puts every patient in fold 0.
    seed : permutes the patients (``train.seed``).

    Returns
    -------
    dict {patient_id: fold in 0..k-1}, one entry per unique patient: the sorted unique ids, permuted with
    ``seed``, dealt round-robin (the i-th patient of the permutation goes to fold ``i mod k``).

    Raises
    ------
    ValueError
        If ``folds < 1`` or there are fewer patients than folds (a fold would have no validation patient).
    """
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    patients = sorted({str(p) for p in patient_ids})
    if len(patients) < folds:
        raise ValueError(f"{folds} folds need at least {folds} patients, got {len(patients)}")
    order = sorted(patients, key=lambda patient: _shuffle_key(seed, patient))
    return {patient: position % folds for position, patient in enumerate(order)}


@dataclass(frozen=True)
class Splits:
    """The cross-validation's folds, written once as ``splits.json`` (nnU-Net's ``splits_final.json``) and read by
    every fold's training and by the out-of-fold prediction, so that both see the very same assignment.

    Attributes
    ----------
    folds : k; seed : ``train.seed``
    fold_of : {patient_id: fold}, every patient of the restructured training split
    """

    folds: int
    seed: int
    fold_of: dict[str, int]

    def patients_of(self, fold: int) -> list[str]:
        """The patients validated by fold ``fold`` (sorted)."""
        return sorted(p for p, f in self.fold_of.items() if f == fold)

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, {"folds": self.folds, "seed": self.seed, "fold_of": self.fold_of,
                                 "patients_per_fold": [len(self.patients_of(f)) for f in range(self.folds)]})


def fit_on(fold_of: Mapping[str, int], patient_id: str, fold: int) -> bool:
    """Whether fold ``fold``'s model is fit on ``patient_id`` (a patient of another fold; ``fold_of``:
    :attr:`Splits.fold_of`). Hard-negative mining looks for false positives on those images (image set
    ``fit-<fold>``). A patient outside the splits is a ``KeyError``: the splits are not those of this manifest."""
    return fold_of[patient_id] != fold


def fit_set(fold: int) -> str:
    """The name of the image set of the training images fold ``fold``'s model was fit on."""
    return f"{FIT_SET}{fold}"


def fit_set_fold(image_set: str) -> int | None:
    """The fold of a ``fit-<f>`` image set (:func:`fit_set`); None for any other image set."""
    if not image_set.startswith(FIT_SET):
        return None
    return int(image_set[len(FIT_SET):])


def folds_predicting(image_set: str, patient_id: str, fold_of: Mapping[str, int] | None, folds: int) -> list[int]:
    """The folds whose models predict a patient's images in an image set (their mean when several).

    ``test`` and new studies (``studies``, ``studies-<folder key>``): every fold. ``oof``: the one fold that holds
    the patient, i.e. the model that never trained on them. ``fit-<f>``: fold f when its model was fit on the
    patient (:func:`fit_on`), else none. ``fold_of`` (:attr:`Splits.fold_of`) is needed for the last two.
    """
    if image_set in ("test", "studies") or image_set.startswith("studies-"):
        return list(range(folds))
    fit_fold = fit_set_fold(image_set)
    if fold_of is None or (image_set != "oof" and fit_fold is None):
        raise ValueError(f"image set {image_set!r}: out-of-fold and fit predictions need the cross-validation's "
                         f"splits; known sets: test, studies, oof, {FIT_SET}<fold>")
    if image_set == "oof":
        return [fold_of[patient_id]]
    return [fit_fold] if fit_on(fold_of, patient_id, fit_fold) else []


def build_splits(patient_ids: Iterable[str], folds: int, seed: int) -> Splits:
    """The splits of the training patients (all of them: patients whose ROIs make no patch still get a fold)."""
    return Splits(folds=int(folds), seed=int(seed), fold_of=assign_folds(patient_ids, folds, seed))


def read_splits(path: str | Path) -> Splits:
    """Load ``splits.json``; a missing or foreign file is an :class:`~mammoseg.errors.InputError` naming it."""
    try:
        raw = json.loads(Path(path).read_text())
        return Splits(folds=int(raw["folds"]), seed=int(raw["seed"]),
                      fold_of={str(k): int(v) for k, v in raw["fold_of"].items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a mammoseg splits.json: {exc}") from None


def run_splits(train_manifest: str | Path, out: str | Path, *, folds: int, seed: int) -> Splits:
    """Stage ``splits``: the folds of the training manifest's patients, written as ``splits.json``."""
    splits = build_splits((row["patient_id"] for row in read_manifest(train_manifest)), folds, seed)
    splits.write(out)
    sizes = [len(splits.patients_of(f)) for f in range(splits.folds)]
    print(f"splits: {len(splits.fold_of)} training patients in {splits.folds} fold(s) of {sizes} -> {out}")
    return splits
