"""The training input pipeline: a ``tf.data.Dataset`` over HDF5 patch shards (:mod:`mammoseg.patches.shards`).

Only patch *indices* (shard, row) are held in memory and shuffled; the indices are batched and each batch is
read from the shards when the pipeline asks for it, several batches in parallel, then prefetched, so the whole
set is never loaded. TensorFlow is imported inside the
functions, so importing this module is cheap.

Reading: h5py serialises every HDF5 call behind one global lock, so parallel reads are safe from tf.data's
threads; open file handles are cached per shard (opening a file costs far more than reading one chunk) and
the lzf decompression of a chunk (masks by default; images too with ``patches.image_compression: lzf``) happens
inside that lock. Its read rate is measured in benchmarks/measures.py.

Augmentation (``train.augment``, beyond the paper; training batches only, see :func:`augment_batch`): each batch
gets one random key from ``tf.data.Dataset.random(seed)`` (a new stream every epoch, the same streams for the
same seed), drawn *before* the parallel reads, so a batch's transforms depend only on the seed, the epoch and its
place in the epoch, never on which thread read it. With every ``train.augment`` setting off no augmentation step
is added at all: the batches are bit-identical to those of a pipeline without augmentation.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mammoseg.errors import InputError
from mammoseg.patches.geometry import NORMALISE_MODES
from mammoseg.patches.shards import PROVENANCE_COLUMNS, read_shard_attributes, read_table

__all__ = ["read_provenance", "shards_normalisation", "make_dataset", "ShardReader", "augments", "augment_batch"]


def read_provenance(shard_paths: Sequence[str | Path]) -> "pandas.DataFrame":  # noqa: F821
    """Provenance of every patch of every shard, one row per patch.

    Returns
    -------
    pandas.DataFrame with :data:`mammoseg.patches.shards.PROVENANCE_COLUMNS` plus ``shard_path`` (str, as given) and
    ``row`` (int64, the patch's index in that shard's ``images``/``masks``). Pass a subset of it (e.g. the
    training split) to :func:`make_dataset`.

    Raises
    ------
    ValueError
        If a shard cannot be read or shards hold patches of different sizes.
    """
    import h5py
    import pandas as pd

    frames, sizes = [], {}
    for path in shard_paths:
        try:
            with h5py.File(path, "r") as h5:
                prov = read_table(h5, "provenance")
                sizes[str(path)] = tuple(h5["images"].shape[1:])
                if len(prov) != h5["images"].shape[0]:
                    raise InputError(f"{path}: provenance has {len(prov)} rows but images has {h5['images'].shape[0]}")
        except OSError as exc:
            raise InputError(f"{path}: cannot read shard: {exc}") from exc
        prov["shard_path"] = str(path)
        prov["row"] = np.arange(len(prov), dtype=np.int64)
        frames.append(prov)
    if len(set(sizes.values())) > 1:
        raise ValueError(f"shards hold patches of different sizes: {sizes}")
    if not frames:
        return pd.DataFrame(columns=[*PROVENANCE_COLUMNS, "shard_path", "row"])
    return pd.concat(frames, ignore_index=True)


class ShardReader:
    """Reads single patches from a fixed list of shards, keeping one open read-only handle per shard.

    Safe to call from several threads: handle creation is guarded by a lock and h5py serialises HDF5 calls.
    """

    def __init__(self, shard_paths: Sequence[str | Path]):
        self.shard_paths = [str(p) for p in shard_paths]
        self._handles: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _datasets(self, shard: int):
        """(file, images dataset, masks dataset) of a shard, opened once; looking datasets up by name costs
        about as much as reading an uncompressed patch, so the dataset objects are cached too."""
        entry = self._handles.get(shard)
        if entry is None:
            import h5py

            with self._lock:
                entry = self._handles.get(shard)
                if entry is None:
                    handle = h5py.File(self.shard_paths[shard], "r")
                    entry = (handle, handle["images"], handle["masks"])
                    self._handles[shard] = entry
        return entry

    def read(self, shard: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Image float32 (s, s, 1) in [0, 1] and mask float32 (s, s, 1) in {0, 1} of one patch."""
        _, images, masks = self._datasets(int(shard))
        row = int(row)
        image = images[row]
        mask = masks[row]
        return image[..., None], mask[..., None].astype(np.float32)

    def close(self) -> None:
        with self._lock:
            for handle, _, _ in self._handles.values():
                handle.close()
            self._handles.clear()

    def __del__(self):  # pragma: no cover - best effort at interpreter shutdown
        try:
            self.close()
        except Exception:
            pass


