"""DICOM Segmentation (SEG) objects of a prediction, for viewing beside the mammogram in a DICOM viewer or PACS.

One SEG per predicted image, written with highdicom: a BINARY SEG from the mask, or a FRACTIONAL (probability)
SEG from the probability map. Each holds one frame with one segment, "mass" (SCT 4147007 *Mass*, category SCT
49755003 *Morphologically abnormal structure*), identified as made by the algorithm "mammoseg", version
``<package version>+<experiment>`` (family DCM 123110 *Artificial Intelligence*, type AUTOMATIC).

Geometry
    The SEG frame corresponds pixel for pixel with the stored source image (same Rows x Columns, same
    orientation; mammoseg's reader inverts MONOCHROME1 intensities but never flips or crops). CBIS-DDSM images
    are 2-D Secondary Capture projections without FrameOfReferenceUID, ImagePositionPatient or PixelSpacing;
    highdicom encodes such a SEG by its per-frame reference to the source SOP instance (Derivation Image
    Sequence) and writes no plane position or orientation (highdicom PR #183, for issue #159 on mammograms).
    Where the source has PixelSpacing, highdicom copies it into the Pixel Measures Sequence; where it has a
    frame of reference, the SEG shares it.

Empty predictions
    A mask with no foreground still gives a valid SEG: one all-zero frame (``omit_empty_frames=False``), so "the
    model found no mass here" is a result a viewer shows, never a missing file that looks like a failed job.

Transfer syntax (measured on a 4432 x 2864 CBIS-DDSM mammogram with a lesion-sized probability bump;
highdicom 0.28.2, a shared 2-core machine; write = build + atomic save, read = highdicom ``segread`` + frame)
    BINARY: Explicit VR Little Endian, 1 bit per pixel: 1.59 MB, 0.03 s to write, 0.01 s to read.
    highdicom's only compressed choice for BINARY is JPEG 2000 (4 KB, 0.19 s / 0.13 s), but the SEG reader of
    OHIF/Cornerstone (dcmjs ``Segmentation_4X.generateToolState``) decodes only uncompressed and RLE pixel data
    itself, and DCMTK (3D Slicer's dcmqi) has no free JPEG 2000 codec; it stays available as
    ``transfer_syntax=JPEG2000Lossless`` for readers that have one.
    FRACTIONAL: RLE Lossless: 0.42 MB (4.2 MB when low-level noise covers the breast) against 12.7 MB
    uncompressed, 0.24 s / 0.04 s; the readers above decode it. JPEG-LS (84 KB; 1.6 MB noisy) and JPEG 2000
    (32 KB; 2.3 MB noisy) are smaller still but not decoded by the OHIF SEG reader.

Privacy: what the SEG copies from its source
    highdicom copies the Patient, General Study and Patient Study modules (and institution, station and device
    of the acquisition equipment) from the source dataset it is given. It is therefore given a reduced copy
    holding only :data:`COPIED_ATTRIBUTES`, each needed to show the SEG with its image:

    * ``StudyInstanceUID``: a SEG must belong to the study of its source; viewers and PACS group by it.
    * ``SeriesInstanceUID``, ``SOPInstanceUID``, ``SOPClassUID``: the reference to the segmented image
      (Referenced Series / Source Image / Derivation Image Sequences) by which a viewer overlays the SEG.
    * ``PatientID``: PACS file instances under a patient by it and refuse or split a study whose instances
      disagree. In CBIS-DDSM it is the case id (``Mass-Test_P_00173_LEFT_CC``) that every derived artefact of
      mammoseg already carries.
    * ``PatientName``: copied only when it equals ``PatientID`` (CBIS-DDSM's convention, so it adds nothing to
      the case id); any other name is left empty.
    * ``Rows``, ``Columns``, ``NumberOfFrames``, ``FrameOfReferenceUID``, ``PixelSpacing``,
      ``ImagePositionPatient``, ``ImageOrientationPatient``, ``SliceThickness``, ``SpacingBetweenSlices``:
      geometry, where present.
    * ``LossyImageCompression``, ``LossyImageCompressionRatio``, ``LossyImageCompressionMethod``: a SEG states
      that it derives from a lossy image.
    * ``SpecificCharacterSet``, ``Modality``: how to decode the copied text; ``Modality`` only names the
      content label (``MG_SEG``).

    Everything else stays out: birth date, sex, age, accession number, study id, date and time, referring
    physician, study description, institution, station, operators, device serial numbers, clinical-trial and
    private attributes. The required (type 2) ones among them are written empty.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless

from mammoseg import __version__
from mammoseg.errors import InputError
from mammoseg.io.atomic import atomic_path
from mammoseg.io.dicom import read_header

__all__ = ["COPIED_ATTRIBUTES", "SegKind", "DEFAULT_TRANSFER_SYNTAX", "source_reference", "build_seg", "write_seg"]

SegKind = Literal["binary", "fractional"]

#: Attributes of the source image that a SEG may carry (see the module docstring for why each is needed).
COPIED_ATTRIBUTES: tuple[str, ...] = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "PatientID", "Rows", "Columns", "NumberOfFrames", "FrameOfReferenceUID", "PixelSpacing", "ImagePositionPatient",
    "ImageOrientationPatient", "SliceThickness", "SpacingBetweenSlices", "LossyImageCompression",
    "LossyImageCompressionRatio", "LossyImageCompressionMethod",
)  # fmt: skip

#: Required (type 2) Patient and Study attributes highdicom reads from the source; written empty.
_EMPTIED_ATTRIBUTES = ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                       "ReferringPhysicianName")  # fmt: skip

#: Transfer syntax per SEG kind: what the OHIF/Cornerstone SEG reader and DCMTK decode (module docstring).
DEFAULT_TRANSFER_SYNTAX: dict[str, UID] = {"binary": ExplicitVRLittleEndian, "fractional": RLELossless}

#: Series numbers of the SEG series (a viewer lists them after the image series, binary before probability).
_SERIES_NUMBER = {"binary": 901, "fractional": 902}

_ALGORITHM_NAME = "mammoseg"


def source_reference(source: Dataset) -> Dataset:
    """The reduced copy of a source header that a SEG is built from: :data:`COPIED_ATTRIBUTES` only.

    ``PatientName`` is kept only when it equals ``PatientID``; the type-2 Patient/Study attributes highdicom
    requires are present and empty. Pixel data are never needed.

    Raises
    ------
    ValueError
        If the source lacks an attribute a SEG cannot do without (UIDs, Rows, Columns).
    """
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows",
                           "Columns") if not source.get(k)]  # fmt: skip
    if missing:
        raise InputError(f"source image lacks {', '.join(missing)}: a SEG cannot reference it")
    reduced = Dataset()
    for keyword in COPIED_ATTRIBUTES:
        if keyword in source:
            reduced.add(source[keyword])
    reduced.PatientID = str(source.get("PatientID", "") or "")
    name = str(source.get("PatientName", "") or "")
    reduced.PatientName = name if name and name == reduced.PatientID else ""
    for keyword in _EMPTIED_ATTRIBUTES:
        setattr(reduced, keyword, "")
    if "Modality" not in reduced:
        reduced.Modality = "OT"
    return reduced


def _segment_description(experiment: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=_ALGORITHM_NAME, version=_algorithm_version(experiment), family=codes.cid7162.ArtificialIntelligence
    )
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="mass",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Mass,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )


def _algorithm_version(experiment: str) -> str:
    """``<version>+<experiment>``, or the version alone (AlgorithmVersion is LO: 64 characters at most)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]*", experiment):
        raise ValueError(f"experiment name {experiment!r} may hold only letters, digits, '.', '_' and '-'")
    version = f"{__version__}+{experiment}" if experiment else __version__
    if len(version) > 64:
        raise ValueError(f"algorithm version {version!r} is longer than 64 characters; shorten the experiment name")
    return version


