"""Candidate FROC, CPM and bootstrap, checked against independent computations and hand-built cases.

The reference FROC below re-implements, in plain Python, the published algorithm of MONAI's
``monai.metrics.froc.compute_froc_curve_data`` and ``compute_froc_score`` (MONAI 1.x,
https://github.com/Project-MONAI/MONAI/blob/dev/monai/metrics/froc.py, itself modified from the CAMELYON16 evaluation
code), and the interpolation with the documented semantics of ``numpy.interp`` that ``compute_froc_score`` uses.
MONAI itself is not a dependency (it needs torch).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from mammoseg.evaluation import froc, metrics

LUNA16_POINTS = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)


# --------------------------------------------------------------------------------------------------------------
# reference implementations (independent of mammoseg.evaluation.froc)
# --------------------------------------------------------------------------------------------------------------
def reference_froc_curve_data(fp_probs, tp_probs, num_targets, num_images):
    """MONAI's compute_froc_curve_data: thresholds = the sorted distinct values of fp_probs ∪ tp_probs except the
    lowest; at each, count fp_probs >= t and tp_probs >= t; then one more point with 0 FP and 0 TP."""
    distinct = sorted({float(p) for p in fp_probs} | {float(p) for p in tp_probs})
    fps = [sum(1 for p in fp_probs if p >= t) for t in distinct[1:]] + [0]
    tps = [sum(1 for p in tp_probs if p >= t) for t in distinct[1:]] + [0]
    return [f / num_images for f in fps], [t / num_targets for t in tps]


def reference_interp(x, xs, ys):
    """numpy.interp for non-decreasing xs: ys[0] left of xs[0], ys[-1] right of xs[-1]; otherwise the last j with
    xs[j] <= x, then linear towards j + 1 (so at an x shared by several points, the last of them)."""
    if x < xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    j = max(i for i in range(len(xs)) if xs[i] <= x)
    return ys[j] + (x - xs[j]) * (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j])


def reference_froc_score(fps_per_image, sensitivity, eval_thresholds):
    """MONAI's compute_froc_score: interpolate the reversed curve (increasing FPPI) at each threshold; mean."""
    xs, ys = list(fps_per_image)[::-1], list(sensitivity)[::-1]
    values = [reference_interp(x, xs, ys) for x in eval_thresholds]
    return values, sum(values) / len(values)


def _random_scores(rng, n_fp, n_lesions, p_miss):
    """Scores quantised like ours (k / 255, so ties are common); misses at 0.0."""
    fp = rng.integers(1, 256, size=n_fp) / 255.0
    hits = rng.integers(1, 256, size=n_lesions) / 255.0
    hits[rng.random(n_lesions) < p_miss] = 0.0
    return fp, hits


# --------------------------------------------------------------------------------------------------------------
# FROC curve and CPM
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_curve_and_sensitivities_equal_monai_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n_images = int(rng.integers(1, 30))
    fp, hits = _random_scores(rng, int(rng.integers(0, 60)), int(rng.integers(1, 40)),
                              p_miss=[0.0, 0.3, 1.0][seed % 3])
    curve = froc.froc_curve(fp, hits, len(hits), n_images)
    # MONAI with the probability floor 0.0 among the scores (mammoseg.evaluation.froc, "FROC curve")
    ref_fppi, ref_sens = reference_froc_curve_data([*fp, 0.0], hits, len(hits), n_images)
    np.testing.assert_array_equal(curve.fppi, ref_fppi)
    np.testing.assert_array_equal(curve.sensitivity, ref_sens)
    ref_values, ref_cpm = reference_froc_score(ref_fppi, ref_sens, LUNA16_POINTS)
    np.testing.assert_allclose(froc.sensitivity_at_fppi(curve.fppi, curve.sensitivity), ref_values,
                               rtol=0, atol=1e-15)
    assert froc.cpm(curve.fppi, curve.sensitivity) == pytest.approx(ref_cpm, abs=1e-15)


