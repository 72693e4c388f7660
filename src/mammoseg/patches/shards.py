"""Paper-exact training patches written into HDF5 shards, with a provenance row per patch.

Stage ``extract``: reads a restructured collection's ``manifest.csv`` (docs/architecture.md), cuts the centred
``2**n`` window and ``n_shifted`` shifted windows around every ROI (geometry in :mod:`mammoseg.patches.geometry`),
downscales and normalises them exactly as inference does (:func:`mammoseg.patches.geometry.preprocess_window`,
:func:`mammoseg.patches.geometry.downscale_mask`) and writes them into one of ``n_shards`` HDF5 files.

Shard layout (``s = 2**n // downscale``)
---------------------------------------
``images``      float32 (N, s, s), values in [0, 1], one patch per chunk (1, s, s), uncompressed by default
                (``image_compression``: lzf saves 0-7 % of float32 patch bytes, measured, and costs a fifth of
                the extraction time at full size; see ``extract_shard``)
``masks``       uint8   (N, s, s), values in {0, 1}, same chunking, lzf by default (``compression``: stores
                about 3 % of the bytes)
``provenance/`` one 1-D dataset of length N per column (:data:`PROVENANCE_COLUMNS`); strings are UTF-8
``skipped/``    one 1-D dataset per column of :data:`SKIPPED_COLUMNS`
root attributes: :data:`ROOT_ATTRIBUTES`

Images are assigned to shards by a stable hash of ``image_id`` (:func:`mammoseg.data.manifest.bucket_of`), so all ROIs
of one image are in one shard and a changed image rebuilds exactly one shard. Files are written under a temporary name
and renamed (:func:`mammoseg.io.atomic.atomic_path`) and are byte-identical for identical inputs and parameters. HDF5
writes through :func:`mammoseg.io.hdf5.hdf5_writer`, so a disk that fills up in the middle of a shard ends in an
``OSError`` naming the shard (the CLI: one line, exit 2), never in an HDF5 crash.

This module imports neither TensorFlow nor (at import time) h5py/pandas.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mammoseg import __version__
from mammoseg.config.plan import read_plan
from mammoseg.data.manifest import is_normal, lesion_rows, read_manifest, rows_of_bucket
from mammoseg.errors import InputError, NoSpaceError
from mammoseg.io.atomic import atomic_path, write_csv_atomic
from mammoseg.io.dicom import read_mammogram
from mammoseg.io.hdf5 import hdf5_writer
from mammoseg.io.masks import read_mask
from mammoseg.patches.geometry import (
    NORMALISE_MODES,
    PatchLargerThanImage,
    crop,
    downscale_mask_window,
    intensity_range_for,
    plan_crops,
    plan_negative_windows,
    preprocess_window,
    roi_rng,
)

__all__ = [
    "PROVENANCE_COLUMNS",
    "SKIPPED_COLUMNS",
    "ROOT_ATTRIBUTES",
    "root_attributes",
    "PatchParams",
    "PatchTables",
    "image_lesions",
    "extract_shard",
    "store_shard",
    "write_shard",
    "read_table",
    "read_shard_attributes",
    "write_patch_manifest",
    "render_grid",
    "run_extract",
    "run_patch_manifest",
]

#: provenance column -> kind ("str" stored as UTF-8 variable-length strings, "int" as int64)
PROVENANCE_COLUMNS: dict[str, str] = {
    "roi_id": "str",
    "image_id": "str",
    "patient_id": "str",
    "split": "str",
    "abnormality_id": "int",
    "copy_index": "int",  # 0 = centred crop, 1..K = shifted copies
    "crop_row": "int",  # top-left corner of the window in full-image pixels
    "crop_col": "int",
    "crop_size": "int",  # window side 2**n in full-image pixels
    "shift_row": "int",  # centre offset drawn for this copy, full-image pixels (0 for the centred crop)
    "shift_col": "int",
    "downscale": "int",  # stored patch = window downscaled by this factor
    "bbox_r0": "int",  # lesion bounding box in full-image pixels, r1/c1 exclusive
    "bbox_c0": "int",
    "bbox_r1": "int",
    "bbox_c1": "int",
    # every ROI of the image with mask pixels inside the window, ';'-separated: the patch's mask is their union
    "rois_in_window": "str",
}
SKIPPED_COLUMNS: dict[str, str] = {"roi_id": "str", "image_id": "str", "reason": "str", "message": "str"}
ROOT_ATTRIBUTES = (
    "config_hash", "mammoseg_version", "h5py_version", "hdf5_version", "numpy_version", "n", "window_size",
    "patch_size", "downscale", "normalise", "n_shifted", "max_shift", "seed", "n_negative", "negative_min_mean",
    "n_normal", "shard_index", "n_shards", "compression", "image_compression",
)


@dataclass(frozen=True)
class PatchParams:
    """Validated extraction parameters (see ``patches`` in the config schema)."""

    n: int
    downscale: int
    n_shifted: int
    max_shift: float
    seed: int
    n_negative: int = 0
    negative_min_mean: float = 0.05
    n_normal: int = 0
    normalise: str = "window"

    @property
    def window_size(self) -> int:
        """Window side in full-image pixels (``2**n``)."""
        return 2 ** self.n

    @property
    def patch_size(self) -> int:
        """Stored patch side in pixels (``2**n // downscale``)."""
        return self.window_size // self.downscale

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"patch exponent n must be >= 1, got {self.n}")
        if self.downscale < 1 or self.window_size % self.downscale:
            raise ValueError(f"downscale {self.downscale} must be >= 1 and divide the window side 2**{self.n}")
        if self.n_shifted < 0:
            raise ValueError(f"n_shifted must be >= 0, got {self.n_shifted}")
        if not 0 <= self.max_shift <= 0.5:
            raise ValueError(f"max_shift must be in [0, 0.5] (a fraction of the window side), got {self.max_shift}")
        if self.normalise not in NORMALISE_MODES:
            raise ValueError(f"normalise must be one of {NORMALISE_MODES}, got {self.normalise!r}")


