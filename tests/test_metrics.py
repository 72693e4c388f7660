"""Metrics against independent computations (scikit-learn, scikit-image) and hand-built cases."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from skimage.morphology import remove_small_objects
from sklearn.metrics import confusion_matrix, f1_score, jaccard_score

from mammoseg.evaluation import metrics


def _disc(shape, centre, radius):
    rr, cc = np.ogrid[: shape[0], : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2


def _box(shape, r0, c0, r1, c1):
    mask = np.zeros(shape, dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


@pytest.mark.parametrize("seed", range(5))
def test_pixel_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    pred = rng.random((40, 30)) < rng.uniform(0.05, 0.6)
    truth = rng.random((40, 30)) < rng.uniform(0.05, 0.6)
    counts = metrics.pixel_counts(pred, truth)
    tn, fp, fn, tp = confusion_matrix(truth.ravel(), pred.ravel(), labels=[False, True]).ravel()
    assert (counts.tp, counts.fp, counts.fn, counts.tn) == (tp, fp, fn, tn)
    assert counts.dice == pytest.approx(f1_score(truth.ravel(), pred.ravel()))
    assert counts.iou == pytest.approx(jaccard_score(truth.ravel(), pred.ravel()))


def test_both_empty_is_perfect_like_sklearn_zero_division_one():
    empty = np.zeros((8, 8), dtype=bool)
    counts = metrics.pixel_counts(empty, empty)
    assert counts.dice == 1.0 == f1_score(empty.ravel(), empty.ravel(), zero_division=1.0)
    assert counts.iou == 1.0 == jaccard_score(empty.ravel(), empty.ravel(), zero_division=1.0)
    # prediction on an image without lesion: 0, as sklearn
    pred = empty.copy()
    pred[0, 0] = True
    assert metrics.pixel_counts(pred, empty).dice == 0.0 == f1_score(empty.ravel(), pred.ravel(), zero_division=1.0)


def test_pooled_metrics_equal_metrics_of_all_images_concatenated():
    rng = np.random.default_rng(7)
    preds = [rng.random((20, 25)) < p for p in (0.1, 0.3, 0.0)]
    truths = [rng.random((20, 25)) < p for p in (0.2, 0.05, 0.0)]
    counts = [metrics.pixel_counts(p, t) for p, t in zip(preds, truths)]
    dice, iou = metrics.pooled_dice_iou([c.intersection for c in counts], [c.union for c in counts])
    all_pred = np.concatenate([p.ravel() for p in preds])
    all_truth = np.concatenate([t.ravel() for t in truths])
    assert dice == pytest.approx(f1_score(all_truth, all_pred))
    assert iou == pytest.approx(jaccard_score(all_truth, all_pred))
    # eq. (4) literally
    inter = sum(np.sum(p & t) for p, t in zip(preds, truths))
    union = sum(np.sum(p | t) for p, t in zip(preds, truths))
    assert dice == pytest.approx(2 * inter / (inter + union))


def test_binarise_at_half_equals_float_threshold():
    rng = np.random.default_rng(1)
    prob = rng.random((50, 50)).astype(np.float32)
    prob[0, :3] = [0.5, np.nextafter(np.float32(0.5), np.float32(0)), 1.0]
    u8 = np.rint(prob * 255).astype(np.uint8)
    np.testing.assert_array_equal(metrics.binarise(u8, 0.5), prob >= 0.5)
    assert metrics.threshold_level(0.2) == 51  # 0.2*255 = 51.000000000000007 must not become 52
    assert metrics.binarise(u8, 0.0).all()
    with pytest.raises(TypeError):
        metrics.binarise(prob, 0.5)


def test_components_are_eight_connected():
    mask = np.zeros((5, 5), dtype=bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True  # a diagonal line
    _, count = metrics.label_components(mask)
    assert count == 1


@pytest.mark.parametrize("min_area", [0, 1, 3, 10])
def test_remove_small_components_matches_skimage(min_area):
    rng = np.random.default_rng(min_area)
    mask = rng.random((60, 60)) < 0.3
    expected = remove_small_objects(mask, max_size=min_area - 1, connectivity=2) if min_area > 1 else mask
    np.testing.assert_array_equal(metrics.remove_small_components(mask, min_area), expected)


def test_two_lesions_one_hit_one_missed_two_fp_blobs():
    shape = (100, 100)
    lesion_a = _disc(shape, (25, 25), 8)
    lesion_b = _disc(shape, (75, 75), 8)
    pred = _disc(shape, (26, 25), 8)  # hits A
    pred |= _box(shape, 5, 80, 10, 85)  # FP blob 1
    pred |= _box(shape, 80, 5, 84, 9)  # FP blob 2
    match = metrics.match_lesions(pred, [lesion_a, lesion_b], rule="iou", iou_threshold=0.1)
    assert match.n_lesions == 2 and match.n_detected == 1 and match.n_false_positives == 2
    assert [row["detected"] for row in match.lesions] == [True, False]
    iou_a = np.sum(_disc(shape, (26, 25), 8) & lesion_a) / np.sum(_disc(shape, (26, 25), 8) | lesion_a)
    assert match.lesions[0]["best_iou"] == pytest.approx(iou_a)
    fp_areas = sorted(c["area"] for c in match.components if c["false_positive"])
    assert fp_areas == [16, 25]


def test_iou_rule_versus_centroid_rule():
    shape = (60, 60)
    lesion = _box(shape, 10, 10, 40, 40)  # 900 px, centroid (24.5→25, 24.5→25)
    pred = _box(shape, 22, 22, 27, 27)  # small blob on the centroid: IoU 25/900
    assert not metrics.match_lesions(pred, [lesion], "iou", 0.1).n_detected
    assert metrics.match_lesions(pred, [lesion], "centroid").n_detected == 1
    off_centre = _box(shape, 10, 10, 40, 20)  # IoU 300/900 but does not contain the centroid
    assert metrics.match_lesions(off_centre, [lesion], "iou", 0.1).n_detected == 1
    assert metrics.match_lesions(off_centre, [lesion], "centroid").n_detected == 0
    with pytest.raises(ValueError, match="match rule"):
        metrics.match_lesions(pred, [lesion], "overlap")


def test_one_component_can_detect_two_lesions_and_is_not_a_false_positive():
    shape = (40, 40)
    a, b = _box(shape, 5, 5, 15, 15), _box(shape, 5, 16, 15, 26)
    pred = _box(shape, 5, 5, 15, 26)
    match = metrics.match_lesions(pred, [a, b], "iou", 0.3)
    assert match.n_detected == 2 and match.n_false_positives == 0


def test_restrict_to_lesions_keeps_only_touching_components():
    shape = (50, 50)
    truth = _box(shape, 10, 10, 20, 20)
    touching = _box(shape, 15, 15, 25, 25)
    far = _box(shape, 40, 40, 45, 45)
    restricted = metrics.restrict_to_lesions(touching | far, truth)
    np.testing.assert_array_equal(restricted, touching)
    c = metrics.pixel_counts(restricted, truth)
    assert c.dice == pytest.approx(f1_score(truth.ravel(), touching.ravel()))


def test_higher_threshold_never_detects_more_with_the_centroid_rule():
    rng = np.random.default_rng(3)
    shape = (80, 80)
    lesions = [_disc(shape, (20, 20), 6), _disc(shape, (60, 55), 7), _disc(shape, (20, 60), 5)]
    from scipy.ndimage import gaussian_filter

    field_ = gaussian_filter(rng.random(shape), 2)
    prob = (field_ - field_.min()) / (field_.max() - field_.min())
    for lesion, level in zip(lesions, (0.9, 0.6, 0.3)):
        prob[lesion] = np.maximum(prob[lesion], level)
    u8 = np.rint(prob * 255).astype(np.uint8)
    detected = [metrics.match_lesions(metrics.binarise(u8, t), lesions, "centroid").n_detected
                for t in np.linspace(0.05, 0.95, 11)]
    assert all(a >= b for a, b in zip(detected, detected[1:]))  # higher threshold, subset of the mask


def test_metrics_module_does_not_import_tensorflow():
    code = "import sys, mammoseg.evaluation.metrics, mammoseg.evaluation.evaluate; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _filter_components(labels: np.ndarray, count: int, min_area: int) -> tuple[np.ndarray, int]:
    """Drop labelled components smaller than ``min_area`` pixels and renumber the rest 1..kept (label order)."""
    if min_area <= 1 or count == 0:
        return labels, count
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    keep = areas >= min_area
    keep[0] = False
    lookup = np.zeros(count + 1, dtype=np.int32)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lookup[labels], int(keep.sum())


def test_filter_components_and_fast_matching_agree_with_the_detailed_path():
    rng = np.random.default_rng(11)
    from scipy.ndimage import gaussian_filter

    pred = gaussian_filter(rng.random((120, 90)), 1.5) > 0.52
    lesions = [_disc(pred.shape, (30, 30), 10), _disc(pred.shape, (90, 60), 12)]
    labels, count = metrics.label_components(pred)
    kept, kept_count = _filter_components(labels, count, 6)
    np.testing.assert_array_equal(kept > 0, metrics.remove_small_components(pred, 6))
    assert set(np.unique(kept)) == set(range(kept_count + 1))
    detailed = metrics.match_lesions(kept > 0, lesions, "iou", 0.05)
    fast = metrics.match_labels(kept, kept_count, lesions, "iou", 0.05, details=False)
    assert (fast.n_detected, fast.n_false_positives) == (detailed.n_detected, detailed.n_false_positives)
    assert detailed.n_false_positives == sum(c["false_positive"] for c in detailed.components)
    assert fast.components == [] and len(detailed.components) == kept_count
    # centroids and boxes against a per-component computation
    for row in detailed.components[:5]:
        rr, cc = np.nonzero(metrics.label_components(kept > 0)[0] == row["component"])
        assert row["centroid_row"] == pytest.approx(rr.mean()) and row["area"] == rr.size
        assert (row["row0"], row["row1"], row["col0"], row["col1"]) == (rr.min(), rr.max() + 1, cc.min(), cc.max() + 1)


def test_empty_image_without_lesions_matches_without_error():
    """A 0x0 crop (nothing predicted, no lesion) used to crash find_objects in the detailed match."""
    empty = np.zeros((0, 0), dtype=np.int32)
    result = metrics.match_labels(empty, 0, [], details=True)
    assert result.n_false_positives == 0 and result.components == [] and result.lesions == []


def test_centroid_rule_does_not_depend_on_the_crop_offset():
    lesion = np.zeros((12, 12), dtype=bool)
    lesion[3:7, 3:7] = True  # centroid 4.5 -> pixel 5
    pred = np.zeros((12, 12), dtype=bool)
    pred[1:5, 1:5] = True  # holds (4, 4) but not (5, 5)
    full = metrics.match_lesions(pred, [lesion], rule="centroid")
    cropped = metrics.match_lesions(pred[1:, 1:], [lesion[1:, 1:]], rule="centroid")
    assert full.lesions[0]["detected"] is cropped.lesions[0]["detected"] is False
    assert (full.lesions[0]["centroid_row"], full.lesions[0]["centroid_col"]) == (5, 5)


def test_centre_in_lesion_rule_counts_a_mark_whose_centre_is_inside_the_circle():
    """The criterion of detection studies on circle annotations: a mark counts when its centre lies inside the
    circle, whatever their overlap; the lesion's own centroid need not be in the mark."""
    shape = (100, 100)
    circle = _disc(shape, (50, 50), 30)  # a loose circle, 2,800 px
    small_core = _disc(shape, (60, 40), 5)  # inside the circle, off its centre: IoU under 0.1
    assert metrics.match_lesions(small_core, [circle], "iou", 0.1).n_detected == 0
    assert metrics.match_lesions(small_core, [circle], "centroid").n_detected == 0
    match = metrics.match_lesions(small_core, [circle], "centre_in_lesion")
    assert match.n_detected == 1 and match.n_false_positives == 0 and match.lesions[0]["detected_by"] == [1]
    # a crescent hugging the circle's rim from outside: overlaps, but its centre lies outside the circle
    crescent = _disc(shape, (50, 85), 12) & ~circle
    crescent |= _disc(shape, (50, 79), 2)  # a touch of overlap
    assert not circle[50, 85]
    match = metrics.match_lesions(crescent, [circle], "centre_in_lesion")
    assert match.n_detected == 0 and match.n_false_positives == 1


