"""Reading DICOM headers and pixels the same way in every stage, through pydicom.

Never imports TensorFlow. Restructuring, extraction and inference all read pixels through :func:`read_mammogram`
and :func:`mammoseg.io.masks.read_mask`, so an image means the same thing to every stage.

Everything DICOM is pydicom's: ``dcmread`` parses the header, :func:`pydicom.pixels.pixel_array` decodes the pixel
data straight from the open file (every transfer syntax its plugins know: uncompressed; RLE Lossless through
pylibjpeg-rle, with pydicom's own RLE decoder as the fallback; JPEG, JPEG-LS and JPEG 2000 through the pylibjpeg
plugins) and ``apply_modality_lut`` applies the rescale. What this module adds is what a pipeline over a 160 GB
download needs around that: every failure becomes a :class:`~mammoseg.io.errors.DicomReadError` naming the file,
with a reason code (``zero_byte``, ``not_dicom``, ``truncated``, ``no_pixel_data``, ``bad_header``,
``undecodable``, ``unreadable``: the codes of ``skipped.csv``); image dimensions are checked before anything is
decoded; each file is opened once.

JPEG/PNG files (the Kaggle copy, :mod:`mammoseg.io.raster`) are read only where the caller passes
``allow_raster=True``; everywhere else they are ``not_dicom``, like any other file that is not DICOM.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import pydicom
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, as_pixel_options, get_decoder, pixel_array
from pydicom.pixels.utils import pixel_dtype, reshape_pixel_array
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, RLELossless
from pydicom.values import convert_string, convert_value

from mammoseg.io import raster
from mammoseg.io.errors import DicomReadError
from mammoseg.io.names import shown_value

__all__ = [
    "MAX_FRAMES",
    "MAX_IMAGE_SIDE",
    "DicomReadError",
    "StoredPixels",
    "check_decodable",
    "header_record",
    "read_header",
    "read_mammogram",
    "read_stored_pixels",
]

#: Largest image side accepted, in pixels. CBIS-DDSM images are at most ~7,000 px; a corrupt Rows/Columns
#: would otherwise make the decoder allocate rows x cols x frames buffers of many GiB before failing (the fuzz
#: tests saw a test process grow to 18 GiB that way).
MAX_IMAGE_SIDE = 16384
#: Frames per file accepted: a mammogram or a mask is one frame.
MAX_FRAMES = 1

_PIXEL_DATA_TAG = 0x7FE00010
#: keyword -> tag and dictionary VR of every header value read here, looked up once
_TAGS = {keyword: Tag(keyword) for keyword in (
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SeriesDescription", "ViewPosition",
    "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel",
    "NumberOfFrames", "SpecificCharacterSet")}  # fmt: skip
_DICTIONARY_VR = {keyword: dictionary_VR(tag) for keyword, tag in _TAGS.items()}
#: every element read from a header: those above and what the decoder (``as_pixel_options``) and
#: ``apply_modality_lut`` look at
_READ_TAGS = [*_TAGS.values(), *map(Tag, (
    "PixelRepresentation", "PlanarConfiguration", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "ModalityLUTSequence"))]  # fmt: skip
_UNDEFINED_LENGTH = 0xFFFFFFFF  # an element length meaning "up to the closing delimiter" (encapsulated data)

#: Values longer than this (bytes) are stepped over, not read, when the Pixel Data element is checked: pydicom
#: seeks past uncompressed data and walks the 8-byte item headers of compressed data to their closing delimiter.
_DEFER_BYTES = 1024
#: Bytes of a file handed to pydicom in memory to parse its header (CBIS-DDSM headers are 1-2 KB)
_HEADER_BYTES = 1 << 16


class _Geometry(NamedTuple):  # a NamedTuple: built once per file of the index, at a third of a dataclass's cost
    """The image pixel values of a header that decide how (and whether) its pixels are read.

    ``rows``/``cols`` in pixels; ``bits_allocated``/``bits_stored`` in bits per sample; ``photometric`` as written
    in the header ("" when absent). Absent BitsStored, SamplesPerPixel and NumberOfFrames take their usual
    defaults (BitsAllocated, 1, 1) for the index; pydicom's decoder decides what they mean for the pixels.
    """

    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    samples: int
    frames: int
    photometric: str

    @property
    def uncompressed_bytes(self) -> int:
        """Length of the pixel data when stored uncompressed (bits packed, rounded up to whole bytes)."""
        return (self.rows * self.cols * self.samples * self.frames * self.bits_allocated + 7) // 8

    @property
    def monochrome1(self) -> bool:
        """Whether the stored values are inverted (0 is white)."""
        return self.photometric.upper() == "MONOCHROME1"


@dataclass(frozen=True)
class StoredPixels:
    """A file's stored pixel values, before any LUT or inversion, and what is needed to interpret them.

    Attributes
    ----------
    pixels : np.ndarray, shape (rows, cols), the stored integer dtype (uint8/uint16 in CBIS-DDSM; may be read-only)
    photometric : str, e.g. ``MONOCHROME2`` (also for JPEG/PNG input)
    bits_stored : int, bits per stored value
    """

    pixels: np.ndarray
    photometric: str
    bits_stored: int


# --- opening and parsing -------------------------------------------------------------------------------------


def _file_size(path: str | Path, handle: BinaryIO) -> int:
    """Size of an opened file in bytes; ``zero_byte`` for an empty one (fstat: no second path lookup)."""
    size = os.fstat(handle.fileno()).st_size
    if size == 0:
        raise DicomReadError(path, "zero_byte", "empty file (0 bytes)")
    return size


def _not_dicom(path: str | Path) -> DicomReadError:
    if raster.is_raster(path):
        return DicomReadError(path, "not_dicom", "a JPEG/PNG image, not DICOM (raster images are read only where the "
                                                 "caller allows them: the Kaggle layout)")  # fmt: skip
    return DicomReadError(path, "not_dicom", "not a DICOM file (no 'DICM' marker after the 128-byte preamble)")


def _dcmread(path: str | Path, handle: BinaryIO, **options: Any) -> pydicom.Dataset:
    """``pydicom.dcmread(handle, **options)`` with its failures as reason codes."""
    try:
        return pydicom.dcmread(handle, **options)
    except InvalidDicomError:
        raise _not_dicom(path) from None
    except (EOFError, struct.error) as exc:  # pydicom's short reads
        raise DicomReadError(path, "truncated", f"file ends inside the header ({exc})") from None
    except Exception as exc:  # pydicom raises many types on garbage; all mean the same thing here
        raise DicomReadError(path, "unreadable",
                             f"cannot parse the DICOM header: {type(exc).__name__}: {exc}") from None


def _parse_header(path: str | Path, handle: BinaryIO, size: int) -> tuple[pydicom.Dataset, BinaryIO]:
    """The elements this module reads (:data:`_READ_TAGS`), up to the pixel data.

    Returns the dataset and where to read on: the file, or the copy of it in memory when it fits in
    :data:`_HEADER_BYTES`; either is left where pydicom stopped, at the Pixel Data element.

    Why from memory: pydicom reads a header in some fifty small reads and tells; from the file's first
    :data:`_HEADER_BYTES` in a ``BytesIO`` (``dcmread`` takes any buffer) it parses it 10 % faster, and with
    ``specific_tags`` it keeps only the elements wanted (3 % more): indexing has to keep up with a bare ``dcmread``
    loop. When pydicom reaches the end of those bytes first (a longer header, or a file cut short inside them),
    the header is parsed from the file.
    """
    prefix = handle.read(min(size, _HEADER_BYTES))
    source: BinaryIO = io.BytesIO(prefix)
    if len(prefix) < size:  # pydicom stops quietly at the end of its input: it may be the prefix's, not the file's
        try:
            ds = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=_READ_TAGS)
        except Exception:  # noqa: BLE001 - perhaps only cut by the prefix: the file decides below
            ds = None
        if ds is not None and source.tell() < len(prefix):
            handle.seek(source.tell())
            return ds, handle
        source = handle
        source.seek(0)
    return _dcmread(path, source, stop_before_pixels=True, specific_tags=_READ_TAGS), source


def _convert(path: str | Path, keyword: str, element: Any, encodings: list[str] | None) -> Any:
    """One element's value, converted by pydicom's value converters; ``bad_header`` when they cannot."""
    if not isinstance(element, RawDataElement):  # already converted
        return element.value
    # the file's VR, or the dictionary's where the file gives none (implicit VR) or UN, as pydicom does
    vr = element.VR if element.VR not in (None, "UN") else _DICTIONARY_VR[keyword]
    try:
        if vr == "UI" and element.value:
            # as text: the index needs the string, and UID() re-validates it at 3x the cost of the conversion
            return convert_string(element.value, element.is_little_endian)
        return convert_value(vr, element, encodings)
    except Exception as exc:  # noqa: BLE001 - conversion fails in many ways on a corrupt element
        raise DicomReadError(path, "bad_header", f"{keyword} cannot be read: {type(exc).__name__}: {exc}") from None


def _encodings(ds: pydicom.Dataset) -> list[str] | None:
    """The Python codecs of the dataset's Specific Character Set; None (pydicom's default, ISO 646) when absent or
    unreadable, as pydicom itself falls back (only text values depend on it, none of the image geometry)."""
    charset = ds.get_item(_TAGS["SpecificCharacterSet"], keep_deferred=True)
    if charset is None:
        return None
    try:
        return convert_encodings(_convert("", "SpecificCharacterSet", charset, None))
    except Exception:  # noqa: BLE001 - an unknown character set, a corrupt value
        return None


def _header_values(path: str | Path, ds: pydicom.Dataset, keywords: tuple[str, ...], *,
                   encodings: list[str] | None, strict: bool = True) -> dict[str, Any]:  # fmt: skip
    """The values of ``keywords`` in ``ds`` (None when absent), each converted by pydicom.

    ``encodings``: from :func:`_encodings`. ``strict``: a value pydicom cannot convert is a ``bad_header``;
    otherwise it counts as absent.

    Why not ``ds.get(keyword)``: indexing has to keep up with a bare ``dcmread`` loop, and through the Dataset's
    attribute machinery a dozen values cost half as much again as the whole parse; pydicom's value converters
    (:func:`pydicom.values.convert_value`, where ``ds.get`` ends up) cost a quarter of that.
    """
    values = {}
    for keyword in keywords:
        element = ds.get_item(_TAGS[keyword], keep_deferred=True)
        try:
            values[keyword] = None if element is None else _convert(path, keyword, element, encodings)
        except DicomReadError:
            if strict:
                raise
            values[keyword] = None
    return values


def _integer(path: str | Path, keyword: str, value: Any) -> int | None:
    """One integer header value; None when absent or empty; ``bad_header`` when it is anything but one integer."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    # a US element whose VR or length was corrupted converts to bytes, floats or several values
    if isinstance(value, bool) or not isinstance(value, int):
        raise DicomReadError(path, "bad_header", f"{keyword} is {shown_value(value, 40)}, expected one integer")
    return int(value)


