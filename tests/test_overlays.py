"""Overlay colours at known pixels, size limit, thin regions after reduction, atomic PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mammoseg.evaluation import overlays


def _scene(shape=(40, 60)):
    image = np.tile(np.linspace(0, 1000, shape[1], dtype=np.float32), (shape[0], 1))
    truth = np.zeros(shape, dtype=bool)
    pred = np.zeros(shape, dtype=bool)
    truth[5:15, 5:15] = True
    pred[10:20, 10:20] = True  # overlaps truth at [10:15, 10:15]
    pred[30:35, 40:45] = True  # false positive
    return image, pred, truth


def test_colours_at_known_pixels_without_reduction():
    image, pred, truth = _scene()
    rgb = overlays.make_overlay(image, pred, truth, max_side=100)
    assert rgb.shape == (40, 60, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[12, 12]) == overlays.TP_COLOUR == (0, 255, 0)
    assert tuple(rgb[6, 6]) == overlays.FN_COLOUR == (255, 0, 0)
    assert tuple(rgb[18, 18]) == overlays.FP_COLOUR == (255, 255, 255)
    assert tuple(rgb[32, 42]) == overlays.FP_COLOUR
    # elsewhere: grey, min-max scaled (column 0 → 0, last column → 255)
    assert tuple(rgb[0, 0]) == (0, 0, 0) and tuple(rgb[0, 59]) == (255, 255, 255)
    assert rgb[0, 30, 0] == rgb[0, 30, 1] == rgb[0, 30, 2] == round(30 / 59 * 255)


def test_reduction_keeps_one_pixel_lines_visible_and_respects_max_side():
    shape = (1000, 700)
    image = np.zeros(shape, dtype=np.float32)
    truth = np.zeros(shape, dtype=bool)
    pred = np.zeros(shape, dtype=bool)
    truth[:, 351] = True  # a 1-pixel-wide missed lesion
    pred[501, :] = True  # a 1-pixel-high false positive
    rgb = overlays.make_overlay(image, pred, truth, max_side=128)
    factor = overlays.reduction_factor(shape, 128)
    assert factor == 8 and max(rgb.shape[:2]) <= 128
    assert rgb.shape[:2] == (125, 88)
    red = np.all(rgb == overlays.FN_COLOUR, axis=2)
    white = np.all(rgb == overlays.FP_COLOUR, axis=2)
    assert red[:, 351 // 8].sum() >= 120  # the column survives (except where the FP row crosses it)
    assert white[501 // 8, :].sum() >= 80
    # where the FP row crosses the missed column, pred & truth hold: TP, painted last (green)
    assert tuple(rgb[501 // 8, 351 // 8]) == overlays.TP_COLOUR


def test_write_overlay_is_a_png_with_the_same_pixels(tmp_path):
    image, pred, truth = _scene()
    rgb = overlays.make_overlay(image, pred, truth, max_side=100)
    target = tmp_path / "sub" / "x.png"
    overlays.write_overlay(target, rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(target).convert("RGB")), rgb)
    assert not list(target.parent.glob(".tmp-*"))
    with pytest.raises(ValueError):
        overlays.write_overlay(target, rgb[..., 0])


def test_shape_mismatch_is_an_error():
    image, pred, truth = _scene()
    with pytest.raises(ValueError, match="differ in shape"):
        overlays.make_overlay(image, pred[:-1], truth)


def test_legend_band_names_the_colours_below_an_unchanged_overlay():
    image, pred, truth = _scene((200, 300))
    rgb = overlays.make_overlay(image, pred, truth, max_side=400)
    legend = overlays.add_legend(rgb, "P_00001_LEFT_CC")
    band = legend.shape[0] - rgb.shape[0]
    assert legend.shape[1:] == rgb.shape[1:] and 10 <= band <= 30
    np.testing.assert_array_equal(legend[: rgb.shape[0]], rgb)
    strip = legend[rgb.shape[0]:].reshape(-1, 3)
    colours = {tuple(c) for c in strip}
    for _, colour in overlays.LEGEND:  # a swatch of every class colour is in the band
        assert colour in colours, colour
