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
