"""The test suite's own machinery: under ``make test``'s two workers (pytest-xdist, ``--dist loadgroup``) every
test carries its group (tests/conftest.py), so the session's tiny run is made once and each file's module
fixtures once. A pytest or xdist release that drops the groups silently would double the suite's cost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import xdist_group


def test_the_tiny_runs_tests_share_one_group_and_the_others_go_with_their_file():
    assert xdist_group(("tmp_path", "tiny_run"), Path("tests/test_report.py")) == "tiny_run"
    assert xdist_group(("tmp_path",), Path("tests/test_report.py")) == "test_report.py"


@pytest.mark.skipif("PYTEST_XDIST_WORKER" not in os.environ, reason="the suite runs in one process")
def test_under_xdist_this_test_runs_in_its_files_group(request):
    # xdist appends the group to the id it schedules by; without it the groups are ignored
    assert request.node.nodeid.endswith("@test_suite.py"), request.node.nodeid
