"""Losses and metrics for training the U-Net (Keras 3, backend-agnostic ``keras.ops``).

Every class is registered as Keras-serialisable under the package ``mammoseg``, so a saved ``.keras`` model
reloads with ``keras.saving.load_model(path, safe_mode=True)`` once this module is imported.

Shapes: ``y_true`` and ``y_pred`` are float (B, rows, cols, 1); ``y_true`` in {0, 1} (1 = lesion, "white"),
``y_pred`` probabilities in [0, 1] (the sigmoid output).

The paper's class balancing
---------------------------
Masses cover a small fraction of a patch, so the paper weights pixels by the black/white ratio of the training
masks. Here every lesion (white) pixel gets the weight ``pos_weight = n_black / n_white`` and every background
(black) pixel the weight 1, where ``n_black`` and ``n_white`` are counted over all training masks; the loss is
the mean of the weighted per-pixel cross-entropy over all pixels:

    L = mean_pixels( -(pos_weight * y * log(p) + (1 - y) * log(1 - p)) )

so both classes contribute equally in total (n_white * pos_weight = n_black).

Per-sample and batch Dice
-------------------------
``dice`` and ``bce_dice`` average a soft Dice loss computed per sample. On a lesion-free patch it is
``1 - s / (sum(p) + s)`` (smooth ``s`` = 1): any probability mass there costs nearly a whole unit, as much as a
missed lesion. When most patches are negatives (tissue windows of lesion and normal images), the cheapest way
down is to predict nothing anywhere, and training drifts into that (on mias-dev the training pooled Dice fell
from 0.33 to 0.003 in one epoch). ``batch_dice`` and ``bce_batch_dice`` compute one soft Dice over all pixels of
the batch (nnU-Net's "batch Dice"): a negative patch only adds its probability mass to the denominator, like
the false positives of any other patch, and the loss is the same for every sample of the batch.
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = [
    "EPSILON", "PixelWeightedBCE", "SoftDiceLoss", "BCEDiceLoss", "DiceCoefficient", "IoUCoefficient",
    "PooledDice", "get_loss", "get_metrics",
]

EPSILON = 1e-7  # probability clip, as Keras' own binary cross-entropy
_PIXEL_AXES = (1, 2, 3)


def _as_float(y_true, y_pred):
    return ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")


def _weighted_bce_per_sample(y_true, y_pred, pos_weight: float):
    y_true, y_pred = _as_float(y_true, y_pred)
    y_pred = ops.clip(y_pred, EPSILON, 1.0 - EPSILON)
    per_pixel = -(pos_weight * y_true * ops.log(y_pred) + (1.0 - y_true) * ops.log(1.0 - y_pred))
    return ops.mean(per_pixel, axis=_PIXEL_AXES)


def _soft_dice(y_true, y_pred, smooth: float, batch: bool):
    """Soft Dice loss (B,): each sample's own (``batch=False``), or one over all pixels of the batch repeated for
    every sample (``batch=True``, nnU-Net's batch Dice), so that Keras' mean over samples is that one value."""
    y_true, y_pred = _as_float(y_true, y_pred)
    axes = None if batch else _PIXEL_AXES
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    loss = 1.0 - (2.0 * intersection + smooth) / (total + smooth)
    return ops.full(ops.shape(y_true)[:1], loss) if batch else loss


def _binarised(y_true, y_pred, threshold: float):
    """(truth, prediction) as float32 0/1: ``y_true >= 0.5`` and ``y_pred >= threshold``."""
    y_true, y_pred = _as_float(y_true, y_pred)
    return ops.cast(y_true >= 0.5, "float32"), ops.cast(y_pred >= threshold, "float32")


@keras.saving.register_keras_serializable(package="mammoseg")
class PixelWeightedBCE(keras.losses.Loss):
    """Binary cross-entropy with lesion pixels weighted by ``pos_weight`` (1.0 = plain BCE).

    Per sample: the mean over pixels of ``-(w*y*log p + (1-y)*log(1-p))``, ``p`` clipped to [1e-7, 1-1e-7];
    the batch loss is the mean over samples.
    """

    def __init__(self, pos_weight: float = 1.0, name: str = "weighted_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pos_weight = float(pos_weight)

    def call(self, y_true, y_pred):
        return _weighted_bce_per_sample(y_true, y_pred, self.pos_weight)

    def get_config(self):
        return {**super().get_config(), "pos_weight": self.pos_weight}


@keras.saving.register_keras_serializable(package="mammoseg")
class SoftDiceLoss(keras.losses.Loss):
    """Soft Dice loss per sample, ``1 - (2*sum(y*p) + s) / (sum(y) + sum(p) + s)``, averaged over the batch;
    with ``batch=True`` one such loss over all pixels of the batch (see the module docstring)."""

    def __init__(self, smooth: float = 1.0, batch: bool = False, name: str = "dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smooth = float(smooth)
        self.batch = bool(batch)

    def call(self, y_true, y_pred):
        return _soft_dice(y_true, y_pred, self.smooth, self.batch)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth, "batch": self.batch}


@keras.saving.register_keras_serializable(package="mammoseg")
class BCEDiceLoss(keras.losses.Loss):
    """Sum of (optionally pixel-weighted) BCE and soft Dice loss, per sample, averaged over the batch; with
    ``batch=True`` the Dice term is one soft Dice over the whole batch."""

    def __init__(self, pos_weight: float = 1.0, smooth: float = 1.0, batch: bool = False, name: str = "bce_dice",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.pos_weight = float(pos_weight)
        self.smooth = float(smooth)
        self.batch = bool(batch)

    def call(self, y_true, y_pred):
        return (_weighted_bce_per_sample(y_true, y_pred, self.pos_weight)
                + _soft_dice(y_true, y_pred, self.smooth, self.batch))

    def get_config(self):
        return {**super().get_config(), "pos_weight": self.pos_weight, "smooth": self.smooth, "batch": self.batch}


class _ThresholdedOverlap(keras.metrics.Metric):
    """Mean over samples of an overlap score of ``y_pred >= threshold`` vs ``y_true >= 0.5``.

    A sample whose prediction and truth are both empty scores 1 (a perfect answer for a lesion-free patch).
    """

    def __init__(self, threshold: float = 0.5, name: str = "overlap", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = float(threshold)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total", dtype="float32")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count", dtype="float32")

    def _score(self, intersection, size_true, size_pred):  # pragma: no cover - overridden
        raise NotImplementedError

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth, pred = _binarised(y_true, y_pred, self.threshold)
        intersection = ops.sum(truth * pred, axis=_PIXEL_AXES)
        score = self._score(intersection, ops.sum(truth, axis=_PIXEL_AXES), ops.sum(pred, axis=_PIXEL_AXES))
        self.total.assign_add(ops.sum(score))
        self.count.assign_add(ops.cast(ops.shape(score)[0], "float32"))

    def result(self):
        return ops.divide_no_nan(self.total, self.count)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


@keras.saving.register_keras_serializable(package="mammoseg")
class DiceCoefficient(_ThresholdedOverlap):
    """Dice = 2|A∩B| / (|A| + |B|) of the thresholded prediction, mean over samples (empty vs empty = 1)."""

    def __init__(self, threshold: float = 0.5, name: str = "dice", **kwargs):
        super().__init__(threshold=threshold, name=name, **kwargs)

    def _score(self, intersection, size_true, size_pred):
        denominator = size_true + size_pred
        return ops.where(denominator > 0, 2.0 * intersection / ops.maximum(denominator, 1.0), 1.0)


@keras.saving.register_keras_serializable(package="mammoseg")
class IoUCoefficient(_ThresholdedOverlap):
    """IoU = |A∩B| / |A∪B| of the thresholded prediction, mean over samples (empty vs empty = 1)."""

    def __init__(self, threshold: float = 0.5, name: str = "iou", **kwargs):
        super().__init__(threshold=threshold, name=name, **kwargs)

    def _score(self, intersection, size_true, size_pred):
        union = size_true + size_pred - intersection
        return ops.where(union > 0, intersection / ops.maximum(union, 1.0), 1.0)


@keras.saving.register_keras_serializable(package="mammoseg")
class PooledDice(keras.metrics.Metric):
    """Dice of ``y_pred >= threshold`` vs ``y_true >= 0.5`` over all pixels of all samples seen (1 when both are empty).

    Unlike :class:`DiceCoefficient`, a lesion-free patch predicted empty adds nothing: with many negative patches
    the mean over samples rewards a model that predicts nothing (each empty answer scores 1), while the pooled Dice
    counts a missed lesion's pixels as false negatives and a false alarm's as false positives. It is the quantity
    to select checkpoints by when most patches are negatives (``train.monitor: pooled_dice``).
    """

    def __init__(self, threshold: float = 0.5, name: str = "pooled_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = float(threshold)
        self.intersection = self.add_variable(shape=(), initializer="zeros", name="intersection", dtype="float32")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth, pred = _binarised(y_true, y_pred, self.threshold)
        self.intersection.assign_add(ops.sum(truth * pred))
        self.total.assign_add(ops.sum(truth) + ops.sum(pred))

    def result(self):
        return ops.where(self.total > 0, 2.0 * self.intersection / ops.maximum(self.total, 1.0), 1.0)

    def reset_state(self):
        self.intersection.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


LOSS_NAMES = ("bce", "weighted_bce", "dice", "bce_dice", "batch_dice", "bce_batch_dice")


def get_loss(name: str, pos_weight: float | None = None) -> keras.losses.Loss:
    """The loss called ``name`` in the config (``train.loss``).

    Parameters
    ----------
    name : ``bce`` | ``weighted_bce`` | ``dice`` | ``bce_dice`` | ``batch_dice`` | ``bce_batch_dice`` (the
        ``batch_`` ones: one soft Dice over the whole batch, see the module docstring)
    pos_weight : lesion-pixel weight (see the module docstring); required for ``weighted_bce``; for ``bce_dice``
        and ``bce_batch_dice`` it weights the BCE term when given (default 1).
    """
    if name == "bce":
        return PixelWeightedBCE(1.0, name="bce")
    if name == "weighted_bce":
        if pos_weight is None:
            raise ValueError("loss 'weighted_bce' needs pos_weight = n_black / n_white of the training masks")
        return PixelWeightedBCE(pos_weight, name="weighted_bce")
    if name == "dice":
        return SoftDiceLoss()
    if name == "bce_dice":
        return BCEDiceLoss(1.0 if pos_weight is None else pos_weight)
    if name == "batch_dice":
        return SoftDiceLoss(batch=True, name="batch_dice")
    if name == "bce_batch_dice":
        return BCEDiceLoss(1.0 if pos_weight is None else pos_weight, batch=True, name="bce_batch_dice")
    raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSS_NAMES)}")


def get_metrics(threshold: float = 0.5) -> list[keras.metrics.Metric]:
    """Accuracy, Dice, IoU and pooled Dice at ``threshold``; history keys ``accuracy``, ``dice``, ``iou``,
    ``pooled_dice``."""
    return [
        keras.metrics.BinaryAccuracy(name="accuracy", threshold=threshold),
        DiceCoefficient(threshold),
        IoUCoefficient(threshold),
        PooledDice(threshold),
    ]