def root_attributes(config_hash: str, params: PatchParams, *, shard_index: int, n_shards: int,
                    compression: str | None, image_compression: str | None) -> dict[str, Any]:  # fmt: skip
    """The :data:`ROOT_ATTRIBUTES` of a shard made with ``params``: the one place they are built, for extracted and
    mined shards alike (a mined shard's ``params`` have no shifted, negative or normal windows).

    ``config_hash``: the key of the patch settings (the plan's ``patches_key``); ``compression`` and
    ``image_compression``: the HDF5 filters (None is stored as ``"none"``). Library versions are this process's.
    """
    import h5py

    return {
        "config_hash": config_hash, "mammoseg_version": __version__, "h5py_version": h5py.__version__,
        "hdf5_version": h5py.version.hdf5_version, "numpy_version": np.__version__, "n": params.n,
        "window_size": params.window_size, "patch_size": params.patch_size, "downscale": params.downscale,
        "normalise": params.normalise, "n_shifted": params.n_shifted, "max_shift": params.max_shift,
        "seed": params.seed, "n_negative": params.n_negative, "negative_min_mean": params.negative_min_mean,
        "n_normal": params.n_normal, "shard_index": shard_index, "n_shards": n_shards,
        "compression": compression or "none", "image_compression": image_compression or "none",
    }


@dataclass
class PatchTables:
    """Provenance and skip rows collected in memory (small: a few ints/strings per patch)."""

    provenance: dict[str, list] = field(default_factory=lambda: {c: [] for c in PROVENANCE_COLUMNS})
    skipped: dict[str, list] = field(default_factory=lambda: {c: [] for c in SKIPPED_COLUMNS})

    def skip(self, roi_id: str, image_id: str, reason: str, message: str) -> None:
        for key, value in zip(SKIPPED_COLUMNS, (roi_id, image_id, reason, message)):
            self.skipped[key].append(value)


def _describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class _Lesion:
    """One kept ROI of an image: its row in the manifest, foreground box (half-open) and mask inside that box."""

    roi: dict
    bbox: tuple[int, int, int, int]
    mask_in_box: np.ndarray  # bool (r1 - r0, c1 - c0)

    def inside(self, row: int, col: int, size: int) -> bool:
        """True when some foreground pixel of this lesion lies inside the window (row, col, size)."""
        r0, c0, r1, c1 = self.bbox
        top, bottom = max(row, r0), min(row + size, r1)
        left, right = max(col, c0), min(col + size, c1)
        return top < bottom and left < right and bool(
            self.mask_in_box[top - r0 : bottom - r0, left - c0 : right - c0].any())


