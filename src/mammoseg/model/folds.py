"""k-fold cross-validation by patient (after nnU-Net): which fold each training patient belongs to.

One function decides it, so the training of fold ``f`` (validate on fold ``f``'s patients, train on the others)
and the workflow (which training images fold ``f``'s model predicts out of fold) cannot disagree. Pure Python:
no TensorFlow, no NumPy, so the Snakefile can import it cheaply.

Determinism: the order of the patients comes from SHA-256 of ``"<seed>:<patient_id>"``, not from a random
generator, so the same ids and seed give the same folds on every run, platform and library version (NumPy's
``Generator`` does not promise the same stream across its versions).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

__all__ = ["assign_folds"]


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
