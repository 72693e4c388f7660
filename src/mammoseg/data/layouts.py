"""Find and index CBIS-DDSM trees in every on-disk layout.

CBIS-DDSM reaches users in four layouts (``../shared/data/cbis-ddsm/LAYOUTS.md`` section 4). ``<top>`` is the case
folder, ``<Collection>_<patient>_<LEFT|RIGHT>_<CC|MLO>[_<abnormality id>]``, equal to the files' PatientID:

=============  ==========================================================================================
layout         path of one file below the root (``CBIS-DDSM/`` may sit under ``manifest-*/``)
=============  ==========================================================================================
``doi``        A, old NBIA downloader, as the CSV paths: ``<top>/<StudyUID>/<SeriesUID>/00000N.dcm``
``nbia-old``   B, NBIA Data Retriever 2018-2020:
               ``<top>/<MM-DD-YYYY>-DDSM-<last5 study>/1-<SeriesDescription>-<last5 series>/00000N.dcm``
``nbia``       C, current NBIA Data Retriever:
               ``<top>/<MM-DD-YYYY>-DDSM-NA-<last5 study>/1.000000-<SeriesDescription>-<last5 series>/1-K.dcm``
``nbia-no-na`` C without ``NA-`` in the study folder (some manifests; may be mixed with ``nbia``)
``kaggle``     D, Kaggle JPEG copy: ``jpeg/<SeriesUID>/1-NNN.jpg`` plus ``csv/dicom_info.csv``, which gives
               each JPEG's PatientID, UIDs and SeriesDescription
=============  ==========================================================================================

Nothing downstream trusts folder or file names: :func:`index_tree` reads every file's identifying header values
(PatientID, Study/Series/SOP Instance UID, SeriesDescription, ViewPosition, Rows, Columns, BitsStored, photometric
interpretation) without its pixels, checks that the pixel data are complete, and records why a file cannot be
used. The layout only decides where the files are: in layouts A-C one collection (``Mass-Training``,
``Mass-Test``, ``Calc-Training``, ``Calc-Test``) is selected by its case-folder names, so the headers of the
others are never read; in layout D by the PatientID column of ``dicom_info.csv``. In layout D the JPEGs listed in
``dicom_info.csv`` are the files found; JPEGs it does not list cannot be assigned to a collection and are ignored.

In layouts A-C every entry below the case root is accounted for (:func:`list_entries`), except the top-level
entries named after another collection: regular files are indexed (also files beside the case folders and in
folders named after no case), hidden and system files and folders (``.DS_Store``, ``Thumbs.db``, ``desktop.ini``,
``._*``, any name starting with '.') get an index row with reason ``ignored`` and are not read, and entries that
are no regular file or folder that cannot be listed get reason ``unreadable``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mammoseg.errors import InputError
from mammoseg.io.dicom import header_record

__all__ = [
    "LAYOUTS",
    "COLLECTIONS",
    "INDEX_COLUMNS",
    "CASE_NAME_PATTERN",
    "CaseName",
    "TreeListing",
    "ignored_reason",
    "parse_case_name",
    "collection_prefix",
    "find_case_root",
    "find_kaggle_table",
    "detect_layout",
    "list_entries",
    "no_case_folders_message",
    "list_files",
    "index_tree",
]

LAYOUTS = ("doi", "nbia-old", "nbia", "nbia-no-na", "kaggle")
COLLECTIONS = ("Mass-Training", "Mass-Test", "Calc-Training", "Calc-Test")
INDEX_COLUMNS = [
    "path", "top_folder", "PatientID", "StudyUID", "SeriesUID", "SOPUID", "SeriesDescription", "ViewPosition", "Rows",
    "Columns", "BitsStored", "PhotometricInterpretation", "TransferSyntax", "readable", "reason", "error",
]  # fmt: skip

_ABNORMALITY = {"Mass": "mass", "Calc": "calc"}
_SPLIT = {"Training": "train", "Test": "test"}
# Strict: a name that does not match exactly (slashes, NUL, '..', extra text, absurd lengths) is no case name.
# The patient identifier after 'P_' is CBIS-DDSM's five digits (P_00016), or any safe word of a tree laid out like
# it (P_M0001): letters, digits, '-' and '_', starting with a letter or digit, at most 32 characters. Only such
# characters ever reach a file name.
_CASE_RE = re.compile(
    r"(?P<collection>(?P<abn>Mass|Calc)-(?P<split>Training|Test))_(?P<patient>P_[A-Za-z0-9][A-Za-z0-9_-]{0,31})"
    r"_(?P<side>LEFT|RIGHT)_(?P<view>CC|MLO)(?:_(?P<abnormality_id>\d{1,3}))?"
)
#: The case-name pattern in words, for messages.
CASE_NAME_PATTERN = ("<Mass|Calc>-<Training|Test>_P_<id>_<LEFT|RIGHT>_<CC|MLO>[_<abnormality id>], <id> = 1-32 "
                     "letters, digits, '-' or '_' (e.g. Mass-Training_P_00001_LEFT_CC_1)")
_UID_FOLDER = re.compile(r"\d+(\.\d+)+")
_NBIA_NA_STUDY = re.compile(r"\d\d-\d\d-\d{4}-DDSM-NA-\d+")
_NBIA_STUDY = re.compile(r"\d\d-\d\d-\d{4}-DDSM-\d+")
_SAMPLE_CASES = 40  # case folders looked at to tell the layouts apart


@dataclass(frozen=True)
class CaseName:
    """A parsed case name (folder name or PatientID).

    Attributes
    ----------
    collection : ``Mass-Training``, ``Mass-Test``, ``Calc-Training`` or ``Calc-Test``
    abnormality : ``mass`` or ``calc``
    split : ``train`` or ``test``
    patient_id : ``P_00016`` (``P_`` and 1-32 letters, digits, ``-`` or ``_``)
    side, view : ``LEFT``/``RIGHT``, ``CC``/``MLO``
    abnormality_id : int for an ROI folder (``..._CC_1``), None for a full image
    """

    collection: str
    abnormality: str
    split: str
    patient_id: str
    side: str
    view: str
    abnormality_id: int | None

    @property
    def image_id(self) -> str:
        """``P_00016_LEFT_CC``: the full image."""
        return f"{self.patient_id}_{self.side}_{self.view}"

    @property
    def roi_id(self) -> str | None:
        """``P_00016_LEFT_CC_1``, or None for a full image."""
        return None if self.abnormality_id is None else f"{self.image_id}_{self.abnormality_id}"


def parse_case_name(name: str) -> CaseName | None:
    """Parse ``Mass-Training_P_00016_LEFT_CC[_1]``; None for anything that is not exactly such a name."""
    match = _CASE_RE.fullmatch(str(name).strip()) if isinstance(name, str) and len(name) < 80 else None
    if match is None:
        return None
    abnormality_id = match["abnormality_id"]
    return CaseName(
        collection=match["collection"], abnormality=_ABNORMALITY[match["abn"]], split=_SPLIT[match["split"]],
        patient_id=match["patient"], side=match["side"], view=match["view"],
        abnormality_id=None if abnormality_id is None else int(abnormality_id),
    )  # fmt: skip


def collection_prefix(abnormality: str, split: str) -> str:
    """``('mass', 'train') -> 'Mass-Training'``."""
    names = {("mass", "train"): "Mass-Training", ("mass", "test"): "Mass-Test",
             ("calc", "train"): "Calc-Training", ("calc", "test"): "Calc-Test"}  # fmt: skip
    try:
        return names[(abnormality, split)]
    except KeyError:
        raise ValueError(f"abnormality must be mass|calc and split train|test, got {abnormality!r}/{split!r}") from None


def _case_dirs(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if e.is_dir() and parse_case_name(e.name) is not None)
    except OSError:
        return []


def find_case_root(root: str | Path) -> Path | None:
    """The folder that holds the case folders (layouts A-C), or None.

    Looks at ``root``, ``root/CBIS-DDSM``, ``root/*/CBIS-DDSM`` (``manifest-*``), ``root/DOI`` and ``root/*``.
    """
    root = Path(root)
    candidates = [root, root / "CBIS-DDSM", root / "DOI"]
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        children = []
    candidates += [child / "CBIS-DDSM" for child in children] + children
    for candidate in candidates:
        if candidate.is_dir() and _case_dirs(candidate):
            return candidate
    return None


def find_kaggle_table(root: str | Path) -> Path | None:
    """``dicom_info.csv`` of a Kaggle copy (layout D) in ``root/csv``, ``root/CBIS-DDSM/csv``, ``root/../csv``."""
    root = Path(root)
    for candidate in (root / "csv", root / "CBIS-DDSM" / "csv", root.parent / "csv", root):
        if (candidate / "dicom_info.csv").is_file():
            return candidate / "dicom_info.csv"
    return None


_SHOWN_NAMES = 8  # top-level names an error message lists


def _shown_name(name: str, limit: int = 60) -> str:
    """A file name fit for a one-line message: repr when it holds control characters, cut to ``limit``."""
    text = name if name.isprintable() else repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def no_case_folders_message(root: str | Path) -> str:
    """Why ``root`` is no CBIS-DDSM download: the case-name pattern expected and a few of the names found.

    The names are those of ``root/CBIS-DDSM`` when there is one (the case folders would be there), else of ``root``;
    folders end with ``/``.
    """
    root = Path(root)
    folder = root / "CBIS-DDSM" if (root / "CBIS-DDSM").is_dir() else root
    try:
        with os.scandir(folder) as scan:
            names = sorted(e.name + ("/" if e.is_dir() else "") for e in scan)
    except OSError as exc:
        names, listing = [], f"cannot be listed ({exc.strerror or exc})"
    else:
        shown = ", ".join(_shown_name(name) for name in names[:_SHOWN_NAMES])
        more = f" and {len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else ""
        listing = f"holds {shown}{more}" if names else "is empty"
    return (f"{root}: no CBIS-DDSM case folder found and no csv/dicom_info.csv (Kaggle copy); case folders are "
            f"named {CASE_NAME_PATTERN}; {folder} {listing}")


def _classify_case_folder(case_dir: Path) -> str | None:
    """The layout one case folder is in, from its study and series folder names."""
    try:
        studies = sorted(p for p in case_dir.iterdir() if p.is_dir())
    except OSError:
        return None
    for study in studies:
        if _UID_FOLDER.fullmatch(study.name):
            return "doi"
        if _NBIA_NA_STUDY.fullmatch(study.name):
            return "nbia"
        if _NBIA_STUDY.fullmatch(study.name):
            series = sorted(p.name for p in study.iterdir() if p.is_dir())
            if any(name.startswith("1.000000-") for name in series):
                return "nbia-no-na"
            if any(name.startswith("1-") for name in series):
                return "nbia-old"
    return None


def detect_layout(root: str | Path) -> str:
    """Tell which layout a download is in.

    Parameters
    ----------
    root : the download folder (the one holding ``CBIS-DDSM/``, ``CBIS-DDSM`` itself, a ``manifest-*`` folder, or
        the Kaggle folder holding ``csv/`` and ``jpeg/``).

    Returns
    -------
    str : one of :data:`LAYOUTS`. A tree mixing ``nbia`` and ``nbia-no-na`` study folders is ``nbia`` (both are
    indexed the same way).

    Raises
    ------
    FileNotFoundError, ValueError : naming ``root`` and what was (not) found.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder (expected a CBIS-DDSM download)")
    case_root = find_case_root(root)
    if case_root is None:
        if find_kaggle_table(root) is not None:
            return "kaggle"
        raise InputError(no_case_folders_message(root))
    votes: dict[str, int] = {}
    for name in _case_dirs(case_root)[:_SAMPLE_CASES]:
        layout = _classify_case_folder(case_root / name)
        if layout is not None:
            votes[layout] = votes.get(layout, 0) + 1
    if not votes:
        raise InputError(f"{case_root}: case folders found, but their study folders match no known layout "
                         "(UID, MM-DD-YYYY-DDSM-NNNNN or MM-DD-YYYY-DDSM-NA-NNNNN)")
    if "nbia" in votes and "nbia-no-na" in votes:
        return "nbia"
    return max(sorted(votes), key=votes.get)


#: File names (lower case) that operating systems and file managers leave in folders: never data.
_SYSTEM_FILES = {
    ".ds_store": "macOS Finder folder metadata",
    "thumbs.db": "Windows Explorer thumbnail cache",
    "ehthumbs.db": "Windows Media Center thumbnail cache",
    "desktop.ini": "Windows folder settings",
}


def ignored_reason(name: str) -> str:
    """Why the entry called ``name`` is never read: a hidden or system file or folder; '' for any other name.

    ``.DS_Store``, ``Thumbs.db``, ``ehthumbs.db``, ``desktop.ini`` (any case), AppleDouble files (``._*``) and every
    other name starting with '.' (hidden files, ``.Trashes``, an interrupted download's temporaries).
    """
    known = _SYSTEM_FILES.get(name.lower())
    if known:
        return known
    if name.startswith("._"):
        return "AppleDouble file (macOS metadata of the file without '._')"
    if name.startswith("."):
        return "hidden (the name starts with '.')"
    return ""


@dataclass
class TreeListing:
    """Every entry below a case root, sorted by path, in one of two lists.

    Attributes
    ----------
    files : (path, case folder name) of each regular file to index; the case folder name is the top-level folder
        the file is in, '' for a file directly in the case root
    set_aside : index rows (:data:`INDEX_COLUMNS`, ``readable`` False) of the entries that are not read: hidden and
        system files and folders (reason ``ignored``; a folder is one row and is not searched), entries that are
        not regular files (a broken link, a socket) and folders that cannot be listed (``unreadable``)
    """

    files: list[tuple[str, str]] = field(default_factory=list)
    set_aside: list[dict] = field(default_factory=list)

    def set_aside_entry(self, path: str, top: str, reason: str, error: str) -> None:
        self.set_aside.append({**_NOT_READ, "path": path, "top_folder": top, "reason": reason, "error": error})


#: index row values of an entry whose header was not read
_NOT_READ = {
    "PatientID": "", "StudyUID": "", "SeriesUID": "", "SOPUID": "", "SeriesDescription": "", "ViewPosition": "",
    "Rows": -1, "Columns": -1, "BitsStored": -1, "PhotometricInterpretation": "", "TransferSyntax": "",
    "readable": False,
}  # fmt: skip


def _other_collection(name: str, prefix: str | None) -> bool:
    """Whether a top-level entry is named after a collection other than ``prefix`` (that collection's run reads it)."""
    return prefix is not None and any(name.startswith(c + "_") for c in COLLECTIONS if c != prefix)


def list_entries(case_root: str | Path, prefix: str | None = None) -> TreeListing:
    """Every entry below ``case_root`` (layouts A-C), sorted, each either to be indexed or set aside with a reason.

    Parameters
    ----------
    case_root : from :func:`find_case_root`
    prefix : a collection (``Mass-Training``): top-level entries named after another collection
        (``Mass-Test_...``) are left to that collection's run; everything else is listed, so that every file of a
        one-collection tree is accounted for (hidden files, stray files beside the case folders, files in folders
        named after no case)

    Returns
    -------
    TreeListing
    """
    listing = TreeListing()
    visited: set[tuple[int, int]] = set()
    _list_folder(os.fspath(case_root), None, prefix, listing, visited)
    return listing


def _list_folder(folder: str, top: str | None, prefix: str | None, listing: TreeListing,
                 visited: set[tuple[int, int]]) -> None:  # fmt: skip
    """Add the entries below ``folder`` to ``listing``; ``top`` is the case folder name (None at the case root).

    scandir, not Path.rglob: its d_type answers is_dir/is_file without a stat per file. One stat per folder
    detects a folder reached twice (a link that loops back), which would otherwise recurse without end.
    """
    try:
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in visited:
            listing.set_aside_entry(folder, top or "", "unreadable", "a folder link to a folder already searched")
            return
        visited.add((info.st_dev, info.st_ino))
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
    except OSError as exc:
        listing.set_aside_entry(folder, top or "", "unreadable", f"cannot list the folder: {exc.strerror or exc}")
        return
    for entry in entries:
        entry_top = entry.name if top is None else top
        why = ignored_reason(entry.name)
        if why:
            kind = "folder, not searched" if entry.is_dir() else "file"
            listing.set_aside_entry(entry.path, top or "", "ignored", f"{why}: {kind}")
        elif top is None and _other_collection(entry.name, prefix):
            continue
        elif entry.is_dir():
            _list_folder(entry.path, entry_top, prefix, listing, visited)
        elif entry.is_file():
            listing.files.append((entry.path, top or ""))
        else:
            listing.set_aside_entry(entry.path, top or "", "unreadable",
                                    "not a regular file (a broken link, a socket or a device)")


def list_files(case_root: str | Path, prefix: str | None = None) -> list[tuple[str, str]]:
    """The regular files of :func:`list_entries`: (path, case folder name), sorted; hidden and system files left out."""
    return list_entries(case_root, prefix).files


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm  # stderr by default

    return tqdm(items, desc=desc, unit="file", mininterval=0.5)


def _index_dicom_tree(root: Path, prefix: str | None, progress: bool) -> pd.DataFrame:
    case_root = find_case_root(root)
    if case_root is None:
        raise InputError(no_case_folders_message(root))
    listing = list_entries(case_root, prefix)
    rows = []
    for path, top in _progress(listing.files, progress, "index"):
        # headers only: restructuring decodes every full image and reads every ROI file, and a truncated or
        # broken file is a skip there, with the same reason; checking pixel data here too cost 10 % of indexing
        record = header_record(path, check_pixels=False)
        record["top_folder"] = top
        rows.append(record)
    return pd.DataFrame(rows + listing.set_aside, columns=INDEX_COLUMNS)


def _kaggle_path(image_path: str, bases: list[Path]) -> Path:
    """Resolve a ``dicom_info.csv`` image_path (``CBIS-DDSM/jpeg/<uid>/1-N.jpg``) against the download."""
    relative = Path(image_path.strip().replace("\\", "/"))
    tails = [relative] + ([Path(*relative.parts[1:])] if len(relative.parts) > 1 else [])
    candidates = [base / tail for base in bases for tail in tails]
    existing = next((c for c in candidates if c.exists()), None)
    # a missing file is reported where its folder is, so the message points at the right place
    return existing or next((c for c in candidates if c.parent.is_dir()), candidates[0])


def _index_kaggle(root: Path, prefix: str | None, progress: bool) -> pd.DataFrame:
    table_path = find_kaggle_table(root)
    if table_path is None:
        raise InputError(f"{root}: layout 'kaggle' needs csv/dicom_info.csv, which is not there")
    table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    missing = {"image_path", "PatientID", "SeriesInstanceUID"} - set(table.columns)
    if missing:
        raise InputError(f"{table_path}: missing columns {sorted(missing)}")
    if prefix is not None:
        table = table[table["PatientID"].str.startswith(prefix + "_")]
    bases = [table_path.parent.parent, table_path.parent.parent.parent]
    rows = []
    for entry in _progress(list(table.itertuples(index=False)), progress, "index"):
        path = _kaggle_path(entry.image_path, bases)
        if path.exists():
            record = header_record(path, allow_raster=True)  # the Kaggle copy is JPEG
        else:
            record = {"path": str(path), "readable": False, "reason": "missing_file",
                      "error": f"listed in {table_path.name} but not on disk"}  # fmt: skip
        record.update(
            top_folder=entry.PatientID, PatientID=entry.PatientID,
            StudyUID=getattr(entry, "StudyInstanceUID", ""), SeriesUID=entry.SeriesInstanceUID,
            SOPUID=getattr(entry, "SOPInstanceUID", ""), SeriesDescription=getattr(entry, "SeriesDescription", ""),
        )  # fmt: skip
        rows.append(record)
    frame = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    for column, default in (("Rows", -1), ("Columns", -1), ("BitsStored", -1)):
        frame[column] = frame[column].fillna(default).astype(int)
    return frame.fillna({c: "" for c in ("PhotometricInterpretation", "TransferSyntax")})


def index_tree(root: str | Path, *, layout: str = "auto", collection_prefix: str | None = None,
               progress: bool = False) -> pd.DataFrame:  # fmt: skip
    """Index every file of a download by its header, without reading pixels.

    Parameters
    ----------
    root : the download (see :func:`detect_layout`)
    layout : ``auto`` or one of :data:`LAYOUTS`
    collection_prefix : e.g. ``Mass-Training``: only that collection's case folders (A-C) or dicom_info rows (D)
    progress : show a tqdm bar on stderr

    Returns
    -------
    pandas.DataFrame, one row per file or set-aside entry (:class:`TreeListing`), columns :data:`INDEX_COLUMNS`:
    ``path`` (str), ``top_folder`` (case folder, '' for a file beside the case folders, or PatientID in layout D),
    header values (``Rows``/``Columns``: pixels, ``BitsStored``: bits, -1 when unknown),
    ``readable`` (bool), ``reason`` (a skip code, empty when readable) and ``error`` (readable message).
    """
    root = Path(root)
    if collection_prefix is not None and collection_prefix not in COLLECTIONS:
        raise ValueError(f"collection_prefix must be one of {COLLECTIONS}, got {collection_prefix!r}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}")
    if layout == "kaggle":
        return _index_kaggle(root, collection_prefix, progress)
    return _index_dicom_tree(root, collection_prefix, progress)