def test_hand_computed_curve_and_cpm():
    # 4 images, 4 lesions (one missed), 6 false positives; the table lists, per threshold t (every distinct score
    # but the lowest, 0.0): FPs with score >= t, hits with score >= t
    hits = [0.9, 0.7, 0.4, 0.0]
    fp = [0.8, 0.6, 0.5, 0.3, 0.3, 0.2]
    table = [  # t, FP, TP
        (0.2, 6, 3), (0.3, 5, 3), (0.4, 3, 3), (0.5, 3, 2), (0.6, 2, 2), (0.7, 1, 2), (0.8, 1, 1), (0.9, 0, 1),
        (np.inf, 0, 0),
    ]
    curve = froc.froc_curve(fp, hits, n_lesions=4, n_images=4)
    np.testing.assert_array_equal(curve.score_thresholds, [t for t, _, _ in table])
    np.testing.assert_array_equal(curve.false_positives, [f for _, f, _ in table])
    np.testing.assert_array_equal(curve.detected, [d for _, _, d in table])
    np.testing.assert_array_equal(curve.fppi, [f / 4 for _, f, _ in table])
    np.testing.assert_array_equal(curve.sensitivity, [d / 4 for _, _, d in table])
    # by hand, reading the curve in increasing FPPI:
    # 1/8: halfway between (0, .25) and (.25, .25) -> .25
    # 1/4: points (.25, .25) and (.25, .5) share the FPPI: the last, .5
    # 1/2: the point (.5, .5) -> .5
    # 1: between (.75, .75) and (1.25, .75) -> .75
    # 2, 4, 8: beyond the last point (1.5, .75): flat -> .75
    expected = [0.25, 0.5, 0.5, 0.75, 0.75, 0.75, 0.75]
    np.testing.assert_array_equal(froc.sensitivity_at_fppi(curve.fppi, curve.sensitivity), expected)
    assert froc.cpm(curve.fppi, curve.sensitivity) == pytest.approx(4.25 / 7)


def test_every_candidate_score_is_a_threshold():
    # every lesion hit, the lowest score is a hit: MONAI alone never reaches sensitivity 1; the floor does
    curve = froc.froc_curve([0.5], [0.9, 0.3], n_lesions=2, n_images=1)
    assert curve.sensitivity.max() == 1.0
    assert max(reference_froc_curve_data([0.5], [0.9, 0.3], 2, 1)[1]) == 0.5
    assert reference_froc_curve_data([0.5, 0.0], [0.9, 0.3], 2, 1)[1] == list(curve.sensitivity)
    # every lesion hit, the lowest score is a false positive: it is counted
    curve = froc.froc_curve([0.2], [0.9], n_lesions=1, n_images=1)
    assert curve.false_positives.max() == 1
    # one missed lesion (0.0) is the floor already: MONAI and the floor agree
    curve = froc.froc_curve([0.2], [0.9, 0.0], n_lesions=2, n_images=1)
    assert curve.false_positives.max() == 1 and curve.detected.max() == 1
    assert reference_froc_curve_data([0.2], [0.9, 0.0], 2, 1)[1] == list(curve.sensitivity)


def test_curve_without_lesions_has_undefined_sensitivity():
    curve = froc.froc_curve([0.4, 0.6], [], n_lesions=0, n_images=2)
    np.testing.assert_array_equal(curve.fppi, [1.0, 0.5, 0.0])  # both false positives count
    assert np.isnan(curve.sensitivity).all()


def test_misses_cannot_be_left_out():
    with pytest.raises(ValueError, match="missed lesions enter as 0.0"):
        froc.froc_curve([0.5], [0.9], n_lesions=2, n_images=1)
    with pytest.raises(ValueError, match="at least one image"):
        froc.froc_curve([0.5], [0.9], n_lesions=1, n_images=0)


def test_operating_points_are_the_curve_as_rows():
    curve = froc.froc_curve([0.8, 0.3], [0.9, 0.5, 0.0], n_lesions=3, n_images=2)
    rows = froc.operating_points(curve)
    assert [r["score_threshold"] for r in rows] == [0.3, 0.5, 0.8, 0.9, np.inf]
    assert [(r["detected"], r["false_positives"]) for r in rows] == [(2, 2), (2, 1), (1, 1), (1, 0), (0, 0)]
    assert [r["tpr"] for r in rows] == [2 / 3, 2 / 3, 1 / 3, 1 / 3, 0.0]
    assert [r["fppi"] for r in rows] == [1.0, 0.5, 0.5, 0.0, 0.0]
    assert all(type(v) in (int, float) for r in rows for v in r.values())


def test_module_imports_neither_tensorflow_nor_torch():
    code = "import sys, mammoseg.evaluation.froc; print(sorted({'tensorflow', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------------------
