"""CITATION.cff is valid Citation File Format 1.2.0 and says what the README says: the software, its licence, the
paper it implements and the data set."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml


def cff_validator(repo_root: Path) -> jsonschema.Draft7Validator:
    schema = json.loads((repo_root / "tests" / "data" / "citation-file-format" / "schema-1.2.0.json").read_text())
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())


def read_citation(repo_root: Path) -> dict:
    return yaml.safe_load((repo_root / "CITATION.cff").read_text())


def test_citation_cff_is_valid_cff_1_2_0(repo_root):
    citation = read_citation(repo_root)
    assert citation["cff-version"] == "1.2.0"
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in cff_validator(repo_root).iter_errors(citation)]
    assert not errors, errors


def test_the_validation_rejects_a_broken_citation(repo_root):
    """The schema check can fail: a citation without a title, or with a malformed DOI, is refused."""
    validator = cff_validator(repo_root)
    citation = read_citation(repo_root)
    untitled = copy.deepcopy(citation)
    del untitled["title"]
    assert not validator.is_valid(untitled)
    bad_doi = copy.deepcopy(citation)
    bad_doi["references"][1]["doi"] = "not a doi"
    assert not validator.is_valid(bad_doi)


def test_citation_names_the_software_licence_paper_and_data(repo_root):
    citation = read_citation(repo_root)
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    assert citation["type"] == "software"
    assert citation["version"] == project["version"]
    assert citation["license"] == project["license"]
    titles = [reference["title"] for reference in citation["references"]]
    assert "Deep Learning Based Masses Segmentation Method in Mammograms" in titles
    assert any(reference.get("doi") == "10.7937/K9/TCIA.2016.7O02S9CY" for reference in citation["references"])


def test_cffconvert_validates_the_citation_where_it_is_installed(repo_root):
    cffconvert = shutil.which("cffconvert", path=str(Path(sys.executable).parent)) or shutil.which("cffconvert")
    if cffconvert is None:
        pytest.skip("cffconvert is not installed (it pins jsonschema<4, which mammoseg cannot use)")
    done = subprocess.run([cffconvert, "--validate", "-i", str(repo_root / "CITATION.cff")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
