"""Shared fixtures: where the repository and the shared CBIS-DDSM data live."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# benchmarks/measures.py (the measurements of `make bench`) is tested too; it is not part of the package
sys.path.insert(0, str(REPO / "benchmarks"))


#: The four official CBIS-DDSM case CSVs (CC BY 3.0), kept in the repository so every test runs on a fresh clone.
CBIS_CSV_DIR = REPO / "tests" / "data" / "cbis-ddsm"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cbis_csv_dir() -> Path:
    return CBIS_CSV_DIR