def _text(value: Any) -> str:
    """One text header value as written ("" when absent); several values joined by ``\\`` as in the file."""
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


#: the header values that decide how a file's pixels are read
_GEOMETRY_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel", "NumberOfFrames",
                      "PhotometricInterpretation")  # fmt: skip


def _geometry(path: str | Path, values: dict[str, Any], *, at_end: bool = False) -> _Geometry:
    """The checked image geometry from the converted :data:`_GEOMETRY_KEYWORDS` values; ``at_end``: pydicom
    reached the end of the file (it stops there quietly), so a missing value means a header cut short."""
    numbers = {name: _integer(path, name, values[name]) for name in _GEOMETRY_KEYWORDS[:-1]}
    for name in ("Rows", "Columns", "BitsAllocated"):
        if not numbers[name]:
            if at_end:
                raise DicomReadError(path, "truncated", f"file ends inside the header ({name} never reached)")
            raise DicomReadError(path, "bad_header", f"{name} is missing or zero ({numbers[name]!r})")
    bits_stored, samples, frames = numbers["BitsStored"], numbers["SamplesPerPixel"], numbers["NumberOfFrames"]
    return _Geometry(
        rows=numbers["Rows"], cols=numbers["Columns"], bits_allocated=numbers["BitsAllocated"],
        bits_stored=numbers["BitsAllocated"] if bits_stored is None else bits_stored,
        samples=1 if samples is None else samples, frames=1 if frames is None else max(frames, 1),
        photometric=_text(values["PhotometricInterpretation"]).strip(),
    )  # fmt: skip