def _union_box(lesions: Sequence[_Lesion]) -> tuple[int, int, int, int]:
    boxes = np.array([lesion.bbox for lesion in lesions])
    return int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max())


def _roi_patches(image: np.ndarray, union: np.ndarray, lesion: _Lesion, lesions: Sequence[_Lesion],
                 params: PatchParams, intensity_range: tuple[float, float] | None):  # fmt: skip
    """Yield (provenance row, image patch float32 (s, s), mask patch uint8 (s, s)) for each crop of one ROI.

    ``intensity_range``: the image's, for ``params.normalise`` (:func:`mammoseg.patches.geometry.intensity_range_for`).

    The crops are placed around this ROI (:func:`mammoseg.patches.geometry.plan_crops`); the mask patch is the
    union of *every* lesion of the image inside the window, so a second mass that a window catches is taught as
    a mass, not as background.
    """
    roi, bbox = lesion.roi, lesion.bbox
    crops = plan_crops(bbox, image.shape, params.window_size, params.n_shifted, params.max_shift,
                       roi_rng(params.seed, roi["roi_id"]))
    union_box = _union_box(lesions)
    for c in crops:
        row = {
            "roi_id": roi["roi_id"], "image_id": roi["image_id"], "patient_id": roi["patient_id"],
            "split": roi["split"], "abnormality_id": int(roi["abnormality_id"]), "copy_index": c.copy_index,
            "crop_row": c.row, "crop_col": c.col, "crop_size": c.size, "shift_row": c.shift_row,
            "shift_col": c.shift_col, "downscale": params.downscale,
            "bbox_r0": bbox[0], "bbox_c0": bbox[1], "bbox_r1": bbox[2], "bbox_c1": bbox[3],
            "rois_in_window": ";".join(other.roi["roi_id"] for other in lesions if other.inside(c.row, c.col, c.size)),
        }
        image_patch = preprocess_window(crop(image, c.row, c.col, c.size), params.downscale, intensity_range)
        mask_patch = downscale_mask_window(union, c.row, c.col, c.size, params.downscale, union_box)
        yield row, image_patch, mask_patch


def image_lesions(image_path: Path, image_shape: tuple[int, int], rois: Sequence[dict], base: Path,
                   tables: PatchTables) -> tuple[list[_Lesion], np.ndarray]:  # fmt: skip
    """Read the masks of one image: the usable lesions and their union (bool, the image's shape); skips recorded."""
    image_id = rois[0]["image_id"]
    union = np.zeros(image_shape, dtype=bool)
    lesions = []
    for roi in lesion_rows(rois):  # a normal image's row has no mask
        mask_path = base / roi["mask_path"]
        try:
            read = read_mask(mask_path, allow_raster=True)  # the Kaggle layout's masks are PNG/JPEG
        except Exception as exc:
            tables.skip(roi["roi_id"], image_id, "unreadable_mask", f"{mask_path}: {_describe_error(exc)}")
            continue
        if read.mask.shape != image_shape:
            tables.skip(roi["roi_id"], image_id, "mask_size_mismatch",
                        f"{mask_path}: mask {read.mask.shape} differs from image {image_shape} ({image_path})")
            continue
        if read.bbox is None:
            tables.skip(roi["roi_id"], image_id, "empty_mask", f"{mask_path}: mask has no foreground pixel")
            continue
        r0, c0, r1, c1 = read.bbox
        box = read.mask[r0:r1, c0:c1]
        union[r0:r1, c0:c1] |= box  # the lesion's box only: a full-size mask is mostly background
        lesions.append(_Lesion(roi=roi, bbox=read.bbox, mask_in_box=box.copy()))
    return lesions, union


