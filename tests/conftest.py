"""Shared fixtures: where the repository and the shared CBIS-DDSM data live."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# benchmarks/measures.py (the measurements of `make bench`) is tested too; it is not part of the package
sys.path.insert(0, str(REPO / "benchmarks"))


def shared_data_dir() -> Path:
    """The official CBIS-DDSM CSVs: $MAMMOSEG_SHARED/data/cbis-ddsm, else ../shared beside the checkout."""
    root = Path(os.environ.get("MAMMOSEG_SHARED", REPO.parent / "shared"))
    return root / "data" / "cbis-ddsm"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cbis_csv_dir() -> Path:
    path = shared_data_dir()
    if not (path / "mass_case_description_test_set.csv").is_file():
        pytest.skip(f"official CBIS-DDSM CSVs not found under {path} (set MAMMOSEG_SHARED)")
    return path
