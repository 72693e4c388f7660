"""Reading a restructured collection's ``manifest.csv`` and cutting it into stable buckets of images.

The manifest (one row per kept ROI, and one row with empty ROI columns per lesion-free image of ``data.normals``;
columns in docs/architecture.md) is read with the csv module, not pandas:
the Snakefile reads it while it builds the DAG, and every value stays a string (CBIS fields hold the literal
``NA``; identifiers must not become numbers). Image paths in it are relative to its folder.

Buckets: an image belongs to bucket ``int(sha1(image_id)) mod n`` (:func:`bucket_of`). Extraction shards and
prediction/evaluation chunks are such buckets, so all ROIs of an image stay together and one changed image
re-runs the one shard or chunk it belongs to.
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from mammoseg.errors import InputError

__all__ = ["REQUIRED_COLUMNS", "read_manifest", "is_normal", "has_truth", "lesion_rows", "bucket_of", "chunk_count",
           "rows_of_bucket", "images_of", "files_of"]

#: Columns every consumer of a manifest needs.
REQUIRED_COLUMNS = ("roi_id", "image_id", "patient_id", "split", "abnormality_id", "image_path", "mask_path")
_INTEGER = re.compile(r"-?\d+")


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """The rows of ``manifest.csv`` as dicts of strings, checked.

    Raises
    ------
    InputError
        Unreadable file, a missing required column, a non-integer ``abnormality_id`` or a duplicated ``roi_id``,
        naming the file.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, restval="")
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read manifest: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise InputError(f"{path}: manifest lacks required column(s) {', '.join(missing)}")
    bad_ids = [row["roi_id"] for row in rows if not _INTEGER.fullmatch(row["abnormality_id"])]
    if bad_ids:
        raise InputError(f"{path}: abnormality_id is not an integer for ROI(s) {', '.join(bad_ids[:5])}")
    seen: set[str] = set()
    duplicated = [row["roi_id"] for row in rows if row["roi_id"] and (row["roi_id"] in seen or seen.add(row["roi_id"]))]
    if duplicated:
        raise InputError(f"{path}: duplicated roi_id(s) {', '.join(duplicated[:5])}")
    return rows


def bucket_of(image_id: str, n: int) -> int:
    """``int(sha1(image_id)) mod n``: stable across runs, platforms and Python versions."""
    if n < 1:
        raise ValueError(f"the number of buckets must be >= 1, got {n}")
    return int(hashlib.sha1(str(image_id).encode("utf-8")).hexdigest(), 16) % int(n)


def chunk_count(rows: Iterable[Mapping[str, str]], chunk_size: int) -> int:
    """How many prediction chunks the images of ``rows`` make: ``max(1, ceil(images / chunk_size))``.

    Why a size and not a count: each chunk pays a fixed cost (a process, TensorFlow, the models) that is worth tens
    of images; a count fixed for CBIS-DDSM's 378 test images would cut the demo's 12 into chunks of 3.
    """
    n_images = len({row["image_id"] for row in rows})
    return max(1, -(-n_images // int(chunk_size)))


def rows_of_bucket(rows: Iterable[Mapping[str, str]], index: int, n: int) -> list[Mapping[str, str]]:
    """The rows whose image belongs to bucket ``index`` of ``n``."""
    return [row for row in rows if bucket_of(row["image_id"], n) == index]


def images_of(rows: Iterable[Mapping[str, str]]) -> list[tuple[str, str]]:
    """Sorted (image_id, image_path) pairs of manifest rows, one per image."""
    return sorted({(row["image_id"], row["image_path"]) for row in rows})


def is_normal(row: Mapping[str, str]) -> bool:
    """True for the row of a lesion-free image (``data.normals``): it has no ROI, hence no mask."""
    return not row["roi_id"]


def has_truth(rows: Iterable[Mapping[str, str]]) -> bool:
    """False for the row of a new study (``studies.root``): no ROI and no pathology, so nothing is known of its
    lesions; a normal image (pathology ``NORMAL``) is known to have none."""
    return any(row["roi_id"] or row.get("pathology") for row in rows)


def lesion_rows(rows: Iterable[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """The rows of ROIs (the lesions), without the rows of normal images."""
    return [row for row in rows if not is_normal(row)]


def files_of(rows: Sequence[Mapping[str, str]], base: str | Path) -> list[str]:
    """Every image and mask file of ``rows`` (paths joined to ``base``, the manifest's folder), sorted."""
    names = {row["image_path"] for row in rows} | {row["mask_path"] for row in rows if row["mask_path"]}
    return sorted(str(Path(base) / name) for name in names)
