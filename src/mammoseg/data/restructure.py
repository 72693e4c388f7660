"""Pair full mammograms with their ROI masks, for one collection, and account for every file.

One call of :func:`restructure_collection` handles one collection (``abnormality`` x ``split``, e.g. Mass-Training)
of a download in any layout (:mod:`mammoseg.data.layouts`) and writes, per ``docs/architecture.md``::

    out_dir/images/{image_id}.dcm     one link (or copy) per kept full image   (.jpg/.png in the Kaggle layout)
    out_dir/masks/{roi_id}.dcm        one link (or copy) per kept ROI mask
    out_dir/manifest.csv              one row per kept ROI (columns: MANIFEST_COLUMNS)
    out_dir/skipped.csv               one row per skipped file, image or ROI (columns: SKIPPED_COLUMNS)

Links are relative symbolic links (:func:`link_text`), so they resolve from any working directory and keep working
when the folder holding both results/ and the download moves; absolute when the two meet only at the filesystem
root (a download on another disk). ``link="copy"`` copies instead. The ``image_source``/``mask_source`` columns
and ``skipped.csv``'s ``source_path`` record absolute paths at the time of the run (provenance: nothing reads
files through them).
Every output appears atomically (a temporary name, then ``os.replace``); entries of a previous run that the current
run does not produce are removed from ``images/`` and ``masks/``.

How files are told apart
------------------------
Nothing is decided by file or folder names such as ``000000``/``000001`` or ``1-1``/``1-2``. Each file's case comes
from its header PatientID (``Mass-Training_P_00016_LEFT_CC[_N]``; its case folder name when the PatientID is not
a valid case name). A file without ``_N`` is a full image. The files with ``_N`` belong to ROI N; its **mask** is
the file whose size equals the full image's size (a crop is always smaller). When no file has that size (a mask of
the wrong size, or no full image), the mask is the largest file whose content is two-valued (at least 98 % of the
pixels at the minimum or the maximum, allowing for JPEG ringing). Every other file is a **cropped ROI image**,
which the method does not use. SeriesDescription is only a hint: NBIA folders are sometimes labelled
'cropped images' while holding both files; disagreements are counted (``hint_disagreements``).

The official case CSV (``{abn}_case_description_{split}_set.csv``), when found (``csv_dir``, else beside or inside
the source), is joined on the ROI's mask series UID (then on the ROI id) for pathology, assessment, subtlety,
breast density, and shape and margins (masses) or calc type and calc distribution (calcifications; the columns
of the other kind stay empty). ROIs
it lists that have no file on disk are reported; without a CSV everything else works the same.

Accounting: found = kept + skipped
----------------------------------
The units are **full images**, **ROIs** and **stray files**:

- an image is found when at least one readable file of its case (no ``_N``) is found whose pixels decode (every
  full image is decoded, in ``threads`` threads, before it is kept); it is kept when at least one of its ROIs is
  kept;
- an ROI (a distinct ``roi_id``) is found when a readable file of its case folder is found, or when the case CSV
  lists it (even if nothing of it is on disk); it is kept when its mask passes every check;
- a stray file is a file that belongs to no image or ROI: unreadable, not DICOM, an undecodable full image, a
  duplicate, another collection's, a hidden or system file (``ignored``).

``found = images found + ROIs found + stray files``, ``kept = images kept + ROIs kept``, ``skipped`` = rows of
skipped.csv; ``found == kept + skipped`` always (asserted). Cropped ROI images belong to their ROI and are counted
as ``crop_files``, never linked. ``files_found`` is the number of entries the index saw: every file below the case
root except the top-level entries of other collections, plus one per hidden folder (not searched).

Skip reasons (``skipped.csv`` column ``reason``)
------------------------------------------------
See :data:`SKIP_REASONS`; docs/usage.md lists them in a table that a test keeps equal to it.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammoseg.data.layouts import (
    CASE_NAME_PATTERN,
    CaseName,
    collection_prefix,
    detect_layout,
    ignored_reason,
    index_tree,
    parse_case_name,
)
from mammoseg.errors import InputError
from mammoseg.io.atomic import atomic_path, write_csv_atomic
from mammoseg.io.dicom import DicomReadError, check_decodable, header_record, read_stored_pixels
from mammoseg.io.masks import binary_fraction, mask_from_pixels
from mammoseg.io.names import safe_name, shown_value
from mammoseg.io.raster import RASTER_SUFFIXES

__all__ = [
    "MANIFEST_COLUMNS",
    "SKIPPED_COLUMNS",
    "SKIP_REASONS",
    "BINARY_FRACTION",
    "case_csv_folders",
    "case_csv_name",
    "find_case_csv",
    "link_text",
    "normal_identity",
    "plan_normals",
    "record_view",
    "view_position",
    "run_index_studies",
    "load_case_csv",
    "decode_failure",
    "decode_failures",
    "restructure_collection",
    "run_restructure",
    "summary_text",
]

MANIFEST_COLUMNS = [
    "roi_id", "image_id", "patient_id", "abnormality", "split", "side", "view", "abnormality_id", "pathology",
    "assessment", "subtlety", "breast_density", "shape", "margins", "calc_type", "calc_distribution", "image_rows",
    "image_cols", "mask_rows", "mask_cols",
    "image_path", "mask_path", "image_source", "mask_source", "mask_note",
]  # fmt: skip
SKIPPED_COLUMNS = ["source_path", "image_id", "roi_id", "reason", "message"]
#: manifest column -> its column in the official case CSVs: both kinds, masses only, calcifications only. The two
#: kinds spell breast density differently (LAYOUTS.md section 1).
_CSV_COLUMNS: dict[str, dict[str, str]] = {
    "both": {"pathology": "pathology", "assessment": "assessment", "subtlety": "subtlety"},
    "mass": {"breast_density": "breast_density", "shape": "mass shape", "margins": "mass margins"},
    "calc": {"breast_density": "breast density", "calc_type": "calc type", "calc_distribution": "calc distribution"},
}
#: manifest columns copied from the official case CSV (empty when the CSV has no such column)
CSV_ATTRIBUTES = tuple(dict.fromkeys(name for columns in _CSV_COLUMNS.values() for name in columns))

#: Skip reason codes and what they mean. ``unit`` says what one skipped.csv row stands for.
SKIP_REASONS: dict[str, tuple[str, str]] = {
    "zero_byte": ("file", "the file is empty (0 bytes)"),
    "not_dicom": ("file", "not a DICOM file (no DICM marker), nor a JPEG/PNG in the Kaggle layout"),
    "truncated": ("file", "the file is cut short: header or pixel data incomplete"),
    "no_pixel_data": ("file", "a DICOM file without Pixel Data"),
    "bad_header": ("file", "Rows/Columns/BitsAllocated missing or zero, or not a single-frame greyscale image"),
    "undecodable": ("file", "pixel data cannot be decoded (corrupt stream or missing codec plugin); every full "
                            "image is decoded before it is kept, so this includes e.g. a JPEG 2000 image whose "
                            "codestream header is broken"),
    "unreadable": ("file", "the file cannot be opened or parsed for another reason; also an entry that is no "
                           "regular file (a broken link) and a folder that cannot be listed"),
    "ignored": ("file", "a hidden or system file or folder (`.DS_Store`, `Thumbs.db`, `desktop.ini`, AppleDouble "
                        "`._*`, any name starting with '.'): never read; a folder is one row and is not searched"),
    "missing_file": ("file", "listed in the Kaggle dicom_info.csv but not on disk"),
    "bad_identifier": ("file", "neither the PatientID nor the case folder is a case name (Collection_P_id_SIDE_VIEW"
                               "[_N], the id 1-32 letters, digits, '-' or '_'; e.g. it contains '/', '..', NUL, or "
                               "is too long): nothing is named after it"),
    "other_collection": ("file", "the header names another collection than the one being restructured"),
    "duplicate": ("file", "a second file for an image or mask already taken (the same case twice); the first, "
                          "or the one whose series UID the CSV names, is kept"),
    "mask_missing": ("roi", "no mask for this ROI: only a cropped image, unreadable files, or nothing on disk "
                            "for an ROI the CSV lists"),
    "mask_without_image": ("roi", "the ROI's full image is missing or unreadable"),
    "mask_size_mismatch": ("roi", "the mask's size differs from its full image's (the paper skips these)"),
    "empty_mask": ("roi", "the mask has no foreground pixel"),
    "full_mask": ("roi", "every pixel of the mask is foreground"),
    "image_without_mask": ("image", "a full image with no kept ROI (no ROI files at all, or all its ROIs skipped)"),
}  # fmt: skip

#: Fraction of pixels at the extremes above which an ROI file's content counts as a (two-valued) mask.
BINARY_FRACTION = 0.98


# --- the case CSVs -------------------------------------------------------------------------------------------


def find_case_csv(source_root: str | Path, csv_dir: str | Path | None, abnormality: str, split: str) -> Path | None:
    """The official case CSV of one collection, or None.

    ``csv_dir`` (if given, the file must be there) else ``source_root``, its ``csv/``, ``CBIS-DDSM/csv/``, its
    parent and the parent's ``csv/``.
    """
    name = case_csv_name(abnormality, split)
    if csv_dir:
        path = Path(csv_dir) / name
        if not path.is_file():
            raise InputError(f"{path}: case CSV not found (data.csv_dir = {csv_dir})")
        return path
    for folder in case_csv_folders(source_root):
        if (folder / name).is_file():
            return folder / name
    return None


def case_csv_name(abnormality: str, split: str) -> str:
    """``mass_case_description_train_set.csv`` and its kin: the official case CSV's file name."""
    return f"{abnormality}_case_description_{split}_set.csv"


