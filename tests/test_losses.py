"""Losses and metrics against independent NumPy computations on random arrays."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import keras  # noqa: E402

from mammoseg.model import losses  # noqa: E402

RNG = np.random.default_rng(42)
SHAPE = (4, 16, 16, 1)


def _arrays():
    y_true = (RNG.random(SHAPE) > 0.8).astype(np.float32)
    y_true[3] = 0  # one lesion-free patch
    y_pred = RNG.random(SHAPE).astype(np.float32)
    return y_true, y_pred


def _np_bce(y, p, w=1.0):
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(np.mean(-(w * y * np.log(p) + (1 - y) * np.log(1 - p))))


def _np_soft_dice_loss(y, p, smooth=1.0):
    scores = [1 - (2 * np.sum(a * b) + smooth) / (np.sum(a) + np.sum(b) + smooth) for a, b in zip(y, p)]
    return float(np.mean(scores))


def _np_overlap(y, p, kind):
    scores = []
    for a, b in zip(y >= 0.5, p >= 0.5):
        inter, union, total = np.sum(a & b), np.sum(a | b), np.sum(a) + np.sum(b)
        if kind == "dice":
            scores.append(1.0 if total == 0 else 2 * inter / total)
        else:
            scores.append(1.0 if union == 0 else inter / union)
    return float(np.mean(scores))


def test_bce_matches_numpy_and_keras():
    y, p = _arrays()
    ours = float(losses.get_loss("bce")(y, p))
    assert ours == pytest.approx(_np_bce(y, p), rel=1e-5)
    assert ours == pytest.approx(float(keras.losses.BinaryCrossentropy()(y, p)), rel=1e-4)


def test_weighted_bce_matches_numpy():
    y, p = _arrays()
    assert float(losses.get_loss("weighted_bce", pos_weight=7.5)(y, p)) == pytest.approx(_np_bce(y, p, 7.5), rel=1e-5)


def test_weighted_bce_needs_a_weight():
    with pytest.raises(ValueError, match="pos_weight"):
        losses.get_loss("weighted_bce")


def test_soft_dice_and_bce_dice_match_numpy():
    y, p = _arrays()
    assert float(losses.get_loss("dice")(y, p)) == pytest.approx(_np_soft_dice_loss(y, p), rel=1e-5)
    assert float(losses.get_loss("bce_dice")(y, p)) == pytest.approx(_np_bce(y, p) + _np_soft_dice_loss(y, p),
                                                                      rel=1e-5)


def test_batch_dice_is_one_soft_dice_over_the_batch():
    y, p = _arrays()
    batch = 1 - (2 * np.sum(y * p) + 1.0) / (np.sum(y) + np.sum(p) + 1.0)
    assert float(losses.get_loss("batch_dice")(y, p)) == pytest.approx(batch, rel=1e-5)
    assert float(losses.get_loss("bce_batch_dice")(y, p)) == pytest.approx(_np_bce(y, p) + batch, rel=1e-5)
    assert float(losses.get_loss("bce_batch_dice", 3.0)(y, p)) == pytest.approx(_np_bce(y, p, 3.0) + batch, rel=1e-5)


def test_batch_dice_does_not_make_an_empty_answer_on_negatives_the_cheapest():
    """Three lesion-free patches with a little probability mass and one well-found lesion: the per-sample Dice
    loss prefers predicting nothing at all, the batch Dice prefers finding the lesion."""
    y = np.zeros(SHAPE, dtype=np.float32)
    y[0, 4:12, 4:12] = 1
    found = np.where(y > 0, 0.9, 0.0).astype(np.float32)
    found[1:, :2, :2] = 0.5  # 2 px of probability mass on each negative patch
    nothing = np.zeros(SHAPE, dtype=np.float32)
    per_sample, batch = losses.get_loss("dice"), losses.get_loss("batch_dice")
    assert float(per_sample(y, nothing)) < float(per_sample(y, found))
    assert float(batch(y, found)) < float(batch(y, nothing))


@pytest.mark.parametrize("metric_cls,kind", [(losses.DiceCoefficient, "dice"), (losses.IoUCoefficient, "iou")])
def test_thresholded_metrics_match_numpy_over_batches(metric_cls, kind):
    y, p = _arrays()
    p[3] = 0.1  # empty prediction on the empty patch: a perfect score of 1
    metric = metric_cls()
    metric.update_state(y[:2], p[:2])  # accumulated over two batches = the mean over all samples
    metric.update_state(y[2:], p[2:])
    assert float(metric.result()) == pytest.approx(_np_overlap(y, p, kind), rel=1e-6)


def test_pooled_dice_counts_pixels_over_all_samples_and_batches():
    y, p = _arrays()
    p[3] = 0.1  # empty prediction on the empty patch: adds nothing (the mean Dice would score it 1)
    metric = losses.PooledDice()
    metric.update_state(y[:2], p[:2])
    metric.update_state(y[2:], p[2:])
    truth, pred = y >= 0.5, p >= 0.5
    assert float(metric.result()) == pytest.approx(2 * np.sum(truth & pred) / (np.sum(truth) + np.sum(pred)), rel=1e-6)


def test_pooled_dice_does_not_reward_predicting_nothing():
    """Three lesion-free patches and one lesion patch, all predicted empty: mean Dice 0.75, pooled Dice 0."""
    y = np.zeros(SHAPE, dtype=np.float32)
    y[0, 4:8, 4:8] = 1
    p = np.zeros(SHAPE, dtype=np.float32)
    mean_dice, pooled = losses.DiceCoefficient(), losses.PooledDice()
    mean_dice.update_state(y, p)
    pooled.update_state(y, p)
    assert float(mean_dice.result()) == pytest.approx(0.75)
    assert float(pooled.result()) == 0.0
    empty = losses.PooledDice()
    empty.update_state(np.zeros(SHAPE, np.float32), p)
    assert float(empty.result()) == 1.0  # nothing to find, nothing found
    empty.reset_state()
    assert float(empty.result()) == 1.0


def test_accuracy_metric():
    y, p = _arrays()
    accuracy = losses.get_metrics()[0]
    accuracy.update_state(y, p)
    assert float(accuracy.result()) == pytest.approx(float(np.mean((p >= 0.5) == (y >= 0.5))), rel=1e-6)


def test_unknown_loss_names_the_allowed_ones():
    with pytest.raises(ValueError, match="bce_dice"):
        losses.get_loss("focal")


def test_objects_round_trip_through_keras_serialisation():
    y, p = _arrays()
    for obj in (losses.get_loss("weighted_bce", 3.0), losses.get_loss("bce_dice"), losses.DiceCoefficient(0.4),
                losses.get_loss("bce_batch_dice", 2.0), losses.get_loss("batch_dice"),
                losses.PooledDice(0.3)):
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obj), safe_mode=True)
        assert type(clone) is type(obj)
        assert clone.get_config() == obj.get_config()
    assert float(losses.get_loss("weighted_bce", 3.0)(y, p)) == pytest.approx(_np_bce(y, p, 3.0), rel=1e-5)
