"""k-fold by patient: every patient in exactly one fold, balanced, reproducible (no TensorFlow needed)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from mammoseg.model.folds import assign_folds

PATIENTS = [f"P_{p:05d}" for p in range(23)]


@pytest.mark.parametrize("folds", [1, 2, 3, 5, 23])
def test_every_patient_in_exactly_one_fold_and_sizes_differ_by_at_most_one(folds):
    # patches repeat their patient: duplicates must not create extra entries
    assignment = assign_folds(PATIENTS * 3, folds, seed=0)
    assert sorted(assignment) == PATIENTS
    assert set(assignment.values()) == set(range(folds))
    sizes = Counter(assignment.values())
    assert max(sizes.values()) - min(sizes.values()) <= 1
    assert sum(sizes.values()) == len(PATIENTS)


def test_folds_are_disjoint_patient_sets():
    assignment = assign_folds(PATIENTS, 5, seed=3)
    members = [{p for p, f in assignment.items() if f == fold} for fold in range(5)]
    for a in range(5):
        for b in range(a + 1, 5):
            assert members[a].isdisjoint(members[b])
    assert set().union(*members) == set(PATIENTS)


def test_assignment_depends_on_seed_not_on_input_order():
    forward = assign_folds(PATIENTS, 4, seed=7)
    assert assign_folds(list(reversed(PATIENTS)), 4, seed=7) == forward
    assert assign_folds(PATIENTS, 4, seed=8) != forward


def test_assignment_is_the_same_in_a_fresh_interpreter():
    # a fresh process has a different str hash salt (PYTHONHASHSEED): the folds must not depend on it
    code = ("from mammoseg.model.folds import assign_folds; "
            f"print(sorted(assign_folds({PATIENTS!r}, 4, 7).items()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PYTHONPATH": ":".join(sys.path)})
    assert out.stdout.strip() == str(sorted(assign_folds(PATIENTS, 4, 7).items()))


def test_assignment_is_pinned():
    # a change of the permutation would silently move patients between folds of existing results. The order by
    # sha256("0:<id>") is d, a, c, b, e (checked by hand with hashlib), dealt round-robin into 2 folds:
    assert assign_folds(["e", "d", "c", "b", "a"], 2, seed=0) == {"d": 0, "a": 1, "c": 0, "b": 1, "e": 0}


def test_errors_are_clear():
    with pytest.raises(ValueError, match="at least 3 patients"):
        assign_folds(["a", "b"], 3, seed=0)
    with pytest.raises(ValueError, match="folds must be >= 1"):
        assign_folds(PATIENTS, 0, seed=0)


def test_a_patients_normal_and_lesion_images_share_a_fold_and_a_split(tmp_path):
    """Splits are over the manifest's patients, normal images included; a patient in both splits is refused."""
    import pandas as pd
    import pytest

    from mammoseg.config.fingerprint import dataset_fingerprint
    from mammoseg.errors import InputError
    from mammoseg.model.folds import read_splits, run_splits

    rows = []
    for i in range(12):
        patient = f"P_{i:05d}"
        rows.append({"roi_id": f"{patient}_LEFT_MLO_1", "image_id": f"{patient}_LEFT_MLO", "patient_id": patient,
                     "split": "train", "abnormality_id": "1", "image_path": "x", "mask_path": "y"})
        rows.append({"roi_id": "", "image_id": f"{patient}_RIGHT_MLO", "patient_id": patient, "split": "train",
                     "abnormality_id": "0", "image_path": "z", "mask_path": ""})
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    splits = run_splits(manifest, tmp_path / "splits.json", folds=3, seed=4)
    assert read_splits(tmp_path / "splits.json") == splits and len(splits.fold_of) == 12
    by_image = {row["image_id"]: splits.fold_of[row["patient_id"]] for row in rows}
    for i in range(12):
        assert by_image[f"P_{i:05d}_LEFT_MLO"] == by_image[f"P_{i:05d}_RIGHT_MLO"]
    train = pd.DataFrame(rows).assign(image_rows="8", image_cols="8", pathology="")
    test = train.iloc[:1].assign(split="test")
    with pytest.raises(InputError, match="P_00000.*both"):
        dataset_fingerprint([train, test])
    assert dataset_fingerprint([train])["train"]["normal_images"] == 12