def case_csv_folders(source_root: str | Path) -> list[Path]:
    """Where :func:`find_case_csv` looks without ``csv_dir``, in order."""
    root = Path(source_root)
    return [root, root / "csv", root / "CBIS-DDSM" / "csv", root.parent, root.parent / "csv"]


@dataclass
class CaseTable:
    """The case CSV indexed for the join: rows by ROI id, and ROI ids by mask/crop series UID."""

    path: str
    rows: dict[str, dict[str, str]] = field(default_factory=dict)
    by_series: dict[str, list[str]] = field(default_factory=dict)
    image_series: dict[str, str] = field(default_factory=dict)
    unparsed: int = 0


def _series_of(csv_path: str) -> str:
    parts = csv_path.strip().replace("\\", "/").split("/")
    return parts[2].strip() if len(parts) >= 4 else ""


def load_case_csv(path: str | Path, abnormality: str) -> CaseTable:
    """Read an official case CSV (CRLF, embedded newlines, literal 'NA' kept as text) for the join.

    Returns
    -------
    CaseTable : ``rows[roi_id]`` = the row's :data:`CSV_ATTRIBUTES` (strings, stripped; empty when the CSV of
    this abnormality has no such column);
    ``by_series[series_uid]`` = ROI ids whose mask or crop lives in that series; ``image_series[image_id]`` = the
    full image's series UID.
    """
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.columns = [c.strip() for c in frame.columns]
    needed = {"image file path", "ROI mask file path", "cropped image file path", "pathology"}
    if needed - set(frame.columns):
        raise InputError(f"{path}: not a CBIS-DDSM case CSV (missing {sorted(needed - set(frame.columns))})")
    columns = {**_CSV_COLUMNS["both"], **_CSV_COLUMNS[abnormality]}
    table = CaseTable(path=str(path))
    for record in frame.to_dict("records"):
        record = {key: str(value).strip() for key, value in record.items()}
        mask_path = record["ROI mask file path"].replace("\\", "/")
        case = parse_case_name(mask_path.split("/")[0])
        if case is None or case.roi_id is None:
            table.unparsed += 1
            continue
        if case.roi_id in table.rows:
            continue  # a repeated row adds nothing
        table.rows[case.roi_id] = {name: record.get(columns[name], "") if name in columns else ""
                                   for name in CSV_ATTRIBUTES}  # fmt: skip
        for column in ("ROI mask file path", "cropped image file path"):
            series = _series_of(record[column])
            if series:
                table.by_series.setdefault(series, []).append(case.roi_id)
        table.image_series.setdefault(case.image_id, _series_of(record["image file path"]))
    return table