def _image_patches(image_path: Path, rois: Sequence[dict], base: Path, params: PatchParams, tables: PatchTables):
    """Read one image and its masks; yield its patches and record skips. One image in memory at a time."""
    image_id = rois[0]["image_id"]
    try:
        # a restructured Kaggle set holds the JPEG/PNG files that restructuring indexed and vetted
        image = read_mammogram(image_path, allow_raster=True)
    except Exception as exc:  # any decode failure of one file must not stop the shard: record it
        for roi in rois:
            tables.skip(roi["roi_id"], image_id, "unreadable_image", f"{image_path}: {_describe_error(exc)}")
        return
    lesions, union = image_lesions(image_path, image.shape, rois, base, tables)
    intensity_range = intensity_range_for(image, params.normalise)
    for lesion in lesions:
        try:
            yield from _roi_patches(image, union, lesion, lesions, params, intensity_range)
        except PatchLargerThanImage as exc:
            tables.skip(lesion.roi["roi_id"], image_id, "patch_larger_than_image", f"{image_path}: {exc}")
    count = params.n_normal if all(is_normal(roi) for roi in rois) else params.n_negative
    yield from _negative_patches(image, union, rois[0], params, count, intensity_range)


def _negative_patches(image: np.ndarray, lesions: np.ndarray, roi: dict, params: PatchParams, count: int,
                      intensity_range: tuple[float, float] | None):  # fmt: skip
    """``count`` lesion-free windows of one image (``n_negative`` for an image with lesions, ``n_normal`` for a
    normal image; beyond the paper): copy_index -1, all-zero masks."""
    if count <= 0:
        return
    image_id = roi["image_id"]
    corners = plan_negative_windows(lesions, image, params.window_size, count, params.negative_min_mean,
                                    roi_rng(params.seed, f"{image_id}#negatives"))
    s = params.patch_size
    for j, (r, c) in enumerate(corners):
        row = {
            "roi_id": f"{image_id}_neg{j}", "image_id": image_id, "patient_id": roi["patient_id"],
            "split": roi["split"], "abnormality_id": 0, "copy_index": -1, "crop_row": r, "crop_col": c,
            "crop_size": params.window_size, "shift_row": 0, "shift_col": 0, "downscale": params.downscale,
            "bbox_r0": -1, "bbox_c0": -1, "bbox_r1": -1, "bbox_c1": -1, "rois_in_window": "",
        }
        window = crop(image, r, c, params.window_size)
        yield row, preprocess_window(window, params.downscale, intensity_range), np.zeros((s, s), dtype=np.uint8)


def _string_dtype():
    import h5py

    return h5py.string_dtype("utf-8")


def _write_table(group, columns: dict[str, str], values: dict[str, list]) -> None:
    for name, kind in columns.items():
        if kind == "str":
            data = np.array([str(v) for v in values[name]], dtype=object)
            group.create_dataset(name, data=data, shape=(len(data),), dtype=_string_dtype(), track_times=False)
        else:
            group.create_dataset(name, data=np.asarray(values[name], dtype=np.int64).reshape(-1),
                                 track_times=False)


def read_table(h5file, group_name: str) -> "pandas.DataFrame":  # noqa: F821
    """Read a ``provenance`` or ``skipped`` group of an open shard into a DataFrame (strings decoded)."""
    import pandas as pd

    columns = PROVENANCE_COLUMNS if group_name == "provenance" else SKIPPED_COLUMNS
    group = h5file[group_name]
    data = {}
    for name, kind in columns.items():
        if name not in group:
            raise InputError(f"{h5file.filename}: '{group_name}' has no column '{name}'")
        values = group[name]
        data[name] = values.asstr()[()] if kind == "str" else values[()]
    return pd.DataFrame({k: (list(v) if len(v) else []) for k, v in data.items()}, columns=list(columns)).astype(
        {k: ("int64" if kind == "int" else "object") for k, kind in columns.items()})


def read_shard_attributes(shard_path: str | Path) -> dict[str, Any]:
    """Root attributes of a shard as plain Python values."""
    import h5py

    with h5py.File(shard_path, "r") as h5:
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in h5.attrs.items()}