def _indices(shard_paths: Sequence[str | Path], rows) -> tuple[np.ndarray, np.ndarray, int]:
    """(shard index int32 (N,), row int64 (N,), patch side s) of the patches to serve."""
    import h5py

    if rows is None:
        rows = read_provenance(shard_paths)
    missing = {"shard_path", "row"} - set(rows.columns)
    if missing:
        raise ValueError(f"rows must be (a subset of) read_provenance output; missing column(s) {sorted(missing)}")
    position = {str(p): k for k, p in enumerate(shard_paths)}
    unknown = sorted(set(rows["shard_path"].astype(str)) - set(position))
    if unknown:
        raise ValueError(f"rows refer to shard(s) not in shard_paths: {unknown[:3]}")
    shard_index = np.array([position[str(p)] for p in rows["shard_path"]], dtype=np.int32)
    row_index = rows["row"].to_numpy(dtype=np.int64)
    if not len(shard_paths):
        raise ValueError("no shards given")
    with h5py.File(shard_paths[0], "r") as h5:
        side = int(h5["images"].shape[1])
    return shard_index, row_index, side


def shards_normalisation(shard_paths: Sequence[str | Path]) -> str:
    """The ``patches.normalise`` mode every shard was written with (its ``normalise`` root attribute; a shard
    written before the attribute existed was min-max normalised, ``"window"``).

    Raises
    ------
    InputError
        If the shards disagree.
    """
    modes = {str(path): read_shard_attributes(path).get("normalise", "window") for path in shard_paths}
    found = set(modes.values())
    if len(found) != 1:
        raise InputError(f"shards were normalised differently ({modes}); re-run extraction")
    return found.pop()


