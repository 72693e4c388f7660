"""Shared fixtures: where the repository and the shared CBIS-DDSM data live, and one finished tiny run."""

from __future__ import annotations

import os
import shutil
import sys
import time
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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished run of the tiny workflow (tests/data/tiny.yaml) per test session: (workdir, resolved config,
    the run's CompletedProcess).

    Shared by every test that inspects a finished run or dry-runs a change against it. Such a test may add
    variants beside it (other keyed folders) and may change an input for a dry run if it restores the bytes
    after; it never deletes or damages the run's own outputs (tests that must, copy it or make their own run).
    """
    from tinyrun import TINY, failure, snakemake

    from mammoseg.config.resolve import resolve_config

    workdir = tmp_path_factory.mktemp("tiny-run")
    shutil.copy(TINY, workdir / "config.yaml")
    result = snakemake(workdir, timeout=1200)
    assert result.returncode == 0, f"the tiny workflow failed:\n{failure(result)}"
    return workdir, resolve_config([workdir / "config.yaml"]), result


_SESSION_START = time.monotonic()


def pytest_itemcollected(item):
    """Under pytest-xdist (``make test`` runs two workers, ``--dist loadgroup``): every test of the session's
    tiny run goes to one worker, so the run is made once and no two Snakemake processes share its folder; every
    other test goes with its file, so a module's expensive fixtures (a trained model, a SLURM cluster, a DICOM
    collection) are built once. Marked as each test is collected: xdist reads the groups in its own
    ``pytest_collection_modifyitems``."""
    if not item.config.pluginmanager.hasplugin("xdist"):  # the marker is xdist's
        return
    item.add_marker(pytest.mark.xdist_group(name=xdist_group(getattr(item, "fixturenames", ()), item.path)))


def xdist_group(fixturenames, path: Path) -> str:
    """The xdist group of a test: ``tiny_run`` for every test that uses the session's tiny run (directly or
    through another fixture), else its file's name."""
    return "tiny_run" if "tiny_run" in fixturenames else path.name


def session_reference():
    """The reference epoch ``make test`` measured before the suite (mammoseg.timing), read from the JSON file
    that ``MAMMOSEG_REFERENCE_EPOCH`` names; None when the suite runs without it."""
    path = os.environ.get("MAMMOSEG_REFERENCE_EPOCH")
    if not path:
        return None
    from mammoseg.timing import read_reference

    return read_reference(path)


def pytest_report_header(config):
    reference = session_reference()
    if reference:
        return (f"reference epoch: {reference.seconds:.2f} s (epochs {', '.join(f'{s:.2f}' for s in reference.epochs)})"
                f" on {reference.cpu}, measured before the suite")
    return None


def pytest_terminal_summary(terminalreporter):
    """The suite's wall time, also in reference epochs when ``make test`` measured one (``session_reference``):
    times of different machines then compare."""
    seconds = time.monotonic() - _SESSION_START
    line = f"test session: {seconds:.0f} s"
    reference = session_reference()
    if reference:
        line += f" = {reference.multiple(seconds):.1f} reference epochs of {reference.seconds:.2f} s ({reference.cpu})"
    terminalreporter.write_line(line)