# --- planning: decide the fate of every file, image and ROI --------------------------------------------------


@dataclass
class RoiFile:
    """One readable file of an ROI case folder, read and classified."""

    path: str
    series_uid: str
    sop_uid: str
    shape: tuple[int, int]
    role: str  # "mask" or "crop", set by _assign_roles
    note: str = ""  # from mask_from_pixels: empty, 'empty mask' or the threshold applied
    foreground: int = 0  # pixels that are foreground when read as a mask
    binary: float = 1.0  # binary_fraction of the stored values
    hint: str = ""  # SeriesDescription, lower case
    hint_disagrees: bool = False
    in_case_folder: bool = True


@dataclass
class Plan:
    """Every decision of one restructuring run, before anything is written."""

    images: dict[str, dict] = field(default_factory=dict)  # image_id -> {"path", "shape", "case", "series"}
    manifest: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    rois_found: set[str] = field(default_factory=set)
    images_found: set[str] = field(default_factory=set)
    crop_files: int = 0
    hint_disagreements: int = 0
    stray: int = 0

    def skip(self, reason: str, message: str, *, source: str = "", image_id: str = "", roi_id: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.skipped.append({"source_path": source, "image_id": image_id, "roi_id": roi_id, "reason": reason,
                             "message": message})  # fmt: skip
        if SKIP_REASONS[reason][0] == "file":
            self.stray += 1


def _identify(row: Any, prefix: str, plan: Plan) -> CaseName | None:
    """The case of one readable index row, or None after recording why it has none."""
    case = parse_case_name(row.PatientID) or parse_case_name(row.top_folder)
    folder_case = parse_case_name(row.top_folder)
    ids = {"image_id": folder_case.image_id if folder_case else "",
           "roi_id": (folder_case.roi_id or "") if folder_case else ""}
    if case is None:
        plan.skip("bad_identifier", f"PatientID {shown_value(row.PatientID, 60)} and folder "
                                    f"{shown_value(row.top_folder, 60)} are not case names ({CASE_NAME_PATTERN})",
                  source=row.path, **ids)  # fmt: skip
        return None
    if case.collection != prefix:
        plan.skip("other_collection",
                  f"PatientID {shown_value(row.PatientID, 60)} belongs to {case.collection}, not {prefix}",
                  source=row.path, image_id=case.image_id, roi_id=case.roi_id or "")  # fmt: skip
        return None
    return case


def _name(case: CaseName) -> str:
    """The case folder name of ``case`` (``Mass-Training_P_00001_LEFT_CC[_N]``)."""
    return f"{case.collection}_{case.roi_id or case.image_id}"


def _choose(candidates: list[Any], preferred_series: str) -> tuple[Any, list[Any]]:
    """Order duplicates: the CSV's series first, then a file in its own case folder, then by path.

    Returns (kept, others).
    """
    ordered = sorted(candidates, key=lambda c: (c.series_uid != preferred_series if preferred_series else False,
                                                not c.in_case_folder, c.path))  # fmt: skip
    return ordered[0], ordered[1:]


@dataclass
class _ImageFile:
    path: str
    series_uid: str
    sop_uid: str
    shape: tuple[int, int]
    in_case_folder: bool  # its case folder is named after its case (not a copy such as '..._CC (1)')


def _plan_images(rows: list[tuple[Any, CaseName]], table: CaseTable | None, plan: Plan) -> None:
    by_image: dict[str, list[_ImageFile]] = {}
    for row, case in rows:
        by_image.setdefault(case.image_id, []).append(_ImageFile(
            row.path, row.SeriesUID, row.SOPUID, (int(row.Rows), int(row.Columns)), row.top_folder == _name(case)))
    for image_id, files in sorted(by_image.items()):
        preferred = table.image_series.get(image_id, "") if table else ""
        kept, others = _choose(files, preferred)
        plan.images_found.add(image_id)
        plan.images[image_id] = {"path": kept.path, "shape": kept.shape}
        for other in others:
            same = " (same SOPInstanceUID)" if other.sop_uid and other.sop_uid == kept.sop_uid else ""
            plan.skip("duplicate", f"another full image for {image_id}{same}; kept {kept.path}", source=other.path,
                      image_id=image_id)  # fmt: skip


def decode_failure(path: str) -> DicomReadError | None:
    """Why the full image at ``path`` cannot be used, or None when its pixels decode.

    The one place restructuring decodes a full image (:func:`mammoseg.io.dicom.check_decodable`; the Kaggle
    layout's JPEGs are allowed). Indexing checked the header and that the pixel data are complete; only a decode
    finds a broken stream, such as a JPEG 2000 codestream whose own header is damaged, which extraction and
    prediction would otherwise be the first to meet.
    """
    try:
        check_decodable(path, allow_raster=True)
    except DicomReadError as exc:
        return exc
    return None


def decode_failures(paths: list[str], *, threads: int = 1, progress: bool = False) -> dict[str, DicomReadError]:
    """Decode every file of ``paths`` (full images) and return ``{path: error}`` for those that fail.

    ``threads`` decodes run at once in a pool of processes, not threads: the RLE decoder holds the GIL (measured:
    two threads decode no faster than one). Each holds one decoded image, about 25 MB for a 4.6k x 2.8k 16-bit
    mammogram, dropped as soon as it has decoded.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    bar = _bar(len(paths), "decode full images", progress)
    failures: dict[str, DicomReadError] = {}
    # forkserver: workers start from a clean process, never from a copy of a caller that holds threads (TensorFlow)
    pool = (ProcessPoolExecutor(max_workers=threads, mp_context=multiprocessing.get_context("forkserver"))
            if threads > 1 and len(paths) > 1 else ThreadPoolExecutor(1))
    with pool:
        for path, error in zip(paths, pool.map(decode_failure, paths, chunksize=max(1, len(paths) // (8 * threads)))):
            if error is not None:
                failures[path] = error
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return failures


def _bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr, or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="file", mininterval=0.5)


def _drop_undecodable(rows: list[tuple[Any, CaseName]], plan: Plan, threads: int,
                      progress: bool) -> list[tuple[Any, CaseName]]:  # fmt: skip
    """The full-image rows whose pixels decode; each other one becomes a skip with the reader's reason and message.

    An image none of whose files decodes is then not found, and its ROIs are ``mask_without_image``.
    """
    failures = decode_failures([row.path for row, _ in rows], threads=threads, progress=progress)
    for row, case in rows:
        error = failures.get(row.path)
        if error is not None:
            plan.skip(error.reason, error.detail, source=row.path, image_id=case.image_id)
    return [(row, case) for row, case in rows if row.path not in failures]


def _read_roi_file(row: Any, case: CaseName, plan: Plan, ids: dict) -> RoiFile | None:
    """Read one ROI-folder file's pixels and measure them; None (recorded) when unreadable."""
    try:
        # the index already refused JPEG/PNG files outside the Kaggle layout: what reaches here is to be read
        stored = read_stored_pixels(row.path, allow_raster=True)
    except DicomReadError as exc:
        plan.skip(exc.reason, exc.detail, source=row.path, **ids)
        return None
    pixels = stored.pixels
    read = mask_from_pixels(pixels, stored.photometric, stored.bits_stored)
    return RoiFile(
        row.path, row.SeriesUID, row.SOPUID, (int(pixels.shape[0]), int(pixels.shape[1])), role="crop",
        note=read.note, foreground=int(np.count_nonzero(read.mask)), binary=binary_fraction(pixels),
        hint=str(row.SeriesDescription).lower(), in_case_folder=row.top_folder == _name(case),
    )  # fmt: skip


def _assign_roles(files: list[RoiFile], image_shape: tuple[int, int] | None) -> None:
    """Mark each ROI file ``mask`` or ``crop`` by size and content, never by name.

    A file of the full image's size is a mask (a crop is always smaller). When none has that size (a mask of the
    wrong size, or no full image), the two-valued files (:data:`BINARY_FRACTION`) of the largest area are masks:
    a crop that happens to look two-valued (flat background) is smaller than the mask.
    """
    sized = [f for f in files if image_shape is not None and f.shape == image_shape]
    if sized:
        masks = sized
    else:
        binary = [f for f in files if f.binary >= BINARY_FRACTION]
        largest = max((f.shape[0] * f.shape[1] for f in binary), default=0)
        masks = [f for f in binary if f.shape[0] * f.shape[1] == largest]
    for item in files:
        item.role = "mask" if any(item is m for m in masks) else "crop"
        item.hint_disagrees = (("mask" in item.hint and item.role != "mask")
                               or ("crop" in item.hint and item.role == "mask"))


def _plan_roi(roi_id: str, case: CaseName, files: list[RoiFile], table: CaseTable | None, plan: Plan) -> None:
    """Decide one ROI: its mask, its checks, its manifest row or skip."""
    image_id = case.image_id
    masks = [f for f in files if f.role == "mask"]
    plan.crop_files += sum(f.role == "crop" for f in files)
    if not masks:
        found = "only a cropped image" if files else "no readable file"
        plan.skip("mask_missing", f"ROI {roi_id}: {found}", source=files[0].path if files else "", image_id=image_id,
                  roi_id=roi_id)  # fmt: skip
        return
    csv_series = ""
    if table is not None:
        csv_series = next((s for s, ids in table.by_series.items()
                           if roi_id in ids and any(s == m.series_uid for m in masks)), "")
    image = plan.images.get(image_id)
    if len(masks) > 1:  # prefer the CSV's series, then a mask of the image's size
        size = image["shape"] if image else None
        masks.sort(key=lambda m: (m.series_uid != csv_series if csv_series else False, m.shape != size,
                                  not m.in_case_folder, m.path))  # fmt: skip
    mask, others = masks[0], masks[1:]
    for other in others:
        same = " (same SOPInstanceUID)" if other.sop_uid and other.sop_uid == mask.sop_uid else ""
        plan.skip("duplicate", f"another mask for {roi_id}{same}; kept {mask.path}", source=other.path,
                  image_id=image_id, roi_id=roi_id)  # fmt: skip
    ids = {"source": mask.path, "image_id": image_id, "roi_id": roi_id}
    if image is None:
        plan.skip("mask_without_image", f"ROI {roi_id}: no readable full image {image_id} in this collection", **ids)
        return
    if mask.shape != image["shape"]:
        plan.skip("mask_size_mismatch", f"mask {mask.shape[0]}x{mask.shape[1]} pixels, full image "
                                        f"{image['shape'][0]}x{image['shape'][1]}", **ids)  # fmt: skip
        return
    if mask.foreground == 0:
        plan.skip("empty_mask", f"ROI {roi_id}: mask has no foreground pixel", **ids)
        return
    if mask.foreground == mask.shape[0] * mask.shape[1]:
        plan.skip("full_mask", f"ROI {roi_id}: every mask pixel is foreground", **ids)
        return
    attributes = _csv_attributes(roi_id, mask.series_uid, table)
    plan.manifest.append({
        "roi_id": roi_id, "image_id": image_id, "patient_id": case.patient_id, "abnormality": case.abnormality,
        "split": case.split, "side": case.side, "view": case.view, "abnormality_id": case.abnormality_id,
        **attributes, "image_rows": image["shape"][0], "image_cols": image["shape"][1],
        "mask_rows": mask.shape[0], "mask_cols": mask.shape[1], "image_source": image["path"],
        "mask_source": mask.path, "mask_note": mask.note,
    })  # fmt: skip


def _csv_attributes(roi_id: str, mask_series: str, table: CaseTable | None) -> dict[str, str]:
    """Join on the mask's series UID (the series may hold several ROIs' files only by mistake), then on roi_id."""
    empty = dict.fromkeys(CSV_ATTRIBUTES, "")
    if table is None:
        return empty
    by_series = table.by_series.get(mask_series, [])
    key = roi_id if roi_id in by_series or roi_id in table.rows else (by_series[0] if len(by_series) == 1 else "")
    return dict(table.rows.get(key, empty))


def plan_collection(index: pd.DataFrame, prefix: str, table: CaseTable | None, *, threads: int = 1,
                    progress: bool = False) -> Plan:  # fmt: skip
    """Decide the fate of every indexed file, image and ROI of one collection (nothing is written).

    Parameters
    ----------
    index : from :func:`mammoseg.data.layouts.index_tree`, one collection
    prefix : the collection, e.g. ``Mass-Training``
    table : the case CSV, or None
    threads : full images decoded at once (:func:`decode_failures`)
    progress : tqdm bars (stderr) over the full images decoded and the ROI files whose pixels are read
    """
    plan = Plan()
    image_rows: list[tuple[Any, CaseName]] = []
    roi_rows: dict[str, list[tuple[Any, CaseName]]] = {}
    for row in index.sort_values("path").itertuples(index=False):
        if not row.readable:
            folder_case = parse_case_name(row.top_folder)
            plan.skip(row.reason or "unreadable", row.error or "unreadable", source=row.path,
                      image_id=folder_case.image_id if folder_case else "",
                      roi_id=(folder_case.roi_id or "") if folder_case else "")  # fmt: skip
            continue
        case = _identify(row, prefix, plan)
        if case is None:
            continue
        if case.roi_id is None:
            image_rows.append((row, case))
        else:
            roi_rows.setdefault(case.roi_id, []).append((row, case))
    _plan_images(_drop_undecodable(image_rows, plan, threads, progress), table, plan)

    roi_ids = set(roi_rows) | (set(table.rows) if table is not None else set())
    bar = _bar(sum(len(v) for v in roi_rows.values()), "ROI files", progress)
    for roi_id in sorted(roi_ids):
        entries = roi_rows.get(roi_id, [])
        case = entries[0][1] if entries else parse_case_name(f"{prefix}_{roi_id}")
        if case is None:  # a CSV row of another collection's naming: cannot happen after load_case_csv
            continue
        plan.rois_found.add(roi_id)
        image = plan.images.get(case.image_id)
        files = []
        for row, _case in entries:
            item = _read_roi_file(row, case, plan, {"image_id": case.image_id, "roi_id": roi_id})
            if bar is not None:
                bar.update(1)
            if item is not None:
                files.append(item)
        _assign_roles(files, image["shape"] if image else None)
        plan.hint_disagreements += sum(f.hint_disagrees for f in files)
        if not entries:
            plan.skip("mask_missing", f"ROI {roi_id} is listed in the case CSV but no file of it is on disk",
                      image_id=case.image_id, roi_id=roi_id)  # fmt: skip
            continue
        _plan_roi(roi_id, case, files, table, plan)
    if bar is not None:
        bar.close()

    kept_images = {row["image_id"] for row in plan.manifest}
    for image_id in sorted(plan.images_found - kept_images):
        rois = sorted(r["roi_id"] for r in plan.skipped
                      if r["image_id"] == image_id and SKIP_REASONS[r["reason"]][0] == "roi")
        why = f"all its ROIs were skipped ({', '.join(rois)})" if rois else "no ROI file or CSV row names it"
        plan.skip("image_without_mask", f"full image {image_id}: {why}", source=plan.images[image_id]["path"],
                  image_id=image_id)  # fmt: skip
    return plan


# --- lesion-free (normal) images -------------------------------------------------------------------------------

#: A patient, side and view somewhere in a normal image's PatientID or file name (``Normal_P_90003_LEFT_MLO``).
_NORMAL_NAME = re.compile(r"(?:^|_)P_([A-Za-z0-9][A-Za-z0-9_-]{0,31}?)_(LEFT|RIGHT)_(CC|MLO)(?:$|[_.])")


def normal_identity(patient_id: str, file_stem: str) -> tuple[str, str, str, str]:
    """(image_id, patient_id, side, view) of a normal image, from its PatientID or else its file name.

    The CBIS-like name ``P_<id>_<SIDE>_<VIEW>`` in either gives ``P_<id>_<SIDE>_<VIEW>`` / ``P_<id>``, so a woman's
    normal image and her mass images share a patient (and so a side of every patient-level split). Any other name
    is its own patient, and the image id is the file name made safe; side and view are then empty.
    """
    for text in (patient_id, file_stem):
        found = _NORMAL_NAME.search(text or "")
        if found:
            patient = f"P_{found.group(1)}"
            return f"{patient}_{found.group(2)}_{found.group(3)}", patient, found.group(2), found.group(3)
    image_id = safe_name(file_stem)
    return image_id, image_id, "", ""


def record_view(record: dict[str, Any]) -> str:
    """The view of a mammogram, upper case (``CC``, ``MLO``, ...), from its :func:`header_record`: its DICOM
    ViewPosition, else the view in ``P_<id>_<SIDE>_<VIEW>`` of its PatientID or its file name (CBIS-DDSM files carry
    no ViewPosition); ``""`` when none says. An unreadable file's record has empty header values, so its name
    decides (the file is refused with its reason when its pixels are read). The one rule for the manifest's
    ``view`` column of images without ROI and for files given to ``mammoseg predict``."""
    view = str(record.get("ViewPosition") or "").strip().upper()
    return view or normal_identity(str(record.get("PatientID") or ""), Path(record["path"]).stem)[3]


def view_position(path: str | Path) -> str:
    """:func:`record_view` of a file whose header has not been indexed yet (its header read once, pixels unchecked)."""
    return record_view(header_record(path, check_pixels=False))


def plan_normals(folders: list[str | Path], split: str, abnormality: str, plan: Plan, *, threads: int = 1,
                 pathology: str = "NORMAL", key: str = "data.normals") -> None:  # fmt: skip
    """Add the mammograms without ROI found in ``folders`` to ``plan``: lesion-free (normal) images, or new studies
    whose truth is unknown (``pathology=''``).

    Every file is read as a full image is (header, then pixels decoded) and gets the same skip reasons; hidden and
    system files are ``ignored``; a second file for an image id already taken (a normal image or an image of the
    collection) is a ``duplicate``. A kept image is one manifest row with empty ROI columns (``roi_id``,
    ``mask_path``: ''), ``abnormality_id`` 0 and ``pathology`` (``NORMAL`` for normal images). ``key`` names the
    configuration key of the folders in errors.
    """
    rows = []
    for folder in map(Path, folders):
        if folder.is_file():  # a single file given (mammoseg predict): read as a folder holding only it
            entries, folder = [folder], folder.parent
        elif folder.is_dir():
            entries = sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())
        else:
            raise InputError(f"{folder}: {key} names no folder")
        for entry in entries:
            hidden = next((ignored_reason(part) for part in entry.relative_to(folder).parts
                           if ignored_reason(part)), "")
            if hidden:
                plan.skip("ignored", f"{entry}: {hidden}", source=str(entry))
                continue
            record = header_record(entry)
            if not record["readable"]:
                plan.skip(record["reason"] or "unreadable", record["error"] or "unreadable", source=str(entry))
                continue
            if str(entry).lower().endswith(RASTER_SUFFIXES):
                plan.skip("not_dicom", f"{entry}: normal images are read as DICOM files", source=str(entry))
                continue
            rows.append((entry, record))
    failures = decode_failures([str(entry) for entry, _ in rows], threads=threads)
    for entry, record in rows:
        if str(entry) in failures:
            error = failures[str(entry)]
            plan.skip(error.reason, str(error), source=str(entry))
            continue
        image_id, patient_id, side, _ = normal_identity(record["PatientID"], entry.stem)
        view = record_view(record)
        if image_id in plan.images:
            plan.skip("duplicate", f"another full image for {image_id}; kept {plan.images[image_id]['path']}",
                      source=str(entry), image_id=image_id)  # fmt: skip
            continue
        plan.images_found.add(image_id)  # a kept normal image is an image unit; a skipped file is a file unit
        plan.images[image_id] = {"path": str(entry), "shape": (int(record["Rows"]), int(record["Columns"]))}
        plan.manifest.append({
            "roi_id": "", "image_id": image_id, "patient_id": patient_id, "abnormality": abnormality, "split": split,
            "side": side, "view": view, "abnormality_id": 0, "pathology": pathology,
            **{column: "" for column in ("assessment", "subtlety", "breast_density", "shape", "margins", "calc_type",
                                         "calc_distribution", "mask_note")},
            "image_rows": int(record["Rows"]), "image_cols": int(record["Columns"]), "mask_rows": "",
            "mask_cols": "", "image_source": str(entry), "mask_source": "",
        })