def make_dataset(
    shard_paths: Sequence[str | Path],
    rows: "pandas.DataFrame | None" = None,  # noqa: F821
    batch_size: int = 8,
    *,
    shuffle: bool = True,
    seed: int = 0,
    repeat: bool = False,
    drop_remainder: bool = False,
    augment: Mapping[str, Any] | None = None,
    normalise: str | None = None,
):
    """A ``tf.data.Dataset`` of (images, masks) batches read lazily from the shards.

    Parameters
    ----------
    shard_paths : the shard files
    rows : subset of :func:`read_provenance` output to serve (needs ``shard_path`` and ``row``); None = all
    batch_size : patches per batch
    shuffle : shuffle the patch indices across all shards, reshuffled every epoch (seeded by ``seed``)
    seed : shuffle seed
    repeat : repeat forever (one epoch otherwise)
    drop_remainder : drop a last, smaller batch
    augment : the validated ``train.augment`` section, for training batches (:func:`augment_batch`, seeded by
        ``seed``); None (validation, prediction) or every setting off = the patches as stored
    normalise : how the shards normalised their patches (:func:`shards_normalisation`), which augmentation
        keeps: ``"window"`` = each augmented patch min-max again, ``"image"`` = clipped to [0, 1] only; needed
        only with ``augment``

    Returns
    -------
    tf.data.Dataset yielding (images float32 (B, s, s, 1) in [0, 1], masks float32 (B, s, s, 1) in {0, 1});
    every selected patch appears exactly once per epoch.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shard_paths = [str(p) for p in shard_paths]
    shard_index, row_index, side = _indices(shard_paths, rows)
    reader = ShardReader(shard_paths)

    def load_batch(shards, rows):
        pairs = [reader.read(k, r) for k, r in zip(shards.tolist(), rows.tolist())]
        if not pairs:
            empty = np.zeros((0, side, side, 1), dtype=np.float32)
            return empty, empty
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def tf_load_batch(shards, rows):
        images, masks = tf.numpy_function(load_batch, [shards, rows], [tf.float32, tf.float32], stateful=False)
        images.set_shape((batch_size if drop_remainder else None, side, side, 1))
        masks.set_shape((batch_size if drop_remainder else None, side, side, 1))
        return images, masks

    ds = tf.data.Dataset.from_tensor_slices((shard_index, row_index))
    if shuffle and len(row_index):
        # only indices are shuffled (12 bytes per patch), so a full-size buffer is a perfect shuffle across shards
        ds = ds.shuffle(len(row_index), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    # batch the indices, then read a whole batch per call: one Python call per batch instead of per patch, and
    # several batches are read in parallel (h5py serialises the HDF5 calls themselves behind its global lock)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if augment is not None and augments(augment):
        if normalise not in NORMALISE_MODES:
            raise ValueError(f"augmentation needs the patches' normalisation, one of {NORMALISE_MODES}; "
                             f"got {normalise!r}")
        # one key per batch, zipped in before the parallel reads: a batch's transforms depend on its position only
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, keys).map(
            lambda index, key: augment_batch(*tf_load_batch(*index), key, augment, normalise),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
    else:
        ds = ds.map(tf_load_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------------------------------------
# augmentation (train.augment)
# --------------------------------------------------------------------------------------------------------------
def augments(augment: Mapping[str, Any]) -> bool:
    """Whether a validated ``train.augment`` section changes anything (False: every setting is 0 / false)."""
    return bool(augment["flip"]) or any(float(augment[k]) > 0
                                        for k in ("rotate_deg", "scale", "translate", "contrast", "gamma"))


def _affine(rotation_rad, zoom, side: int, shift_rows=None, shift_cols=None):
    """ImageProjectiveTransform rows float32 (B, 8): each output pixel samples the input at the centre plus the
    offset rotated by ``rotation_rad`` and divided by ``zoom`` (zoom > 1 magnifies), minus the shift (pixels, float32
    (B,) or None): the content moves by ``shift_rows`` down and ``shift_cols`` right."""
    import tensorflow as tf

    centre = (side - 1) / 2.0
    cos, sin = tf.cos(rotation_rad) / zoom, tf.sin(rotation_rad) / zoom
    zeros = tf.zeros_like(cos)
    shift_rows = zeros if shift_rows is None else shift_rows
    shift_cols = zeros if shift_cols is None else shift_cols
    # x = column, y = row; input = c + [[cos, -sin], [sin, cos]] @ (output - c) - shift
    return tf.stack([cos, -sin, centre - cos * centre + sin * centre - shift_cols,
                     sin, cos, centre - sin * centre - cos * centre - shift_rows, zeros, zeros], axis=1)


def _warp(images, transforms, interpolation: str):
    import tensorflow as tf

    side = tf.shape(images)[1:3]
    # reflect for image and mask alike, so the pair stays aligned without an artificial black border
    return tf.raw_ops.ImageProjectiveTransformV3(images=images, transforms=transforms, output_shape=side,
                                                 fill_value=0.0, interpolation=interpolation, fill_mode="REFLECT")


def _minmax(images):
    """Per-patch min-max normalisation of float32 (B, s, s, 1), as :func:`mammoseg.patches.geometry.normalise_patch`
    (a flat patch becomes zeros): what inference feeds the network."""
    import tensorflow as tf

    low = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
    high = tf.reduce_max(images, axis=[1, 2, 3], keepdims=True)
    return tf.where(high > low, (images - low) / tf.maximum(high - low, 1e-12), tf.zeros_like(images))


def augment_batch(images, masks, key, augment: Mapping[str, Any], normalise: str):
    """Random flips, rotation, zoom, contrast and gamma of one batch, the same geometry for images and masks.

    Parameters
    ----------
    images : float32 (B, s, s, 1) in [0, 1], patches as extraction normalised them
    masks : float32 (B, s, s, 1) in {0, 1}
    key : int64 scalar, the batch's random key (all draws are stateless functions of it)
    augment : the validated ``train.augment`` section: ``flip`` (bool: horizontal and vertical flips, each with
        probability 1/2), ``rotate_deg`` (rotation uniform in ±degrees), ``scale`` (zoom uniform in
        [1 - scale, 1 + scale]), ``translate`` (shift of the content uniform in ± translate × patch side, rows and
        columns drawn apart), ``contrast`` (factor about the patch mean uniform in [1 - contrast, 1 + contrast],
        ``tf.image.adjust_contrast``), ``gamma`` (exponent uniform in [1 - gamma, 1 + gamma],
        ``tf.image.adjust_gamma``); 0 / false = that transform off
    normalise : the patches' ``patches.normalise`` mode: ``"window"`` or ``"image"`` (see Returns)

    Returns
    -------
    (images float32 (B, s, s, 1) in [0, 1], masks float32 (B, s, s, 1) in {0, 1}): each sample has its own draws.
    Rotation, zoom and shift resample about the patch centre (images bilinear, masks nearest neighbour, so they
    stay binary; both reflect at the border). Photometric changes are clipped to [0, 1]. With ``normalise="window"``
    every augmented image is min-max normalised again, as inference normalises every window: so a contrast factor
    below 1 alone changes nothing the network sees, while one above 1 saturates the darkest and brightest pixels.
    With ``"image"`` the patch keeps its place in its mammogram's intensity range (inference does not re-normalise
    a window), so it is only clipped to [0, 1].
    """
    import math

    import tensorflow as tf

    shape = images.shape  # static (B or None, s, s, 1): the warp and map_fn below lose it
    batch = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(tf.stack([key, tf.constant(0, tf.int64)]), num=6)

    def uniform(k, low, high):
        return tf.random.stateless_uniform([batch], seed=seeds[k], minval=low, maxval=high)

    if augment["flip"]:
        flips = uniform(0, 0.0, 1.0) < 0.5, uniform(1, 0.0, 1.0) < 0.5
        for axis, chosen in zip((2, 1), flips):  # columns (horizontal flip), rows (vertical flip)
            chosen = chosen[:, None, None, None]
            images = tf.where(chosen, tf.reverse(images, [axis]), images)
            masks = tf.where(chosen, tf.reverse(masks, [axis]), masks)
    rotate, scale = float(augment["rotate_deg"]), float(augment["scale"])
    max_shift_px = float(augment["translate"]) * int(images.shape[1])
    if rotate > 0 or scale > 0 or max_shift_px > 0:
        angle = uniform(2, -rotate, rotate) * (math.pi / 180.0)
        shifts = None, None
        if max_shift_px > 0:  # seeds of their own, so the other draws stay those of a run without translation
            extra = tf.random.experimental.stateless_split(tf.stack([key, tf.constant(1, tf.int64)]), num=2)
            shifts = tuple(tf.random.stateless_uniform([batch], seed=extra[k], minval=-max_shift_px,
                                                       maxval=max_shift_px) for k in (0, 1))
        transforms = _affine(angle, uniform(3, 1.0 - scale, 1.0 + scale), int(images.shape[1]), *shifts)
        images = _warp(images, transforms, "BILINEAR")
        masks = _warp(masks, transforms, "NEAREST")
    contrast, gamma = float(augment["contrast"]), float(augment["gamma"])
    if contrast > 0 or gamma > 0:
        factors = uniform(4, 1.0 - contrast, 1.0 + contrast)
        exponents = uniform(5, 1.0 - gamma, 1.0 + gamma)

        def photometric(args):
            image, factor, exponent = args
            image = tf.clip_by_value(tf.image.adjust_contrast(image, factor), 0.0, 1.0)
            return tf.image.adjust_gamma(image, exponent)

        images = tf.map_fn(photometric, (images, factors, exponents), fn_output_signature=tf.float32)
    images = _minmax(images) if normalise == "window" else tf.clip_by_value(images, 0.0, 1.0)
    images.set_shape(shape)
    masks.set_shape(shape)
    return images, masks