def _check_free_space(out_path: str | Path, max_patches: int, patch_size: int) -> None:
    """Refuse to start a shard whose patch pixels alone cannot fit on its disk (pixel bytes + 1 MiB).

    Why: a full disk is found before any image is decoded, with the sizes in the message. It is not a bound on
    the file (HDF5's chunk index and the provenance add some 400 bytes per patch, which dominate for tiny
    patches); a disk that fills up during the write is handled by :func:`mammoseg.io.hdf5.hdf5_writer`.
    """
    import errno
    import shutil

    folder = Path(out_path).parent
    folder.mkdir(parents=True, exist_ok=True)
    needed = max_patches * patch_size * patch_size * 5 + (1 << 20)  # float32 image + uint8 mask per pixel
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise NoSpaceError(errno.ENOSPC,
                           f"{out_path}: not enough free space for the shard: up to {needed / 2**20:.1f} MiB"
                                    f" needed ({max_patches} patches of {patch_size}x{patch_size} px), "
                                    f"{free / 2**20:.1f} MiB free")


def _filter(name: str | None, key: str) -> str | None:
    value = None if name in (None, "none") else str(name)
    if value not in (None, "lzf", "gzip"):
        raise ValueError(f"{key} must be 'lzf', 'gzip' or 'none', got {name!r}")
    return value


def _collection_batches(groups: dict[str, list[dict]], base: Path, params: PatchParams, tables: PatchTables,
                        manifest_csv: Path):  # fmt: skip
    """Per image of ``groups`` (image_id -> its ROI rows), the list of its patches (provenance row, image patch,
    mask patch); images that cannot be used are recorded in ``tables`` and give an empty list."""
    for image_id, rois in groups.items():
        image_paths = {r["image_path"] for r in rois}
        if len(image_paths) > 1:
            for roi in rois:
                tables.skip(roi["roi_id"], image_id, "inconsistent_image_path",
                            f"{manifest_csv}: image {image_id} has several image_path values")
            yield []
            continue
        yield list(_image_patches(base / rois[0]["image_path"], rois, base, params, tables))


def write_shard(out_path: str | Path, image_batches: Iterable[list[tuple[dict, np.ndarray, np.ndarray]]], *,
                max_patches: int, patch_size: int, compression: str | None, image_compression: str | None,
                tables: PatchTables, attrs: dict[str, Any], extra_attrs: dict[str,
                                                                              Any] | None = None) -> int:  # fmt: skip
    """Write patches into one HDF5 shard (layout in the module docstring), atomically; the one shard writer.

    Parameters
    ----------
    out_path : the shard (written under a temporary name and renamed when complete)
    image_batches : per image, a list of (provenance row with every :data:`PROVENANCE_COLUMNS` key, image patch
        float32 (s, s) in [0, 1], mask patch uint8 (s, s) in {0, 1}); pulled one image at a time, and not pulled
        any further once the disk is full. Skips found while they are made go into ``tables``.
    max_patches : an upper bound on the patches (the datasets are allocated for it and cut to the count)
    patch_size : s, pixels
    compression, image_compression : HDF5 filters of ``masks`` and ``images`` (``"lzf"``, ``"gzip"`` or None)
    tables : provenance and skipped rows; the skipped ones collected beforehand are written too
    attrs : every key of :data:`ROOT_ATTRIBUTES`; extra_attrs : further root attributes (after them)

    Returns
    -------
    int, the number of patches written.
    """
    missing = [key for key in ROOT_ATTRIBUTES if key not in attrs]
    if missing:
        raise ValueError(f"{out_path}: root attribute(s) {missing} not given")
    s = int(patch_size)
    _check_free_space(out_path, max_patches, s)
    with atomic_path(out_path) as tmp, hdf5_writer(tmp, track_order=False) as (h5, disk):
        chunk = {"chunks": (1, s, s), "maxshape": (None, s, s), "track_times": False}
        # sized for every patch the shard can hold and cut to the patches written at the end: one resize
        # instead of two per image (chunks are allocated on write, so the unused rows cost nothing)
        images = h5.create_dataset("images", shape=(max_patches, s, s), dtype=np.float32,
                                   compression=image_compression, **chunk)  # fmt: skip
        masks = h5.create_dataset("masks", shape=(max_patches, s, s), dtype=np.uint8, compression=compression,
                                  **chunk)  # fmt: skip
        count = 0
        batches = iter(image_batches)
        # One slice write per dataset and image (its 5 x ROIs patches), not per patch: HDF5 calls
        # dominated extraction time. Not across images either: patches kept while the next full-size
        # image decodes fragment the heap, and extraction of real mammograms got 20 % slower (measured).
        while disk.error is None:  # the disk is full: stop, hdf5_writer raises the error naming the shard
            batch = next(batches, None)
            if batch is None:
                break
            if not batch:
                continue
            images[count:count + len(batch)] = np.stack([image_patch for _, image_patch, _ in batch])
            masks[count:count + len(batch)] = np.stack([mask_patch for _, _, mask_patch in batch])
            for row, _, _ in batch:
                for key in PROVENANCE_COLUMNS:
                    tables.provenance[key].append(row[key])
            count += len(batch)
        images.resize(count, axis=0)
        masks.resize(count, axis=0)
        _write_table(h5.create_group("provenance"), PROVENANCE_COLUMNS, tables.provenance)
        _write_table(h5.create_group("skipped"), SKIPPED_COLUMNS, tables.skipped)
        for key in ROOT_ATTRIBUTES:
            h5.attrs[key] = attrs[key]
        for key, value in (extra_attrs or {}).items():
            h5.attrs[key] = value
    return count


