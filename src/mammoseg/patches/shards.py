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

Images are assigned to shards by a stable hash of ``image_id`` (:func:`shard_of`), so all ROIs of one image are in
one shard and a changed image rebuilds exactly one shard. Files are written under a temporary name and renamed
(:func:`mammoseg.atomic.atomic_path`) and are byte-identical for identical inputs and parameters.

This module imports neither TensorFlow nor (at import time) h5py/pandas: the Snakefile imports :func:`shard_of`
while it builds the DAG.
"""

from __future__ import annotations

import csv
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mammoseg import __version__
from mammoseg.io.atomic import atomic_path, write_csv_atomic
from mammoseg.patches.geometry import (
    PatchLargerThanImage,
    crop,
    downscale_mask_window,
    plan_crops,
    plan_negative_windows,
    preprocess_window,
    roi_rng,
)

__all__ = [
    "PROVENANCE_COLUMNS",
    "SKIPPED_COLUMNS",
    "ROOT_ATTRIBUTES",
    "MANIFEST_COLUMNS",
    "shard_of",
    "shard_image_ids",
    "shard_input_files",
    "extract_shard",
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
}
SKIPPED_COLUMNS: dict[str, str] = {"roi_id": "str", "image_id": "str", "reason": "str", "message": "str"}
ROOT_ATTRIBUTES = (
    "config_hash", "mammoseg_version", "h5py_version", "hdf5_version", "numpy_version", "n", "window_size",
    "patch_size", "downscale", "n_shifted", "max_shift", "seed", "n_negative", "negative_min_mean", "shard_index",
    "n_shards", "compression", "image_compression",
)
#: manifest.csv columns extraction needs (docs/architecture.md)
MANIFEST_COLUMNS = ("roi_id", "image_id", "patient_id", "split", "abnormality_id", "image_path", "mask_path")


# --------------------------------------------------------------------------------------------------------------
# Shard assignment
# --------------------------------------------------------------------------------------------------------------


def shard_of(image_id: str, n_shards: int) -> int:
    """Shard index of an image: ``int(sha1(image_id)) % n_shards`` (stable across runs, platforms, Python versions).

    Keyed by ``image_id`` so that every ROI of an image lands in the same shard.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    return int(hashlib.sha1(str(image_id).encode("utf-8")).hexdigest(), 16) % int(n_shards)


_INTEGER = re.compile(r"-?\d+")


