"""mammoseg.io.dicom: pixel and header reading on hand-built bad and awkward DICOM files."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from mammoseg.io.dicom import DicomReadError, header_record, read_header, read_mammogram
from mammoseg.io.dicomwrite import DicomHeader, build_dataset
from mammoseg.io.masks import binary_fraction, mask_from_pixels, read_mask
from mammoseg.io.names import safe_name

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
    assert header_record(cut, check_pixels=False)["readable"]  # the header alone is whole
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


def _png_and_jpeg(tmp_path):
    """A two-valued mask as PNG and a smooth ramp as JPEG (the Kaggle copy's formats)."""
    from PIL import Image

    mask = np.zeros((30, 20), np.uint8)
    mask[10:20, 5:15] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    r, c = np.mgrid[0:32, 0:24]
    Image.fromarray((r * 4 + c * 2).astype(np.uint8)).save(tmp_path / "x.jpg", quality=95)
    return mask, tmp_path / "m.png", tmp_path / "x.jpg"


def test_raster_files_read_where_allowed(tmp_path):
    mask, png, jpeg = _png_and_jpeg(tmp_path)
    np.testing.assert_array_equal(read_mask(png, allow_raster=True).mask, mask > 0)
    assert read_mammogram(jpeg, allow_raster=True).shape == (32, 24)
    record = header_record(png, allow_raster=True)
    assert record["readable"] and (record["Rows"], record["Columns"], record["BitsStored"]) == (30, 20, 8)
    (tmp_path / "bad.jpg").write_text("not an image")
    assert header_record(tmp_path / "bad.jpg", allow_raster=True)["reason"] == "not_dicom"
    with pytest.raises(DicomReadError) as info:
        read_mammogram(tmp_path / "bad.jpg", allow_raster=True)
    assert info.value.reason == "undecodable" and "bad.jpg" in str(info.value)


@pytest.mark.parametrize("reader", ["read_mammogram", "read_mask", "header_record", "check_decodable"])
def test_raster_files_are_not_dicom_unless_allowed(tmp_path, reader):
    """A PNG chart or a JPEG handed to a reader that did not ask for raster input is refused, naming the file."""
    from mammoseg.io import dicom, masks

    function = getattr(dicom, reader, None) or getattr(masks, reader)
    _, png, jpeg = _png_and_jpeg(tmp_path)
    for path in (png, jpeg):
        if reader == "header_record":
            record = function(path)
            assert not record["readable"] and record["reason"] == "not_dicom" and "JPEG/PNG" in record["error"]
            continue
        with pytest.raises(DicomReadError) as info:
            function(path)
        assert info.value.reason == "not_dicom" and path.name in str(info.value) and "JPEG/PNG" in info.value.detail


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
    header = DicomHeader("../../evil\x00" + "x" * 60, "1.2", "1.2.3", "1.2.3.4", "ROI mask images", "20160720", "L",
                         "CC")
    path = write(tmp_path / "h.dcm", np.zeros((4, 4), np.uint8), header=header)
    record = header_record(path)
    assert record["readable"] and record["PatientID"].startswith("../../evil\x00")


def test_corrupt_dimension_element_is_a_bad_header(tmp_path):
    """Found by the fuzz test: a Rows element whose VR is garbage made pydicom raise NotImplementedError."""
    from dicom_helpers import write_test_dicom

    from mammoseg.io.dicom import DicomReadError, read_mammogram

    path = write_test_dicom(tmp_path / "x.dcm", np.arange(64 * 48, dtype=np.uint16).reshape(64, 48))
    data = bytearray(path.read_bytes())
    at = data.find(bytes([0x28, 0x00, 0x10, 0x00]))  # (0028,0010) Rows, explicit VR little endian
    data[at + 4:at + 6] = b"TS"
    path.write_bytes(bytes(data))
    with pytest.raises(DicomReadError) as info:
        read_mammogram(path)
    assert info.value.reason == "bad_header" and "x.dcm" in str(info.value)


# --- every kind of file: the same pixels as pydicom's own pixel_array -----------------------------------------


def _file(tmp_path, name, pixels, *, rle, bits_stored=None, implicit=False, stored=None, signed=False,
          deflated=False):  # fmt: skip
    """A file holding ``pixels``; ``stored`` replaces the pixel bytes after the header is built (garbage high bits)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = build_dataset(pixels, HEADER, bits_stored=bits_stored)
    if signed:
        ds.PixelRepresentation = 1
    if stored is not None:
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
    if rle:
        ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    elif implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif deflated:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    return path


def _cases():
    image = ramp(37, 23, top=4000)  # odd sizes: 8-bit native data are padded to an even length
    mask = np.zeros((37, 23), np.uint8)
    mask[5:20, 3:11] = 255
    garbage = image | np.uint16(0xF000)  # 12 stored bits, the 4 unused high bits set
    return {
        "rle16": dict(pixels=image, rle=True),
        "rle8": dict(pixels=mask, rle=True),
        "native16": dict(pixels=image, rle=False),
        "native8_odd": dict(pixels=mask, rle=False),
        "implicit16": dict(pixels=image, rle=False, implicit=True),
        "deflated16": dict(pixels=image, rle=False, deflated=True),
        "native12_high_bits": dict(pixels=image, rle=False, bits_stored=12, stored=garbage),
        "rle12_high_bits": dict(pixels=image, rle=True, bits_stored=12, stored=garbage),
    }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_stored_pixels_equal_pydicom(tmp_path, case):
    from mammoseg.io.dicom import read_stored_pixels

    path = _file(tmp_path, f"{case}.dcm", **_cases()[case])
    expected = pydicom.dcmread(path).pixel_array  # pydicom's own decode of the whole dataset is the reference
    stored = read_stored_pixels(path)
    raw = stored.pixels
    assert raw.dtype == expected.dtype and raw.shape == expected.shape and stored.photometric == "MONOCHROME2"
    np.testing.assert_array_equal(raw, expected)
    if case.endswith("high_bits"):
        assert stored.bits_stored == 12 and int(raw.max()) < 4096  # the garbage bits are cleared
        np.testing.assert_array_equal(raw, _cases()[case]["pixels"])
    if expected.dtype == np.uint16:
        np.testing.assert_array_equal(read_mammogram(path), expected)  # no LUT: the stored values as they are


def test_signed_pixels(tmp_path):
    from mammoseg.io.dicom import read_stored_pixels

    pixels = ramp(20, 16, top=300)
    path = _file(tmp_path, "signed.dcm", pixels, rle=True, signed=True)
    raw = read_stored_pixels(path).pixels
    assert raw.dtype == np.int16
    np.testing.assert_array_equal(raw, pydicom.dcmread(path).pixel_array)
    values = read_mammogram(path)  # not unsigned: through the modality LUT (identity here) as float32
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, pixels.astype(np.float32))


def _corrupt_rle(tmp_path):
    path = _file(tmp_path, "rle.dcm", ramp(40, 30), rle=True)
    data = bytearray(path.read_bytes())
    # Pixel Data (12 bytes), the offset table item (8 + 4), the fragment item (8), its 64-byte RLE header: then
    # the segments, overwritten with PackBits no-ops, which decode to nothing
    segments = data.find(b"\xe0\x7f\x10\x00") + 12 + 12 + 8 + 64
    data[segments:len(data) - 8] = b"\x80" * (len(data) - 8 - segments)
    path.write_bytes(bytes(data))
    return path


def test_corrupt_rle_stream_is_undecodable(tmp_path):
    path = _corrupt_rle(tmp_path)
    with pytest.raises(DicomReadError) as info:
        read_mammogram(path)
    assert info.value.reason == "undecodable" and "rle.dcm" in str(info.value)
    assert header_record(path)["readable"]  # the header and the item structure are intact: only decoding tells
    with pytest.raises(Exception):  # pydicom agrees that the stream is corrupt
        pydicom.dcmread(path).pixel_array  # noqa: B018


def test_dimensions_are_checked_before_decoding(tmp_path, monkeypatch):
    """A header claiming a 60,000-pixel side is refused before any decoder allocates for it."""
    from mammoseg.io import dicom

    path = _file(tmp_path, "x.dcm", ramp(), rle=True)
    ds = pydicom.dcmread(path)
    ds.Rows = 60000
    ds.save_as(path, enforce_file_format=True)
    for decoder_entry in ("get_decoder", "pixel_array"):
        monkeypatch.setattr(dicom, decoder_entry, lambda *a, **k: pytest.fail("a decoder was called"))
    with pytest.raises(DicomReadError) as info:
        read_mammogram(path)
    assert info.value.reason == "bad_header" and "60000" in info.value.detail
    assert header_record(path)["reason"] == "bad_header"  # the index applies the same limits


# --- check_decodable: restructuring's check of every full image, from several threads ------------------------


def test_check_decodable_reasons(tmp_path):
    from mammoseg.io.dicom import check_decodable

    good = _file(tmp_path, "good.dcm", ramp(40, 30), rle=True)
    assert check_decodable(good) is None
    with pytest.raises(DicomReadError) as info:
        check_decodable(_corrupt_rle(tmp_path))
    assert info.value.reason == "undecodable" and "rle.dcm" in str(info.value)
    assert "cannot decode pixel data (RLE Lossless)" in info.value.detail  # with the decoder's own message after it
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-50])
    with pytest.raises(DicomReadError) as info:
        check_decodable(cut)
    assert info.value.reason == "truncated"


def test_check_decodable_is_thread_safe(tmp_path):
    """Many files checked from 4 threads at once give exactly the outcomes of checking them one by one."""
    from concurrent.futures import ThreadPoolExecutor

    from mammoseg.io.dicom import check_decodable

    paths = []
    for k in range(12):
        path = _file(tmp_path, f"f{k}.dcm", ramp(200 + k, 150, top=4000), rle=k % 3 != 2)
        if k % 4 == 1:  # every fourth file corrupt: its RLE segments become no-ops
            data = bytearray(path.read_bytes())
            if k % 3 != 2:
                start = data.find(b"\xe0\x7f\x10\x00") + 12 + 12 + 8 + 64
                data[start:len(data) - 8] = b"\x80" * (len(data) - 8 - start)
            else:  # uncompressed: cut short
                data = data[:-100]
            path.write_bytes(bytes(data))
        paths.append(path)

    def outcome(path):
        try:
            check_decodable(path)
        except DicomReadError as exc:
            return exc.reason
        return "ok"

    sequential = [outcome(p) for p in paths]
    assert sequential.count("ok") == 9 and set(sequential) == {"ok", "undecodable", "truncated"}, sequential
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            assert list(pool.map(outcome, paths)) == sequential


# --- mask binarisation and the binary fraction against plain definitions -----------------------------------


def _reference_mask(pixels):
    """The rule written the slow, obvious way: foreground above half the maximum; clean = two values only."""
    values = pixels.astype(np.float64)
    top = values.max()
    if top <= 0:
        return np.zeros(pixels.shape, bool), "empty"
    mask = values > top / 2
    clean = all((v == top) if v > top / 2 else (v == values.min()) for v in np.unique(values))
    return mask, "clean" if clean else "thresholded"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mask_from_pixels_matches_reference(data):

    dtype = data.draw(st.sampled_from([np.uint8, np.uint16]))
    top = np.iinfo(dtype).max
    values = data.draw(st.lists(st.sampled_from([0, 1, 2, 127, 128, 200, top - 1, top]), min_size=1, max_size=4,
                                unique=True))  # fmt: skip
    shape = (data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9)))
    pixels = np.asarray(data.draw(st.lists(st.sampled_from(values), min_size=shape[0] * shape[1],
                                           max_size=shape[0] * shape[1])), dtype=dtype).reshape(shape)  # fmt: skip
    read = mask_from_pixels(pixels)
    mask, kind = _reference_mask(pixels)
    np.testing.assert_array_equal(read.mask, mask)
    assert {"": "clean", "empty mask": "empty"}.get(read.note, "thresholded") == kind, read.note
    if kind == "thresholded":
        assert f"{len(np.unique(pixels))} distinct values" in read.note


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_binary_fraction_matches_float_definition(data):
    dtype = data.draw(st.sampled_from([np.uint8, np.uint16]))
    n = data.draw(st.integers(2, 60))
    pixels = np.asarray(data.draw(st.lists(st.integers(0, int(np.iinfo(dtype).max)), min_size=n, max_size=n)),
                        dtype=dtype).reshape(1, n)  # fmt: skip
    values = pixels.astype(np.float64)
    low, high = values.min(), values.max()
    band = 0.05 * (high - low)
    expected = 1.0 if high == low else float(np.mean((values <= low + band) | (values >= high - band)))
    assert binary_fraction(pixels) == expected


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_mask_read_bbox_is_the_foreground_box(data):
    """The box found while binarising equals a box computed from the finished mask (None when empty)."""
    from mammoseg.patches.geometry import mask_bbox

    rows, cols = data.draw(st.integers(1, 30)), data.draw(st.integers(1, 30))
    pixels = np.zeros((rows, cols), np.uint8)
    for _ in range(data.draw(st.integers(0, 3))):
        r0, c0 = data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, cols - 1))
        r1, c1 = data.draw(st.integers(r0 + 1, rows)), data.draw(st.integers(c0 + 1, cols))
        pixels[r0:r1, c0:c1] = data.draw(st.sampled_from([1, 100, 200, 255]))
    read = mask_from_pixels(pixels)
    if read.mask.any():
        assert read.bbox == mask_bbox(read.mask)
    else:
        assert read.bbox is None


@pytest.mark.parametrize("rle", [False, True], ids=["native", "rle"])
def test_long_header_element(tmp_path, rle):
    """A 70 KiB private element before the pixels gives the same record and pixels as any other file; the file
    cut inside that element is truncated, not read."""
    from mammoseg.io.dicom import read_stored_pixels

    pixels = ramp(30, 20, top=3000)
    ds = build_dataset(pixels, HEADER)
    ds.add_new(0x00091010, "OB", bytes(range(256)) * 280)  # private, 71,680 bytes
    if rle:
        ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    path = tmp_path / "long.dcm"
    ds.save_as(path, enforce_file_format=True)
    record = header_record(path)
    assert record["readable"] and (record["Rows"], record["Columns"]) == (30, 20), record
    assert record["PatientID"] == HEADER.patient_id
    np.testing.assert_array_equal(read_stored_pixels(path).pixels, pixels)
    data = path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: data.find(bytes(range(256))) + 1000])
    assert header_record(tmp_path / "cut.dcm")["reason"] == "truncated"


# --- odd and hostile files: a reason code, never another exception -----------------------------------------


def test_corrupt_identity_value_leaves_the_file_readable_everywhere(tmp_path):
    """Found by the slow fuzz test on a real mammogram: one flipped bit made SeriesDescription's VR 'MO'. pydicom
    cannot convert it; the pixel readers never look at it, so the index must not refuse the file either: the value
    is recorded empty (the case is then named by its folder)."""
    path = write(tmp_path / "x.dcm", ramp())
    data = bytearray(path.read_bytes())
    at = data.find(b"\x08\x00\x3e\x10LO")  # (0008,103E) SeriesDescription, explicit VR
    data[at + 4:at + 6] = b"MO"
    path.write_bytes(bytes(data))
    with pytest.raises(NotImplementedError):  # pydicom's own verdict on the value
        pydicom.dcmread(path).SeriesDescription  # noqa: B018
    record = header_record(path)
    assert record["readable"] and record["SeriesDescription"] == "" and record["PatientID"] == HEADER.patient_id
    np.testing.assert_array_equal(read_mammogram(path), ramp())


def test_encapsulated_data_under_a_native_syntax_is_refused_cleanly(tmp_path):
    """A one-character flip of the transfer syntax (RLE ...1.2.5 -> native ...1.2.1) must not reach np.frombuffer."""
    path = _file(tmp_path, "rle.dcm", ramp(40, 30), rle=True)
    data = path.read_bytes().replace(b"1.2.840.10008.1.2.5", b"1.2.840.10008.1.2.1", 1)
    path.write_bytes(data)
    with pytest.raises(DicomReadError) as info:
        read_mammogram(path)
    assert "rle.dcm" in str(info.value)


def test_unreadable_rescale_slope_is_a_bad_header(tmp_path):
    ds = build_dataset(ramp(), HEADER)
    ds.add_new(0x00281052, "DS", "0")
    ds.add_new(0x00281053, "FD", 1.0)  # RescaleSlope with a binary VR, then cut to 4 bytes: an FD needs 8
    path = tmp_path / "slope.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    at = data.find(b"\x28\x00\x53\x10FD\x08\x00")
    assert at > 0
    path.write_bytes(data[:at] + b"\x28\x00\x53\x10FD\x04\x00" + data[at + 8:at + 12] + data[at + 16:])
    with pytest.raises(DicomReadError) as info:
        read_mammogram(path)
    assert info.value.reason == "bad_header"


def test_rle_stream_the_rust_decoder_rejects_gets_pydicoms_decoder(tmp_path):
    """pylibjpeg-rle refuses an RLE header with a stray offset in an unused slot; pydicom falls back to its own
    decoder, which reads it, and so must we."""
    path = _file(tmp_path, "rle.dcm", ramp(40, 30), rle=True)
    data = bytearray(path.read_bytes())
    header = data.find(b"\xe0\x7f\x10\x00") + 12 + 12 + 8  # Pixel Data, offset table item, fragment item
    assert int.from_bytes(data[header:header + 4], "little") == 2  # two segments: high and low bytes
    data[header + 12:header + 16] = (7).to_bytes(4, "little")  # offset of an unused third segment
    path.write_bytes(bytes(data))
    expected = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(read_mammogram(path), expected)
    np.testing.assert_array_equal(expected, ramp(40, 30))


def test_missing_bits_stored_is_decided_by_pydicom(tmp_path):
    path = _file(tmp_path, "x.dcm", ramp(), rle=False)
    ds = pydicom.dcmread(path)
    del ds.BitsStored
    ds.save_as(path, enforce_file_format=True)
    try:
        expected = pydicom.dcmread(path).pixel_array
    except Exception:  # noqa: BLE001 - pydicom refuses: so must the reader, with a reason
        with pytest.raises(DicomReadError):
            read_mammogram(path)
    else:
        np.testing.assert_array_equal(read_mammogram(path), expected)


def test_implicit_vr_length_that_spells_letters(tmp_path):
    """37 x 257 16-bit pixels are 19,018 bytes = 0x4A4A ('JJ'): the length must not be taken for an explicit VR."""
    pixels = ramp(37, 257, top=4000)
    path = _file(tmp_path, "jj.dcm", pixels, rle=False, implicit=True)
    record = header_record(path)
    assert record["readable"], record
    np.testing.assert_array_equal(read_mammogram(path), pixels)
