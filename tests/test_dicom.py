"""mammoseg.dicom: pixel and header reading on hand-built bad and awkward DICOM files."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from mammoseg.dicom import (
    DicomReadError,
    binary_fraction,
    header_record,
    read_header,
    read_mammogram,
    read_mask,
    safe_name,
)
from mammoseg.dicomwrite import DicomHeader, build_dataset

HEADER = DicomHeader("Mass-Training_P_00001_LEFT_CC", "1.2.3.4", "1.2.3.4.5", "1.2.3.4.5.6", "full mammogram images",
                     "20160720", "L", "CC")  # fmt: skip


def ramp(rows: int = 12, cols: int = 10, top: int = 1024) -> np.ndarray:
    """A deterministic uint16 test pattern with many distinct values (independent of the code under test)."""
    r, c = np.mgrid[0:rows, 0:cols]
    return ((r * 97 + c * 31) % top).astype(np.uint16)


def write(path, pixels, *, header=HEADER, syntax=None, **tags):
    ds = build_dataset(pixels, header)
    for name, value in tags.items():
        setattr(ds, name, value)
    if syntax is not None:
        ds.compress(syntax, pixels)
    ds.save_as(path, enforce_file_format=True)
    return path


# --- compressed transfer syntaxes ---------------------------------------------------------------------------

# ramp() encoded as JPEG-LS lossless (10-bit) by CharLS (pyjpegls 1.5.1), made once outside the test environment:
# the environment has JPEG-LS decoders (pylibjpeg-libjpeg) but no encoder, and ramp() is the independent truth.
JPEG_LS_RAMP = bytes.fromhex(
    "ffd8fff7000b0a000c000a01011100ffda000801010000000087475d8ebb72ddab300090f3c74e1b3464c0780024b962a509922240f0"
    "40fbceb8e36db474bed32cb2c30c3070bcbaebaee739c6cbae735ad6b5a68b8d6b58c631864b6c6318c631882d2d6b5b5080004982ca"
    "c9440816a5172c217d4a5294a2c0ffd9"
)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_lossless_encoders_round_trip(tmp_path, syntax):
    pixels = ramp(80, 64)  # OpenJPEG's default 6 resolution levels need more than a few pixels
    path = write(tmp_path / "x.dcm", pixels, syntax=syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_mammogram(path), pixels.astype(np.float32))
    assert header_record(path)["readable"]


def _encapsulated(tmp_path, name, frame: bytes, syntax, pixels, bits_stored):
    ds = build_dataset(pixels, HEADER)
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_jpeg_ls_decodes(tmp_path):
    path = _encapsulated(tmp_path, "ls.dcm", JPEG_LS_RAMP, JPEGLSLossless, ramp(), 10)
    record = header_record(path)
    assert record["readable"] and record["TransferSyntax"] == JPEGLSLossless
    np.testing.assert_array_equal(read_mammogram(path), ramp().astype(np.float32))


def test_jpeg_ls_via_pydicom_encoder_when_available(tmp_path):
    pytest.importorskip("jpeg_ls", reason="pyjpegls (pydicom's JPEG-LS encoder) is not installed")
    path = write(tmp_path / "ls2.dcm", ramp(), syntax=JPEGLSLossless)
    np.testing.assert_array_equal(read_mammogram(path), ramp().astype(np.float32))


def test_jpeg_baseline_decodes(tmp_path):
    import io

    from PIL import Image

    r, c = np.mgrid[0:32, 0:24]
    pixels = (r * 4 + c * 2).astype(np.uint8)  # smooth: lossy JPEG stays within a few grey levels
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    path = _encapsulated(tmp_path, "jpg.dcm", buffer.getvalue(), JPEGBaseline8Bit, pixels, 8)
    decoded = read_mammogram(path)
    assert decoded.shape == pixels.shape
    assert np.abs(decoded - pixels.astype(np.float32)).max() <= 4


# --- broken files -------------------------------------------------------------------------------------------


def test_zero_byte(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(DicomReadError) as info:
        read_mammogram(path)
    assert info.value.reason == "zero_byte" and str(path) in str(info.value)
    assert header_record(path)["reason"] == "zero_byte"


def test_not_dicom(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(DicomReadError) as info:
        read_header(path)
    assert info.value.reason == "not_dicom"
    record = header_record(path)
    assert not record["readable"] and record["reason"] == "not_dicom"


@pytest.mark.parametrize("syntax", [None, RLELossless], ids=["uncompressed", "rle"])
def test_truncated_pixel_data(tmp_path, syntax):
    whole = write(tmp_path / "whole.dcm", ramp(40, 30), syntax=syntax)
    data = whole.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 50])
    assert header_record(whole)["readable"]
    assert header_record(cut)["reason"] == "truncated"
    with pytest.raises(DicomReadError) as info:
        read_mammogram(cut)
    assert info.value.reason == "truncated"


def test_truncated_header(tmp_path):
    whole = write(tmp_path / "whole.dcm", ramp())
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole.read_bytes()[:300])  # inside the file meta / first elements
    record = header_record(cut)
    assert not record["readable"] and record["reason"] == "truncated"


def test_missing_rows_is_bad_header(tmp_path):
    path = write(tmp_path / "x.dcm", ramp())
    ds = pydicom.dcmread(path)
    del ds.Rows
    ds.save_as(path)
    assert header_record(path)["reason"] == "bad_header"
    with pytest.raises(DicomReadError):
        read_mammogram(path)


# --- photometric interpretation, LUTs ------------------------------------------------------------------------


def test_monochrome1_is_inverted(tmp_path):
    pixels = ramp()
    path = write(tmp_path / "m1.dcm", pixels, PhotometricInterpretation="MONOCHROME1")
    values = read_mammogram(path)
    expected = float(pixels.max()) + float(pixels.min()) - pixels.astype(np.float32)
    np.testing.assert_array_equal(values, expected)
    assert values[pixels == pixels.min()].min() == values.max()  # the darkest stored value is now the brightest


def test_modality_lut_applied_voi_ignored(tmp_path):
    pixels = ramp()
    plain = write(tmp_path / "plain.dcm", pixels, RescaleSlope=2, RescaleIntercept=-100)
    windowed = write(tmp_path / "voi.dcm", pixels, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=300,
                     WindowWidth=50)  # fmt: skip
    ds = pydicom.dcmread(windowed)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.LUTData = [0, 10, 20, 30]
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(windowed)
    expected = pixels.astype(np.float32) * 2 - 100
    np.testing.assert_array_equal(read_mammogram(plain), expected)
    np.testing.assert_array_equal(read_mammogram(windowed), expected)


# --- masks -------------------------------------------------------------------------------------------------


def test_clean_mask(tmp_path):
    mask = np.zeros((20, 16), np.uint8)
    mask[5:9, 3:12] = 255
    read = read_mask(write(tmp_path / "m.dcm", mask))
    np.testing.assert_array_equal(read.mask, mask > 0)
    assert read.note == ""


def test_non_binary_mask_thresholded(tmp_path):
    mask = np.zeros((20, 16), np.uint8)
    mask[5:9, 3:12] = 254
    mask[5, 3] = 100  # below half of 254: background
    mask[6, 3] = 200  # above: foreground
    read = read_mask(write(tmp_path / "m.dcm", mask))
    np.testing.assert_array_equal(read.mask, mask > 127)
    assert "thresholded" in read.note and "max=254" in read.note


def test_empty_mask(tmp_path):
    read = read_mask(write(tmp_path / "m.dcm", np.zeros((8, 8), np.uint8)))
    assert not read.mask.any() and read.note == "empty mask"


def test_monochrome1_mask(tmp_path):
    stored = np.full((10, 10), 255, np.uint8)
    stored[2:5, 2:5] = 0  # MONOCHROME1: 0 is white, the foreground
    read = read_mask(write(tmp_path / "m.dcm", stored, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(read.mask, stored == 0)


def test_binary_fraction_tells_mask_from_crop():
    mask = np.zeros((50, 50), np.uint8)
    mask[10:30, 10:30] = 255
    assert binary_fraction(mask) == 1.0
    assert binary_fraction(np.zeros((5, 5))) == 1.0
    assert binary_fraction(ramp(50, 50)) < 0.5


def test_raster_files_read(tmp_path):
    from PIL import Image

    pixels = np.zeros((30, 20), np.uint8)
    pixels[10:20, 5:15] = 255
    Image.fromarray(pixels).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png").mask, pixels > 0)
    assert header_record(tmp_path / "m.png")["Rows"] == 30
    (tmp_path / "bad.jpg").write_text("not an image")
    assert header_record(tmp_path / "bad.jpg")["reason"] == "not_dicom"


# --- hostile header values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["../../etc/passwd", "/abs/path", "a\x00b", "x" * 5000, "a/../b"])
def test_safe_name_never_escapes(text):
    name = safe_name(text)
    assert "/" not in name and "\x00" not in name and ".." not in name
    assert not name.startswith(".") and 0 < len(name) <= 120


@pytest.mark.parametrize("text", ["", "///", "..", "\x00\x00"])
def test_safe_name_rejects_empty(text):
    with pytest.raises(ValueError):
        safe_name(text)


def test_hostile_patient_id_survives_indexing(tmp_path):
    header = DicomHeader("../../evil\x00" + "x" * 60, "1.2", "1.2.3", "1.2.3.4", "ROI mask images", "20160720", "L", "CC")
    path = write(tmp_path / "h.dcm", np.zeros((4, 4), np.uint8), header=header)
    record = header_record(path)
    assert record["readable"] and record["PatientID"].startswith("../../evil\x00")


def test_corrupt_dimension_element_is_a_bad_header(tmp_path):
    """Found by the fuzz test: a Rows element whose VR is garbage made pydicom raise NotImplementedError."""
    from dicom_helpers import write_test_dicom

    from mammoseg.dicom import DicomReadError, read_mammogram

    path = write_test_dicom(tmp_path / "x.dcm", np.arange(64 * 48, dtype=np.uint16).reshape(64, 48))
    data = bytearray(path.read_bytes())
    at = data.find(bytes([0x28, 0x00, 0x10, 0x00]))  # (0028,0010) Rows, explicit VR little endian
    data[at + 4:at + 6] = b"TS"
    path.write_bytes(bytes(data))
    with pytest.raises(DicomReadError) as info:
        read_mammogram(path)
    assert info.value.reason == "bad_header" and "x.dcm" in str(info.value)