def _segment_pixels(pixels: np.ndarray, kind: SegKind, shape: tuple[int, int]) -> np.ndarray:
    """Check ``pixels`` against the source shape and bring them to what highdicom takes for ``kind``.

    binary: bool or integer 0/1 -> bool. fractional: uint8 ``round(p x 255)`` or float in [0, 1] -> float32 in
    [0, 1] (highdicom stores ``round(p x 255)``, so a uint8 map comes back unchanged).
    """
    pixels = np.asarray(pixels)
    if pixels.shape != shape:
        raise ValueError(f"segmentation of shape {pixels.shape} does not match the source image {shape} (rows, cols)")
    if kind == "binary":
        if pixels.dtype != np.bool_ and not np.isin(pixels, (0, 1)).all():
            raise ValueError("a binary SEG needs a mask of 0/1 or bool values")
        return pixels.astype(bool, copy=False)
    if kind != "fractional":
        raise ValueError(f"unknown SEG kind {kind!r}; allowed: binary, fractional")
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / np.float32(255)
    if pixels.dtype.kind != "f" or not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
        raise ValueError("a fractional SEG needs uint8 probabilities x 255 or finite floats in [0, 1]")
    return pixels.astype(np.float32, copy=False)


def build_seg(source: Dataset, pixels: np.ndarray, *, kind: SegKind, experiment: str = "",
              transfer_syntax: str | None = None):  # fmt: skip
    """Build the SEG of one predicted image (in memory).

    Parameters
    ----------
    source : the source image's header (pixel data not needed), e.g. ``mammoseg.io.dicom.read_header(path)``
    pixels : (Rows, Columns) of the source. ``kind="binary"``: the mask, bool or 0/1. ``kind="fractional"``: the
        probability map, uint8 ``round(p x 255)`` as saved by ``mammoseg.inference.sliding`` or float in [0, 1].
    kind : ``"binary"`` (BINARY SEG, 1 bit per pixel) or ``"fractional"`` (FRACTIONAL PROBABILITY SEG, 8 bits,
        MaximumFractionalValue 255)
    experiment : name of the experiment that made the prediction; appended to the algorithm version and shown
        in the series description. ``[A-Za-z0-9._-]`` as in the config.
    transfer_syntax : None for :data:`DEFAULT_TRANSFER_SYNTAX`, or a UID highdicom supports for the kind

    Returns
    -------
    highdicom.seg.Segmentation, with fresh Series and SOP Instance UIDs.
    """
    reference = source_reference(source)
    segment_pixels = _segment_pixels(pixels, kind, (int(reference.Rows), int(reference.Columns)))
    label = "mass" if kind == "binary" else "mass probability"
    description = f"mammoseg {experiment} {label}" if experiment else f"mammoseg {label}"
    with warnings.catch_warnings():
        # CBIS-DDSM's PatientName is the one-component case id, by design; highdicom warns about such names
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        return _segmentation(reference, segment_pixels, kind, experiment, description, transfer_syntax)