# candidates of one image
# --------------------------------------------------------------------------------------------------------------
def _box(shape, r0, c0, r1, c1):
    mask = np.zeros(shape, dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def _candidates(prob, lesions, match="iou", iou_threshold=0.1, candidate_threshold=0.1):
    return froc.image_candidates(prob, lesions, candidate_threshold=candidate_threshold, match=match,
                                 iou_threshold=iou_threshold)


def test_blob_on_a_lesion_is_a_hit_and_blob_elsewhere_a_false_positive():
    shape = (60, 80)
    prob = np.zeros(shape, dtype=np.uint8)
    prob[11:21, 13:23] = 200
    prob[15, 17] = 230  # the blob's maximum
    prob[41:46, 61:71] = 150
    lesion = _box(shape, 11, 13, 21, 23)
    found = _candidates(prob, [lesion])
    hit, fp = found.candidates
    assert (hit["candidate"], hit["score"], hit["area"]) == (0, 230 / 255, 100)
    assert (hit["row0"], hit["col0"], hit["row1"], hit["col1"]) == (11, 13, 21, 23)
    assert (hit["centroid_row"], hit["centroid_col"]) == (15.5, 17.5)
    assert hit["matched_lesion"] == 0 and not hit["false_positive"] and hit["best_iou"] == 1.0
    assert (fp["candidate"], fp["score"], fp["area"]) == (1, 150 / 255, 50)
    assert (fp["row0"], fp["col0"], fp["row1"], fp["col1"]) == (41, 61, 46, 71)
    assert fp["matched_lesion"] == -1 and fp["false_positive"] and fp["matched_lesions"] == []
    (les,) = found.lesions
    assert (les["hit"], les["hit_score"], les["hit_candidate"], les["area"]) == (True, 230 / 255, 0, 100)
    assert (les["centroid_row"], les["centroid_col"]) == (16, 18)  # rows 11..20 -> 15.5 -> 16 (half to even)
    np.testing.assert_array_equal(found.fp_scores, [150 / 255])
    np.testing.assert_array_equal(found.lesion_hit_scores, [230 / 255])


def test_lesion_matched_by_two_candidates_is_one_hit_and_no_false_positive():
    shape = (40, 40)
    prob = np.zeros(shape, dtype=np.uint8)
    prob[10:30, 10:19] = 180  # left half of the lesion, IoU 180/400
    prob[10:30, 21:30] = 240  # right half, higher score
    found = _candidates(prob, [_box(shape, 10, 10, 30, 30)])
    left, right = found.candidates
    assert left["matched_lesions"] == right["matched_lesions"] == [0]
    assert right["matched_lesion"] == 0 and not right["duplicate"]
    assert left["matched_lesion"] == -1 and left["duplicate"] and not left["false_positive"]
    assert found.lesions[0]["hit_candidate"] == 1 and found.lesions[0]["matched_by"] == [0, 1]
    assert found.lesion_hit_scores.tolist() == [240 / 255]
    assert found.fp_scores.size == 0


def test_saturated_false_positive_ranks_first_and_counts_at_every_threshold():
    shape = (50, 50)
    prob = np.zeros(shape, dtype=np.uint8)
    prob[5:10, 5:10] = 255  # false positive saturated at probability 1.0
    prob[20:30, 20:30] = 200  # on lesion 0
    lesions = [_box(shape, 20, 20, 30, 30), _box(shape, 40, 40, 45, 45)]  # lesion 1 is missed
    found = _candidates(prob, lesions)
    assert found.fp_scores.tolist() == [1.0]
    assert found.lesion_hit_scores.tolist() == [200 / 255, 0.0]
    curve = froc.froc_curve(found.fp_scores, found.lesion_hit_scores, n_lesions=2, n_images=1)
    finite = np.isfinite(curve.score_thresholds)
    assert (curve.false_positives[finite] == 1).all()  # no score threshold removes it
    # at the highest threshold it is the only candidate counted
    assert (curve.score_thresholds[finite][-1], curve.detected[finite][-1]) == (1.0, 0)
    # the old sweep reports TPR 0 at budget 0.5; sorting candidates by score still finds the lesion at 1 FPPI
    assert froc.sensitivity_at_fppi(curve.fppi, curve.sensitivity, [1.0]).tolist() == [0.5]


def test_component_below_the_candidate_threshold_is_ignored():
    shape = (30, 30)
    level = metrics.threshold_level(0.1)  # 26
    prob = np.zeros(shape, dtype=np.uint8)
    prob[2:8, 2:8] = level - 1  # on the lesion, but below the candidate threshold
    prob[20:25, 20:25] = level  # exactly at it: a candidate
    found = _candidates(prob, [_box(shape, 2, 2, 8, 8)], candidate_threshold=0.1)
    assert [c["score_u8"] for c in found.candidates] == [level]
    assert found.candidates[0]["false_positive"]
    les = found.lesions[0]
    assert (les["hit"], les["hit_score"], les["hit_candidate"], les["matched_by"]) == (False, 0.0, -1, [])


@pytest.mark.parametrize("rule, hit_score, fp_score", [("iou", 100, 50), ("centroid", 50, 100)])
def test_centroid_rule_credits_the_component_holding_the_centroid(rule, hit_score, fp_score):
    shape = (40, 40)
    lesion = _box(shape, 10, 10, 21, 31)  # centroid (15, 20)
    prob = np.zeros(shape, dtype=np.uint8)
    prob[10:21, 10:17] = 100  # large overlap (IoU 77/231), misses the centroid
    prob[14:17, 19:22] = 50  # tiny (IoU 9/231 < 0.1), holds the centroid
    found = _candidates(prob, [lesion], match=rule, iou_threshold=0.1)
    assert found.lesions[0]["centroid_row"] == 15 and found.lesions[0]["centroid_col"] == 20
    assert found.lesion_hit_scores.tolist() == [hit_score / 255]
    assert found.fp_scores.tolist() == [fp_score / 255]


@pytest.mark.parametrize("corner, hit", [(1, False), (2, True)])
def test_cropping_does_not_move_a_centroid_ending_in_half(corner, hit):
    # lesion rows/cols 3..6: centroid 4.5 -> pixel 5 (halves up). The active region starts at `corner`; with
    # Python's round (half to even) a crop at the odd offset 1 saw 3.5 -> 4 -> pixel 5 but the full image 4.5 -> 4.
    shape = (12, 12)
    lesion = _box(shape, 3, 3, 7, 7)
    prob = np.zeros(shape, dtype=np.uint8)
    prob[corner:5, corner:5] = 120  # holds (4, 4), not (5, 5)
    prob[5:6, 5:6] = 120 if hit else 0  # joins (5, 5) to the component when `hit`
    found = _candidates(prob, [lesion], match="centroid")
    full = metrics.match_lesions(prob > 0, [lesion], rule="centroid")
    cropped = metrics.match_lesions(prob[1:, 1:] > 0, [lesion[1:, 1:]], rule="centroid")
    assert full.lesions[0]["detected"] == cropped.lesions[0]["detected"] == found.lesions[0]["hit"] == hit
    assert (found.lesions[0]["centroid_row"], found.lesions[0]["centroid_col"]) == (5, 5)


def _brute_force(prob, lesions, level, rule, iou_threshold):
    """Candidates by scipy.ndimage on the full image and the credit rules written out: (FP scores, hit scores)."""
    labels, count = ndimage.label(prob >= level, structure=np.ones((3, 3)))
    scores = [int(prob[labels == k].max()) / 255 for k in range(1, count + 1)]
    matches = np.zeros((count, len(lesions)), dtype=bool)
    for j, lesion in enumerate(lesions):
        rows, cols = np.nonzero(lesion)
        centre = (int(np.floor(rows.mean() + 0.5)), int(np.floor(cols.mean() + 0.5)))
        for k in range(count):
            comp = labels == k + 1
            if rule == "iou":
                inter = np.sum(comp & lesion)
                matches[k, j] = inter > 0 and inter / np.sum(comp | lesion) >= iou_threshold
            else:
                matches[k, j] = comp[centre]
    hits = [max((scores[k] for k in range(count) if matches[k, j]), default=0.0) for j in range(len(lesions))]
    fps = [scores[k] for k in range(count) if not matches[k].any()]
    return sorted(fps), hits


@pytest.mark.parametrize("seed", range(12))
def test_random_images_match_a_brute_force_on_the_full_image(seed):
    rng = np.random.default_rng(seed)
    shape = (70, 90)
    prob = np.zeros(shape, dtype=np.uint8)
    for _ in range(rng.integers(1, 9)):
        r, c = rng.integers(0, shape[0] - 5), rng.integers(0, shape[1] - 5)
        prob[r:r + rng.integers(2, 15), c:c + rng.integers(2, 15)] = rng.integers(1, 256)
    lesions = []
    for _ in range(rng.integers(1, 4)):
        r, c = rng.integers(0, shape[0] - 5), rng.integers(0, shape[1] - 5)
        lesions.append(_box(shape, r, c, r + rng.integers(2, 16), c + rng.integers(2, 16)))
    rule = ("iou", "centroid")[seed % 2]
    found = _candidates(prob, lesions, match=rule, iou_threshold=0.2, candidate_threshold=0.3)
    fps, hits = _brute_force(prob, lesions, metrics.threshold_level(0.3), rule, 0.2)
    assert sorted(found.fp_scores.tolist()) == fps
    assert found.lesion_hit_scores.tolist() == hits


def test_inputs_are_checked():
    prob = np.zeros((5, 5), dtype=np.uint8)
    with pytest.raises(TypeError):
        _candidates(prob.astype(np.float32), [])
    with pytest.raises(ValueError, match="shape"):
        _candidates(prob, [np.ones((4, 5), dtype=bool)])
    with pytest.raises(ValueError, match="above probability 0"):
        _candidates(prob, [], candidate_threshold=0.0)
    empty = _candidates(prob, [])
    assert (empty.candidates, empty.lesions, empty.fp_scores.size) == ([], [], 0)


# --------------------------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------------------------
def _random_records(seed, n_images):
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n_images):
        n_lesions = int(rng.integers(0, 3))
        fp, hits = _random_scores(rng, int(rng.integers(0, 6)), n_lesions, p_miss=0.3)
        duplicates = rng.integers(1, 256, size=int(rng.integers(0, 2))) / 255.0
        inter = int(rng.integers(0, 500))
        records.append(froc.ImageRecord(
            n_lesions=n_lesions, detected=int(rng.integers(0, n_lesions + 1)),
            false_positives=int(rng.integers(0, 4)), intersection=inter, union=inter + int(rng.integers(0, 500)),
            candidate_scores=tuple(fp) + tuple(hits[hits > 0]) + tuple(duplicates),
            candidate_false_positive=(True,) * fp.size + (False,) * int(np.sum(hits > 0) + duplicates.size),
            lesion_hit_scores=tuple(hits)))
    return records


