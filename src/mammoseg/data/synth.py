"""A synthetic, learnable CBIS-DDSM look-alike: DICOM trees in every real layout, official-format CSVs, truth.

:func:`generate_dataset` writes the built-in demo: synthetic mammograms (breast silhouette on a black background,
tissue texture, 1–3 irregular masses), full-size binary masks and cropped ROIs, the real CBIS-DDSM quirks, case
CSVs in the official format and ``truth.json`` (every file written and its expected fate in restructuring). Trees
built from the real case CSVs, for tests and benchmarks, are in :mod:`mammoseg.testing.trees`.

Layouts (``../shared/data/cbis-ddsm/LAYOUTS.md`` section 4): ``doi`` (A), ``nbia-old`` (B), ``nbia`` (C),
``nbia-no-na`` (C without ``NA``), ``kaggle`` (D, 8-bit JPEGs plus ``dicom_info.csv`` and ``meta.csv``).
The CSVs always hold DOI paths, whatever the layout on disk, as the real ones do.

Everything is seeded: UIDs are hashes of the seed and the case, dates are fixed, and each image has its own
random generator, so the same arguments give byte-identical files and memory stays flat at any scale.

Never imports TensorFlow.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from scipy import ndimage

from mammoseg.io.dicomwrite import DicomHeader, build_dataset, make_uid, write_dicom

__all__ = [
    "LAYOUTS",
    "FileRef",
    "TreeWriter",
    "cropped_roi_box",
    "publish_with_truth",
    "truth_summary",
    "layout_path",
    "csv_path",
    "generate_dataset",
    "run_synth",
    "render_mammogram",
    "write_case_csv",
]

LAYOUTS = ("doi", "nbia-old", "nbia", "nbia-no-na", "kaggle")
SPLIT_NAMES = {"train": "Training", "test": "Test"}
COLLECTION_NAMES = {"mass": "Mass", "calc": "Calc"}
FULL_LABEL, MASK_LABEL, CROP_LABEL = "full mammogram images", "ROI mask images", "cropped images"

#: StudyDate per (abnormality, split, kind), as observed in real downloads (LAYOUTS.md section 4).
STUDY_DATES = {
    ("mass", "train", "full"): "20160720",
    ("mass", "train", "roi"): "20160721",
    ("mass", "test", "full"): "20161004",
    ("mass", "test", "roi"): "20161004",
    ("mass", "test", "roi-separate"): "20170927",
    ("calc", "train", "full"): "20160807",
    ("calc", "train", "roi"): "20170906",
    ("calc", "test", "full"): "20170829",
    ("calc", "test", "roi"): "20170829",
}

MASS_COLUMNS = [
    "patient_id", "breast_density", "left or right breast", "image view", "abnormality id", "abnormality type",
    "mass shape", "mass margins", "assessment", "pathology", "subtlety", "image file path",
    "cropped image file path", "ROI mask file path",
]
CALC_COLUMNS = [
    "patient_id", "breast density", "left or right breast", "image view", "abnormality id", "abnormality type",
    "calc type", "calc distribution", "assessment", "pathology", "subtlety", "image file path",
    "cropped image file path", "ROI mask file path",
]
#: The field that carries a bare '\n' before its closing quote in the real CSVs (LAYOUTS.md quirk 1).
NEWLINE_FIELD = {"mass": "ROI mask file path", "calc": "cropped image file path"}

KAGGLE_DICOM_INFO_COLUMNS = [
    "file_path", "image_path", "AccessionNumber", "BitsAllocated", "BitsStored", "BodyPartExamined", "Columns",
    "ContentDate", "ContentTime", "ConversionType", "HighBit", "InstanceNumber", "LargestImagePixelValue",
    "Laterality", "Modality", "PatientBirthDate", "PatientID", "PatientName", "PatientOrientation", "PatientSex",
    "PhotometricInterpretation", "PixelRepresentation", "ReferringPhysicianName", "Rows", "SOPClassUID",
    "SOPInstanceUID", "SamplesPerPixel", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
    "SmallestImagePixelValue", "SpecificCharacterSet", "StudyDate", "StudyID", "StudyInstanceUID", "StudyTime",
]
KAGGLE_META_COLUMNS = [
    "SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesDescription", "BodyPartExamined", "SeriesNumber",
    "Collection", "Visibility", "ImageCount",
]

_SHAPES = ["IRREGULAR", "OVAL", "ROUND", "LOBULATED", "IRREGULAR-ARCHITECTURAL_DISTORTION"]
_MARGINS = ["SPICULATED", "CIRCUMSCRIBED", "ILL_DEFINED", "OBSCURED", "MICROLOBULATED"]
_PATHOLOGIES = ["MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"]
_CALC_TYPES = ["PLEOMORPHIC", "AMORPHOUS", "PUNCTATE", "LUCENT_CENTER", "FINE_LINEAR_BRANCHING"]
_CALC_DISTRIBUTIONS = ["CLUSTERED", "SEGMENTAL", "LINEAR", "REGIONAL", "DIFFUSELY_SCATTERED"]


# --------------------------------------------------------------------------------------------------------------
# Layout paths
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileRef:
    """Where one DICOM file sits, independent of the layout.

    Attributes
    ----------
    top : case folder, e.g. ``Mass-Training_P_00001_LEFT_CC_1``
    study_uid, series_uid : UIDs of its study and series
    folder_label : the series label NBIA puts in the folder name (may differ from the file's own
        SeriesDescription: a two-file ROI series can be labelled 'cropped images')
    number : 0-based file number in the series (``00000N.dcm``; ``1-<N+1>.dcm`` in layout C)
    study_date : ``YYYYMMDD``
    kaggle_number : the ``NNN`` of ``1-NNN.jpg`` in the Kaggle copy
    """

    top: str
    study_uid: str
    series_uid: str
    folder_label: str
    number: int
    study_date: str
    kaggle_number: int = 1


def _last5(uid: str) -> str:
    return uid[-5:]


def _mmddyyyy(date: str) -> str:
    return f"{date[4:6]}-{date[6:8]}-{date[0:4]}"


def layout_path(layout: str, ref: FileRef) -> str:
    """The path of a file relative to the dataset root, in ``layout`` (LAYOUTS.md section 4).

    ``doi``:        ``CBIS-DDSM/<top>/<StudyUID>/<SeriesUID>/00000N.dcm``
    ``nbia-old``:   ``CBIS-DDSM/<top>/<MM-DD-YYYY>-DDSM-<last5 study>/1-<label>-<last5 series>/00000N.dcm``
    ``nbia``:       ``CBIS-DDSM/<top>/<MM-DD-YYYY>-DDSM-NA-<last5 study>/1.000000-<label>-<last5 series>/1-<N+1>.dcm``
    ``nbia-no-na``: as ``nbia`` without ``NA-``
    ``kaggle``:     ``CBIS-DDSM/jpeg/<SeriesUID>/1-<kaggle_number>.jpg``
    """
    date = _mmddyyyy(ref.study_date)
    if layout == "doi":
        return f"CBIS-DDSM/{ref.top}/{ref.study_uid}/{ref.series_uid}/{ref.number:06d}.dcm"
    if layout == "nbia-old":
        return (f"CBIS-DDSM/{ref.top}/{date}-DDSM-{_last5(ref.study_uid)}/"
                f"1-{ref.folder_label}-{_last5(ref.series_uid)}/{ref.number:06d}.dcm")
    if layout in ("nbia", "nbia-no-na"):
        na = "NA-" if layout == "nbia" else ""
        return (f"CBIS-DDSM/{ref.top}/{date}-DDSM-{na}{_last5(ref.study_uid)}/"
                f"1.000000-{ref.folder_label}-{_last5(ref.series_uid)}/1-{ref.number + 1}.dcm")
    if layout == "kaggle":
        return f"CBIS-DDSM/jpeg/{ref.series_uid}/1-{ref.kaggle_number}.jpg"
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def csv_path(top: str, study_uid: str, series_uid: str, number: int) -> str:
    """The DOI-style path the official CSVs use (no ``CBIS-DDSM/`` prefix)."""
    return f"{top}/{study_uid}/{series_uid}/{number:06d}.dcm"


# --------------------------------------------------------------------------------------------------------------
# Plans: every decision except pixels, made up front from the seed
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RoiPlan:
    """One abnormality: its files (crop, mask), numbering, quirks and CSV attributes.

    ``crop_number``/``mask_number`` are the numbers on disk; ``csv_crop_number``/``csv_mask_number`` the numbers
    the CSV states (they disagree for the ``swapped_numbering`` quirk, as for real Mass-Training_P_00044_RIGHT_CC_1).
    """

    abnormality_id: int
    roi_id: str
    top: str
    crop_study: str
    crop_series: str
    mask_study: str
    mask_series: str
    crop_number: int
    mask_number: int
    csv_crop_number: int
    csv_mask_number: int
    date: str
    separate: bool = False
    mislabelled: bool = False
    size_mismatch: bool = False
    quirks: list[str] = field(default_factory=list)
    attributes: dict = field(default_factory=dict)
    diameter_fraction: float = 0.08
    contrast: float = 0.25


@dataclass
class ImagePlan:
    """One full mammogram and its ROIs."""

    split: str
    index: int
    patient_id: str
    side: str
    view: str
    image_id: str
    top: str
    study_uid: str
    series_uid: str
    date: str
    breast_density: int
    breast_edge: str
    rois: list[RoiPlan] = field(default_factory=list)
    quirks: list[str] = field(default_factory=list)


def _collection_top(abnormality: str, split: str, patient_id: str, side: str, view: str) -> str:
    return f"{COLLECTION_NAMES[abnormality]}-{SPLIT_NAMES[split]}_{patient_id}_{side}_{view}"


def _roi_plan(seed: int, abnormality: str, image: ImagePlan, abnormality_id: int, *, separate: bool,
              swapped: bool, mislabelled: bool, size_mismatch: bool, rng: np.random.Generator) -> RoiPlan:
    """Decide one ROI's UIDs, file numbers and CSV attributes."""
    top = f"{image.top}_{abnormality_id}"
    crop_study = make_uid(seed, "roi-study", top, "crop" if separate else "")
    crop_series = make_uid(seed, "roi-series", top, "crop" if separate else "")
    mask_study = make_uid(seed, "roi-study", top, "mask") if separate else crop_study
    mask_series = make_uid(seed, "roi-series", top, "mask") if separate else crop_series
    # Normal numbering: mass crop 000000 / mask 000001; calc the reverse (LAYOUTS.md quirk 2).
    csv_mask_first = abnormality == "calc"
    if separate:
        crop_number = mask_number = csv_crop_number = csv_mask_number = 0
    else:
        csv_crop_number, csv_mask_number = (1, 0) if csv_mask_first else (0, 1)
        mask_first_on_disk = csv_mask_first != swapped
        crop_number, mask_number = (1, 0) if mask_first_on_disk else (0, 1)
    date_key = (abnormality, image.split, "roi-separate" if separate else "roi")
    date = STUDY_DATES.get(date_key, STUDY_DATES[(abnormality, image.split, "roi")])
    quirks = [name for name, on in (("separate_series", separate), ("swapped_numbering", swapped),
                                    ("mislabelled_folder", mislabelled), ("mask_size_mismatch", size_mismatch)) if on]
    diameter_fraction = float(rng.uniform(0.04, 0.12))
    contrast = float(rng.uniform(0.10, 0.32))
    subtlety = int(np.clip(1 + (contrast - 0.10) / 0.22 * 4.999, 1, 5))
    if abnormality == "mass":
        attributes = {
            "mass shape": str(rng.choice(_SHAPES)),
            "mass margins": str(rng.choice(_MARGINS)),
        }
    else:
        attributes = {
            "calc type": str(rng.choice(_CALC_TYPES)),
            "calc distribution": str(rng.choice(_CALC_DISTRIBUTIONS)),
        }
    pathology = str(rng.choice(_PATHOLOGIES, p=[0.45, 0.45, 0.10]))
    attributes.update({
        "assessment": int(rng.integers(3, 6)) if pathology == "MALIGNANT" else int(rng.integers(0, 5)),
        "pathology": pathology,
        "subtlety": subtlety,
    })
    return RoiPlan(
        abnormality_id=abnormality_id, roi_id=f"{image.image_id}_{abnormality_id}", top=top,
        crop_study=crop_study, crop_series=crop_series, mask_study=mask_study, mask_series=mask_series,
        crop_number=crop_number, mask_number=mask_number, csv_crop_number=csv_crop_number,
        csv_mask_number=csv_mask_number, date=date, separate=separate, mislabelled=mislabelled,
        size_mismatch=size_mismatch, quirks=quirks, attributes=attributes,
        diameter_fraction=diameter_fraction, contrast=contrast,
    )


