"""New studies (mammoseg.studies): each folder its own image set, checked before anything runs, on both
routes (the workflow's dry run and ``mammoseg predict``); a model trained on the synthetic demo says so."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from dicom_helpers import write_test_dicom

from mammoseg.cli import main
from mammoseg.config.checks import check_data_paths
from mammoseg.config.resolve import resolve_config
from mammoseg.data.studies import check_studies_folder
from mammoseg.errors import ConfigError, InputError
from mammoseg.studies import (
    experiment_config,
    is_studies_set,
    studies_set,
    synthetic_model_warning,
    trained_on_synthetic,
)


def a_dicom(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_test_dicom(path, np.arange(64 * 40, dtype=np.uint16).reshape(64, 40))


def not_dicom_folder(folder):
    """A folder with a PNG and a text file: files, but no mammogram."""
    folder.mkdir(parents=True)
    (folder / "report.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (folder / "notes.txt").write_text("not an image\n")
    return folder


# --- the image set of a folder ---------------------------------------------------------------------------------
def test_a_folder_keeps_its_set_and_another_folder_or_a_changed_one_gets_another(tmp_path):
    first, second = tmp_path / "new studies", tmp_path / "other"
    a_dicom(first / "a.dcm")
    a_dicom(second / "a.dcm")
    key = studies_set(first)
    assert re.fullmatch(r"studies-new_studies-[0-9a-f]{8}", key), key
    assert is_studies_set(key) and not is_studies_set("test")
    assert studies_set(first) == key == studies_set(str(first) + "/")  # stable, however the path is written
    assert studies_set(second) != key  # the same file names in another folder: other studies
    a_dicom(first / "visit 2" / "b.dcm")
    added = studies_set(first)
    assert added != key  # a file added
    stamp = (first / "a.dcm").stat().st_mtime_ns + 10**9
    os.utime(first / "a.dcm", ns=(stamp, stamp))
    assert studies_set(first) not in (key, added)  # a file rewritten


# --- the folder is checked before anything runs --------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing", "file", "empty", "hidden only", "no dicom"])
def test_a_folder_without_a_dicom_file_is_refused_naming_it(tmp_path, case):
    folder = tmp_path / "studies"
    if case == "file":
        folder.write_text("x")
    elif case == "empty":
        folder.mkdir()
    elif case == "hidden only":
        a_dicom(folder / ".cache" / "a.dcm")
        (folder / ".DS_Store").write_bytes(b"\0" * 200)
    elif case == "no dicom":
        not_dicom_folder(folder)
    with pytest.raises(InputError, match=re.escape(str(folder))) as caught:
        check_studies_folder(folder)
    expected = {"missing": "no such folder", "file": "not a folder", "empty": "no file in this folder",
                "hidden only": "no file in this folder", "no dicom": "none of its 2 files is a DICOM file"}[case]
    assert expected in str(caught.value)


def test_a_folder_with_one_dicom_file_passes(tmp_path):
    not_dicom_folder(tmp_path / "studies")
    a_dicom(tmp_path / "studies" / "deep" / "scan")  # any name: the DICM marker decides
    check_studies_folder(tmp_path / "studies")


def test_the_dry_run_check_names_studies_root(tmp_path):
    """The workflow's plan-time check (common.smk calls check_data_paths, as for data.root)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for root, reason in ((tmp_path / "missing", "no such folder"), (empty, "no file in this folder")):
        config = resolve_config([], {"studies": {"root": str(root)}})
        with pytest.raises(ConfigError, match=re.escape(f"'studies.root' = '{root}': {reason}")):
            check_data_paths(config)
    a_dicom(tmp_path / "fine" / "a.dcm")
    check_data_paths(resolve_config([], {"studies": {"root": str(tmp_path / "fine")}}))
    check_data_paths(resolve_config([], {}))  # no studies: nothing to check


def test_the_experiment_records_no_studies_folder(tmp_path):
    config = resolve_config([], {"studies": {"root": str(tmp_path)}})
    recorded = experiment_config(config)
    assert recorded["studies"]["root"] == "" and config["studies"]["root"] == str(tmp_path)
    assert {k: v for k, v in recorded.items() if k != "studies"} == {k: v for k, v in config.items()
                                                                     if k != "studies"}


