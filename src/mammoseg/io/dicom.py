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

import io
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
    bbox : (r0, c0, r1, c1) or None
        Bounding box of the foreground in pixels, ``r1``/``c1`` exclusive (as
        :func:`mammoseg.patches.geometry.mask_bbox`); None when nothing is foreground. Found while binarising, from the
        rows that hold the lesion, so that nobody has to scan a full-size mask again.
    """

    mask: np.ndarray
    note: str = ""
    bbox: tuple[int, int, int, int] | None = None


# --- headers -------------------------------------------------------------------------------------------------


def _check_size(path: Path) -> int:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DicomReadError(path, "unreadable", f"cannot stat file: {exc.strerror or exc}") from None
    if size == 0:
        raise DicomReadError(path, "zero_byte", "empty file (0 bytes)")
    return size


def _parse_header(path: str | Path, handle, specific_tags: tuple[str, ...] | None) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=specific_tags)
    except InvalidDicomError:
        raise DicomReadError(path, "not_dicom", "not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
    except (EOFError, struct.error) as exc:
        raise DicomReadError(path, "truncated", f"file ends inside the header ({exc})") from None
    except Exception as exc:  # pydicom raises many types on garbage; all mean the same thing here
        raise DicomReadError(path, "unreadable", f"cannot parse the DICOM header: {type(exc).__name__}: {exc}") from None


def _check_pixel_data(path: str | Path, read_at, start: int, file_size: int, values: dict[str, Any],
                      implicit: bool | None = None) -> tuple[int, int, bool]:  # fmt: skip
    """Check, without decoding, that the Pixel Data element is present and complete; return where its value is.

    ``start`` is where :func:`pydicom.dcmread` stopped (the start of Pixel Data); ``read_at(position, n)`` reads
    bytes of the file; ``implicit`` is the dataset's VR encoding (None: guessed from the bytes). Uncompressed
    data must be as long as Rows x Columns x SamplesPerPixel x Frames x BitsAllocated/8 and fit in the file;
    encapsulated (compressed) data must end with its sequence delimiter.
    Costs one 12-byte read and, for compressed data, one 8-byte read at the end of the file.

    Returns
    -------
    (value_start, value_length, encapsulated) : byte offset of the element's value in the file, its length in
    bytes (for encapsulated data the items up to, not including, the closing sequence delimiter) and whether
    the data are encapsulated (undefined length).
    """
    element = read_at(start, 12)
    if len(element) < 8 or element[:4] != _PIXEL_DATA_TAG:
        raise DicomReadError(path, "no_pixel_data", "no Pixel Data element (7FE0,0010)")
    # the encoding, not the bytes, says whether a VR follows the tag: an implicit length can spell letters
    explicit = element[4:6].isalpha() if implicit is None else not implicit
    length = struct.unpack("<I", element[8:12] if explicit else element[4:8])[0] if len(element) == 12 else 0
    value_start = start + (12 if explicit else 8)
    if length == _UNDEFINED_LENGTH:
        if read_at(max(file_size - 8, 0), 8) != _SEQUENCE_DELIMITER:
            raise DicomReadError(path, "truncated", "compressed pixel data do not end with a sequence delimiter (file cut short)")
        return value_start, max(file_size - 8 - value_start, 0), True
    if value_start + length > file_size:
        raise DicomReadError(
            path, "truncated", f"pixel data declare {length} bytes but only {max(file_size - value_start, 0)} are in the file"
        )
    rows, cols = values["Rows"], values["Columns"]
    expected = rows * cols * values["SamplesPerPixel"] * values["NumberOfFrames"] * values["BitsAllocated"] // 8
    if length < expected:
        raise DicomReadError(path, "truncated", f"pixel data hold {length} bytes, {expected} expected for {rows}x{cols}")
    return value_start, length, False


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
            "BitsStored": 0x00280101, "PixelRepresentation": 0x00280103}  # fmt: skip
# tag -> (name, is_us); one dict lookup per header element instead of one search per wanted tag
_HEADER_TAGS = {**{tag: (name, False) for name, tag in _STRING_TAGS.items()},
                **{tag: (name, True) for name, tag in _US_TAGS.items()}}  # fmt: skip
_EMPTY_VALUES: dict[str, Any] = {**{name: "" for name in _STRING_TAGS}, **{name: None for name in _US_TAGS}}


def _element_value(ds: pydicom.Dataset, tag: int, element: Any) -> Any:
    if isinstance(element, pydicom.dataelem.RawDataElement) and not element.is_little_endian:
        return ds[tag].value  # big endian (retired): let pydicom convert
    return element.value


def _as_string(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        # header text: ASCII in CBIS-DDSM; anything else survives as replacement characters, never an exception
        return value.decode("latin-1").rstrip(" \x00")
    return str(value)


def _as_us(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return struct.unpack_from("<H", value)[0] if len(value) >= 2 else None
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


#: VRs under which the raw bytes of an image-geometry element are its little-endian US value (None: implicit VR)
_US_VRS = (None, "US", "UN")


def _raw_header_values(path: str | Path, ds: pydicom.Dataset) -> dict[str, Any]:
    """The values of :data:`_STRING_TAGS` (str, "" when absent) and :data:`_US_TAGS` (int, None when absent).

    Raises ``bad_header`` for a geometry element with another VR: its bytes may not be what they claim (found by
    the fuzz test, where pydicom itself failed on such an element).
    """
    values = dict(_EMPTY_VALUES)
    for tag, element in ds._dict.items():  # noqa: SLF001 - the raw elements, to avoid pydicom's slow conversion
        wanted = _HEADER_TAGS.get(tag)
        if wanted is not None:
            name, is_us = wanted
            if is_us and getattr(element, "VR", None) not in _US_VRS:
                raise DicomReadError(path, "bad_header", f"{name} has VR {element.VR!r}, expected US")
            value = _element_value(ds, tag, element)
            if is_us and isinstance(value, bytes) and len(value) != 2:  # one US value is 2 bytes
                raise DicomReadError(path, "bad_header", f"{name} holds {len(value)} bytes, expected one 2-byte value")
            values[name] = _as_us(value) if is_us else _as_string(value)
    return values


def _check_values(path: Path, values: dict[str, Any], *, at_end: bool = False) -> None:
    """Check the geometry; ``at_end``: the parser hit the end of the file (pydicom stops there without error)."""
    for name in ("Rows", "Columns", "BitsAllocated"):
        if not values.get(name):
            if at_end:
                raise DicomReadError(path, "truncated", f"file ends inside the header ({name} never reached)")
            raise DicomReadError(path, "bad_header", f"{name} is missing or zero ({values.get(name)!r})")
    # pydicom refuses to decode without these; they are defaulted here for the index, and remembered, so that
    # such files are decoded by pydicom (and refused the same way) rather than by the direct path
    values["defaulted"] = {name for name in ("BitsStored", "SamplesPerPixel", "PixelRepresentation")
                           if values.get(name) is None} | ({"PhotometricInterpretation"}
                                                           if not values.get("PhotometricInterpretation") else set())
    if values.get("BitsStored") is None:
        values["BitsStored"] = values["BitsAllocated"]
    if values.get("SamplesPerPixel") is None:
        values["SamplesPerPixel"] = 1
    if values.get("PixelRepresentation") is None:
        values["PixelRepresentation"] = 0
    frames = values.get("NumberOfFrames") or "1"
    try:
        values["NumberOfFrames"] = max(int(frames), 1)
    except ValueError:
        raise DicomReadError(path, "bad_header", f"NumberOfFrames is not an integer ({frames!r})") from None


def _open_size(path: str | Path, handle) -> int:
    """Size of an opened file in bytes; ``zero_byte`` for an empty one (fstat: no second path lookup)."""
    size = os.fstat(handle.fileno()).st_size
    if size == 0:
        raise DicomReadError(path, "zero_byte", "empty file (0 bytes)")
    return size


@dataclass
class _Header:
    """One parse of a DICOM file up to its pixel data: the dataset, checked values and where the pixels are."""

    ds: pydicom.Dataset
    values: dict[str, Any]  # _raw_header_values, checked and completed by _check_values
    transfer_syntax: str
    pixel_start: int  # byte offset of the Pixel Data value
    pixel_length: int  # its length in bytes (encapsulated: the items, without the closing delimiter)
    encapsulated: bool = False  # Pixel Data of undefined length: items of compressed fragments

    @property
    def photometric(self) -> str:
        return (self.values["PhotometricInterpretation"] or "MONOCHROME2").upper()


#: Bytes read in one go for the header: CBIS-DDSM headers are 1-2 KB; a longer one is parsed from the file.
HEADER_PREFIX = 1 << 16


def _parse_prefix(path: str | Path, prefix: bytes, file_size: int) -> tuple[pydicom.Dataset | None, int]:
    """Parse the header from the file's first bytes; (None, 0) when it may run past them.

    Why: pydicom reads a header in many small reads; from one in-memory buffer it parses 15 % faster than from
    the file, which is what lets indexing keep up with a bare ``dcmread`` loop that does nothing else.
    """
    whole = len(prefix) >= file_size
    buffer = io.BytesIO(prefix)
    try:
        ds = _parse_header(path, buffer, None)
    except DicomReadError:
        if whole:
            raise
        return None, 0  # perhaps only cut by the prefix: let the file decide
    stop = buffer.tell()
    if not whole and stop >= len(prefix):  # pydicom stops quietly at the end of its input
        return None, 0
    return ds, stop


def _read_checked_header(path: str | Path, handle, *, check_pixels: bool = True) -> _Header:
    size = _open_size(path, handle)
    prefix = handle.read(HEADER_PREFIX)
    ds, stop = _parse_prefix(path, prefix, size)
    if ds is None:
        handle.seek(0)
        ds = _parse_header(path, handle, None)
        stop = handle.tell()
    values = _raw_header_values(path, ds)
    _check_values(path, values, at_end=stop >= size)

    def read_at(position: int, n: int) -> bytes:
        if position + n <= len(prefix):
            return prefix[position : position + n]
        handle.seek(position)
        return handle.read(n)

    implicit = getattr(ds, "original_encoding", (None, True))[0]
    start, length, encapsulated = (_check_pixel_data(path, read_at, stop, size, values, implicit) if check_pixels
                                   else (-1, -1, False))  # fmt: skip
    syntax = _text(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    return _Header(ds, values, syntax, start, length, encapsulated)


#: header_record keys filled from the header values
_RECORD_VALUE_KEYS = ("PatientID", "StudyUID", "SeriesUID", "SOPUID", "SeriesDescription", "Rows", "Columns",
                      "BitsStored", "PhotometricInterpretation")  # fmt: skip
_EMPTY_RECORD: dict[str, Any] = {
    "path": "", "PatientID": "", "StudyUID": "", "SeriesUID": "", "SOPUID": "", "SeriesDescription": "",
    "Rows": -1, "Columns": -1, "BitsStored": -1, "PhotometricInterpretation": "", "TransferSyntax": "",
    "readable": False, "reason": "", "error": "",
}  # fmt: skip


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
    # Called once per file of a 160 GB download and benchmarked against a bare dcmread loop: plain strings and
    # one fstat instead of Path objects and a stat by name.
    path_text = os.fspath(path)
    record = dict(_EMPTY_RECORD)
    record["path"] = path_text
    try:
        if path_text.lower().endswith(RASTER_SUFFIXES):
            record.update(_raster_record(Path(path_text)))
        else:
            with open(path_text, "rb") as handle:
                header = _read_checked_header(path_text, handle, check_pixels=check_pixels)
            values = header.values
            for key in _RECORD_VALUE_KEYS:
                record[key] = values[key]
            record["TransferSyntax"] = header.transfer_syntax
        record["readable"] = True
    except DicomReadError as exc:
        record["reason"], record["error"] = exc.reason, exc.detail
    except OSError as exc:
        record["reason"], record["error"] = "unreadable", f"cannot open: {exc.strerror or exc}"
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

#: Largest image side accepted, in pixels. CBIS-DDSM images are at most ~7,000 px; a corrupt Rows/Columns
#: would otherwise make the decoder allocate rows x cols x frames buffers of many GiB before failing (the fuzz
#: tests saw a test process grow to 18 GiB that way).
MAX_IMAGE_SIDE = 16384
MAX_FRAMES = 1

_RLE_LOSSLESS = "1.2.840.10008.1.2.5"
_NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit, explicit VR little endian


def _check_dimensions(path: str | Path, rows: int, cols: int, frames: int, samples: int) -> None:
    if not (0 < rows <= MAX_IMAGE_SIDE and 0 < cols <= MAX_IMAGE_SIDE) or frames != MAX_FRAMES or samples != 1:
        raise DicomReadError(
            path, "bad_header",
            f"{rows} x {cols} px, {frames} frame(s), {samples} sample(s) per pixel: not a single-frame greyscale "
            f"image of at most {MAX_IMAGE_SIDE} px a side",
        )


def _check_dataset_dimensions(path: str | Path, ds: pydicom.Dataset) -> None:
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except Exception as exc:  # a corrupt header can fail in pydicom in many ways (unknown VR, bad length, ...)
        raise DicomReadError(path, "bad_header", f"unreadable image dimensions: {type(exc).__name__}: {exc}") from None
    _check_dimensions(path, rows, cols, frames, samples)


def _syntax_name(ds: pydicom.Dataset) -> str:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return str(getattr(syntax, "name", syntax))


def _decode(path: str | Path, ds: pydicom.Dataset) -> np.ndarray:
    """Decode through pydicom's pixel handlers (every transfer syntax its plugins know)."""
    _check_dataset_dimensions(path, ds)
    try:
        pixels = ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    # BaseException, not Exception: a corrupt RLE stream makes pylibjpeg-rle's Rust decoder panic, and pyo3
    # raises that as PanicException, a BaseException subclass (found by tests/test_fuzz.py).
    except BaseException as exc:  # missing plugin, corrupt stream, inconsistent header, decoder panic
        raise DicomReadError(path, "undecodable", f"cannot decode pixel data ({_syntax_name(ds)}): {type(exc).__name__}: {exc}") from None
    if pixels.ndim != 2:
        raise DicomReadError(path, "bad_header", f"expected a single-frame greyscale image, got pixel array of shape {pixels.shape}")
    return pixels