def _read_manifest(manifest_csv: str | Path) -> list[dict[str, str]]:
    """The rows of a restructured collection's manifest.csv as dicts of strings, checked.

    The csv module, not pandas: a shard's few hundred rows parse in a tenth of the time, and the Snakefile calls
    this for every shard while it builds the DAG. Every value stays a string (CBIS fields hold the literal
    'NA'; ids must not become numbers).
    """
    manifest_csv = Path(manifest_csv)
    try:
        with open(manifest_csv, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, restval="")
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{manifest_csv}: cannot read manifest: {exc}") from exc
    missing = [c for c in MANIFEST_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{manifest_csv}: manifest lacks required column(s) {', '.join(missing)}")
    bad_ids = [row["roi_id"] for row in rows if not _INTEGER.fullmatch(row["abnormality_id"])]
    if bad_ids:
        raise ValueError(f"{manifest_csv}: abnormality_id is not an integer for ROI(s) {', '.join(bad_ids[:5])}")
    seen: set[str] = set()
    duplicated = [row["roi_id"] for row in rows if row["roi_id"] in seen or seen.add(row["roi_id"])]
    if duplicated:
        raise ValueError(f"{manifest_csv}: duplicated roi_id(s) {', '.join(duplicated[:5])}")
    return rows


def _rows_of_shard(rows: list[dict[str, str]], shard_index: int, n_shards: int) -> list[dict[str, str]]:
    """The manifest rows whose image belongs to the shard."""
    return [row for row in rows if shard_of(row["image_id"], n_shards) == shard_index]


def shard_image_ids(manifest_csv: str | Path, shard_index: int, n_shards: int) -> list[str]:
    """Sorted image ids of ``manifest_csv`` that belong to shard ``shard_index``."""
    return sorted({row["image_id"] for row in _rows_of_shard(_read_manifest(manifest_csv), shard_index, n_shards)})


def shard_input_files(manifest_csv: str | Path, shard_index: int, n_shards: int) -> list[str]:
    """Image and mask files a shard is built from (absolute, sorted): the Snakefile's per-shard inputs.

    Declaring these as a shard's inputs makes Snakemake rebuild only the shard of a changed image.
    """
    base = Path(manifest_csv).resolve().parent
    mine = _rows_of_shard(_read_manifest(manifest_csv), shard_index, n_shards)
    files = {row["image_path"] for row in mine} | {row["mask_path"] for row in mine}
    return sorted(str(base / f) for f in files)


# --------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------


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


@dataclass
class _Tables:
    """Provenance and skip rows collected in memory (small: a few ints/strings per patch)."""

    provenance: dict[str, list] = field(default_factory=lambda: {c: [] for c in PROVENANCE_COLUMNS})
    skipped: dict[str, list] = field(default_factory=lambda: {c: [] for c in SKIPPED_COLUMNS})

    def skip(self, roi_id: str, image_id: str, reason: str, message: str) -> None:
        for key, value in zip(SKIPPED_COLUMNS, (roi_id, image_id, reason, message)):
            self.skipped[key].append(value)


def _describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _roi_patches(image: np.ndarray, mask: np.ndarray, bbox: tuple[int, int, int, int], roi: dict,
                 params: PatchParams):  # fmt: skip
    """Yield (provenance row, image patch float32 (s, s), mask patch uint8 (s, s)) for each crop of one ROI.

    ``bbox`` is the mask's foreground box (:func:`mammoseg.patches.geometry.mask_bbox`).
    """
    crops = plan_crops(bbox, image.shape, params.window_size, params.n_shifted, params.max_shift,
                       roi_rng(params.seed, roi["roi_id"]))
    for c in crops:
        row = {
            "roi_id": roi["roi_id"], "image_id": roi["image_id"], "patient_id": roi["patient_id"],
            "split": roi["split"], "abnormality_id": int(roi["abnormality_id"]), "copy_index": c.copy_index,
            "crop_row": c.row, "crop_col": c.col, "crop_size": c.size, "shift_row": c.shift_row,
            "shift_col": c.shift_col, "downscale": params.downscale,
            "bbox_r0": bbox[0], "bbox_c0": bbox[1], "bbox_r1": bbox[2], "bbox_c1": bbox[3],
        }
        image_patch = preprocess_window(crop(image, c.row, c.col, c.size), params.downscale)
        mask_patch = downscale_mask_window(mask, c.row, c.col, c.size, params.downscale, bbox)
        yield row, image_patch, mask_patch


def _image_patches(image_path: Path, rois: Sequence[dict], base: Path, params: PatchParams, tables: _Tables):
    """Read one image and its masks; yield its patches and record skips. One image in memory at a time."""
    from mammoseg.io.dicom import read_mammogram
    from mammoseg.io.masks import read_mask

    image_id = rois[0]["image_id"]
    try:
        # a restructured Kaggle set holds the JPEG/PNG files that restructuring indexed and vetted
        image = read_mammogram(image_path, allow_raster=True)
    except Exception as exc:  # any decode failure of one file must not stop the shard: record it
        for roi in rois:
            tables.skip(roi["roi_id"], image_id, "unreadable_image", f"{image_path}: {_describe_error(exc)}")
        return
    # the union of the image's lesions, only needed to keep lesion-free windows free of lesions
    lesions = np.zeros(image.shape, dtype=bool) if params.n_negative > 0 else None
    for roi in rois:
        mask_path = base / roi["mask_path"]
        try:
            read = read_mask(mask_path, allow_raster=True)
        except Exception as exc:
            tables.skip(roi["roi_id"], image_id, "unreadable_mask", f"{mask_path}: {_describe_error(exc)}")
            continue
        mask = read.mask
        if mask.shape == image.shape and lesions is not None:
            lesions |= mask
        if mask.shape != image.shape:
            tables.skip(roi["roi_id"], image_id, "mask_size_mismatch",
                        f"{mask_path}: mask {mask.shape} differs from image {image.shape} ({image_path})")
            continue
        if read.bbox is None:
            tables.skip(roi["roi_id"], image_id, "empty_mask", f"{mask_path}: mask has no foreground pixel")
            continue
        try:
            yield from _roi_patches(image, mask, read.bbox, roi, params)
        except PatchLargerThanImage as exc:
            tables.skip(roi["roi_id"], image_id, "patch_larger_than_image", f"{image_path}: {exc}")
    yield from _negative_patches(image, lesions, rois[0], params)


def _negative_patches(image: np.ndarray, lesions: np.ndarray, roi: dict, params: PatchParams):
    """Lesion-free windows of one image (``n_negative``, beyond the paper): copy_index -1, all-zero masks."""
    if params.n_negative <= 0:
        return
    image_id = roi["image_id"]
    corners = plan_negative_windows(lesions, image, params.window_size, params.n_negative,
                                    params.negative_min_mean, roi_rng(params.seed, f"{image_id}#negatives"))
    s = params.patch_size
    for j, (r, c) in enumerate(corners):
        row = {
            "roi_id": f"{image_id}_neg{j}", "image_id": image_id, "patient_id": roi["patient_id"],
            "split": roi["split"], "abnormality_id": 0, "copy_index": -1, "crop_row": r, "crop_col": c,
            "crop_size": params.window_size, "shift_row": 0, "shift_col": 0, "downscale": params.downscale,
            "bbox_r0": -1, "bbox_c0": -1, "bbox_r1": -1, "bbox_c1": -1,
        }
        window = crop(image, r, c, params.window_size)
        yield row, preprocess_window(window, params.downscale), np.zeros((s, s), dtype=np.uint8)


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
            raise ValueError(f"{h5file.filename}: '{group_name}' has no column '{name}'")
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
    """Refuse to start a shard that cannot fit on its disk (upper bound: uncompressed patches + 1 MiB).

    Why before writing: HDF5 does not survive running out of space in the middle of a file. h5py raises the
    ``ENOSPC`` error, but the library then crashes the process (SIGSEGV) when it tries to close the damaged file
    at interpreter exit. Checking first turns the predictable case into a clear ``OSError`` naming the shard.
    """
    import errno
    import shutil

    folder = Path(out_path).parent
    folder.mkdir(parents=True, exist_ok=True)
    needed = max_patches * patch_size * patch_size * 5 + (1 << 20)  # float32 image + uint8 mask per pixel
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"{out_path}: not enough free space for the shard: up to {needed / 2**20:.1f} MiB"
                                    f" needed ({max_patches} patches of {patch_size}x{patch_size} px), "
                                    f"{free / 2**20:.1f} MiB free")