# --- mammoseg predict ------------------------------------------------------------------------------------------
def test_predict_refuses_several_models_without_ensemble(tmp_path, capsys):
    a_dicom(tmp_path / "in" / "a.dcm")
    models = [str(tmp_path / "fold-0.keras"), str(tmp_path / "fold-1.keras")]
    code = main(["predict", "--model", *models, "--out", str(tmp_path / "out"), str(tmp_path / "in")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "2 --model files given" in err and "--ensemble" in err and all(m in err for m in models)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["empty", "no dicom"])
def test_predict_refuses_a_folder_without_a_dicom_file_as_the_workflow_does(tmp_path, capsys, case):
    folder = tmp_path / "studies"
    folder.mkdir() if case == "empty" else not_dicom_folder(folder)
    code = main(["predict", "--model", str(tmp_path / "model.keras"), "--out", str(tmp_path / "out"), str(folder)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    with pytest.raises(InputError) as caught:
        check_studies_folder(folder)
    assert err == f"mammoseg predict: error: {caught.value}"
    assert not (tmp_path / "out").exists()


def test_predict_without_model_names_the_configuration_s_missing_model(tmp_path, capsys, monkeypatch):
    a_dicom(tmp_path / "in" / "a.dcm")
    monkeypatch.chdir(tmp_path)  # no results/ here
    code = main(["predict", "--config", "data={source: synthetic}", "--out", "out", "in"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no trained model of this configuration" in err and "fold-0/best.keras" in err


# --- a model trained on the synthetic demo ---------------------------------------------------------------------
def test_a_synthetic_demo_model_is_known_from_its_card_or_its_configuration(tmp_path):
    real, synthetic = (resolve_config([], {"data": {"source": s, "root": str(tmp_path)}})
                       for s in ("cbis", "synthetic"))
    assert trained_on_synthetic(synthetic) and not trained_on_synthetic(real)
    model = tmp_path / "model" / "best.keras"
    model.parent.mkdir()
    (model.parent / "model_card.json").write_text(json.dumps({"config": {"values": {"data": {"source": "synthetic"}}}}))
    assert trained_on_synthetic(real, [model])  # the card beside the model wins over the configuration
    (model.parent / "model_card.json").write_text("{")
    with pytest.raises(InputError, match="model_card.json: not a mammoseg model card"):
        trained_on_synthetic(real, [model])
    warning = synthetic_model_warning(True)
    assert len(warning.splitlines()) == 1 and "synthetic" in warning and synthetic_model_warning(False) == ""


def test_a_folder_whose_dicom_files_are_all_unreadable_is_refused_when_indexed(tmp_path, capsys):
    """Past the plan-time check (a DICM marker is there) but no mammogram kept: indexing refuses the folder, with the
    skip reasons, on both routes (the workflow's index_studies job and mammoseg predict)."""
    from mammoseg.data.restructure import run_index_studies

    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "broken.dcm").write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x10\x00garbage")
    check_studies_folder(folder)
    config = resolve_config([], {"studies": {"root": str(folder)}})
    with pytest.raises(InputError, match=re.escape(f"{folder}: no readable DICOM mammogram to predict (1 files:")):
        run_index_studies(config, tmp_path / "index")
    assert not (tmp_path / "index" / "manifest.csv").exists()
    from mammoseg.model.unet import build_unet

    model = tmp_path / "model.keras"
    build_unet((32, 32, 1), depth=2, filters=4).save(model)
    code = main(["predict", "--config", "patches={n: 6, downscale: 2}", "--model", str(model), "--out",
                 str(tmp_path / "out"), str(folder)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"mammoseg predict: error: {folder}: no readable DICOM mammogram"), err


def test_findings_are_labelled_with_the_experiment_only_for_its_own_models(tmp_path):
    """Another model's findings are not labelled with the configuration's experiment: they carry a hash of the
    model files (also in the DICOM SEG's algorithm version)."""
    import hashlib

    from mammoseg.cli import _findings_label
    from mammoseg.config.keys import stage_keys

    keys = stage_keys(resolve_config([], {}))
    own = tmp_path / "results" / "models" / keys.model / "fold-0" / "best.keras"
    other = tmp_path / "elsewhere" / "best.keras"
    for path, content in ((own, b"own"), (other, b"other")):
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
    assert _findings_label([str(own)], keys) == keys.experiment
    digest = hashlib.sha256(hashlib.sha256(b"other").hexdigest().encode()).hexdigest()[:8]
    assert _findings_label([str(other)], keys) == f"model-{digest}"
    assert _findings_label([str(own), str(other)], keys).startswith("model-")
