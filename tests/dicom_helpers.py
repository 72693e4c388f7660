"""Writing small test DICOMs through the package's own writer (one definition for every test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mammoseg.io.dicomwrite import DicomHeader, build_dataset, make_uid, write_dicom


def write_test_dicom(path: Path, pixels: np.ndarray, *, patient_id: str = "Mass-Test_P_00001_LEFT_CC") -> Path:
    """A 16-bit MONOCHROME2 MG file holding ``pixels`` (uint16-castable), uncompressed."""
    key = str(path)
    header = DicomHeader(
        patient_id=patient_id,
        study_uid=make_uid("test", "study", key),
        series_uid=make_uid("test", "series", key),
        sop_uid=make_uid("test", "sop", key),
        series_description="full mammogram images",
        study_date="20160720",
        laterality="L",
        view="CC",
    )
    ds = build_dataset(np.ascontiguousarray(pixels, dtype=np.uint16), header, bits_stored=16)
    return write_dicom(ds, path, rle=False)