# --- writing -------------------------------------------------------------------------------------------------


def _inside(target: Path, out_dir: Path) -> Path:
    """``target`` if it lies inside ``out_dir`` (both resolved up to the file name); raise otherwise."""
    parent = target.parent.resolve()
    if os.path.commonpath([parent, out_dir]) != str(out_dir):
        raise ValueError(f"refusing to write {target}: outside the output folder {out_dir}")
    return parent / target.name


def link_text(source: str | Path, link_folder: str | Path) -> str:
    """What a symbolic link in ``link_folder`` to ``source`` holds: a relative path, or absolute across the root.

    Relative (``../../../../../CBIS-DDSM/...``) when the link and its source lie below one folder other than the
    filesystem root: results/ and the download in one project folder, or side by side below a home folder; moving
    or copying that folder keeps the links working. Absolute when they meet only at the root (``/data/CBIS-DDSM``
    and ``/home/me/project/results``): such a download stays where it is while the project moves, and a relative
    link would then climb out of the moved folder to a place that is not there.

    Both folders are resolved first, because the system follows a relative link from where the link physically
    is; the source's own name is kept (a source that is itself a link stays one).
    """
    source = os.path.abspath(source)
    physical_source = os.path.join(os.path.realpath(os.path.dirname(source)), os.path.basename(source))
    physical_folder = os.path.realpath(link_folder)
    common = os.path.commonpath([physical_source, physical_folder])
    if os.path.dirname(common) == common:  # they meet only at the filesystem root
        return source
    return os.path.relpath(physical_source, physical_folder)