def _direct_decodable(header: _Header) -> bool:
    """Whether :func:`_decode_direct` gives exactly what pydicom's ``pixel_array`` would.

    The formats CBIS-DDSM ships (RLE Lossless, 16-bit images and 8-bit masks) and uncompressed little-endian data,
    unsigned, one frame, one sample, 8 or 16 bits allocated. Anything else goes through pydicom.
    """
    v = header.values
    if v["defaulted"] or v["SamplesPerPixel"] != 1 or v["NumberOfFrames"] != 1 or v["PixelRepresentation"] != 0:
        return False
    if v["BitsAllocated"] not in (8, 16) or not 1 <= v["BitsStored"] <= v["BitsAllocated"]:
        return False
    syntax = header.transfer_syntax
    if syntax == _RLE_LOSSLESS:
        return _rle_decoder() is not None
    # native data have a defined length (_check_pixel_data made sure it holds the image); an undefined one means
    # encapsulated data under a native transfer syntax: pydicom's business
    return syntax in _NATIVE_LITTLE_ENDIAN and not header.encapsulated


def _rle_decoder():
    try:
        from rle.utils import decode_frame  # pylibjpeg-rle, the decoder pydicom itself uses for RLE
    except ImportError:  # pragma: no cover - a declared dependency
        return None
    return decode_frame