def _check_limits(path: str | Path, geometry: _Geometry) -> None:
    """One greyscale frame of at most :data:`MAX_IMAGE_SIDE` a side: checked before any decoder allocates."""
    g = geometry
    if not (0 < g.rows <= MAX_IMAGE_SIDE and 0 < g.cols <= MAX_IMAGE_SIDE) or g.frames != MAX_FRAMES or g.samples != 1:
        raise DicomReadError(
            path, "bad_header",
            f"{g.rows} x {g.cols} px, {g.frames} frame(s), {g.samples} sample(s) per pixel: not a single-frame "
            f"greyscale image of at most {MAX_IMAGE_SIDE} px a side",
        )  # fmt: skip


def _pixel_data_element(path: str | Path, source: BinaryIO, ds: pydicom.Dataset,
                        syntax: str) -> RawDataElement | None:  # fmt: skip
    """The Pixel Data element that follows the header (``source`` is at it), its value located but not read;
    None for a deflated dataset, whose elements only pydicom's inflated copy can locate.

    pydicom reads the element with its value deferred: it seeks past uncompressed data and walks the 8-byte item
    headers of compressed data to their closing delimiter, raising ``EOFError`` when the file ends first. A few
    small reads, whatever the size of the image.
    """
    if syntax == DeflatedExplicitVRLittleEndian:
        return None
    try:
        element = next(data_element_generator(source, *ds.original_encoding, defer_size=_DEFER_BYTES), None)
    except EOFError:
        raise DicomReadError(path, "truncated",
                             "file ends inside the compressed pixel data (no closing delimiter)") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt element header fails in pydicom in many ways
        raise DicomReadError(path, "unreadable",
                             f"cannot read the Pixel Data element: {type(exc).__name__}: {exc}") from None
    if element is None or element.tag != _PIXEL_DATA_TAG:
        raise DicomReadError(path, "no_pixel_data", "no Pixel Data element (7FE0,0010)")
    return element