def _filter(name: str | None, key: str) -> str | None:
    value = None if name in (None, "none") else str(name)
    if value not in (None, "lzf", "gzip"):
        raise ValueError(f"{key} must be 'lzf', 'gzip' or 'none', got {name!r}")
    return value


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
) -> dict[str, Any]:
    """Extract the patches of every ROI whose image hashes to ``shard_index`` into one HDF5 shard.

    Parameters
    ----------
    manifest_csv : a restructured collection's manifest (paths inside are relative to its folder)
    out_path : the shard to write (written to a temporary name beside it and renamed when complete)
    shard_index, n_shards : which shard, of how many (:func:`shard_of`)
    n : window side ``2**n`` full-image pixels (paper: 10)
    downscale : integer factor; stored patches are ``2**n // downscale`` pixels square (paper: 4)
    n_shifted : shifted copies per ROI (paper: 4)
    max_shift : largest centre shift per axis as a fraction of ``2**n`` (0..0.5)
    seed : seeds each ROI's generator together with its roi_id
    config_hash : recorded as a root attribute
    n_negative : lesion-free windows per image, beyond the paper (copy_index -1, roi_id ``<image_id>_negK``,
        all-zero mask; see :func:`mammoseg.patches.geometry.plan_negative_windows`); 0 = the paper's method
    negative_min_mean : a negative window's mean must reach this fraction of the image maximum
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
    import h5py

    started = time.perf_counter()
    compression = _filter(compression, "compression")
    image_compression = _filter(image_compression, "image_compression")
    params = PatchParams(int(n), int(downscale), int(n_shifted), float(max_shift), int(seed), int(n_negative),
                         float(negative_min_mean))
    if not 0 <= shard_index < n_shards:
        raise ValueError(f"shard_index {shard_index} must be in [0, {n_shards})")
    manifest_csv = Path(manifest_csv)
    base = manifest_csv.resolve().parent
    mine = _rows_of_shard(_read_manifest(manifest_csv), shard_index, n_shards)
    # sorted so that the file does not depend on the manifest's row order
    records = sorted(mine, key=lambda row: (row["image_id"], row["roi_id"]))
    groups: dict[str, list[dict]] = {}
    for roi in records:
        groups.setdefault(roi["image_id"], []).append(roi)
    tables = _Tables()
    s = params.patch_size
    max_patches = len(records) * (1 + params.n_shifted) + len(groups) * params.n_negative
    _check_free_space(out_path, max_patches, s)
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w", track_order=False) as h5:
            chunk = {"chunks": (1, s, s), "maxshape": (None, s, s), "track_times": False}
            # sized for every patch the shard can hold and cut to the patches written at the end: one resize
            # instead of two per image (chunks are allocated on write, so the unused rows cost nothing)
            images = h5.create_dataset("images", shape=(max_patches, s, s), dtype=np.float32,
                                       compression=image_compression, **chunk)  # fmt: skip
            masks = h5.create_dataset("masks", shape=(max_patches, s, s), dtype=np.uint8, compression=compression,
                                      **chunk)  # fmt: skip
            count = 0
            for image_id, rois in groups.items():
                image_paths = {r["image_path"] for r in rois}
                if len(image_paths) > 1:
                    for roi in rois:
                        tables.skip(roi["roi_id"], image_id, "inconsistent_image_path",
                                    f"{manifest_csv}: image {image_id} has several image_path values")
                    continue
                # One slice write per dataset and image (its 5 x ROIs patches), not per patch: HDF5 calls
                # dominated extraction time. Not across images either: patches kept while the next full-size
                # image decodes fragment the heap, and extraction of real mammograms got 20 % slower (measured).
                batch = list(_image_patches(base / rois[0]["image_path"], rois, base, params, tables))
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
            attrs = {
                "config_hash": str(config_hash), "mammoseg_version": __version__, "h5py_version": h5py.__version__,
                "hdf5_version": h5py.version.hdf5_version, "numpy_version": np.__version__, "n": params.n,
                "window_size": params.window_size, "patch_size": s, "downscale": params.downscale,
                "n_shifted": params.n_shifted, "max_shift": params.max_shift, "seed": params.seed,
                "n_negative": params.n_negative, "negative_min_mean": params.negative_min_mean,
                "shard_index": int(shard_index), "n_shards": int(n_shards), "compression": compression or "none",
                "image_compression": image_compression or "none",
            }
            for key in ROOT_ATTRIBUTES:
                h5.attrs[key] = attrs[key]
    reasons: dict[str, int] = {}
    for reason in tables.skipped["reason"]:
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "path": str(out_path), "shard_index": int(shard_index), "n_images": len(groups), "n_rois": len(records),
        "n_patches": count, "n_skipped": len(tables.skipped["roi_id"]), "skipped_reasons": reasons,
        "seconds": round(time.perf_counter() - started, 3),
    }


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
            raise ValueError(f"{path}: cannot read shard: {exc}") from exc
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


def _patch_section(config: dict) -> dict:
    from mammoseg.config import validate_config

    return validate_config(config)["patches"]


def run_extract(config: dict, manifest_csv: str | Path, out_path: str | Path, shard_index: int) -> dict[str, Any]:
    """Stage ``extract`` for one shard: parameters from ``config['patches']`` (defaults filled in)."""
    from mammoseg.config import section_hash

    section = _patch_section(config)
    return extract_shard(
        manifest_csv, out_path, shard_index=int(shard_index), n_shards=section["n_shards"], n=section["n"],
        downscale=section["downscale"], n_shifted=section["n_shifted"], max_shift=section["max_shift"],
        seed=section["seed"], config_hash=section_hash(section),
        compression=section["compression"], image_compression=section["image_compression"],
        n_negative=section["n_negative"],
        negative_min_mean=section["negative_min_mean"],
    )


def run_patch_manifest(config: dict, shard_paths: Iterable[str | Path], out_csv: str | Path,
                       skipped_csv: str | Path) -> dict[str, Any]:
    """Stage ``patch manifest``: checks every shard was built with this config, then writes both CSVs."""
    from mammoseg.config import section_hash

    expected = section_hash(_patch_section(config))
    shard_paths = list(shard_paths)
    for path in shard_paths:
        found = read_shard_attributes(path).get("config_hash")
        if found != expected:
            raise ValueError(f"{path}: built with config hash {found!r}, the current 'patches' config is {expected!r};"
                             " re-run extraction")
    return write_patch_manifest(shard_paths, out_csv, skipped_csv)