_ITEM_TAG = 0xE000FFFE  # (FFFE,E000) Item, as a little-endian uint32


def _read_rle_frame(handle, header: _Header) -> bytes:
    """The one encoded frame of single-frame RLE pixel data, read from the file with one copy.

    RLE puts each frame in exactly one fragment (PS3.5 A.4.2): after the Basic Offset Table item comes one item
    holding the frame, which is read straight into the bytes the decoder takes. Anything else (several fragments,
    odd items) is handed to pydicom's fragment parser.
    """
    handle.seek(header.pixel_start)
    table = handle.read(8)
    if len(table) == 8:
        tag, table_length = struct.unpack("<II", table)
        if tag == _ITEM_TAG and table_length <= header.pixel_length:
            handle.seek(table_length, os.SEEK_CUR)
            item = handle.read(8)
            if len(item) == 8:
                tag, length = struct.unpack("<II", item)
                if tag == _ITEM_TAG and 16 + table_length + length == header.pixel_length:
                    frame = handle.read(length)
                    if len(frame) == length:
                        return frame
    from pydicom.encaps import generate_frames

    handle.seek(header.pixel_start)
    return next(generate_frames(handle.read(header.pixel_length), number_of_frames=1))


def _decode_direct(path: str | Path, header: _Header, handle) -> np.ndarray:
    """Decode the pixel data of a file :func:`_direct_decodable` accepts, without pydicom's runner.

    Why: pydicom's ``pixel_array`` copies the encoded data twice on the way to the decoder and the decoded
    bytearray once more into its array; on a full-size mammogram that and the runner's set-up cost as much again
    as a fifth of the decode. Same decoder (pylibjpeg-rle), same result (tests/test_dicom.py compares the two on
    every kind of file).
    """
    v = header.values
    rows, cols, bits = v["Rows"], v["Columns"], v["BitsAllocated"]
    _check_dimensions(path, rows, cols, v["NumberOfFrames"], v["SamplesPerPixel"])
    dtype = np.dtype("<u2") if bits == 16 else np.dtype(np.uint8)
    if header.transfer_syntax == _RLE_LOSSLESS:
        try:
            frame = _read_rle_frame(handle, header)
            pixels = np.frombuffer(_rle_decoder()(frame, rows * cols, bits, "<"), dtype=dtype, count=rows * cols)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # corrupt stream or decoder panic (a BaseException, see _decode)
            raise DicomReadError(path, "undecodable", f"cannot decode pixel data (RLE Lossless): {type(exc).__name__}: {exc}") from None
    else:
        handle.seek(header.pixel_start)
        data = handle.read(header.pixel_length)
        if len(data) < header.pixel_length:
            raise DicomReadError(path, "truncated", "file ends inside the pixel data")
        pixels = np.frombuffer(data, dtype=dtype, count=rows * cols)
    pixels = pixels.reshape(rows, cols)
    if v["BitsStored"] < bits:  # the unused high bits carry no value (PS3.5 8.1.1); pydicom clears them too
        pixels = pixels & dtype.type((1 << v["BitsStored"]) - 1)
    return pixels


