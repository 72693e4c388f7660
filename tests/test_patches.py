"""Patch geometry and the shared pre-processing (NumPy only)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mammoseg.patches.geometry import (
    Crop,
    PatchLargerThanImage,
    bbox_centre,
    crop,
    downscale_image,
    downscale_mask,
    image_intensity_range,
    intensity_range_for,
    mask_bbox,
    normalise_patch,
    place_window,
    plan_crops,
    preprocess_window,
    roi_rng,
    shift_offsets,
)

# ---------------------------------------------------------------------------------------------- pre-processing


def test_downscale_image_is_block_mean():
    window = np.arange(64, dtype=np.uint16).reshape(8, 8)
    out = downscale_image(window, 4)
    expected = np.array([[window[r : r + 4, c : c + 4].mean() for c in (0, 4)] for r in (0, 4)])
    assert out.dtype == np.float32 and out.shape == (2, 2)
    np.testing.assert_allclose(out, expected)


def test_downscale_mask_majority_and_binary():
    mask = np.zeros((4, 8), dtype=bool)
    mask[:2, :4] = True  # exactly half of the first block -> 1
    mask[:1, 4:8] = True  # a quarter of the second block -> 0
    out = downscale_mask(mask, 4)
    assert out.dtype == np.uint8 and out.tolist() == [[1, 0]]


def test_normalise_and_preprocess():
    patch = np.array([[2.0, 4.0], [6.0, 10.0]])
    np.testing.assert_allclose(normalise_patch(patch), (patch - 2) / 8)
    assert not normalise_patch(np.full((3, 3), 7.0)).any()
    window = np.random.default_rng(0).integers(0, 4096, size=(16, 16))
    out = preprocess_window(window, 4)
    assert out.shape == (4, 4) and out.min() == 0 and out.max() == 1
    with pytest.raises(ValueError, match="not divisible"):
        downscale_image(np.zeros((10, 8)), 4)



def test_image_intensity_range_is_the_percentiles_of_every_fourth_pixel():
    # every 4th pixel of this image (each value repeated in a 4 x 4 block) is 0, 1, ..., 9999
    image = np.kron(np.arange(10_000, dtype=np.uint16).reshape(100, 100), np.ones((4, 4), np.uint16))
    low, high = image_intensity_range(image)
    assert low == pytest.approx(0.005 * 9999) and high == pytest.approx(0.995 * 9999)  # linear interpolation
    assert intensity_range_for(image, "window") is None
    assert intensity_range_for(image, "image") == (low, high)
    with pytest.raises(ValueError, match="unknown normalisation"):
        intensity_range_for(image, "breast")


def test_image_normalisation_keeps_windows_comparable_and_clips():
    dark, bright = np.full((8, 8), 100.0), np.full((8, 8), 300.0)
    dark[0, 0], bright[0, 0] = 0.0, 500.0  # one outlier each: below and above the range
    rng = (100.0, 400.0)
    # by hand: block means of 4 x 4 blocks, then (mean - 100) / 300, clipped to [0, 1]
    np.testing.assert_allclose(preprocess_window(dark, 4, rng), [[0.0, 0.0], [0.0, 0.0]])  # 93.75 -> clipped
    np.testing.assert_allclose(preprocess_window(bright, 4, rng), [[(312.5 - 100) / 300, 2 / 3], [2 / 3, 2 / 3]])
    # the paper's min-max would make both flat-but-one windows look alike (0 or 1 everywhere but one block)
    assert preprocess_window(bright, 4).max() == 1.0 and preprocess_window(dark, 4).max() == 1.0
    assert not normalise_patch(np.ones((2, 2)), (5.0, 5.0)).any()  # a flat image: zeros, no division by 0

# ---------------------------------------------------------------------------------------------- geometry


def test_mask_bbox_and_centre():
    mask = np.zeros((50, 40), dtype=bool)
    mask[10:20, 5:9] = True
    mask[25, 30] = True
    assert mask_bbox(mask) == (10, 5, 26, 31)
    assert bbox_centre((10, 5, 26, 31)) == (18, 18)
    with pytest.raises(ValueError, match="no foreground"):
        mask_bbox(np.zeros((5, 5)))
    with pytest.raises(ValueError, match="2-D"):
        mask_bbox(np.zeros(5))


def test_place_window_centred_borders_and_too_large():
    assert place_window((100, 80), 64, (300, 200)) == (68, 48)  # interior: centre - 32
    assert place_window((5, 3), 64, (300, 200)) == (0, 0)  # top-left: moved down/right
    assert place_window((299, 199), 64, (300, 200)) == (236, 136)  # bottom-right: flush with the border
    assert place_window((-50, 500), 64, (300, 200)) == (0, 136)  # a centre outside the image
    assert place_window((10, 10), 64, (64, 64)) == (0, 0)  # exactly fits
    with pytest.raises(PatchLargerThanImage, match="larger than the image"):
        place_window((10, 10), 64, (63, 200))
    with pytest.raises(PatchLargerThanImage):
        place_window((10, 10), 64, (300, 50))


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 300), cols=st.integers(1, 300), size=st.sampled_from([8, 16, 32, 64]),
    cr=st.integers(-100, 400), cc=st.integers(-100, 400),
)
def test_place_window_properties(rows, cols, size, cr, cc):
    if size > rows or size > cols:
        with pytest.raises(PatchLargerThanImage):
            place_window((cr, cc), size, (rows, cols))
        return
    r0, c0 = place_window((cr, cc), size, (rows, cols))
    assert 0 <= r0 <= rows - size and 0 <= c0 <= cols - size
    # the window is moved by the smallest amount: unchanged when the centred window already fits
    if 0 <= cr - size // 2 <= rows - size:
        assert r0 == cr - size // 2
    if 0 <= cc - size // 2 <= cols - size:
        assert c0 == cc - size // 2


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(64, 200), cols=st.integers(64, 200), data=st.data(),
)
def test_centred_crop_contains_whole_bbox_when_it_fits(rows, cols, data):
    h = data.draw(st.integers(1, 64))
    w = data.draw(st.integers(1, 64))
    r0 = data.draw(st.integers(0, rows - h))
    c0 = data.draw(st.integers(0, cols - w))
    crops = plan_crops((r0, c0, r0 + h, c0 + w), (rows, cols), 64, 0, 0.25, roi_rng(0, "x"))
    (c,) = crops
    assert c.copy_index == 0 and c.shift_row == 0 and c.shift_col == 0
    assert c.row <= r0 and r0 + h <= c.row + 64
    assert c.col <= c0 and c0 + w <= c.col + 64


def test_roi_rng_depends_only_on_seed_and_roi():
    a = roi_rng(3, "P_00001_LEFT_CC_1").integers(0, 2**32, size=8)
    b = roi_rng(3, "P_00001_LEFT_CC_1").integers(0, 2**32, size=8)
    c = roi_rng(4, "P_00001_LEFT_CC_1").integers(0, 2**32, size=8)
    d = roi_rng(3, "P_00001_LEFT_CC_2").integers(0, 2**32, size=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != d).any()


def test_shift_offsets_range_and_spread():
    offsets = shift_offsets(roi_rng(0, "r"), 4000, 64, 0.25)
    assert offsets.shape == (4000, 2) and offsets.dtype == np.int64
    assert offsets.min() == -16 and offsets.max() == 16  # the whole closed range is reachable
    # uniform: every one of the 33 values appears, none dominates
    counts = np.bincount((offsets[:, 0] + 16), minlength=33)
    assert counts.min() > 60 and counts.max() < 200
    assert not shift_offsets(roi_rng(0, "r"), 5, 64, 0.0).any()


def test_plan_crops_shifted_inside_and_recorded():
    crops = plan_crops((0, 0, 10, 10), (100, 100), 64, 4, 0.5, roi_rng(1, "corner"))
    assert [c.copy_index for c in crops] == [0, 1, 2, 3, 4]
    assert crops[0] == Crop(0, 0, 0, 64)
    for c in crops[1:]:
        assert abs(c.shift_row) <= 32 and abs(c.shift_col) <= 32
        assert 0 <= c.row <= 36 and 0 <= c.col <= 36
        expected = (min(max(5 + c.shift_row - 32, 0), 36), min(max(5 + c.shift_col - 32, 0), 36))
        assert (c.row, c.col) == expected


def test_crop_view_and_bounds():
    array = np.arange(100).reshape(10, 10)
    np.testing.assert_array_equal(crop(array, 2, 3, 4), array[2:6, 3:7])
    with pytest.raises(ValueError, match="inside"):
        crop(array, 8, 0, 4)


@settings(max_examples=60, deadline=None)
@given(factor=st.integers(1, 17), h=st.integers(1, 6), w=st.integers(1, 6), seed=st.integers(0, 2**31),
       offset=st.integers(0, 3))
def test_downscale_matches_reshape_mean_reference(factor, h, w, seed, offset):
    rng = np.random.default_rng(seed)
    big = rng.integers(0, 65536, size=(h * factor + 3, w * factor + 3)).astype(np.float32)
    window = big[offset : offset + h * factor, offset : offset + w * factor]  # a strided view, as in extraction
    reference = window.astype(np.float64).reshape(h, factor, w, factor).mean(axis=(1, 3))
    np.testing.assert_allclose(downscale_image(window, factor), reference, rtol=1e-6)
    mask = rng.random(big.shape) < rng.random()
    view = mask[offset : offset + h * factor, offset : offset + w * factor]
    expected = (view.reshape(h, factor, w, factor).mean(axis=(1, 3)) >= 0.5).astype(np.uint8)
    np.testing.assert_array_equal(downscale_mask(view, factor), expected)
    np.testing.assert_array_equal(downscale_mask(view.astype(np.uint8) * 255, factor), expected)


def test_negative_windows_avoid_lesions_and_dark_background():
    from mammoseg.patches.geometry import plan_negative_windows, roi_rng

    image = np.zeros((200, 160), np.float32)
    image[:, 60:] = 1000.0  # breast on the right, black on the left
    lesions = np.zeros(image.shape, bool)
    lesions[90:110, 100:120] = True
    corners = plan_negative_windows(lesions, image, 32, 6, 0.5, roi_rng(0, "img"))
    assert len(corners) == 6
    for r, c in corners:
        window_lesion = lesions[r:r + 32, c:c + 32]
        window = image[r:r + 32, c:c + 32]
        assert not window_lesion.any()
        assert window.mean() >= 0.5 * image.max()
    # deterministic per generator seed, and impossible requests return nothing rather than looping
    assert corners == plan_negative_windows(lesions, image, 32, 6, 0.5, roi_rng(0, "img"))
    assert plan_negative_windows(np.ones_like(lesions), image, 32, 3, 0.0, roi_rng(0, "img")) == []
    assert plan_negative_windows(lesions, image, 256, 3, 0.0, roi_rng(0, "img")) == []


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mask_window_downscale_equals_cropping_the_whole_window(data):
    """The bbox-restricted downscale counts only the lesion's blocks; it must equal the plain crop + downscale."""
    from mammoseg.patches.geometry import downscale_mask_window

    factor = data.draw(st.sampled_from([1, 2, 3, 4]))
    size = factor * data.draw(st.integers(1, 8))
    rows, cols = data.draw(st.integers(size, size + 20)), data.draw(st.integers(size, size + 20))
    r0, c0 = data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, cols - 1))
    r1, c1 = data.draw(st.integers(r0 + 1, rows)), data.draw(st.integers(c0 + 1, cols))
    mask = np.zeros((rows, cols), bool)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    mask[r0:r1, c0:c1] = rng.random((r1 - r0, c1 - c0)) < rng.random()
    mask[r0, c0] = True
    bbox = mask_bbox(mask)
    row, col = data.draw(st.integers(0, rows - size)), data.draw(st.integers(0, cols - size))
    expected = downscale_mask(crop(mask, row, col, size), factor)
    np.testing.assert_array_equal(downscale_mask_window(mask, row, col, size, factor, bbox), expected)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), count=st.integers(1, 6), min_mean=st.floats(0, 0.9))
def test_negative_windows_match_brute_force_choice(seed, count, min_mean):
    """The planner draws corners in order and keeps a window iff it is lesion-free and bright enough."""
    from mammoseg.patches.geometry import plan_negative_windows, roi_rng

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 4096, size=(48, 40)).astype(np.uint16)
    lesions = rng.random(image.shape) < 0.002
    size = 16
    got = plan_negative_windows(lesions, image, size, count, min_mean, roi_rng(seed, "x"), max_tries=50)
    draws, expected = roi_rng(seed, "x"), []
    for _ in range(50):
        r, c = int(draws.integers(0, 48 - size + 1)), int(draws.integers(0, 40 - size + 1))
        window = image[r:r + size, c:c + size].astype(np.float64)
        if not lesions[r:r + size, c:c + size].any() and window.mean() >= min_mean * image.max():
            expected.append((r, c))
            if len(expected) == count:
                break
    assert got == expected
