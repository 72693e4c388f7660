"""The reference epoch (mammoseg.timing): its arithmetic, the CPU description, and one real measurement."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest

from mammoseg import timing
from mammoseg.timing import ReferenceEpoch, cpu_description


def test_multiples_of_the_reference_epoch():
    reference = ReferenceEpoch(seconds=12.5, epochs=(12.0, 12.5, 14.0), cpu="x")
    assert reference.multiple(125.0) == pytest.approx(10.0)
    assert reference.describe(250.0) == "250 s = 20.0 reference epochs"
    assert reference.as_dict() == {"seconds": 12.5, "epochs": (12.0, 12.5, 14.0), "cpu": "x"}


def test_cpu_description_names_the_model_the_vector_extensions_and_the_cores(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n\n"
                       "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n")
    real_path = Path

    def fake_path(name, *rest):
        return cpuinfo if name == "/proc/cpuinfo" else real_path(name, *rest)

    monkeypatch.setattr(timing, "Path", fake_path)
    text = cpu_description()
    assert text == f"Test CPU 9000 (avx2 fma avx), {os.cpu_count()} cores"
    cpuinfo.write_text("model name\t: Old CPU\nflags\t\t: fpu sse2\n")
    assert cpu_description().startswith("Old CPU (no AVX)")


def test_the_json_output_reads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "measure_reference_epoch", lambda: timing.ReferenceEpoch(2.5, (3.0, 2.5, 2.0), "X"))
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        timing.main(["--json"])
    (tmp_path / "r.json").write_text(out.getvalue())
    assert timing.read_reference(tmp_path / "r.json") == timing.ReferenceEpoch(2.5, (3.0, 2.5, 2.0), "X")


@pytest.mark.slow
def test_a_real_measurement_reports_its_epochs_and_the_cpu():
    """``make test`` measured the reference before the suite with ``python -m mammoseg.timing --json``: that real
    measurement is checked (measuring again would cost as much). Run alone, the test measures one epoch."""
    from conftest import session_reference

    reference = session_reference()
    if reference is None:
        pytest.importorskip("tensorflow")
        reference = timing.measure_reference_epoch(epochs=1)
        assert len(reference.epochs) == 1
    else:
        assert len(reference.epochs) == timing.REFERENCE_EPOCHS
    assert all(seconds > 0 for seconds in reference.epochs)
    assert reference.seconds == statistics.median(reference.epochs)
    assert reference.cpu == timing.cpu_description()