def _read_stored(path: str | Path) -> tuple[np.ndarray, _Header]:
    """Stored pixel values (rows, cols) and the checked header of a DICOM file, parsed once.

    Pixels of the formats of :func:`_direct_decodable` are read straight from the file. Other files are read whole
    and decoded by pydicom; ``header.ds`` is then the whole dataset.
    """
    with open(path, "rb") as handle:
        header = _read_checked_header(path, handle)
        if _direct_decodable(header):
            try:
                return _decode_direct(path, header, handle), header
            except DicomReadError as exc:
                if exc.reason != "undecodable":
                    raise
                # pylibjpeg-rle is stricter than the standard (the first segment at offset 64, no stray offset
                # entries); pydicom falls back to its own RLE decoder, so such a stream gets the same chance here
        handle.seek(0)
        try:
            header.ds = pydicom.dcmread(handle)
        except Exception as exc:
            raise DicomReadError(path, "unreadable", f"cannot read the dataset: {type(exc).__name__}: {exc}") from None
    return _decode(path, header.ds), header


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


def _open_error(path: str | Path, exc: OSError) -> DicomReadError:
    return DicomReadError(path, "unreadable", f"cannot open file: {exc.strerror or exc}")


def read_raw_pixels(path: str | Path) -> tuple[np.ndarray, str, int]:
    """The stored pixel values, undecorated: no LUT, no inversion.

    Returns
    -------
    pixels : np.ndarray, shape (rows, cols), the stored integer dtype (may be read-only)
    photometric : str, e.g. ``MONOCHROME2``
    bits_stored : int, bits per stored pixel value
    """
    path = Path(path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        pixels = _read_raster(path)
        return pixels, "MONOCHROME2", pixels.dtype.itemsize * 8
    try:
        pixels, header = _read_stored(path)
    except OSError as exc:
        raise _open_error(path, exc) from None
    return pixels, header.photometric, int(header.values["BitsStored"])


def _modality_lut_is_identity(ds: pydicom.Dataset) -> bool:
    """Whether ``apply_modality_lut`` would leave every value as it is (its own conditions, no guessed defaults)."""
    try:
        if ds.get("ModalityLUTSequence"):
            return False
        if "RescaleSlope" in ds and "RescaleIntercept" in ds:
            return float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
        return True
    except Exception:  # noqa: BLE001 - an unreadable value: let apply_modality_lut report it as a bad header
        return False


def read_mammogram(path: str | Path) -> np.ndarray:
    """Read a mammogram's intensities, bright = dense.

    Parameters
    ----------
    path : path to a DICOM file (any transfer syntax pydicom can decode with the pylibjpeg plugins), or a JPEG/PNG
        of the Kaggle copy.

    Returns
    -------
    np.ndarray, shape (rows, cols)
        Modality LUT (rescale slope/intercept) applied; MONOCHROME1 inverted so that larger values are brighter.
        The stored unsigned integer array (uint8/uint16, possibly read-only) when neither changes a value, as in
        every CBIS-DDSM file; float32 otherwise. Consumers convert windows, not the whole image (a 4.5k x 2.8k
        float32 copy costs 50 MB and a tenth of the decode time). No VOI windowing (WindowCenter/Width and VOI
        LUT tags are ignored): every patch is min-max normalised later, which makes windowing irrelevant.

    Raises
    ------
    DicomReadError
        The file and the reason it cannot be read.
    """
    path = Path(path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        return _read_raster(path)
    try:
        pixels, header = _read_stored(path)
    except OSError as exc:
        raise _open_error(path, exc) from None
    ds = header.ds
    monochrome1 = header.photometric == "MONOCHROME1"
    if not monochrome1 and pixels.dtype.kind == "u" and _modality_lut_is_identity(ds):
        return pixels
    try:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    except Exception as exc:
        raise DicomReadError(path, "bad_header", f"cannot apply the modality LUT: {type(exc).__name__}: {exc}") from None
    if monochrome1:
        values = values.max() + values.min() - values
    return values


def binary_fraction(pixels: np.ndarray, tolerance: float = 0.05) -> float:
    """Fraction of pixels within ``tolerance`` x (max - min) of the minimum or the maximum value.

    1.0 for a clean two-valued mask (or a constant array), close to 1 for a mask with JPEG ringing along its
    edges, much lower for a greyscale crop. Used to tell a mask from a cropped ROI image by content.
    """
    if pixels.size == 0:
        return 1.0
    low, high = pixels.min(), pixels.max()
    if high == low:
        return 1.0
    band = tolerance * (float(high) - float(low))
    if pixels.dtype.kind in "ui":
        # integer bounds: the same pixels as the float comparison, without a float copy of the whole image
        near = (pixels <= int(np.floor(float(low) + band))) | (pixels >= int(np.ceil(float(high) - band)))
    else:
        values = pixels.astype(np.float32, copy=False)
        near = (values <= float(low) + band) | (values >= float(high) - band)
    return float(np.count_nonzero(near)) / pixels.size


def _distinct_values(pixels: np.ndarray) -> int:
    """Number of distinct values; a histogram for 8/16-bit integers (np.unique sorts the whole image)."""
    if pixels.dtype.kind == "u" and pixels.dtype.itemsize <= 2:
        counts = np.zeros(1 << (8 * pixels.dtype.itemsize), dtype=np.int64)
        flat = pixels.reshape(-1)
        for start in range(0, flat.size, 1 << 20):  # bincount widens to int64: bound the temporary
            chunk = np.bincount(flat[start:start + (1 << 20)], minlength=counts.size)
            counts += chunk
        return int(np.count_nonzero(counts))
    return int(np.unique(pixels).size)


def _band_bbox(band_mask: np.ndarray, row_offset: int) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(band_mask.any(axis=1))
    if rows.size == 0:
        return None
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(band_mask[r0:r1].any(axis=0))
    return r0 + row_offset, int(cols[0]), r1 + row_offset, int(cols[-1]) + 1


def mask_from_pixels(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 8) -> MaskRead:
    """Binarise stored mask values: foreground = above half the maximum (after MONOCHROME1 inversion).

    The mask is clean (note ``""``) when every pixel is either the maximum or a background value at or below half
    of it, and that background is not negative.
    """
    if photometric.upper() == "MONOCHROME1":
        # MONOCHROME1: 0 is white; invert over the stored range, not the data range, so a uniform mask stays uniform
        pixels = (2 ** int(bits_stored) - 1) - pixels.astype(np.int64)
    if pixels.size == 0 or pixels.ndim != 2:
        return MaskRead(np.zeros(pixels.shape, dtype=bool), "empty mask")
    # Row extremes are two cheap contiguous reductions. Rows whose maximum is the background are background only,
    # so the comparisons and counts run over the band of rows that hold the lesion: a few percent of a full-size
    # mask, which np.zeros leaves as untouched zero pages elsewhere.
    row_max, row_min = pixels.max(axis=1), pixels.min(axis=1)
    top, background = row_max.max(), row_min.min()
    if top <= 0:
        return MaskRead(np.zeros(pixels.shape, dtype=bool), "empty mask")
    # For integers v > top/2 <=> v > top // 2: an integer comparison, 6x faster than against a float (NumPy would
    # convert every pixel to float64).
    cut = top // 2 if pixels.dtype.kind in "ui" else top / 2
    rows, cols = pixels.shape
    if top == background:  # uniform and positive: all foreground
        return MaskRead(np.ones(pixels.shape, dtype=bool), "", (0, 0, rows, cols))
    busy = np.flatnonzero(row_max != background)
    r0, r1 = int(busy[0]), int(busy[-1]) + 1
    band = pixels[r0:r1]
    mask = np.zeros(pixels.shape, dtype=bool) if background <= cut else np.ones(pixels.shape, dtype=bool)
    np.greater(band, cut, out=mask[r0:r1])
    bbox = _band_bbox(mask[r0:r1], r0) if background <= cut else (0, 0, rows, cols)
    # two-valued check by counting (O(n)); np.unique sorts and costs 4x the decode of a full-size mask
    clean = (0 <= background <= cut
             and np.count_nonzero(band == top) + np.count_nonzero(band == background) == band.size)
    if clean:
        return MaskRead(mask, "", bbox)
    return MaskRead(mask, f"thresholded non-binary mask at {float(top) / 2:g} (max={top}, "
                          f"{_distinct_values(pixels)} distinct values)", bbox)


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