def _check_pixel_length(path: str | Path, element: RawDataElement, geometry: _Geometry, size: int) -> None:
    """Uncompressed pixel data must lie inside the file and be as long as the image needs.

    (Compressed data, of undefined length, have already been walked to their closing delimiter.)
    """
    if element.length == _UNDEFINED_LENGTH:
        return
    in_file = max(size - element.value_tell, 0)
    if element.length > in_file:
        raise DicomReadError(path, "truncated",
                             f"pixel data declare {element.length} bytes but only {in_file} are in the file")
    if element.length < geometry.uncompressed_bytes:
        raise DicomReadError(path, "truncated",
                             f"pixel data hold {element.length} bytes, {geometry.uncompressed_bytes} "
                             f"expected for {geometry.rows}x{geometry.cols}")  # fmt: skip


class _Header(NamedTuple):
    """One parsed and checked DICOM header, and where its pixel data are."""

    ds: pydicom.Dataset  # the elements of _READ_TAGS, no pixel data
    transfer_syntax: str  # UID, "" when the file meta does not say
    encodings: list[str] | None  # Python codecs of the Specific Character Set (None: the default)
    geometry: _Geometry
    source: BinaryIO  # what holds the pixel data: the open file, or its copy in memory
    pixel_data: RawDataElement | None  # the Pixel Data element, value not read (None: deflated, or not checked)