def plan_dataset(*, n_train: int, n_test: int, seed: int, quirks: bool, abnormality: str) -> list[ImagePlan]:
    """Decide every image, ROI, UID and quirk of the demo dataset (no pixels).

    Patients have two views (CC then MLO) of one side; train and test patients are disjoint. With
    ``quirks``: ROI k (counted over the dataset) has swapped numbering on disk when k % 5 == 2 and its crop
    and mask in separate studies when k % 7 == 3; two-file ROI series are labelled 'cropped images' in
    NBIA layouts when k % 4 == 1; mass margins are the literal 'NA' when k % 6 == 0; train image 1 has
    ids [1, 3] and test image 1 has ids [2] (id gaps); the last ROI of the first train image with two or more
    ROIs gets a mask of the wrong size.
    """
    if abnormality not in COLLECTION_NAMES:
        raise ValueError(f"abnormality must be 'mass' or 'calc', got {abnormality!r}")
    rng = np.random.default_rng([seed, 1])
    plans: list[ImagePlan] = []
    roi_counter = 0
    mismatch_done = not quirks
    patient_offset = 0
    for split, n_images in (("train", n_train), ("test", n_test)):
        n_patients = (n_images + 1) // 2
        sides = rng.choice(["LEFT", "RIGHT"], size=n_patients)
        for index in range(n_images):
            patient_number = patient_offset + index // 2 + 1
            patient_id = f"P_{patient_number:05d}"
            side = str(sides[index // 2])
            view = "CC" if index % 2 == 0 else "MLO"
            top = _collection_top(abnormality, split, patient_id, side, view)
            n_masses = int(rng.choice([1, 2, 3], p=[0.55, 0.30, 0.15]))
            ids = list(range(1, n_masses + 1))
            image_quirks: list[str] = []
            if quirks and index == min(1, n_images - 1):
                ids = [1, 3] if split == "train" else [2]
                image_quirks.append("abnormality_id_gap")
            image = ImagePlan(
                split=split, index=index, patient_id=patient_id, side=side, view=view,
                image_id=f"{patient_id}_{side}_{view}", top=top,
                study_uid=make_uid(seed, "study", top), series_uid=make_uid(seed, "series", top),
                date=STUDY_DATES[(abnormality, split, "full")], breast_density=int(rng.integers(1, 5)),
                breast_edge=str(rng.choice(["left", "right"])), quirks=image_quirks,
            )
            for position, abnormality_id in enumerate(ids):
                separate = quirks and roi_counter % 7 == 3
                swapped = quirks and not separate and roi_counter % 5 == 2
                mislabelled = quirks and not separate and roi_counter % 4 == 1
                size_mismatch = (not mismatch_done and split == "train" and len(ids) >= 2
                                 and position == len(ids) - 1)
                mismatch_done = mismatch_done or size_mismatch
                roi = _roi_plan(seed, abnormality, image, abnormality_id, separate=separate, swapped=swapped,
                                mislabelled=mislabelled, size_mismatch=size_mismatch, rng=rng)
                if quirks and abnormality == "mass" and roi_counter % 6 == 0:
                    roi.attributes["mass margins"] = "NA"  # the literal string, as in the real CSVs
                if roi.attributes.get("mass margins") == "NA" or roi.attributes.get("mass shape") == "NA":
                    roi.quirks.append("literal_na")
                image.rois.append(roi)
                roi_counter += 1
            plans.append(image)
        patient_offset += n_patients
    return plans


# --------------------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float],
                  work_factor: int) -> np.ndarray:
    """Gaussian-filtered white noise, zero mean and unit standard deviation, float32 of ``shape``.

    Filtering runs on a grid ``work_factor`` times coarser and is upsampled bilinearly, so the cost stays
    small at CBIS size (sigma in full-resolution pixels, per axis).
    """
    rows, cols = shape
    small = (max(2, -(-rows // work_factor)), max(2, -(-cols // work_factor)))
    noise = rng.standard_normal(small, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, (sigma[0] / work_factor, sigma[1] / work_factor), mode="reflect")
    noise -= noise.mean()
    noise /= noise.std() + 1e-12
    return _upsample(noise, shape)


def _upsample(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float32 array to exactly ``shape`` (rows, cols)."""
    if values.shape == tuple(shape):
        return values.astype(np.float32, copy=False)
    rows, cols = shape
    big = ndimage.zoom(values, (rows / values.shape[0], cols / values.shape[1]), order=1, mode="nearest",
                       grid_mode=True)
    out = np.zeros(shape, dtype=np.float32)
    out[: min(rows, big.shape[0]), : min(cols, big.shape[1])] = big[:rows, :cols]
    return out


def _breast_extent(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Per-row breast depth from the chest-wall edge, float32 (rows,), in pixels (at most 0.75 * cols)."""
    y = np.arange(rows, dtype=np.float32)
    centre = rows * rng.uniform(0.46, 0.54)
    half_height = rows * rng.uniform(0.38, 0.46)
    depth = cols * rng.uniform(0.58, 0.70)
    t = np.abs(y - centre) / half_height
    base = np.clip(1.0 - t ** rng.uniform(1.8, 2.4), 0.0, None) ** 0.6
    wobble = 1.0 + 0.03 * _smooth_noise(rng, (rows, 1), (rows * 0.08, 1.0), 1)[:, 0]
    return np.minimum(depth * base * wobble, 0.75 * cols).astype(np.float32)


def _mass_blob(rng: np.random.Generator, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """An irregular mass in a square box of side ``2 * ceil(1.45 * radius) + 1`` pixels.

    The outline is an ellipse (aspect 0.65–1, random angle) whose polar radius is modulated by random
    harmonics 2..6 (lobulated, irregular), kept within [0.6, 1.4] x ``radius``.

    Returns
    -------
    mask : bool (h, w), the lesion
    profile : float32 (h, w), in [0, 1]: a soft dome (1 at the centre, blurred edge), 0 far outside
    """
    half = int(np.ceil(1.45 * radius))
    yy, xx = np.mgrid[-half: half + 1, -half: half + 1].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.65, 1.0)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = (-xx * np.sin(angle) + yy * np.cos(angle)) / aspect
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    modulation = np.ones_like(theta)
    for k in range(2, 7):
        modulation += rng.uniform(0.0, 0.16 / k ** 0.6) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r_theta = radius * aspect ** 0.5 * np.clip(modulation, 0.6, 1.4)
    mask = rho < r_theta
    dome = np.clip(1.0 - (rho / r_theta) ** 2, 0.0, None) ** 0.5
    profile = ndimage.gaussian_filter(dome.astype(np.float32), max(1.0, 0.08 * radius))
    return mask, profile / max(float(profile.max()), 1e-6)


@dataclass
class RenderedMass:
    """A mass placed in an image: its full-size mask lives only as bbox + local mask to keep memory flat."""

    top: int
    left: int
    mask: np.ndarray  # bool (h, w) local
    contrast: float

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(row0, col0, row1, col1) of the lesion pixels, end-exclusive."""
        rows_any = np.flatnonzero(self.mask.any(axis=1))
        cols_any = np.flatnonzero(self.mask.any(axis=0))
        return (self.top + int(rows_any[0]), self.left + int(cols_any[0]),
                self.top + int(rows_any[-1]) + 1, self.left + int(cols_any[-1]) + 1)

    def full_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """uint8 (rows, cols) in {0, 255}."""
        out = np.zeros(shape, dtype=np.uint8)
        h, w = self.mask.shape
        out[self.top: self.top + h, self.left: self.left + w][self.mask] = 255
        return out


def render_mammogram(rng: np.random.Generator, rows: int, cols: int, breast_edge: str,
                     masses: Iterable[tuple[float, float]], *, view: str = "CC",
                     bits_stored: int = 16) -> tuple[np.ndarray, np.ndarray, list[RenderedMass]]:
    """Draw one synthetic mammogram with its masses.

    Parameters
    ----------
    rng : the image's own generator (determinism per image)
    rows, cols : image size in pixels
    breast_edge : 'left' or 'right': the image edge the chest wall lies against
    masses : (diameter as a fraction of ``rows``, contrast as a fraction of the local tissue level) per mass
    view : 'MLO' adds a faint pectoral muscle in the upper chest-wall corner
    bits_stored : output range is [0, 2**bits_stored - 1]

    Returns
    -------
    image : uint16 (rows, cols), black background (< 3% of full scale), breast brighter
    breast : bool (rows, cols), the breast silhouette
    placed : the masses actually placed (a mass that does not fit anywhere is shrunk, then dropped)
    """
    work = max(1, min(rows, cols) // 160)
    extent = _breast_extent(rng, rows, cols)
    x = np.arange(cols, dtype=np.float32)
    if breast_edge == "right":
        x = x[::-1].copy()
    ratio = x[None, :] / np.maximum(extent[:, None], 1.0)  # 0 at chest wall, 1 at the skin line
    breast = ratio < 1.0
    thickness = np.clip(1.0 - ratio * ratio, 0.0, None) ** 0.35
    # Both texture fields are built on a coarse grid and upsampled once (the full-size zoom dominates the cost).
    fine = max(1, work // 2)
    coarse_shape = (-(-rows // fine), -(-cols // fine))
    low = _smooth_noise(rng, coarse_shape, (rows * 0.12 / fine, rows * 0.12 / fine), max(1, work // fine))
    fibres = _smooth_noise(rng, coarse_shape, (rows * 0.004 / fine, rows * 0.03 / fine), 1)
    texture = _upsample(0.10 * low + 0.05 * fibres, (rows, cols))
    tissue = (0.45 + 0.55 * thickness) * (1.0 + texture)
    del low, fibres, texture
    pectoral = np.zeros((rows, cols), dtype=bool)
    if view == "MLO":
        # The muscle is a triangle from the top of the chest wall; faint so it does not pass for a mass.
        yy = np.arange(rows, dtype=np.float32)[:, None]
        pectoral = breast & (x[None, :] < cols * 0.22 * (1.0 - yy / (rows * 0.40)))
        tissue[pectoral] *= 1.08
    tissue *= breast

    placed = _place_masses(rng, rows, breast & ~_dilate_box(pectoral, rows // 40), list(masses))
    for mass, profile in placed:
        h, w = profile.shape
        region = tissue[mass.top: mass.top + h, mass.left: mass.left + w]
        region += mass.contrast * profile * (0.45 + 0.55 * float(region[mass.mask].mean()))

    top_value = float(2**bits_stored - 1)
    scale = top_value * 0.62
    grain = rng.standard_normal((rows, cols), dtype=np.float32)
    image = tissue * scale + grain * (top_value * 0.004) + top_value * 0.01
    image = np.clip(image, 0, top_value).astype(np.uint16)
    return image, breast, [mass for mass, _ in placed]


def _dilate_box(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius < 1 or not mask.any():
        return mask
    return ndimage.maximum_filter(mask, size=2 * radius + 1)


def _place_masses(rng: np.random.Generator, rows: int, allowed: np.ndarray,
                  masses: list[tuple[float, float]]) -> list[tuple[RenderedMass, np.ndarray]]:
    """Place masses fully inside ``allowed`` without overlap (their boxes are apart by 10% of a diameter).

    A mass box may only lie where ``allowed`` holds over the whole box. Tries 200 positions, then shrinks the
    mass by 20% and tries again, up to 4 times; a mass that still does not fit is dropped.
    """
    # Integral image of the forbidden pixels: "box fully allowed" in O(1) per candidate position.
    forbidden = np.pad((~allowed).astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # < 2**31 pixels
    boxes: list[tuple[int, int, int, int]] = []
    placed: list[tuple[RenderedMass, np.ndarray]] = []
    for diameter_fraction, contrast in masses:
        radius = diameter_fraction * rows / 2
        for _attempt in range(5):
            mask, profile = _mass_blob(rng, radius)
            side = mask.shape[0]
            position = _free_position(rng, forbidden, side, boxes, gap=int(0.2 * radius) + 2)
            if position is not None:
                top, left = position
                boxes.append((top, left, top + side, left + side))
                placed.append((RenderedMass(top, left, mask, contrast), profile))
                break
            radius *= 0.8
    return placed


def _free_position(rng: np.random.Generator, forbidden_integral: np.ndarray, side: int,
                   boxes: list[tuple[int, int, int, int]], gap: int) -> tuple[int, int] | None:
    rows, cols = forbidden_integral.shape[0] - 1, forbidden_integral.shape[1] - 1
    if side >= rows or side >= cols:
        return None
    for _ in range(200):
        top = int(rng.integers(0, rows - side))
        left = int(rng.integers(0, cols - side))
        bottom, right = top + side, left + side
        bad = (forbidden_integral[bottom, right] - forbidden_integral[top, right]
               - forbidden_integral[bottom, left] + forbidden_integral[top, left])
        if bad:
            continue
        if any(top < b1 + gap and b0 < bottom + gap and left < c1 + gap and c0 < right + gap
               for b0, c0, b1, c1 in boxes):
            continue
        return top, left
    return None


def cropped_roi_box(bbox: tuple[int, int, int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The cropped-ROI box: lesion bounding box plus a margin of 10% of its side (at least 8 px), clipped."""
    r0, c0, r1, c1 = bbox
    margin = max(8, int(0.1 * max(r1 - r0, c1 - c0)))
    return (max(0, r0 - margin), max(0, c0 - margin), min(shape[0], r1 + margin), min(shape[1], c1 + margin))


def _mismatched_mask(mask: np.ndarray) -> np.ndarray:
    """The mask cut to a slightly different size (16 rows and 8 columns fewer): the size-mismatch quirk."""
    rows, cols = mask.shape
    return np.ascontiguousarray(mask[: max(1, rows - 16), : max(1, cols - 8)])


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------
def write_case_csv(path: str | Path, rows: list[dict], abnormality: str) -> Path:
    """Write an official-format case CSV: CRLF line endings and a bare ``\\n`` ending the quoted path field.

    The mass CSVs end 'ROI mask file path' with ``\\n``, the calc CSVs 'cropped image file path'
    (LAYOUTS.md quirk 1); the field is quoted because of it, as in the real files.
    """
    columns = MASS_COLUMNS if abnormality == "mass" else CALC_COLUMNS
    newline_field = NEWLINE_FIELD[abnormality]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        values = {**row, newline_field: str(row[newline_field]).rstrip("\n") + "\n"}
        writer.writerow([values.get(column, "") for column in columns])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        handle.write(buffer.getvalue())
    return path


def _write_rows_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _to_8bit(pixels: np.ndarray) -> np.ndarray:
    """Scale to 8 bits by the array maximum (how the Kaggle JPEG copy looks); masks stay 0/255."""
    top = float(pixels.max()) if pixels.size else 0.0
    if top <= 0:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round(pixels.astype(np.float32) * (255.0 / top)).astype(np.uint8)


class TreeWriter:
    """Writes files of one tree in one layout under a staging root and records what it wrote."""

    def __init__(self, root: Path, layout: str, *, rle: bool, bits_stored: int):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        self.root = root
        self.layout = layout
        self.rle = rle
        self.bits_stored = bits_stored
        self.kaggle_counter = 0
        self.dicom_info: list[dict] = []
        self.series_meta: dict[str, dict] = {}

    def write(self, pixels: np.ndarray, header: DicomHeader, ref: FileRef, *, collection: str) -> str:
        """Write one file; return its path relative to the dataset root."""
        self.kaggle_counter += 1
        ref = FileRef(ref.top, ref.study_uid, ref.series_uid, ref.folder_label, ref.number, ref.study_date,
                      self.kaggle_counter)
        relative = layout_path(self.layout, ref)
        bits = self.bits_stored if pixels.dtype == np.uint16 else None
        ds = build_dataset(pixels, header, bits_stored=bits)
        if self.layout == "kaggle":
            self._write_jpeg(self.root / relative, pixels)
            self._record_kaggle(ds, ref, relative, collection)
        else:
            write_dicom(ds, self.root / relative, rle=self.rle)
        return relative

    @staticmethod
    def _write_jpeg(path: Path, pixels: np.ndarray) -> None:
        from PIL import Image  # Pillow ships with matplotlib/scikit-image; only the Kaggle layout needs it

        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_to_8bit(pixels) if pixels.dtype != np.uint8 else pixels).save(path, quality=95)

    def _record_kaggle(self, ds, ref: FileRef, relative: str, collection: str) -> None:
        row = {name: getattr(ds, name, "") for name in KAGGLE_DICOM_INFO_COLUMNS[2:]}
        row["PatientName"] = str(ds.PatientName)
        row["file_path"] = f"CBIS-DDSM/dicom/{ref.series_uid}/1-{ref.kaggle_number}.dcm"
        row["image_path"] = relative
        self.dicom_info.append(row)
        meta = self.series_meta.setdefault(ref.series_uid, {
            "SeriesInstanceUID": ref.series_uid, "StudyInstanceUID": ref.study_uid, "Modality": "MG",
            "SeriesDescription": ref.folder_label, "BodyPartExamined": "BREAST", "SeriesNumber": 1,
            "Collection": "CBIS-DDSM", "Visibility": 1, "ImageCount": 0, "_collection": collection,
        })
        meta["ImageCount"] += 1

    def finish(self) -> None:
        """Write the Kaggle tables (``CBIS-DDSM/csv/dicom_info.csv`` and ``meta.csv``)."""
        if self.layout != "kaggle":
            return
        csv_dir = self.root / "CBIS-DDSM" / "csv"
        _write_rows_csv(csv_dir / "dicom_info.csv", KAGGLE_DICOM_INFO_COLUMNS, self.dicom_info)
        _write_rows_csv(csv_dir / "meta.csv", KAGGLE_META_COLUMNS, list(self.series_meta.values()))


def _publish(staging: Path, out_dir: Path, names: list[str]) -> None:
    """Move ``names`` from the staging folder into ``out_dir``, each in one rename (replacing an old copy).

    Readers see either the old or the complete new entry, never a half-written tree; the last name
    (``truth.json``) is the marker that the whole dataset is there.
    """
    for name in names:
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(staging / name, target)


# --------------------------------------------------------------------------------------------------------------
# The demo dataset
# --------------------------------------------------------------------------------------------------------------
def generate_dataset(out_dir: str | Path, *, n_train: int = 40, n_test: int = 12, rows: int = 1024,
                     cols: int = 640, seed: int = 0, quirks: bool = True, abnormality: str = "mass",
                     layout: str = "doi", rle: bool = True, bits_stored: int = 16) -> dict:
    """Write the synthetic CBIS-DDSM-like demo dataset.

    Parameters
    ----------
    out_dir : folder that receives ``CBIS-DDSM/`` (the tree in ``layout``), ``csv/`` (the official-format
        ``{abnormality}_case_description_{train,test}_set.csv``) and ``truth.json``; other content is left alone
    n_train, n_test : full images per split (two views per patient)
    rows, cols : full image size in pixels
    seed : everything (UIDs, pixels, quirks) derives from it; same arguments → byte-identical files
    quirks : inject the real quirks (swapped crop/mask numbering, separate-series ROIs, id gaps, one mask of
        the wrong size, mislabelled NBIA folders)
    abnormality : 'mass' or 'calc' (collection prefix, CSV columns and default numbering)
    layout : one of :data:`LAYOUTS`
    rle : RLE Lossless DICOMs as the real files (False: explicit VR little endian, uncompressed)
    bits_stored : 16 (as real CBIS-DDSM) or 12

    Returns
    -------
    dict : summary (counts of images, ROIs, files and quirks, paths written)
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if bits_stored not in (12, 16):
        raise ValueError(f"bits_stored must be 12 or 16, got {bits_stored}")
    if rows < 128 or cols < 128:
        raise ValueError(f"image size {rows}x{cols} too small; rows and cols must be at least 128 pixels")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = plan_dataset(n_train=n_train, n_test=n_test, seed=seed, quirks=quirks, abnormality=abnormality)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-synth-", dir=out_dir))
    try:
        writer = TreeWriter(staging, layout, rle=rle, bits_stored=bits_stored)
        truth_images, truth_rois, truth_files = [], [], []
        csv_rows: dict[str, list[dict]] = {"train": [], "test": []}
        for image in plans:
            image_rng = np.random.default_rng([seed, 2, 0 if image.split == "train" else 1, image.index])
            entry_image, entry_rois, entry_files, rows_csv = _write_image(
                writer, image, image_rng, rows=rows, cols=cols, abnormality=abnormality, bits_stored=bits_stored)
            truth_images.append(entry_image)
            truth_rois.extend(entry_rois)
            truth_files.extend(entry_files)
            csv_rows[image.split].extend(rows_csv)
        writer.finish()
        csv_files = []
        for split in ("train", "test"):
            name = f"{abnormality}_case_description_{split}_set.csv"
            write_case_csv(staging / "csv" / name, csv_rows[split], abnormality)
            csv_files.append(f"csv/{name}")
            if layout == "kaggle":  # the Kaggle copy ships the case CSVs beside dicom_info.csv
                shutil.copyfile(staging / "csv" / name, staging / "CBIS-DDSM" / "csv" / name)
        summary = truth_summary(truth_images, truth_rois, truth_files, layout=layout, abnormality=abnormality,
                           seed=seed, rows=rows, cols=cols, csv_files=csv_files)
        publish_with_truth(staging, out_dir, summary, truth_images, truth_rois, truth_files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary["out_dir"] = str(out_dir)
    return summary


def publish_with_truth(staging: Path, out_dir: Path, summary: dict, images: list, rois: list, files: list) -> None:
    """Write truth.json into the staging folder, then move the tree, the CSVs and truth.json into ``out_dir``."""
    truth = {"summary": summary, "images": images, "rois": rois, "files": files}
    (staging / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    _publish(staging, out_dir, ["CBIS-DDSM", "csv", "truth.json"])


def _write_image(writer: TreeWriter, image: ImagePlan, rng: np.random.Generator, *, rows: int, cols: int,
                 abnormality: str, bits_stored: int) -> tuple[dict, list[dict], list[dict], list[dict]]:
    """Render and write one full image, its masks and crops; return its truth entries and CSV rows."""
    pixels, _breast, placed = render_mammogram(
        rng, rows, cols, image.breast_edge, [(roi.diameter_fraction, roi.contrast) for roi in image.rois],
        view=image.view, bits_stored=bits_stored)
    if len(placed) < len(image.rois):  # only when a mass cannot fit anywhere, e.g. tiny images
        raise RuntimeError(f"{image.top}: could place only {len(placed)} of {len(image.rois)} masses "
                           f"in a {rows}x{cols} image; use a larger image or fewer masses")
    laterality = image.side[0]
    collection = f"{COLLECTION_NAMES[abnormality]}-{SPLIT_NAMES[image.split]}"
    full_ref = FileRef(image.top, image.study_uid, image.series_uid, FULL_LABEL, 0, image.date)
    full_header = DicomHeader(image.top, image.study_uid, image.series_uid,
                              make_uid(image.series_uid, "sop", 0), FULL_LABEL, image.date, laterality, image.view)
    full_path = writer.write(pixels, full_header, full_ref, collection=collection)
    full_csv = csv_path(image.top, image.study_uid, image.series_uid, 0)
    files = [{"path": full_path, "role": "image", "image_id": image.image_id, "roi_id": "", "fate": "kept",
              "reason": ""}]
    rois, csv_rows = [], []
    for roi, mass in zip(image.rois, placed):
        full_mask = mass.full_mask((rows, cols))
        mask_pixels = _mismatched_mask(full_mask) if roi.size_mismatch else full_mask
        r0, c0, r1, c1 = cropped_roi_box(mass.bbox, (rows, cols))
        crop_pixels = np.ascontiguousarray(pixels[r0:r1, c0:c1])
        # A two-file series carries one folder label in NBIA layouts: 'ROI mask images', or the wrong one.
        shared_label = CROP_LABEL if roi.mislabelled else MASK_LABEL
        mask_ref = FileRef(roi.top, roi.mask_study, roi.mask_series, MASK_LABEL if roi.separate else shared_label,
                           roi.mask_number, roi.date)
        crop_ref = FileRef(roi.top, roi.crop_study, roi.crop_series, CROP_LABEL if roi.separate else shared_label,
                           roi.crop_number, roi.date)
        outputs = {}
        for role, ref, data, label in (("mask", mask_ref, mask_pixels, MASK_LABEL),
                                       ("crop", crop_ref, crop_pixels, CROP_LABEL)):
            header = DicomHeader(roi.top, ref.study_uid, ref.series_uid, make_uid(ref.series_uid, "sop", ref.number),
                                 label, roi.date, laterality, image.view, instance_number=ref.number + 1)
            outputs[role] = writer.write(data, header, ref, collection=collection)
        fate, reason = ("skipped", "mask_size_mismatch") if roi.size_mismatch else ("kept", "")
        files.append({"path": outputs["mask"], "role": "mask", "image_id": image.image_id, "roi_id": roi.roi_id,
                      "fate": fate, "reason": reason})
        files.append({"path": outputs["crop"], "role": "crop", "image_id": image.image_id, "roi_id": roi.roi_id,
                      "fate": "crop", "reason": ""})
        csv_crop = csv_path(roi.top, roi.crop_study, roi.crop_series, roi.csv_crop_number)
        csv_mask = csv_path(roi.top, roi.mask_study, roi.mask_series, roi.csv_mask_number)
        rois.append({
            "roi_id": roi.roi_id, "image_id": image.image_id, "split": image.split,
            "abnormality_id": roi.abnormality_id, "top_folder": roi.top,
            "mask_path": outputs["mask"], "crop_path": outputs["crop"],
            "csv_mask_path": csv_mask, "csv_crop_path": csv_crop,
            "mask_study_uid": roi.mask_study, "mask_series_uid": roi.mask_series,
            "crop_study_uid": roi.crop_study, "crop_series_uid": roi.crop_series,
            "mask_rows": int(mask_pixels.shape[0]), "mask_cols": int(mask_pixels.shape[1]),
            "crop_rows": int(crop_pixels.shape[0]), "crop_cols": int(crop_pixels.shape[1]),
            "bbox": list(mass.bbox), "crop_box": [r0, c0, r1, c1], "area_px": int(mass.mask.sum()),
            "contrast": round(roi.contrast, 4), "faint": roi.contrast < 0.16,
            "quirks": list(roi.quirks), "fate": fate, "reason": reason, **roi.attributes,
        })
        csv_rows.append(_csv_row(image, roi, abnormality, full_csv, csv_crop, csv_mask))
    entry = {
        "image_id": image.image_id, "split": image.split, "patient_id": image.patient_id, "side": image.side,
        "view": image.view, "top_folder": image.top, "path": full_path, "csv_path": full_csv,
        "study_uid": image.study_uid, "series_uid": image.series_uid, "rows": rows, "cols": cols,
        "breast_edge": image.breast_edge, "abnormality_ids": [roi.abnormality_id for roi in image.rois],
        "quirks": list(image.quirks), "fate": "kept", "reason": "",
    }
    return entry, rois, files, csv_rows


def _csv_row(image: ImagePlan, roi: RoiPlan, abnormality: str, full_csv: str, crop_csv: str,
             mask_csv: str) -> dict:
    density_column = "breast_density" if abnormality == "mass" else "breast density"
    return {
        "patient_id": image.patient_id, density_column: image.breast_density,
        "left or right breast": image.side, "image view": image.view, "abnormality id": roi.abnormality_id,
        "abnormality type": "mass" if abnormality == "mass" else "calcification",
        **roi.attributes, "image file path": full_csv, "cropped image file path": crop_csv,
        "ROI mask file path": mask_csv,
    }


def truth_summary(images: list[dict], rois: list[dict], files: list[dict], **extra) -> dict:
    """The ``summary`` of a tree's ``truth.json``: counts of what was written and of each quirk, plus ``extra``."""
    quirk_counts: dict[str, int] = {}
    for item in images + rois:
        for quirk in item["quirks"]:
            quirk_counts[quirk] = quirk_counts.get(quirk, 0) + 1
    return {
        **extra,
        "n_images": len(images),
        "n_images_by_split": {s: sum(i["split"] == s for i in images) for s in ("train", "test")},
        "n_rois": len(rois),
        "n_rois_kept": sum(r["fate"] == "kept" for r in rois),
        "n_rois_skipped": sum(r["fate"] == "skipped" for r in rois),
        "n_files": len(files),
        "quirks": dict(sorted(quirk_counts.items())),
    }


# --------------------------------------------------------------------------------------------------------------
# Stage entry
# --------------------------------------------------------------------------------------------------------------
def run_synth(config: dict, out_dir: str | Path) -> dict:
    """The ``synth`` stage: generate the demo dataset from a validated config.

    Parameters
    ----------
    config : the full validated config; reads ``synth`` (n_train, n_test, rows, cols, seed, quirks) and
        ``data`` (abnormality; layout, where ``auto`` means ``doi``, the layout of the CSV paths)
    out_dir : e.g. ``results/synth``

    Returns
    -------
    dict : the summary of :func:`generate_dataset`
    """
    synth = dict(config.get("synth", {}))
    data = dict(config.get("data", {}))
    layout = data.get("layout", "auto")
    layout = "doi" if layout in ("auto", None, "") else layout
    summary = generate_dataset(
        out_dir,
        n_train=int(synth.get("n_train", 40)), n_test=int(synth.get("n_test", 12)),
        rows=int(synth.get("rows", 1024)), cols=int(synth.get("cols", 640)), seed=int(synth.get("seed", 0)),
        quirks=bool(synth.get("quirks", True)), abnormality=data.get("abnormality", "mass"), layout=layout,
    )
    print(f"synth: {summary['n_images']} images ({summary['n_images_by_split']['train']} train, "
          f"{summary['n_images_by_split']['test']} test), {summary['n_rois']} ROIs "
          f"({summary['n_rois_skipped']} to be skipped), layout {layout}, quirks {summary['quirks']} -> {out_dir}")
    return summary
