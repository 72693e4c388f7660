"""Reading DICOM pixels and headers the same way in every stage.

Never imports TensorFlow. Restructuring, extraction and inference all read pixels through
:func:`read_mammogram` and :func:`read_mask`, so an image means the same thing to every stage.

Bad input never ends in a bare traceback: every reader raises :class:`DicomReadError`, a ``ValueError`` that names
the file and carries a short reason code (``zero_byte``, ``not_dicom``, ``truncated``, ``no_pixel_data``,
``bad_header``, ``undecodable``, ``unreadable``), the same codes that ``skipped.csv`` uses.

Besides DICOM (any transfer syntax pydicom decodes: uncompressed, RLE natively; JPEG, JPEG-LS and JPEG 2000
through the pylibjpeg plugins), the readers accept the 8-bit JPEG/PNG files of the Kaggle copy of CBIS-DDSM
(layout D), so that every stage reads a restructured Kaggle set through the same two functions.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

__all__ = [
    "DicomReadError",
    "MaskRead",
    "RASTER_SUFFIXES",
    "binary_fraction",
    "header_record",
    "mask_from_pixels",
    "read_header",
    "read_mammogram",
    "read_mask",
    "read_raw_pixels",
    "safe_name",
]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_LENGTH = 120

#: File suffixes read through Pillow instead of pydicom (the Kaggle JPEG copy, PNG exports).
RASTER_SUFFIXES = (".jpg", ".jpeg", ".png")

# The encapsulated pixel data of a complete file ends with a Sequence Delimitation Item (FFFE,E0DD), length 0.
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_UNDEFINED_LENGTH = 0xFFFFFFFF


class DicomReadError(ValueError):
    """A file that cannot be used, with the file name and a short reason code.

    Attributes
    ----------
    path : str
        The offending file.
    reason : str
        ``zero_byte``, ``not_dicom``, ``truncated``, ``no_pixel_data``, ``bad_header``, ``undecodable`` or
        ``unreadable``.
    detail : str
        A readable explanation (without the path).
    """

    def __init__(self, path: str | Path, reason: str, detail: str):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {detail} [{reason}]")


@dataclass(frozen=True)
class MaskRead:
    """A binary ROI mask and what had to be done to make it binary.

    Attributes
    ----------
    mask : np.ndarray of bool, shape (rows, cols)
    note : str
        Empty for a clean 0/max mask; otherwise a readable remark (``empty mask``, or the threshold applied to a
        non-binary mask, e.g. ``thresholded non-binary mask at 127.5 (max=255, 37 distinct values)``).
    """

    mask: np.ndarray
    note: str = ""


# --- headers -------------------------------------------------------------------------------------------------


def _check_size(path: Path) -> int:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DicomReadError(path, "unreadable", f"cannot stat file: {exc.strerror or exc}") from None
    if size == 0:
        raise DicomReadError(path, "zero_byte", "empty file (0 bytes)")
    return size


def _parse_header(path: Path, handle, specific_tags: tuple[str, ...] | None) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=specific_tags)
    except InvalidDicomError:
        raise DicomReadError(path, "not_dicom", "not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
    except (EOFError, struct.error) as exc:
        raise DicomReadError(path, "truncated", f"file ends inside the header ({exc})") from None
    except Exception as exc:  # pydicom raises many types on garbage; all mean the same thing here
        raise DicomReadError(path, "unreadable", f"cannot parse the DICOM header: {type(exc).__name__}: {exc}") from None


def _check_pixel_data(path: Path, handle, file_size: int, values: dict[str, Any]) -> None:
    """Check, without decoding, that the Pixel Data element is present and complete.

    ``handle`` stands where :func:`pydicom.dcmread` stopped (the start of Pixel Data). Uncompressed data must be as
    long as Rows x Columns x SamplesPerPixel x Frames x BitsAllocated/8 and fit in the file; encapsulated
    (compressed) data must end with its sequence delimiter. Costs one 12-byte read and, for compressed data, one
    8-byte read at the end of the file.
    """
    start = handle.tell()
    element = handle.read(12)
    if len(element) < 8 or element[:4] != _PIXEL_DATA_TAG:
        raise DicomReadError(path, "no_pixel_data", "no Pixel Data element (7FE0,0010)")
    explicit = element[4:6].isalpha()
    length = struct.unpack("<I", element[8:12] if explicit else element[4:8])[0] if len(element) == 12 else 0
    value_start = start + (12 if explicit else 8)
    if length == _UNDEFINED_LENGTH:
        handle.seek(max(file_size - 8, 0))
        if handle.read(8) != _SEQUENCE_DELIMITER:
            raise DicomReadError(path, "truncated", "compressed pixel data do not end with a sequence delimiter (file cut short)")
        return
    if value_start + length > file_size:
        raise DicomReadError(
            path, "truncated", f"pixel data declare {length} bytes but only {max(file_size - value_start, 0)} are in the file"
        )
    rows, cols = values["Rows"], values["Columns"]
    expected = rows * cols * values["SamplesPerPixel"] * values["NumberOfFrames"] * values["BitsAllocated"] // 8
    if length < expected:
        raise DicomReadError(path, "truncated", f"pixel data hold {length} bytes, {expected} expected for {rows}x{cols}")


def read_header(path: str | Path) -> pydicom.Dataset:
    """Read a DICOM header without its pixel data (fast: stops before PixelData); no validity checks.

    Raises
    ------
    DicomReadError
        reason ``zero_byte``, ``not_dicom``, ``truncated`` or ``unreadable``.
    """
    path = Path(path)
    _check_size(path)
    with open(path, "rb") as handle:
        return _parse_header(path, handle, None)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


# Header values are read from pydicom's raw (still undecoded) elements: converting a dozen elements through
# pydicom's value machinery costs more than parsing the whole header, and indexing must keep up with bare dcmread.
_STRING_TAGS = {
    "PatientID": 0x00100020,
    "StudyUID": 0x0020000D,
    "SeriesUID": 0x0020000E,
    "SOPUID": 0x00080018,
    "SeriesDescription": 0x0008103E,
    "PhotometricInterpretation": 0x00280004,
    "NumberOfFrames": 0x00280008,
}
_US_TAGS = {"SamplesPerPixel": 0x00280002, "Rows": 0x00280010, "Columns": 0x00280011, "BitsAllocated": 0x00280100,
            "BitsStored": 0x00280101}  # fmt: skip


def _raw_value(ds: pydicom.Dataset, tag: int) -> Any:
    element = ds._dict.get(tag)  # noqa: SLF001 - the raw element, to avoid pydicom's slow conversion
    if element is None:
        return None
    if isinstance(element, pydicom.dataelem.RawDataElement):
        if not element.is_little_endian:
            return ds[tag].value  # big endian (retired): let pydicom convert
        return element.value
    return element.value


def _raw_string(ds: pydicom.Dataset, tag: int) -> str:
    value = _raw_value(ds, tag)
    if value is None:
        return ""
    if isinstance(value, bytes):
        # header text: ASCII in CBIS-DDSM; anything else survives as replacement characters, never an exception
        return value.decode("latin-1").rstrip(" \x00")
    return str(value)


def _raw_us(ds: pydicom.Dataset, tag: int) -> int | None:
    value = _raw_value(ds, tag)
    if value is None:
        return None
    if isinstance(value, bytes):
        return struct.unpack_from("<H", value)[0] if len(value) >= 2 else None
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def _raw_header_values(ds: pydicom.Dataset) -> dict[str, Any]:
    values: dict[str, Any] = {name: _raw_string(ds, tag) for name, tag in _STRING_TAGS.items()}
    for name, tag in _US_TAGS.items():
        values[name] = _raw_us(ds, tag)
    return values


def _check_values(path: Path, values: dict[str, Any], *, at_end: bool = False) -> None:
    """Check the geometry; ``at_end``: the parser hit the end of the file (pydicom stops there without error)."""
    for name in ("Rows", "Columns", "BitsAllocated"):
        if not values.get(name):
            if at_end:
                raise DicomReadError(path, "truncated", f"file ends inside the header ({name} never reached)")
            raise DicomReadError(path, "bad_header", f"{name} is missing or zero ({values.get(name)!r})")
    if values.get("BitsStored") is None:
        values["BitsStored"] = values["BitsAllocated"]
    if values.get("SamplesPerPixel") is None:
        values["SamplesPerPixel"] = 1
    frames = values.get("NumberOfFrames") or "1"
    try:
        values["NumberOfFrames"] = max(int(frames), 1)
    except ValueError:
        raise DicomReadError(path, "bad_header", f"NumberOfFrames is not an integer ({frames!r})") from None


def header_record(path: str | Path, *, check_pixels: bool = True) -> dict[str, Any]:
    """Index one file: its identifying header values, or why it cannot be used. Never raises for bad files.

    Parameters
    ----------
    path : a DICOM file (or a JPEG/PNG of the Kaggle copy, whose sizes come from the image header).
    check_pixels : also check that the pixel data are present and complete (see ``_check_pixel_data``).

    Returns
    -------
    dict with keys ``path, PatientID, StudyUID, SeriesUID, SOPUID, SeriesDescription, Rows, Columns, BitsStored,
    PhotometricInterpretation, TransferSyntax, readable, reason, error``. ``Rows``/``Columns``/``BitsStored`` are
    ints (pixels, bits), -1 when unknown. ``reason`` is empty for a readable file, else a code of
    :class:`DicomReadError`; ``error`` the readable message.
    """
    path = Path(path)
    record: dict[str, Any] = {
        "path": str(path), "PatientID": "", "StudyUID": "", "SeriesUID": "", "SOPUID": "", "SeriesDescription": "",
        "Rows": -1, "Columns": -1, "BitsStored": -1, "PhotometricInterpretation": "", "TransferSyntax": "",
        "readable": False, "reason": "", "error": "",
    }  # fmt: skip
    try:
        if path.suffix.lower() in RASTER_SUFFIXES:
            record.update(_raster_record(path))
        else:
            size = _check_size(path)
            with open(path, "rb") as handle:
                ds = _parse_header(path, handle, None)
                values = _raw_header_values(ds)
                _check_values(path, values, at_end=handle.tell() >= size)
                if check_pixels:
                    _check_pixel_data(path, handle, size, values)
            record.update({key: values[key] for key in record.keys() & values.keys()})
            record["TransferSyntax"] = _text(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
        record["readable"] = True
    except DicomReadError as exc:
        record.update(reason=exc.reason, error=exc.detail)
    except OSError as exc:
        record.update(reason="unreadable", error=f"cannot open: {exc.strerror or exc}")
    return record


def _raster_record(path: Path) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    _check_size(path)
    try:
        with Image.open(path) as image:
            cols, rows = image.size
            mode = image.mode
    except UnidentifiedImageError:
        raise DicomReadError(path, "not_dicom", "neither DICOM nor a readable JPEG/PNG image") from None
    bits = 16 if mode.startswith("I") else 8
    return {"Rows": rows, "Columns": cols, "BitsStored": bits, "PhotometricInterpretation": "MONOCHROME2"}


# --- pixels --------------------------------------------------------------------------------------------------


def _read_dataset(path: Path) -> pydicom.Dataset:
    size = _check_size(path)
    with open(path, "rb") as handle:
        values = _raw_header_values(_parse_header(path, handle, None))
        _check_values(path, values, at_end=handle.tell() >= size)
        _check_pixel_data(path, handle, size, values)
        handle.seek(0)
        try:
            return pydicom.dcmread(handle)
        except Exception as exc:
            raise DicomReadError(path, "unreadable", f"cannot read the dataset: {type(exc).__name__}: {exc}") from None


#: Largest image side accepted, in pixels. CBIS-DDSM images are at most ~7,000 px; a corrupt Rows/Columns
#: would otherwise make the decoder allocate rows x cols x frames buffers of many GiB before failing (the fuzz
#: tests saw a test process grow to 18 GiB that way).
MAX_IMAGE_SIDE = 16384
MAX_FRAMES = 1


def _check_dimensions(path: Path, ds: pydicom.Dataset) -> None:
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except Exception as exc:  # a corrupt header can fail in pydicom in many ways (unknown VR, bad length, ...)
        raise DicomReadError(path, "bad_header", f"unreadable image dimensions: {type(exc).__name__}: {exc}") from None
    if not (0 < rows <= MAX_IMAGE_SIDE and 0 < cols <= MAX_IMAGE_SIDE) or frames != MAX_FRAMES or samples != 1:
        raise DicomReadError(
            path, "bad_header",
            f"{rows} x {cols} px, {frames} frame(s), {samples} sample(s) per pixel: not a single-frame greyscale "
            f"image of at most {MAX_IMAGE_SIDE} px a side",
        )


def _decode(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    _check_dimensions(path, ds)
    try:
        pixels = ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    # BaseException, not Exception: a corrupt RLE stream makes pylibjpeg-rle's Rust decoder panic, and pyo3
    # raises that as PanicException, a BaseException subclass (found by tests/test_fuzz.py).
    except BaseException as exc:  # missing plugin, corrupt stream, inconsistent header, decoder panic
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise DicomReadError(path, "undecodable", f"cannot decode pixel data ({name}): {type(exc).__name__}: {exc}") from None
    if pixels.ndim != 2:
        raise DicomReadError(path, "bad_header", f"expected a single-frame greyscale image, got pixel array of shape {pixels.shape}")
    return pixels


def _read_raster(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    _check_size(path)
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "I", "I;16", "I;16B"):
                image = image.convert("L")
            pixels = np.asarray(image)
    except (UnidentifiedImageError, OSError) as exc:
        raise DicomReadError(path, "undecodable", f"cannot decode image: {exc}") from None
    return pixels


def read_raw_pixels(path: str | Path) -> tuple[np.ndarray, str, int]:
    """The stored pixel values, undecorated: no LUT, no inversion.

    Returns
    -------
    pixels : np.ndarray, shape (rows, cols), the stored integer dtype
    photometric : str, e.g. ``MONOCHROME2``
    bits_stored : int, bits per stored pixel value
    """
    path = Path(path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        pixels = _read_raster(path)
        return pixels, "MONOCHROME2", pixels.dtype.itemsize * 8
    ds = _read_dataset(path)
    pixels = _decode(path, ds)
    bits = int(ds.get("BitsStored", ds.BitsAllocated) or ds.BitsAllocated)
    return pixels, str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper(), bits


def read_mammogram(path: str | Path) -> np.ndarray:
    """Read a mammogram's pixels as float32, bright = dense.

    Parameters
    ----------
    path : path to a DICOM file (any transfer syntax pydicom can decode with the pylibjpeg plugins), or a JPEG/PNG
        of the Kaggle copy.

    Returns
    -------
    np.ndarray of float32, shape (rows, cols)
        Modality LUT (rescale slope/intercept) applied; MONOCHROME1 inverted so that larger values are brighter.
        No VOI windowing (WindowCenter/Width and VOI LUT tags are ignored): every patch is min-max normalised
        later, which makes windowing irrelevant.

    Raises
    ------
    DicomReadError
        The file and the reason it cannot be read.
    """
    path = Path(path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        return _read_raster(path).astype(np.float32)
    ds = _read_dataset(path)
    pixels = _decode(path, ds)
    try:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    except Exception as exc:
        raise DicomReadError(path, "bad_header", f"cannot apply the modality LUT: {type(exc).__name__}: {exc}") from None
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        values = values.max() + values.min() - values
    return values


def binary_fraction(pixels: np.ndarray, tolerance: float = 0.05) -> float:
    """Fraction of pixels within ``tolerance`` x (max - min) of the minimum or the maximum value.

    1.0 for a clean two-valued mask (or a constant array), close to 1 for a mask with JPEG ringing along its
    edges, much lower for a greyscale crop. Used to tell a mask from a cropped ROI image by content.
    """
    if pixels.size == 0:
        return 1.0
    low, high = float(pixels.min()), float(pixels.max())
    if high == low:
        return 1.0
    band = tolerance * (high - low)
    values = pixels.astype(np.float32, copy=False)
    near = (values <= low + band) | (values >= high - band)
    return float(np.count_nonzero(near)) / pixels.size


def mask_from_pixels(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 8) -> MaskRead:
    """Binarise stored mask values: foreground = above half the maximum (after MONOCHROME1 inversion)."""
    if photometric.upper() == "MONOCHROME1":
        # MONOCHROME1: 0 is white; invert over the stored range, not the data range, so a uniform mask stays uniform
        pixels = (2 ** int(bits_stored) - 1) - pixels.astype(np.int64)
    top = int(pixels.max()) if pixels.size else 0
    if top <= 0:
        return MaskRead(np.zeros(pixels.shape, dtype=bool), "empty mask")
    mask = pixels > top / 2
    # Two-valued check by counting (O(n)); np.unique sorts and costs 4x the decode of a full-size mask.
    background = int(pixels.min())
    n_top = int(np.count_nonzero(mask & (pixels == top)))
    n_background = int(np.count_nonzero(~mask & (pixels == background)))
    if n_top + n_background == pixels.size and background >= 0:
        return MaskRead(mask, "")
    distinct = np.unique(pixels).size
    return MaskRead(mask, f"thresholded non-binary mask at {top / 2:g} (max={top}, {distinct} distinct values)")


def read_mask(path: str | Path) -> MaskRead:
    """Read an ROI mask as a boolean array; values above half the maximum are foreground.

    Returns
    -------
    MaskRead
        ``mask``: bool (rows, cols). ``note``: ``""`` for a clean two-valued mask, ``"empty mask"`` when nothing
        is foreground, else the threshold applied to a non-binary mask.

    Raises
    ------
    DicomReadError
        The file and the reason it cannot be read.
    """
    pixels, photometric, bits = read_raw_pixels(path)
    return mask_from_pixels(pixels, photometric, bits)


def safe_name(text: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """Make a header value safe to use as one file-name component.

    Anything outside ``[A-Za-z0-9._-]`` (slashes, NUL, spaces, ``..``) becomes ``_``; leading dots are removed so
    that the name can never be ``.``/``..`` or hidden. Raises ``ValueError`` when nothing usable is left.
    """
    cleaned = _UNSAFE.sub("_", str(text)).strip("._-")
    cleaned = re.sub(r"\.{2,}", "_", cleaned)[:max_length]
    if not cleaned or os.sep in cleaned:
        raise ValueError(f"no usable file name can be made from {text!r}")
    return cleaned
