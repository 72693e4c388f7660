"""The U-Net of Marita et al. and its configurable variants.

The paper gives its model only as "7 encoder / 7 decoder levels including the output, 32 initial filters, batch
normalisation" with **91,238,241 trainable and 24,256 non-trainable parameters** at a 256 x 256 x 1 input.
Enumerating the plausible variants by formula (levels, convolutions per level, batch-norm placement, up-sampling
kind and kernel, biases, filter caps) leaves exactly one family that gives both numbers:

* 7 levels with filters 32, 64, 128, 256, 512, 1024, 1024 (doubling, **capped at 1024**);
* each level: two 3 x 3 convolutions (with bias), each followed by batch norm and ReLU;
* each of the 6 up-steps: a 3 x 3 transposed convolution, stride 2, to the skip connection's filter count
  (with bias), followed by batch norm and ReLU; concatenation with the skip; then the level's two convolutions;
* output: a 1 x 1 convolution to one channel with a sigmoid.

Batch-norm channels: 2 x (32+64+128+256+512+1024+1024) in the encoder, 3 x (1024+512+256+128+64+32) in the
decoder = 6,080 + 6,048 = 12,128; their moving mean and variance are the 24,256 non-trainable parameters.
Up-sampling by bilinear interpolation followed by a 3 x 3 convolution has the same parameter count, so
``upsampling="bilinear"`` is the same model size with a different (checkerboard-free) up-step.
``downsampling="blurmax"`` replaces each 2 x 2 max pooling by Zhang's anti-aliased MaxBlurPool (max over 2 x 2 at
stride 1, then a fixed 3 x 3 binomial low-pass at stride 2; "Making convolutional networks shift-invariant again",
ICML 2019): its blur kernels add 9 non-trainable parameters per pooled channel.
:func:`count_parameters` reproduces the counts by formula; the tests check it against Keras.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mammoseg.config.plan import patch_geometry
from mammoseg.errors import InputError

__all__ = ["DOWNSAMPLINGS", "build_unet", "count_parameters", "level_filters", "load_model", "parameter_counts",
           "run_summary", "model_kwargs"]


#: How the encoder halves the resolution: ``max`` = 2 x 2 max pooling (the paper); ``blurmax`` = MaxBlurPool.
DOWNSAMPLINGS = ("max", "blurmax")
#: The low-pass filter of ``blurmax``: the 3 x 3 binomial [1, 2, 1]^T [1, 2, 1] / 16 (sums to 1).
BLUR_KERNEL = [[1 / 16, 2 / 16, 1 / 16], [2 / 16, 4 / 16, 2 / 16], [1 / 16, 2 / 16, 1 / 16]]


def level_filters(depth: int, filters: int, max_filters: int | None = None) -> list[int]:
    """Filters of each of the ``depth + 1`` levels: ``filters * 2**level``, capped at ``max_filters``."""
    cap = max_filters if max_filters else None
    return [min(filters * 2**level, cap) if cap else filters * 2**level for level in range(depth + 1)]


def _check_args(input_shape: tuple[int, int, int], depth: int, filters: int, kernel_size: int,
                convs_per_level: int, upsampling: str, dropout: float, downsampling: str) -> None:
    rows, cols = input_shape[0], input_shape[1]
    if depth < 1 or filters < 1 or kernel_size < 1 or convs_per_level < 1:
        raise ValueError(f"depth, filters, kernel_size and convs_per_level must be >= 1 "
                         f"(got {depth}, {filters}, {kernel_size}, {convs_per_level})")
    if rows % 2**depth or cols % 2**depth:
        raise ValueError(f"input {rows}x{cols} pixels is not divisible by 2**depth = {2**depth}: "
                         f"a U-Net of depth {depth} needs a side that is a multiple of {2**depth}")
    if upsampling not in ("transpose", "bilinear"):
        raise ValueError(f"upsampling must be 'transpose' or 'bilinear', got {upsampling!r}")
    if downsampling not in DOWNSAMPLINGS:
        raise ValueError(f"downsampling must be one of {DOWNSAMPLINGS}, got {downsampling!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def build_unet(
    input_shape: tuple[int, int, int] = (256, 256, 1),
    *,
    depth: int = 6,
    filters: int = 32,
    batch_norm: bool = True,
    dropout: float = 0.0,
    upsampling: str = "transpose",
    downsampling: str = "max",
    kernel_size: int = 3,
    max_filters: int | None = 1024,
    convs_per_level: int = 2,
    bn_momentum: float = 0.99,
    name: str = "unet",
):
    """Build a U-Net (defaults: the paper's model).

    Parameters
    ----------
    input_shape : (rows, cols, channels) in pixels; rows and cols divisible by ``2**depth``.
    depth : number of down-sampling steps (levels below the input level); the paper: 6, i.e. 7 levels.
    filters : filters of the first level, doubled per level and capped at ``max_filters``.
    batch_norm : batch norm after every convolution (and every up-convolution) except the output.
    dropout : rate of a ``Dropout`` after each level's convolution block (encoder and decoder; 0 = none;
        the paper's option: 0.25). Adds no parameters.
    upsampling : ``"transpose"`` (``kernel_size`` transposed convolution, stride 2) or ``"bilinear"``
        (bilinear x2 then a ``kernel_size`` convolution); both map to the skip connection's filter count.
    downsampling : ``"max"`` (2 x 2 max pooling, stride 2) or ``"blurmax"`` (max over 2 x 2 at stride 1, then
        :data:`BLUR_KERNEL` at stride 2, zero-padded: the pooled map changes less when the input moves by a few
        pixels; on real mammograms the network's answer did not, docs/real-data.md). The blur is a frozen depthwise
        convolution, so the model stays plain Keras layers.
    kernel_size : side of the convolution kernels in pixels.
    max_filters : cap on the filters of a level; ``None`` or 0 = no cap.
    convs_per_level : convolutions (+ batch norm + ReLU) per level.
    bn_momentum : momentum of the batch-norm moving statistics (Keras default 0.99). With a few hundred
        patches an epoch is a few dozen steps, and 0.99 leaves the moving statistics that inference uses far
        from the batch statistics training saw for many epochs; 0.9 converges ten times sooner.

    Returns
    -------
    keras.Model mapping float32 (B, rows, cols, channels) in [0, 1] to float32 (B, rows, cols, 1)
        probabilities (sigmoid). The output layer is float32 even under mixed precision, for stable losses.
    """
    import keras
    import numpy as np
    from keras import layers

    _check_args(input_shape, depth, filters, kernel_size, convs_per_level, upsampling, dropout, downsampling)
    widths = level_filters(depth, filters, max_filters)

    def conv_block(x, width: int, prefix: str):
        for index in range(convs_per_level):
            x = layers.Conv2D(width, kernel_size, padding="same", kernel_initializer="he_normal",
                              name=f"{prefix}_conv{index + 1}")(x)
            if batch_norm:
                x = layers.BatchNormalization(momentum=bn_momentum, name=f"{prefix}_bn{index + 1}")(x)
            x = layers.Activation("relu", name=f"{prefix}_relu{index + 1}")(x)
        if dropout > 0:
            x = layers.Dropout(dropout, name=f"{prefix}_dropout")(x)
        return x

    def up_step(x, width: int, prefix: str):
        if upsampling == "transpose":
            x = layers.Conv2DTranspose(width, kernel_size, strides=2, padding="same", kernel_initializer="he_normal",
                                       name=f"{prefix}_upconv")(x)
        else:
            x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{prefix}_upsample")(x)
            x = layers.Conv2D(width, kernel_size, padding="same", kernel_initializer="he_normal",
                              name=f"{prefix}_upconv")(x)
        if batch_norm:
            x = layers.BatchNormalization(momentum=bn_momentum, name=f"{prefix}_upbn")(x)
        return layers.Activation("relu", name=f"{prefix}_uprelu")(x)

    def down_step(x, prefix: str):
        if downsampling == "max":
            return layers.MaxPooling2D(2, name=f"{prefix}_pool")(x)
        x = layers.MaxPooling2D(2, strides=1, padding="same", name=f"{prefix}_pool")(x)
        blur = layers.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False, trainable=False,
                                      name=f"{prefix}_blur")
        x = blur(x)
        kernel = np.asarray(BLUR_KERNEL, dtype=np.float32)[:, :, None, None]
        blur.set_weights([np.tile(kernel, (1, 1, x.shape[-1], 1))])
        return x

    inputs = keras.Input(shape=tuple(input_shape), name="patch")
    x = inputs
    skips = []
    for level, width in enumerate(widths):
        x = conv_block(x, width, f"enc{level}")
        if level < depth:
            skips.append(x)
            x = down_step(x, f"enc{level}")
    for level in range(depth - 1, -1, -1):
        x = up_step(x, widths[level], f"dec{level}")
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = conv_block(x, widths[level], f"dec{level}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="mask")(x)
    return keras.Model(inputs, outputs, name=name)


def count_parameters(
    channels: int = 1, *, depth: int = 6, filters: int = 32, batch_norm: bool = True, kernel_size: int = 3,
    max_filters: int | None = 1024, convs_per_level: int = 2, downsampling: str = "max", **_ignored: Any,
) -> dict[str, int]:
    """Parameter counts of :func:`build_unet` by formula (independent of Keras; input size does not matter).

    A k x k convolution from ``c_in`` to ``c_out`` channels has ``k*k*c_in*c_out + c_out`` parameters; a batch
    norm over ``c`` channels has ``2c`` trainable (gamma, beta) and ``2c`` non-trainable (moving mean, variance).
    """
    widths = level_filters(depth, filters, max_filters)
    k2 = kernel_size * kernel_size
    trainable = 0
    bn_channels = 0

    def conv(c_in: int, c_out: int, k2_: int = k2) -> int:
        return k2_ * c_in * c_out + c_out

    c_in = channels
    for width in widths:  # encoder
        for _ in range(convs_per_level):
            trainable += conv(c_in, width)
            bn_channels += width
            c_in = width
    for level in range(depth - 1, -1, -1):  # decoder
        width = widths[level]
        trainable += conv(c_in, width)  # up-convolution (transposed or after bilinear up-sampling)
        bn_channels += width
        c_in = 2 * width  # concatenated with the skip
        for _ in range(convs_per_level):
            trainable += conv(c_in, width)
            bn_channels += width
            c_in = width
    trainable += conv(c_in, 1, 1)  # 1x1 output
    if not batch_norm:
        bn_channels = 0
    blur = 9 * sum(widths[:depth]) if downsampling == "blurmax" else 0  # one frozen 3x3 kernel per pooled channel
    return {"trainable": trainable + 2 * bn_channels, "non_trainable": 2 * bn_channels + blur}


def parameter_counts(model) -> dict[str, int]:
    """Trainable and non-trainable parameter counts of a built Keras model (ints)."""
    trainable = sum(_size(w) for w in model.trainable_weights)
    non_trainable = sum(_size(w) for w in model.non_trainable_weights)
    return {"trainable": trainable, "non_trainable": non_trainable}


def _size(variable) -> int:
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size


def model_kwargs(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The :func:`build_unet` keyword arguments from the config's ``model`` section."""
    keys = ("depth", "filters", "batch_norm", "dropout", "upsampling", "downsampling", "kernel_size", "max_filters",
            "convs_per_level", "bn_momentum", "name")
    return {key: model_cfg[key] for key in keys if key in model_cfg}


def run_summary(config: dict[str, Any]) -> dict[str, Any]:
    """``mammoseg model summary``: build the configured model on the CPU (no training) and count parameters.

    Returns
    -------
    dict with ``trainable``, ``non_trainable`` (ints), ``input_shape`` and ``model`` (the model section).
    """
    side = patch_geometry(config["patches"]).input_px
    model = build_unet((side, side, 1), **model_kwargs(config.get("model", {})))
    counts = parameter_counts(model)
    return {**counts, "input_shape": [side, side, 1], "model": json.loads(json.dumps(config.get("model", {})))}


def load_model(model_path: str | Path):
    """Load a ``.keras`` model safely (``compile=False, safe_mode=True``), the project's custom objects registered.

    Raises
    ------
    InputError
        The file is missing or is not a loadable Keras model (also: it carries Python code, e.g. a Lambda layer).
    """
    import keras

    import mammoseg.model.losses  # noqa: F401 - registers the serialisable custom objects

    path = Path(model_path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found")
    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad file, named
        raise InputError(f"{path}: cannot load Keras model: {exc}") from exc