def test_centre_in_lesion_uses_the_centroid_pixel_of_each_component_halves_rounded_up():
    """Each component's centre is computed independently here (np.nonzero means, floor(x + 0.5)) and compared
    with the rule's decision for several components and two lesions."""
    rng = np.random.default_rng(3)
    shape = (64, 64)
    lesions = [_box(shape, 5, 5, 25, 25), _box(shape, 35, 30, 60, 60)]
    pred = np.zeros(shape, dtype=bool)
    for r0, c0, h, w in rng.integers(0, 50, size=(12, 4)) % [56, 56, 8, 8] + [0, 0, 2, 2]:
        pred[r0:r0 + h, c0:c0 + w] = True
    labels, count = metrics.label_components(pred)
    match = metrics.match_lesions(pred, lesions, "centre_in_lesion")
    for index, lesion in enumerate(lesions):
        expected = []
        for k in range(1, count + 1):
            rows, cols = np.nonzero(labels == k)
            r, c = int(np.floor(rows.mean() + 0.5)), int(np.floor(cols.mean() + 0.5))
            if lesion[r, c]:
                expected.append(k)
        assert match.lesions[index]["detected_by"] == expected
    hit = {k for row in match.lesions for k in row["detected_by"]}
    assert 0 < len(hit) < count  # the drawing holds both kinds
    assert match.n_false_positives == count - len(hit)
