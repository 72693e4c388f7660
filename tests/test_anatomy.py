"""Breast region and pectoral muscle (mammoseg.inference.anatomy): phantoms with known regions, and mias-dev."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from mammoseg.inference import anatomy
from mammoseg.inference.anatomy import apply_anatomy, breast_mask, chest_wall_side, pectoral_mask
from mammoseg.inference.sliding import BreastSide, breast_side

ROWS, COLS = 512, 384  # divisible by the working factor (2), so mirroring the image mirrors the masks exactly
PECTORAL_TOP, PECTORAL_DOWN = 120, 220  # the muscle: triangle (0,0)-(0,120)-(220,0)
MASS_CENTRE, MASS_RADIUS = (330, 120), 25


def _regions() -> dict[str, np.ndarray]:
    """Known regions of the phantom (chest wall on the left), bool (ROWS, COLS) each."""
    r, c = np.indices((ROWS, COLS))
    breast = ((r - ROWS / 2) / 230.0) ** 2 + (c / 300.0) ** 2 <= 1.0  # a half ellipse on the left edge
    pectoral = (c < PECTORAL_TOP * (1 - r / PECTORAL_DOWN)) & breast
    mass = (r - MASS_CENTRE[0]) ** 2 + (c - MASS_CENTRE[1]) ** 2 <= MASS_RADIUS**2
    label = (r >= 20) & (r < 60) & (c >= 330) & (c < 370)  # a film label in the background
    return {"breast": breast, "pectoral": pectoral, "mass": mass, "label": label}


def phantom(seed: int = 0) -> np.ndarray:
    """uint16 (ROWS, COLS): background ~300, breast ~20000 with texture, muscle ~34000, a mass ~32000, a label
    at 60000 in the background."""
    rng = np.random.default_rng(seed)
    regions = _regions()
    image = 300 + rng.normal(0, 60, (ROWS, COLS))
    texture = 2500 * np.sin(np.indices((ROWS, COLS))[0] / 9.0) * np.cos(np.indices((ROWS, COLS))[1] / 13.0)
    image[regions["breast"]] = (20000 + texture + rng.normal(0, 800, (ROWS, COLS)))[regions["breast"]]
    image[regions["pectoral"]] = 34000 + rng.normal(0, 800, int(regions["pectoral"].sum()))
    image[regions["mass"]] = 32000
    image[regions["label"]] = 60000
    return np.clip(image, 0, 65535).astype(np.uint16)


# --------------------------------------------------------------------------------------------------------------
# breast region
# --------------------------------------------------------------------------------------------------------------
def test_breast_mask_covers_the_breast_and_drops_background_and_label():
    regions, mask = _regions(), breast_mask(phantom())
    assert mask.dtype == bool and mask.shape == (ROWS, COLS)
    assert mask[regions["breast"]].mean() >= 0.97
    assert mask[regions["mass"]].all()
    assert not mask[regions["label"]].any()
    distance_outside = distance_transform_edt(~regions["breast"])
    assert distance_outside[mask].max() <= 4  # two working pixels (of 2 x 2 image pixels) past the skin at most


def test_a_label_that_noise_joins_to_the_breast_is_cut_off():
    image = phantom()
    r, c = np.indices(image.shape)
    image[(r >= 250) & (r < 254) & (c >= 290) & (c < 330)] = 9000  # a faint thin bridge from the skin to a label
    image[(r >= 230) & (r < 280) & (c >= 330) & (c < 370)] = 60000
    mask = breast_mask(image)
    assert not mask[230:280, 335:370].any()
    assert mask[_regions()["breast"]].mean() >= 0.97


def test_a_flat_image_is_all_breast():
    assert breast_mask(np.full((64, 48), 7, dtype=np.uint16)).all()


def test_working_image_factor_and_shape():
    small, factor = anatomy.working_image(np.ones((1030, 700), dtype=np.uint16))
    assert factor == 5 and small.shape == (206, 140) and small.dtype == np.float32


# --------------------------------------------------------------------------------------------------------------
# chest-wall side
# --------------------------------------------------------------------------------------------------------------
def test_chest_wall_side_is_not_fooled_by_a_film_edge_band():
    image = phantom()
    image[:, -12:] = 65535  # a bright film edge on the side away from the breast
    assert breast_side(image) == BreastSide.RIGHT  # the strip rule is fooled
    assert chest_wall_side(breast_mask(image)) == BreastSide.LEFT
    assert chest_wall_side(breast_mask(np.fliplr(image))) == BreastSide.RIGHT


def test_chest_wall_side_of_an_empty_mask_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        chest_wall_side(np.zeros((4, 4), dtype=bool))


# --------------------------------------------------------------------------------------------------------------
# pectoral muscle
# --------------------------------------------------------------------------------------------------------------
def test_pectoral_mask_lies_in_the_muscle_corner_and_spares_the_mass():
    regions, muscle = _regions(), pectoral_mask(phantom(), BreastSide.LEFT)
    assert muscle.dtype == bool and muscle.shape == (ROWS, COLS)
    assert muscle[regions["pectoral"]].mean() >= 0.4  # the fitted triangle, shrunk by the margin
    assert muscle[~regions["pectoral"]].sum() <= 0.05 * muscle.sum()  # almost nothing outside the muscle
    assert not muscle[regions["mass"]].any()
    rows, cols = np.nonzero(muscle)
    assert rows.max() < ROWS / 2 and cols.max() < COLS / 2  # top, chest-wall side


def test_pectoral_mask_mirrors_with_the_image():
    image = phantom()
    left = pectoral_mask(image, "LEFT")
    assert left.any()
    np.testing.assert_array_equal(pectoral_mask(np.fliplr(image), "RIGHT"), np.fliplr(left))


def test_no_muscle_no_mask():
    image = phantom()
    regions = _regions()
    image[regions["pectoral"]] = 20000  # the muscle painted over with plain breast
    assert not pectoral_mask(image, BreastSide.LEFT).any()


def _bright_corner(top: int, down: int) -> tuple[np.ndarray, np.ndarray]:
    """The phantom with its muscle replaced by a bright corner (0,0)-(0,top)-(down,0): (image, corner mask)."""
    image = phantom()
    image[_regions()["pectoral"]] = 20000
    r, c = np.indices(image.shape)
    corner = (c < top * (1 - r / down)) & _regions()["breast"]
    image[corner] = 34000
    return image, corner


def test_a_large_muscle_is_found_within_its_share_of_the_breast():
    image, corner = _bright_corner(220, 380)  # 30 % of the breast
    muscle, breast = pectoral_mask(image, BreastSide.LEFT), breast_mask(image)
    assert corner.sum() / breast.sum() == pytest.approx(0.30, abs=0.01)
    assert muscle.sum() >= 0.5 * corner.sum()
    assert muscle.sum() <= (1 - anatomy.PECTORAL_MARGIN) ** 2 * anatomy.PECTORAL_MAX_FRACTION * breast.sum()


def test_a_bright_corner_over_half_the_breast_is_not_a_muscle():
    image, corner = _bright_corner(300, 500)
    assert corner.sum() / breast_mask(image).sum() > 0.5
    assert not pectoral_mask(image, BreastSide.LEFT).any()


# --------------------------------------------------------------------------------------------------------------
# the probability map
# --------------------------------------------------------------------------------------------------------------
def test_apply_anatomy_off_returns_the_map_unchanged():
    prob = np.full((ROWS, COLS), 200, dtype=np.uint8)
    assert apply_anatomy(prob, phantom(), None, "MLO", breast_mask=False, exclude_pectoral=False) is prob
    assert apply_anatomy(prob, phantom(), None, "CC", breast_mask=False, exclude_pectoral=True) is prob


def test_apply_anatomy_zeroes_outside_the_breast_and_on_the_muscle_of_mlo_only():
    image, prob = phantom(), np.full((ROWS, COLS), 200, dtype=np.uint8)
    breast, muscle = breast_mask(image), pectoral_mask(image, BreastSide.LEFT)
    only_breast = apply_anatomy(prob, image, None, "MLO", breast_mask=True, exclude_pectoral=False)
    np.testing.assert_array_equal(only_breast, np.where(breast, prob, 0))
    cc = apply_anatomy(prob, image, None, "CC", breast_mask=True, exclude_pectoral=True)
    np.testing.assert_array_equal(cc, only_breast)
    mlo = apply_anatomy(prob, image, None, " mlo ", breast_mask=True, exclude_pectoral=True)
    np.testing.assert_array_equal(mlo, np.where(breast & ~muscle, prob, 0))
    assert mlo.dtype == np.uint8 and prob.min() == 200  # the input is not modified
    pectoral_only = apply_anatomy(prob, image, "LEFT", "MLO", breast_mask=False, exclude_pectoral=True)
    np.testing.assert_array_equal(pectoral_only, np.where(muscle, 0, prob))


def test_apply_anatomy_checks_its_inputs():
    image = phantom()
    with pytest.raises(TypeError, match="uint8"):
        apply_anatomy(np.zeros((ROWS, COLS), np.float32), image, None, "MLO", breast_mask=True,
                      exclude_pectoral=False)
    with pytest.raises(ValueError, match="differs"):
        apply_anatomy(np.zeros((ROWS, 10), np.uint8), image, None, "MLO", breast_mask=True, exclude_pectoral=False)


# --------------------------------------------------------------------------------------------------------------
# real mammograms: the 38 mias-dev mass images (masses never removed)
# --------------------------------------------------------------------------------------------------------------
# beside the repository, as the rest of the suite and `make bench-real` read it
MIAS_DEV = Path(os.environ.get("MAMMOSEG_MIAS_DEV", Path(__file__).resolve().parents[2] / "shared/data/mias-dev"))


def _mias_images():
    import pandas as pd

    from mammoseg.io.dicom import read_mammogram

    if not (MIAS_DEV / "truth.csv").is_file():
        pytest.skip(f"mias-dev not found at {MIAS_DEV} (set MAMMOSEG_MIAS_DEV)")
    truth = pd.read_csv(MIAS_DEV / "truth.csv")
    for folder, rows in truth.groupby("full_folder", sort=True):
        image = read_mammogram(MIAS_DEV / "CBIS-DDSM" / rows["full_file"].iloc[0])
        yield folder, image, list(zip(rows["center_row"], rows["center_col"], rows["radius"]))


@pytest.mark.realdata
def test_mias_dev_masses_are_never_removed():
    """Every mass circle's tissue pixels (>= 5 % of the image maximum, i.e. not background) survive the breast
    mask and the pectoral exclusion; the muscle, where found, has its centroid in the top half of the image and the
    chest-wall half of the breast."""
    seen = 0
    for folder, image, masses in _mias_images():
        keep = apply_anatomy(np.full(image.shape, 255, np.uint8), image, None, "MLO", breast_mask=True,
                             exclude_pectoral=True) > 0
        r, c = np.indices(image.shape)
        for row, col, radius in masses:
            tissue = ((r - row) ** 2 + (c - col) ** 2 <= radius**2) & (image >= 0.05 * image.max())
            assert keep[tissue].mean() >= 0.99, (folder, row, col, keep[tissue].mean())
            assert keep[int(row), int(col)], folder
        laterality = "LEFT" if "_LEFT_" in folder else "RIGHT"  # mias-dev shows the chest wall on that side
        breast = breast_mask(image)
        wall = chest_wall_side(breast)
        assert wall.value == laterality, folder
        muscle = pectoral_mask(image, wall)
        if muscle.any():
            rows, cols = np.nonzero(muscle)
            breast_cols = np.flatnonzero(breast.any(axis=0))
            middle = (breast_cols[0] + breast_cols[-1]) / 2
            assert rows.mean() < image.shape[0] / 2, folder
            assert (cols.mean() < middle) if wall == BreastSide.LEFT else (cols.mean() > middle), folder
        seen += 1
    assert seen == 38