def _place(source: str, target: Path, link: str) -> None:
    """Make ``target`` point to (symlink, :func:`link_text`) or hold (copy) ``source``, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if link == "copy":
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        return
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    os.symlink(link_text(source, target.parent), tmp)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _output_name(identifier: str, source: str) -> str:
    suffix = Path(source).suffix.lower()
    return safe_name(identifier) + (suffix if suffix in RASTER_SUFFIXES else ".dcm")


def _remove_stale(folder: Path, keep: set[str]) -> int:
    removed = 0
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name not in keep and (entry.is_symlink() or entry.is_file()):
                entry.unlink()
                removed += 1
    return removed


def write_outputs(plan: Plan, out_dir: Path, link: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Link/copy the kept files and write manifest.csv and skipped.csv; return both tables."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out_real = out_dir.resolve()
    placed: dict[str, set[str]] = {"images": set(), "masks": set()}
    rows = []
    for entry in sorted(plan.manifest, key=lambda r: (r["roi_id"], r["image_id"])):
        image_name = _output_name(entry["image_id"], entry["image_source"])
        files = [("images", image_name, entry["image_source"])]
        mask_name = ""
        if entry["roi_id"]:  # a normal image has no ROI, hence no mask
            mask_name = _output_name(entry["roi_id"], entry["mask_source"])
            files.append(("masks", mask_name, entry["mask_source"]))
        for folder, name, source in files:
            if name not in placed[folder]:
                _place(source, _inside(out_dir / folder / name, out_real), link)
                placed[folder].add(name)
        rows.append({**entry, "image_path": f"images/{image_name}",
                     "mask_path": f"masks/{mask_name}" if mask_name else "",
                     "image_source": os.path.abspath(entry["image_source"]),
                     "mask_source": os.path.abspath(entry["mask_source"]) if entry["mask_source"] else ""})  # fmt: skip
    for folder, names in placed.items():
        _remove_stale(out_dir / folder, names)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    skipped = pd.DataFrame(plan.skipped, columns=SKIPPED_COLUMNS)
    skipped = skipped.sort_values(["reason", "roi_id", "image_id", "source_path"])
    skipped["source_path"] = [os.path.abspath(p) if p else "" for p in skipped["source_path"]]
    write_csv_atomic(out_dir / "manifest.csv", manifest)
    write_csv_atomic(out_dir / "skipped.csv", skipped)
    return manifest, skipped


def restructure_collection(source_root: str | Path, out_dir: str | Path, *, abnormality: str, split: str,
                           csv_dir: str | Path | None = None, layout: str = "auto", link: str = "symlink",
                           threads: int = 1, progress: bool = True,
                           normals: list[str | Path] | tuple = ()) -> dict:  # fmt: skip
    """Restructure one collection of a CBIS-DDSM download (any layout) into images/, masks/ and two tables.

    Parameters
    ----------
    source_root : the download (see :func:`mammoseg.data.layouts.detect_layout`)
    out_dir : e.g. ``results/restructured/mass/train``; nothing is written outside it
    abnormality : ``mass`` or ``calc``
    split : ``train`` or ``test``
    csv_dir : folder of the official case CSVs; None = look beside and inside ``source_root``
    layout : ``auto`` or one of :data:`mammoseg.data.layouts.LAYOUTS`
    link : ``symlink`` (relative links, see :func:`link_text`) or ``copy``
    threads : full images decoded at once: every full image is decoded before it is kept (an undecodable one is
        a skip with the reader's reason, usually ``undecodable``); the rule passes its ``threads``
    progress : tqdm bars on stderr
    normals : folders of lesion-free mammograms of this split (``data.normals``): kept as images without ROI
        (:func:`plan_normals`)

    Returns
    -------
    dict : counts (``found``, ``kept``, ``skipped``, ``images_found``, ``images_kept``, ``rois_found``,
    ``rois_kept``, ``stray_files``, ``files_found``, ``crop_files``, ``hint_disagreements``, ``skipped_by_reason``)
    and ``layout``, ``collection``, ``csv`` (the case CSV used, '' for none), ``out_dir``; ``csv_name``,
    ``csv_searched`` and ``csv_empty_columns`` (where the CSV was looked for and the manifest columns left empty;
    empty lists when it was found). Printed as :func:`summary_text`.
    """
    if link not in ("symlink", "copy"):
        raise ValueError(f"link must be 'symlink' or 'copy', got {link!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    source_root, out_dir = Path(source_root), Path(out_dir)
    prefix = collection_prefix(abnormality, split)
    layout = detect_layout(source_root) if layout in ("auto", "", None) else layout
    csv_path = find_case_csv(source_root, csv_dir, abnormality, split)
    table = load_case_csv(csv_path, abnormality) if csv_path else None
    index = index_tree(source_root, layout=layout, collection_prefix=prefix, progress=progress)
    plan = plan_collection(index, prefix, table, threads=threads, progress=progress)
    plan_normals(list(normals), split, abnormality, plan, threads=threads, key=f"data.normals.{split}")
    manifest, skipped = write_outputs(plan, out_dir, link)

    rois_kept, images_kept = int((manifest["roi_id"] != "").sum()), manifest["image_id"].nunique()
    found = len(plan.images_found) + len(plan.rois_found) + plan.stray
    if found != images_kept + rois_kept + len(skipped):  # a bug, never bad input: every unit has one fate
        raise AssertionError(f"accounting broken: found {found} != kept {images_kept + rois_kept} "
                             f"+ skipped {len(skipped)}")
    summary = {
        "collection": prefix, "layout": layout, "csv": str(csv_path) if csv_path else "", "out_dir": str(out_dir),
        "found": found, "kept": images_kept + rois_kept, "skipped": len(skipped),
        "images_found": len(plan.images_found), "images_kept": int(images_kept),
        "rois_found": len(plan.rois_found), "rois_kept": rois_kept, "stray_files": plan.stray,
        "normal_images": int((manifest["roi_id"] == "").sum()),
        "files_found": len(index), "crop_files": plan.crop_files, "hint_disagreements": plan.hint_disagreements,
        "masks_thresholded": int((manifest["mask_note"] != "").sum()),
        "skipped_by_reason": {k: int(v) for k, v in skipped["reason"].value_counts().sort_index().items()},
        # without a CSV: its name, where it was looked for, and the manifest columns it would have filled
        "csv_name": case_csv_name(abnormality, split),
        "csv_searched": [] if csv_path else [str(f) for f in case_csv_folders(source_root)],
        "csv_empty_columns": [] if csv_path else [*_CSV_COLUMNS["both"], *_CSV_COLUMNS[abnormality]],
    }  # fmt: skip
    print(summary_text(summary), flush=True)
    return summary


def summary_text(summary: dict) -> str:
    """What restructuring prints for one collection: one summary line, and a warning line when no case CSV was found.

    Parameters
    ----------
    summary : as returned by :func:`restructure_collection`

    Returns
    -------
    str : ``restructure <Collection>: found F = kept K + skipped S (<reason> <count>, ...); layout <layout>; case CSV
    <path>; <images kept>/<found> images and <ROIs kept>/<found> ROIs kept, <files> files -> <out_dir>``; without a
    CSV, ``case CSV none`` and a second line ``restructure <Collection>: warning: ...`` naming the CSV, where it
    was looked for and the manifest columns that stay empty.
    """
    name = summary["collection"]
    reasons = ", ".join(f"{k} {v}" for k, v in summary["skipped_by_reason"].items()) or "none"
    line = (f"restructure {name}: found {summary['found']} = kept {summary['kept']} + skipped {summary['skipped']} "
            f"({reasons}); layout {summary['layout']}; case CSV {summary['csv'] or 'none'}; "
            f"{summary['images_kept']}/{summary['images_found']} images"
            + (f" ({summary['normal_images']} normal)" if summary.get("normal_images") else "")
            + f" and {summary['rois_kept']}/"
            f"{summary['rois_found']} ROIs kept, {summary['files_found']} files "
            f"({summary['crop_files']} cropped ROI images set aside) -> {summary['out_dir']}")
    if summary["csv"]:
        return line
    searched = ", ".join(summary.get("csv_searched", [])) or "data.csv_dir"
    columns = ", ".join(summary.get("csv_empty_columns", []))
    return (f"{line}\nrestructure {name}: warning: no case CSV {summary.get('csv_name', '')} found (looked in "
            f"{searched}; set data.csv_dir); the manifest columns {columns} stay empty")


def run_restructure(config: dict, source_root: str | Path, out_dir: str | Path, split: str, threads: int = 1) -> dict:
    """The ``restructure`` stage: one collection, settings from ``config['data']``.

    Parameters
    ----------
    config : the validated config; reads ``data.abnormality``, ``data.layout``, ``data.link``, ``data.csv_dir``
        (empty = look beside and inside ``source_root``)
    source_root : the download, or the synthetic tree (``results/synth``)
    out_dir : ``results/restructured/{abn}/{split}``
    split : ``train`` or ``test``
    threads : full images decoded at once (the rule's ``threads``)
    """
    data = config["data"]
    return restructure_collection(
        source_root, out_dir, abnormality=data["abnormality"], split=split, csv_dir=data["csv_dir"] or None,
        layout=data["layout"], link=data["link"], threads=threads, progress=True, normals=data["normals"][split],
    )  # fmt: skip


def run_index_studies(config: dict, out_dir: str | Path, threads: int = 1,
                      roots: list[str | Path] | None = None) -> dict:  # fmt: skip
    """Stage ``index_studies``: the mammograms of ``studies.root`` (new studies, outside the CBIS splits, no ground
    truth) as a manifest of images without ROI and ``pathology`` '' (truth unknown), linked like restructured
    images, with ``skipped.csv``; found = kept + skipped. ``roots``: the folders or files to index instead
    (``mammoseg predict``). Nothing kept is an :class:`InputError` naming the folders: there is nothing to
    predict."""
    out_dir = Path(out_dir)
    roots = [config["studies"]["root"]] if roots is None else list(roots)
    shown = ", ".join(map(str, roots))
    plan = Plan()
    plan_normals(roots, "studies", config["data"]["abnormality"], plan, threads=threads, pathology="",
                 key="studies.root")
    if not plan.manifest:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(Counter(s["reason"] for s in plan.skipped).items()))
        raise InputError(f"{shown}: no readable DICOM mammogram to predict ({len(plan.skipped)} files: "
                         f"{counts or 'none'})")
    manifest, skipped = write_outputs(plan, out_dir, config["data"]["link"])
    found, kept = len(plan.images_found) + plan.stray, int(manifest["image_id"].nunique())
    if found != kept + len(skipped):  # a bug, never bad input
        raise AssertionError(f"accounting broken: found {found} != kept {kept} + skipped {len(skipped)}")
    reasons = ", ".join(f"{k} {v}" for k, v in skipped["reason"].value_counts().sort_index().items()) or "none"
    line = f"studies {shown}: found {found} = kept {kept} + skipped {len(skipped)} ({reasons}) -> {out_dir}"
    print(line)
    return {"found": found, "kept": kept, "skipped": len(skipped), "text": line}