def _pooled_statistics(records):
    """The statistics of one resample, from the copies of its images pooled, with the reference FROC."""
    fp = [s for rec in records for s, is_fp in zip(rec.candidate_scores, rec.candidate_false_positive) if is_fp]
    hits = [s for rec in records for s in rec.lesion_hit_scores]
    n_lesions = sum(rec.n_lesions for rec in records)
    inter, union = sum(rec.intersection for rec in records), sum(rec.union for rec in records)
    fppi, sens = reference_froc_curve_data([*fp, 0.0], hits, n_lesions, len(records))  # with the floor
    values, cpm = reference_froc_score(fppi, sens, LUNA16_POINTS)
    return {"tpr": sum(rec.detected for rec in records) / n_lesions,
            "fppi": sum(rec.false_positives for rec in records) / len(records),
            "tpr_at_1_fppi": values[3], "cpm": cpm, "pooled_dice": 2 * inter / (inter + union)}


@pytest.mark.parametrize("groups", [None, "patients"])
def test_replicates_equal_the_statistics_of_the_pooled_copies(groups):
    records = _random_records(3, 30)
    patient_ids = [f"p{i // 3}" for i in range(30)] if groups else None
    weights = froc.resample_weights(30, 8, seed=11, groups=patient_ids)
    replicates = froc.bootstrap_replicates(records, weights)
    for r, row in enumerate(weights):
        copies = [rec for rec, w in zip(records, row) for _ in range(w)]
        for name, value in _pooled_statistics(copies).items():
            assert replicates[name][r] == pytest.approx(value, rel=1e-12), name


