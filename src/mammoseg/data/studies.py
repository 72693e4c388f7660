"""A folder of new studies as found on disk: its files, and whether it can hold a mammogram at all.

Checked before anything runs, on both routes (the workflow's dry run, ``mammoseg predict``), so an empty folder or
one without a single DICOM file is the same one-line error naming it (:mod:`mammoseg.studies` runs the studies).
Only the standard library and :mod:`mammoseg.data.layouts` are imported: the workflow calls this while it plans
the DAG.
"""

from __future__ import annotations

import os
from pathlib import Path

from mammoseg.errors import InputError

__all__ = ["study_files", "check_studies_folder"]

#: Where a DICOM file's magic number lies (DICOM PS3.10: a 128-byte preamble, then "DICM").
_DICM_OFFSET, _DICM = 128, b"DICM"


def study_files(root: str | Path) -> list[Path]:
    """Every file (and link) below ``root``, sorted: what indexing reads, counts or skips."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() or p.is_symlink())


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(_DICM_OFFSET)
            return handle.read(len(_DICM)) == _DICM
    except OSError:
        return False


def check_studies_folder(folder: str | Path) -> None:
    """Refuse a studies folder that is missing, unreadable, empty or without a single DICOM file (by its 'DICM'
    marker, hidden and system files not counted), naming the folder: there would be nothing to predict.

    Raises
    ------
    InputError
        With the folder and the reason.
    """
    from mammoseg.data.layouts import ignored_reason

    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise InputError(f"{folder}: folder not readable")
    files = [p for p in study_files(folder)
             if not any(ignored_reason(part) for part in p.relative_to(folder).parts)]
    if not files:
        raise InputError(f"{folder}: no file in this folder, so no mammogram to predict")
    if not any(_is_dicom(p) for p in files):
        raise InputError(f"{folder}: none of its {len(files)} files is a DICOM file (no 'DICM' marker after the "
                         f"128-byte preamble), so no mammogram to predict")