def store_shard(out_path: str | Path, image_batches: Iterable[list[tuple[dict, np.ndarray, np.ndarray]]], *,
                params: PatchParams, tables: PatchTables, max_patches: int, config_hash: str, shard_index: int,
                n_shards: int, compression: str | None, image_compression: str | None,
                extra_attrs: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Write one shard made with ``params`` and say what it holds: the common end of extraction and mining.

    ``compression`` and ``image_compression`` are checked (``"lzf"``, ``"gzip"``, ``"none"`` or None), the root
    attributes built (:func:`root_attributes`) and the patches written (:func:`write_shard`, where the other
    arguments are described).

    Returns
    -------
    dict with ``n_patches``, ``n_skipped`` and ``skipped_reasons`` ({reason: count}).
    """
    compression = _filter(compression, "compression")
    image_compression = _filter(image_compression, "image_compression")
    attrs = root_attributes(config_hash, params, shard_index=shard_index, n_shards=n_shards, compression=compression,
                            image_compression=image_compression)
    count = write_shard(out_path, image_batches, max_patches=max_patches, patch_size=params.patch_size,
                        compression=compression, image_compression=image_compression, tables=tables, attrs=attrs,
                        extra_attrs=extra_attrs)
    reasons: dict[str, int] = {}
    for reason in tables.skipped["reason"]:
        reasons[reason] = reasons.get(reason, 0) + 1
    return {"n_patches": count, "n_skipped": len(tables.skipped["roi_id"]), "skipped_reasons": reasons}


def extract_shard(
    manifest_csv: str | Path,
    out_path: str | Path,
    *,
    shard_index: int,
    n_shards: int,
    n: int,
    downscale: int,
    n_shifted: int,
    max_shift: float,
    seed: int,
    config_hash: str = "",
    compression: str | None = "lzf",
    image_compression: str | None = None,
    n_negative: int = 0,
    negative_min_mean: float = 0.05,
    n_normal: int = 0,
    normalise: str = "window",
) -> dict[str, Any]:
    """Extract the patches of every ROI whose image hashes to ``shard_index`` into one HDF5 shard.

    Parameters
    ----------
    manifest_csv : a restructured collection's manifest (paths inside are relative to its folder)
    out_path : the shard to write (written to a temporary name beside it and renamed when complete)
    shard_index, n_shards : which shard, of how many (:func:`mammoseg.data.manifest.bucket_of`)
    n : window side ``2**n`` full-image pixels (paper: 10)
    downscale : integer factor; stored patches are ``2**n // downscale`` pixels square (paper: 4)
    n_shifted : shifted copies per ROI (paper: 4)
    max_shift : largest centre shift per axis as a fraction of ``2**n`` (0..0.5)
    seed : seeds each ROI's generator together with its roi_id
    config_hash : recorded as a root attribute
    n_negative : lesion-free windows per image, beyond the paper (copy_index -1, roi_id ``<image_id>_negK``,
        all-zero mask; see :func:`mammoseg.patches.geometry.plan_negative_windows`); 0 = the paper's method
    negative_min_mean : a negative window's mean must reach this fraction of the image maximum
    n_normal : lesion-free windows per normal image (a manifest row without ROI, ``data.normals``)
    normalise : ``"window"`` (each window min-max, the paper) or ``"image"`` (the image's intensity range,
        :func:`mammoseg.patches.geometry.intensity_range_for`)
    compression : HDF5 filter of ``masks``: ``"lzf"`` (the contract's default), ``"gzip"`` or ``None``/``"none"``.
        0/1 masks are mostly runs: lzf keeps about 3 % of their bytes at almost no cost.
    image_compression : HDF5 filter of ``images``, same choices, default none. Measured (benchmarks/README.md):
        lzf saves 0 % of the bytes of the demo's float32 patches and 7 % of real lesion windows (the mantissas of
        normalised block means are noise to it), while it costs about a fifth of the extraction time on
        full-size mammograms and slows every per-index read in training.

    Returns
    -------
    dict with ``path``, ``shard_index``, ``n_images``, ``n_rois``, ``n_patches``, ``n_skipped``,
    ``skipped_reasons`` ({reason: count}) and ``seconds``.

    Raises
    ------
    ValueError
        For an unreadable manifest, missing columns or invalid parameters. Unreadable or unusable images and
        masks are not errors: they are recorded in the shard's ``skipped`` table with a reason.
    """
    started = time.perf_counter()
    params = PatchParams(int(n), int(downscale), int(n_shifted), float(max_shift), int(seed), int(n_negative),
                         float(negative_min_mean), int(n_normal), str(normalise))
    if not 0 <= shard_index < n_shards:
        raise ValueError(f"shard_index {shard_index} must be in [0, {n_shards})")
    manifest_csv = Path(manifest_csv)
    base = manifest_csv.resolve().parent
    mine = rows_of_bucket(read_manifest(manifest_csv), shard_index, n_shards)
    # sorted so that the file does not depend on the manifest's row order
    records = sorted(mine, key=lambda row: (row["image_id"], row["roi_id"]))
    groups: dict[str, list[dict]] = {}
    for roi in records:
        groups.setdefault(roi["image_id"], []).append(roi)
    tables = PatchTables()
    lesion_records = lesion_rows(records)
    normal_images = len(groups) - len({row["image_id"] for row in lesion_records})
    max_patches = (len(lesion_records) * (1 + params.n_shifted) + (len(groups) - normal_images) * params.n_negative
                   + normal_images * params.n_normal)
    stored = store_shard(out_path, _collection_batches(groups, base, params, tables, manifest_csv), params=params,
                         tables=tables, max_patches=max_patches, config_hash=str(config_hash),
                         shard_index=int(shard_index), n_shards=int(n_shards), compression=compression,
                         image_compression=image_compression)
    return {"path": str(out_path), "shard_index": int(shard_index), "n_images": len(groups),
            "n_rois": len(lesion_records), **stored, "seconds": round(time.perf_counter() - started, 3)}


# --------------------------------------------------------------------------------------------------------------
# Patch manifest and picture
# --------------------------------------------------------------------------------------------------------------


def write_patch_manifest(shard_paths: Iterable[str | Path], out_csv: str | Path,
                         skipped_csv: str | Path) -> dict[str, Any]:
    """One CSV row per patch over all shards and one per skipped ROI.

    ``out_csv`` columns: ``shard`` (the shard path as given), ``row`` (index in the shard's datasets), then
    :data:`PROVENANCE_COLUMNS`. ``skipped_csv`` columns: ``shard`` then :data:`SKIPPED_COLUMNS`.

    Returns
    -------
    dict with ``n_shards``, ``n_patches``, ``n_skipped``.
    """
    import h5py
    import pandas as pd

    patches, skipped = [], []
    for path in shard_paths:
        try:
            with h5py.File(path, "r") as h5:
                prov = read_table(h5, "provenance")
                skip = read_table(h5, "skipped")
        except OSError as exc:
            raise InputError(f"{path}: cannot read shard: {exc}") from exc
        prov.insert(0, "row", np.arange(len(prov), dtype=np.int64))
        prov.insert(0, "shard", str(path))
        skip.insert(0, "shard", str(path))
        patches.append(prov)
        skipped.append(skip)
    empty_prov = pd.DataFrame(columns=["shard", "row", *PROVENANCE_COLUMNS])
    empty_skip = pd.DataFrame(columns=["shard", *SKIPPED_COLUMNS])
    patch_frame = pd.concat(patches, ignore_index=True) if patches else empty_prov
    skip_frame = pd.concat(skipped, ignore_index=True) if skipped else empty_skip
    write_csv_atomic(out_csv, patch_frame)
    write_csv_atomic(skipped_csv, skip_frame)
    return {"n_shards": len(patches), "n_patches": int(len(patch_frame)), "n_skipped": int(len(skip_frame))}


def render_grid(shard_path: str | Path, out_png: str | Path, n: int = 16) -> dict[str, Any]:
    """Write a PNG grid of ``n`` patches of a shard (evenly spaced over its rows) with the mask contour in red.

    Uses Matplotlib's object API with the Agg canvas, so it never touches pyplot's global backend.

    Returns
    -------
    dict with ``path`` and ``rows`` (the shard rows shown).
    """
    import h5py
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    with h5py.File(shard_path, "r") as h5:
        total = h5["images"].shape[0]
        rows = sorted(set(np.linspace(0, total - 1, num=min(n, total)).round().astype(int).tolist())) if total else []
        prov = read_table(h5, "provenance") if total else None
        images = [h5["images"][r] for r in rows]
        masks = [h5["masks"][r] for r in rows]
    cols = max(1, int(np.ceil(np.sqrt(max(len(rows), 1)))))
    grid_rows = max(1, int(np.ceil(len(rows) / cols)))
    fig = Figure(figsize=(2.2 * cols, 2.4 * grid_rows), dpi=100)
    FigureCanvasAgg(fig)
    if not rows:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, f"{Path(shard_path).name}: empty shard", ha="center", va="center")
        ax.axis("off")
    for k, (row, image, mask) in enumerate(zip(rows, images, masks)):
        ax = fig.add_subplot(grid_rows, cols, k + 1)
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        if mask.any() and not mask.all():
            ax.contour(mask, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"{prov.roi_id[row]} #{prov.copy_index[row]}", fontsize=6)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return {"path": str(out_png), "rows": rows}


# --------------------------------------------------------------------------------------------------------------
# Stage entries
# --------------------------------------------------------------------------------------------------------------


def run_extract(plan: str | Path, manifest_csv: str | Path, out_path: str | Path, shard_index: int, *,
                compression: str = "lzf", image_compression: str = "none") -> dict[str, Any]:  # fmt: skip
    """Stage ``extract`` for one shard: geometry and sampling from ``plan.json``, storage filters as given.

    The shard's ``config_hash`` attribute is the plan's patches key, so a shard can be traced to its settings.
    """
    p = read_plan(plan)
    summary = extract_shard(
        manifest_csv, out_path, shard_index=int(shard_index), n_shards=p.n_shards, n=p.n, downscale=p.downscale,
        n_shifted=p.n_shifted, max_shift=p.max_shift, seed=p.seed, config_hash=p.patches_key,
        compression=compression, image_compression=image_compression, n_negative=p.n_negative,
        negative_min_mean=p.negative_min_mean, n_normal=p.n_normal, normalise=p.normalise,
    )
    print(f"shard {shard_index}/{p.n_shards}: {summary['n_patches']} patches of {summary['n_rois']} ROIs in "
          f"{summary['n_images']} images, {summary['n_skipped']} ROIs skipped {summary['skipped_reasons']} "
          f"({summary['seconds']} s) -> {out_path}")
    return summary


def run_patch_manifest(plan: str | Path, shard_paths: Iterable[str | Path], out_csv: str | Path,
                       skipped_csv: str | Path, grid_png: str | Path | None = None) -> dict[str, Any]:
    """Stage ``patch manifest``: checks every shard belongs to the plan, writes both CSVs (and a patch grid)."""
    expected = read_plan(plan).patches_key
    shard_paths = list(shard_paths)
    for path in shard_paths:
        found = read_shard_attributes(path).get("config_hash")
        if found != expected:
            raise InputError(f"{path}: built for patches {found!r}, not for this plan's {expected!r}; re-run "
                             "extraction")
    summary = write_patch_manifest(shard_paths, out_csv, skipped_csv)
    if grid_png is not None:
        render_grid(max(shard_paths, key=_patch_count), grid_png, n=16)
    return summary


def _patch_count(shard_path: str | Path) -> int:
    import h5py

    with h5py.File(shard_path, "r") as h5:
        return int(h5["images"].shape[0])
