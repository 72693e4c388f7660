"""The U-Net builder: the paper's exact parameter counts, the count formula vs Keras, shapes and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from mammoseg.config import load_config  # noqa: E402
from mammoseg.model.unet import build_unet, count_parameters, level_filters, parameter_counts, run_summary  # noqa: E402

PAPER_TRAINABLE = 91_238_241  # Marita et al., model summary
PAPER_NON_TRAINABLE = 24_256


def test_paper_config_builds_the_paper_model_exactly(repo_root):
    summary = run_summary(load_config(repo_root / "config" / "paper.yaml"))
    assert summary["input_shape"] == [256, 256, 1]
    assert summary["trainable"] == PAPER_TRAINABLE
    assert summary["non_trainable"] == PAPER_NON_TRAINABLE


def test_paper_batch_norm_channels_by_hand():
    # non-trainable = moving mean + variance = 2 x BN channels: 2 convs per level in the encoder,
    # up-conv + 2 convs per decoder level
    widths = [32, 64, 128, 256, 512, 1024, 1024]
    bn_channels = 2 * sum(widths) + 3 * sum(widths[:-1])
    assert 2 * bn_channels == PAPER_NON_TRAINABLE
    assert level_filters(6, 32, 1024) == widths


@pytest.mark.parametrize("kwargs", [
    dict(depth=2, filters=4),
    dict(depth=3, filters=8, batch_norm=False),
    dict(depth=2, filters=4, upsampling="bilinear", kernel_size=5),
    dict(depth=3, filters=6, max_filters=12, convs_per_level=3),
    dict(depth=2, filters=4, max_filters=None, dropout=0.25),
    dict(depth=3, filters=4, downsampling="blurmax"),
])
def test_formula_matches_keras(kwargs):
    model = build_unet((32, 32, 1), **kwargs)
    assert parameter_counts(model) == count_parameters(1, **kwargs)


def test_output_is_a_probability_map_of_the_input_size():
    model = build_unet((32, 48, 1), depth=3, filters=4)
    x = np.random.default_rng(0).random((2, 32, 48, 1), dtype=np.float32)
    y = np.asarray(model(x, training=False))
    assert y.shape == (2, 32, 48, 1)
    assert y.dtype == np.float32
    assert np.all((y >= 0) & (y <= 1))


def _maxblur_by_hand(x: np.ndarray) -> np.ndarray:
    """MaxBlurPool of float (rows, cols, channels) with even sides, written out: the max over each 2 x 2 block
    anchored at every pixel (the missing row and column at the far border padded as Keras' "same" pads a max
    pool: ignored), then the binomial [1 2 1]^T [1 2 1] / 16 at every second pixel with a zero border."""
    rows, cols, _ = x.shape
    padded = np.pad(x, ((0, 1), (0, 1), (0, 0)), constant_values=-np.inf)
    maxed = np.max([padded[i:i + rows, j:j + cols] for i in (0, 1) for j in (0, 1)], axis=0)
    binomial = np.outer([1, 2, 1], [1, 2, 1]) / 16
    # "same" at stride 2 on an even side pads 0 before and 1 after: the output at (r, c) is centred on (2r+1, 2c+1)
    zero_border = np.pad(maxed, ((0, 1), (0, 1), (0, 0)))
    out = np.zeros((rows // 2, cols // 2, x.shape[2]))
    for r in range(rows // 2):
        for c in range(cols // 2):
            block = zero_border[2 * r:2 * r + 3, 2 * c:2 * c + 3]
            out[r, c] = np.einsum("ij,ijk->k", binomial, block)
    return out


def test_blurmax_down_step_is_max_then_binomial_blur():
    import keras

    model = build_unet((16, 16, 1), depth=2, filters=3, downsampling="blurmax")
    before = keras.Model(model.input, model.get_layer("enc0_relu2").output)
    after = keras.Model(model.input, model.get_layer("enc0_blur").output)
    x = np.random.default_rng(1).random((1, 16, 16, 1), dtype=np.float32)
    features = np.asarray(before(x, training=False))[0]
    np.testing.assert_allclose(np.asarray(after(x, training=False))[0], _maxblur_by_hand(features), atol=1e-5)


@pytest.mark.slow  # a real training
def test_blurmax_kernels_stay_frozen_through_training():
    model = build_unet((16, 16, 1), depth=2, filters=3, downsampling="blurmax")
    frozen = {name: model.get_layer(name).get_weights()[0].copy() for name in ("enc0_blur", "enc1_blur")}
    convolution = model.get_layer("enc0_conv1").get_weights()[0].copy()
    model.compile(optimizer="adam", loss="binary_crossentropy")
    rng = np.random.default_rng(2)
    model.fit(rng.random((4, 16, 16, 1), dtype=np.float32), (rng.random((4, 16, 16, 1)) > 0.5).astype(np.float32),
              epochs=2, batch_size=2, verbose=0)
    assert not np.allclose(model.get_layer("enc0_conv1").get_weights()[0], convolution)  # training did train
    for name, kernel in frozen.items():
        np.testing.assert_array_equal(model.get_layer(name).get_weights()[0], kernel)


def test_unknown_downsampling_is_refused():
    with pytest.raises(ValueError, match="downsampling"):
        build_unet((16, 16, 1), depth=2, filters=3, downsampling="average")


def test_input_not_divisible_by_the_depth_is_refused():
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth"):
        build_unet((40, 40, 1), depth=4, filters=4)


@pytest.mark.slow
def test_cli_model_summary_prints_the_counts(repo_root):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-m", "mammoseg.cli", "model", "summary", "--configfile",
                           str(repo_root / "config" / "paper.yaml")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout[done.stdout.index("{"):])
    assert (counts["trainable"], counts["non_trainable"]) == (PAPER_TRAINABLE, PAPER_NON_TRAINABLE)