def _read_checked_header(path: str | Path, handle: BinaryIO, *, check_pixels: bool = True) -> _Header:
    """Parse a file from an open handle and check its header and (``check_pixels``) its Pixel Data element;
    decoding needs the element: readers always check the pixels."""
    size = _file_size(path, handle)
    ds, source = _parse_header(path, handle, size)
    encodings = _encodings(ds)
    values = _header_values(path, ds, _GEOMETRY_KEYWORDS, encodings=encodings)
    geometry = _geometry(path, values, at_end=source.tell() >= size)
    _check_limits(path, geometry)
    syntax = str(ds.file_meta.get("TransferSyntaxUID") or "")
    pixel_data = _pixel_data_element(path, source, ds, syntax) if check_pixels else None
    if pixel_data is not None:
        _check_pixel_length(path, pixel_data, geometry, size)
    return _Header(ds, syntax, encodings, geometry, source, pixel_data)


def read_header(path: str | Path) -> pydicom.Dataset:
    """Read a DICOM header without its pixel data (pydicom stops before PixelData); no validity checks.

    Raises
    ------
    DicomReadError
        reason ``zero_byte``, ``not_dicom``, ``truncated`` or ``unreadable``.
    """
    try:
        with open(path, "rb") as handle:
            _file_size(path, handle)
            return _dcmread(path, handle, stop_before_pixels=True)
    except OSError as exc:
        raise _open_error(path, exc) from None


def _open_error(path: str | Path, exc: OSError) -> DicomReadError:
    return DicomReadError(path, "unreadable", f"cannot open or read file: {exc.strerror or exc}")


# --- the index record ----------------------------------------------------------------------------------------

#: header_record keys filled from text header values, and the keyword each comes from
_RECORD_TEXT = {"PatientID": "PatientID", "StudyUID": "StudyInstanceUID", "SeriesUID": "SeriesInstanceUID",
                "SOPUID": "SOPInstanceUID", "SeriesDescription": "SeriesDescription",
                "ViewPosition": "ViewPosition"}  # fmt: skip
_IDENTITY_KEYWORDS = tuple(_RECORD_TEXT.values())
_EMPTY_RECORD: dict[str, Any] = {
    "path": "", "PatientID": "", "StudyUID": "", "SeriesUID": "", "SOPUID": "", "SeriesDescription": "",
    "ViewPosition": "", "Rows": -1, "Columns": -1, "BitsStored": -1, "PhotometricInterpretation": "",
    "TransferSyntax": "", "readable": False, "reason": "", "error": "",
}  # fmt: skip


def _dicom_record(path: str, *, check_pixels: bool) -> dict[str, Any]:
    with open(path, "rb") as handle:
        header = _read_checked_header(path, handle, check_pixels=check_pixels)
    # lenient: the pixel readers do not look at these values, so a corrupt one (a flipped VR) must not make the
    # index refuse a file they read; it is recorded empty, and restructuring names the case by its folder
    identity = _header_values(path, header.ds, _IDENTITY_KEYWORDS, encodings=header.encodings, strict=False)
    g = header.geometry
    record = {key: _text(identity[keyword]) for key, keyword in _RECORD_TEXT.items()}
    record.update(Rows=g.rows, Columns=g.cols, BitsStored=g.bits_stored, PhotometricInterpretation=g.photometric,
                  TransferSyntax=header.transfer_syntax)
    return record


