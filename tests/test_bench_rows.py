"""``make bench`` rows still run against the current code (a smoke test with small inputs, not the numbers).

The rows drive the workflow and the package from outside, so a renamed function or a changed wildcard breaks
them without breaking any other test (it happened: the inference row imported ``load_model`` from a module it
had left, and the prediction-stage row asked for ``predict_chunk`` jobs before the test split's restructure
checkpoint had run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_inference_stage_and_caching_rows_run_and_pass(tmp_path):
    rows = "inference,inference_stage,chunk_caching"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--rows", rows,
                           "--work", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (record,) = (tmp_path / "out").glob("*.json")
    results = json.loads(record.read_text())["rows"]
    crashed = [r for r in results if str(r["measured"]).startswith("FAILED")]
    assert not crashed, crashed
    whats = [r["what"] for r in results]
    assert any(w.startswith("batched inference vs per-window") for w in whats), whats
    assert any(w.startswith("prediction stage as Snakemake runs it") for w in whats), whats
    (caching,) = [r for r in results if r["what"].startswith("dry run after one test image changed")]
    assert caching["passed"], caching  # exactly one chunk's jobs, nothing upstream


def test_a_row_gets_sixty_reference_epochs_and_never_less_than_ten_minutes():
    """The row timeout follows the machine: on 2026-12-07 a machine of 16 s reference epochs needed more than the
    fixed 600 s for the training-levers row."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import run

    assert run.row_timeout_for({"seconds": 15.76}) == pytest.approx(945.6)
    assert run.row_timeout_for({"seconds": 4.0}) == 600.0
    assert run.row_timeout_for({}) == 600.0  # --quick measures no reference