def test_estimates_are_the_statistics_of_all_images():
    records = _random_records(5, 40)
    result = froc.bootstrap_intervals(records, n_resamples=10, seed=0)
    for name, value in _pooled_statistics(records).items():
        assert result[name]["estimate"] == pytest.approx(value, rel=1e-12), name
    dice, _ = metrics.pooled_dice_iou([r.intersection for r in records], [r.union for r in records])
    assert result["pooled_dice"]["estimate"] == pytest.approx(dice, rel=1e-12)


def test_bootstrap_is_reproducible_with_a_seed():
    records = _random_records(1, 50)
    first = froc.bootstrap_intervals(records, n_resamples=200, seed=42)
    assert froc.bootstrap_intervals(records, n_resamples=200, seed=42) == first
    assert froc.bootstrap_intervals(records, n_resamples=200, seed=43) != first
    as_dicts = [rec.as_dict() for rec in records]  # records read back from JSON give the same intervals
    assert froc.bootstrap_intervals(as_dicts, n_resamples=200, seed=42) == first


def test_interval_contains_the_estimate():
    result = froc.bootstrap_intervals(_random_records(2, 200), n_resamples=500, seed=7)
    for name, row in result.items():
        assert row["low"] <= row["estimate"] <= row["high"], name
        assert row["low"] < row["high"], name
        assert row["defined"] == 500