def header_record(path: str | Path, *, check_pixels: bool = True, allow_raster: bool = False) -> dict[str, Any]:
    """Index one file: its identifying header values, or why it cannot be used. Never raises for bad files.

    Parameters
    ----------
    path : a DICOM file (or, with ``allow_raster``, a JPEG/PNG of the Kaggle copy, whose sizes come from the
        image header).
    check_pixels : also read the Pixel Data element (not its value) and check it: present, compressed data ending
        with their closing delimiter, uncompressed data as long as the image needs and inside the file. Nothing is
        decoded; a few small reads (3 % of the record's time on the benchmark's small files).
    allow_raster : read ``.jpg``/``.jpeg``/``.png`` files through Pillow; otherwise they are ``not_dicom``.

    Returns
    -------
    dict with keys ``path, PatientID, StudyUID, SeriesUID, SOPUID, SeriesDescription, ViewPosition, Rows, Columns,
    BitsStored, PhotometricInterpretation, TransferSyntax, readable, reason, error``.
    ``Rows``/``Columns``/``BitsStored`` are ints (pixels, bits), -1 when unknown. ``reason`` is empty for a readable
    file, else a code of :class:`DicomReadError`; ``error`` the readable message. A readable DICOM file is one
    frame, one sample, at most :data:`MAX_IMAGE_SIDE` px a side (the same limits the pixel readers apply).
    """
    # Called once per file of a 160 GB download and benchmarked against a bare dcmread loop: plain strings and
    # one fstat instead of Path objects and a stat by name.
    path_text = os.fspath(path)
    record = dict(_EMPTY_RECORD)
    record["path"] = path_text
    try:
        if allow_raster and raster.is_raster(path_text):
            record.update(raster.raster_record(path_text))
        else:
            record.update(_dicom_record(path_text, check_pixels=check_pixels))
        record["readable"] = True
    except DicomReadError as exc:
        record["reason"], record["error"] = exc.reason, exc.detail
    except OSError as exc:
        record["reason"], record["error"] = "unreadable", f"cannot open: {exc.strerror or exc}"
    return record


# --- pixels --------------------------------------------------------------------------------------------------


def _decode(path: str | Path, header: _Header) -> np.ndarray:
    """Decode the pixel data with pydicom's decoder for the file's transfer syntax (its plugins, in its order of
    preference), reading the encoded data straight from where :func:`_read_checked_header` found them.

    Why not ``pixel_array(file)``: it would parse the header a second time before decoding (6 % of the read of a
    demo image); :meth:`Decoder.as_array <pydicom.pixels.decoders.base.Decoder.as_array>` takes the file positioned
    at the pixel data and the image pixel values of the dataset already parsed (``as_pixel_options``), which is
    all that ``pixel_array`` hands it. Why not from a dataset: the whole Pixel Data value would first be copied into
    it (6 % of the decode of a real mammogram, 19 % of a demo image). ``view_only``: uncompressed pixels are not
    copied once more into a writeable array (every consumer only reads them).
    """
    try:
        if header.pixel_data is None:  # deflated: only pydicom's inflated copy of the whole dataset has the pixels
            header.source.seek(0)
            pixels = pixel_array(pydicom.dcmread(header.source), view_only=True)
        else:
            syntax = UID(header.transfer_syntax)
            decoder = get_decoder(syntax)
            options = as_pixel_options(header.ds, transfer_syntax_uid=syntax, pixel_keyword="PixelData",
                                       view_only=True)  # fmt: skip
            if header.pixel_data.VR:  # explicit VR: OB or OW matters to big endian data
                options["pixel_vr"] = header.pixel_data.VR
            header.source.seek(header.pixel_data.value_tell)
            g = header.geometry
            if syntax == RLELossless and g.bits_stored == g.bits_allocated:
                # as_array would copy the decoded frame into a fresh array, then reshape it: nothing else to do for
                # one RLE frame without unused bits, and the copy costs a fifth of a demo image's read
                buffer, _ = decoder.as_buffer(header.source, index=0, **options)
                pixels = reshape_pixel_array(header.ds, np.frombuffer(buffer, dtype=pixel_dtype(header.ds)))
            else:
                pixels, _ = decoder.as_array(header.source, **options)
    except (KeyboardInterrupt, SystemExit):
        raise
    # BaseException, not Exception: a corrupt RLE stream makes pylibjpeg-rle's Rust decoder panic, and pyo3
    # raises that as PanicException, a BaseException subclass (found by tests/test_fuzz.py).
    except BaseException as exc:  # missing plugin, corrupt stream, inconsistent header, decoder panic
        syntax_name = UID(header.transfer_syntax).name if header.transfer_syntax else "no transfer syntax"
        raise DicomReadError(path, "undecodable", f"cannot decode pixel data ({syntax_name}): "
                                                  f"{type(exc).__name__}: {exc}") from None  # fmt: skip
    if pixels.ndim != 2:
        raise DicomReadError(path, "bad_header",
                             f"expected a single-frame greyscale image, got pixel array of shape {pixels.shape}")
    return pixels