def _segmentation(reference: Dataset, segment_pixels: np.ndarray, kind: SegKind, experiment: str,
                  description: str, transfer_syntax: str | None):  # fmt: skip
    import highdicom as hd

    return hd.seg.Segmentation(
        source_images=[reference],
        pixel_array=segment_pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY if kind == "binary"
        else hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[_segment_description(experiment)],
        series_instance_uid=hd.UID(),
        series_number=_SERIES_NUMBER[kind],
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=_ALGORITHM_NAME,
        manufacturer_model_name=_ALGORITHM_NAME,
        software_versions=__version__,
        device_serial_number=experiment or "none",  # type 1; the trained model is the "device"
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        content_description=description[:64],
        series_description=description[:64],
        transfer_syntax_uid=transfer_syntax or DEFAULT_TRANSFER_SYNTAX[kind],
        omit_empty_frames=False,
    )


def write_seg(source_path: str | Path, pixels: np.ndarray, out_path: str | Path, *, kind: SegKind,
              experiment: str = "", transfer_syntax: str | None = None) -> Path:  # fmt: skip
    """Write the SEG of one predicted image atomically; see :func:`build_seg` for the arguments.

    ``source_path`` is the source DICOM (only its header is read). Returns ``out_path``.
    """
    seg = build_seg(read_header(source_path), pixels, kind=kind, experiment=experiment,
                    transfer_syntax=transfer_syntax)  # fmt: skip
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return out_path