def test_identical_images_give_zero_width_intervals():
    # two lesions (one hit, one missed), two false positives and a duplicate
    record = froc.ImageRecord(n_lesions=2, detected=1, false_positives=2, intersection=40, union=90,
                              candidate_scores=(0.7, 0.5, 0.2, 0.6),
                              candidate_false_positive=(False, True, True, False),
                              lesion_hit_scores=(0.7, 0.0))
    result = froc.bootstrap_intervals([record] * 25, n_resamples=100, seed=0)
    for name, row in result.items():
        assert row["low"] == row["estimate"] == row["high"], name


def test_patient_resampling_keeps_a_patients_images_together():
    groups = ["a", "a", "b", "c", "c", "c", "d"]
    weights = froc.resample_weights(7, 300, seed=1, groups=groups)
    np.testing.assert_array_equal(weights[:, 0], weights[:, 1])
    np.testing.assert_array_equal(weights[:, 3], weights[:, 4])
    np.testing.assert_array_equal(weights[:, 3], weights[:, 5])
    # 4 patients drawn per resample, each bringing all its images
    np.testing.assert_array_equal(weights[:, [0, 2, 3, 6]].sum(axis=1), 4)
    assert len({tuple(row) for row in weights}) > 1


def test_patient_clusters_change_the_interval():
    # every patient: one image with its lesion detected, one with it missed -> TPR 0.5 in every patient resample
    detected = froc.ImageRecord(1, 1, 0, 10, 12, (0.9,), (False,), (0.9,))
    missed = froc.ImageRecord(1, 0, 1, 0, 10, (0.4,), (True,), (0.0,))
    records = [detected, missed] * 20
    patients = [i // 2 for i in range(40)]
    by_patient = froc.bootstrap_intervals(records, n_resamples=300, seed=3, groups=patients)
    by_image = froc.bootstrap_intervals(records, n_resamples=300, seed=3)
    assert by_patient["tpr"]["low"] == by_patient["tpr"]["high"] == 0.5
    assert by_image["tpr"]["low"] < 0.5 < by_image["tpr"]["high"]


def test_image_weights_draw_n_images_per_resample():
    weights = froc.resample_weights(9, 50, seed=0)
    assert weights.shape == (50, 9) and (weights.sum(axis=1) == 9).all() and (weights >= 0).all()


def test_no_resamples_gives_estimates_only():
    result = froc.bootstrap_intervals(_random_records(0, 10), n_resamples=0, seed=0)
    assert all(np.isnan(row["low"]) and np.isnan(row["high"]) and row["defined"] == 0 for row in result.values())
    assert all(np.isfinite(row["estimate"]) for row in result.values())


def test_resamples_without_lesions_are_left_out_of_tpr_percentiles():
    with_lesion = froc.ImageRecord(1, 1, 0, 5, 5, (0.8,), (False,), (0.8,))
    without = froc.ImageRecord(0, 0, 1, 0, 3, (0.3,), (True,), ())
    result = froc.bootstrap_intervals([with_lesion, without], n_resamples=400, seed=0)
    # a resample draws `without` twice with probability 1/4
    assert 250 < result["tpr"]["defined"] < 350
    assert result["fppi"]["defined"] == 400


def test_record_from_candidates_round_trips_through_json_dicts():
    shape = (30, 30)
    prob = np.zeros(shape, dtype=np.uint8)
    prob[2:6, 2:6] = 90
    prob[20:25, 20:25] = 210
    found = _candidates(prob, [_box(shape, 2, 2, 6, 6), _box(shape, 10, 10, 12, 12)])
    record = froc.ImageRecord.from_candidates(found, detected=1, false_positives=1, intersection=16, union=41)
    assert record.n_lesions == 2 and record.lesion_hit_scores == (90 / 255, 0.0)
    assert record.fp_scores.tolist() == [210 / 255]
    assert froc.ImageRecord.from_dict(record.as_dict()) == record
    with pytest.raises(ValueError, match="lesion hit scores"):
        froc.ImageRecord(2, 0, 0, 0, 0, (), (), (0.0,))