def _read_dicom(path: str | Path) -> tuple[np.ndarray, _Header]:
    """Open a DICOM file once: parse and check its header, then decode its stored pixel values (rows, cols) from
    the same handle."""
    try:
        with open(path, "rb") as handle:
            header = _read_checked_header(path, handle)
            return _decode(path, header), header
    except OSError as exc:
        raise _open_error(path, exc) from None


def read_stored_pixels(path: str | Path, *, allow_raster: bool = False) -> StoredPixels:
    """The stored pixel values of an image or mask file, undecorated: no LUT, no inversion.

    Parameters
    ----------
    path : a DICOM file, or with ``allow_raster`` a JPEG/PNG (the Kaggle copy).
    allow_raster : read ``.jpg``/``.jpeg``/``.png`` through Pillow; otherwise they are ``not_dicom``.

    Raises
    ------
    DicomReadError
        The file and the reason it cannot be read.
    """
    if allow_raster and raster.is_raster(path):
        pixels = raster.read_raster(path)
        return StoredPixels(pixels, "MONOCHROME2", pixels.dtype.itemsize * 8)
    pixels, header = _read_dicom(path)
    return StoredPixels(pixels, header.geometry.photometric or "MONOCHROME2", header.geometry.bits_stored)


def check_decodable(path: str | Path, *, allow_raster: bool = False) -> None:
    """Decode a file's pixels once and drop them: raise if any reader would fail on it.

    For checking every full image of a download (restructuring): one decode, about 50 ms of CPU for a real
    4.4k x 2.8k RLE mammogram, and one image of memory while it runs. Safe from several threads (pydicom builds a
    new decode runner per call and keeps no state between calls; tests/test_dicom.py checks it), but
    pylibjpeg-rle 2.2 holds the GIL while it decodes: threads overlap the file reads, not the decodes (measured,
    2 threads decode no faster than 1). Parallel decoding needs processes.

    Raises
    ------
    DicomReadError
        ``undecodable`` with the decoder's message for pixel data no decoder can read; any other reason code for a
        file that fails before its pixels are decoded (``truncated``, ``bad_header``, ...).
    """
    read_stored_pixels(path, allow_raster=allow_raster)


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


def read_mammogram(path: str | Path, *, allow_raster: bool = False) -> np.ndarray:
    """Read a mammogram's intensities, bright = dense.

    Parameters
    ----------
    path : a DICOM file (any transfer syntax pydicom decodes with the pylibjpeg plugins), or with
        ``allow_raster`` a JPEG/PNG of the Kaggle copy.
    allow_raster : read ``.jpg``/``.jpeg``/``.png`` through Pillow; otherwise such a file is ``not_dicom``
        (prediction on a chart exported as PNG is a mistake to report, not an image to segment).

    Returns
    -------
    np.ndarray, shape (rows, cols)
        Modality LUT (rescale slope/intercept) applied; MONOCHROME1 inverted so that larger values are brighter.
        The stored unsigned integer array (uint8/uint16, possibly read-only) when neither changes a value, as in
        every CBIS-DDSM file; float32 otherwise. Consumers convert windows, not the whole image (a 4.5k x 2.8k
        float32 copy costs 50 MB and a tenth of the decode time). No VOI windowing (WindowCenter/Width and VOI
        LUT tags are ignored): every patch is normalised later (min-max, or the image's percentile range under
        ``patches.normalise: image``), which makes windowing irrelevant.

    Raises
    ------
    DicomReadError
        The file and the reason it cannot be read.
    """
    if allow_raster and raster.is_raster(path):
        return raster.read_raster(path)
    pixels, header = _read_dicom(path)
    ds, monochrome1 = header.ds, header.geometry.monochrome1
    if not monochrome1 and pixels.dtype.kind == "u" and _modality_lut_is_identity(ds):
        return pixels
    try:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    except Exception as exc:
        raise DicomReadError(path, "bad_header",
                             f"cannot apply the modality LUT: {type(exc).__name__}: {exc}") from None
    if monochrome1:
        values = values.max() + values.min() - values
    return values
