"""Checks of a resolved configuration that need the file system, made while the workflow is planned.

The schema checks types and ranges; these check that the folders a real run reads exist, so a dry run
(``snakemake -n``) already fails with the key and the path instead of a job failing later inside ``restructure``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from mammoseg.data.studies import check_studies_folder
from mammoseg.errors import ConfigError, InputError

__all__ = ["check_data_paths"]


def _readable_folder(key: str, value: str) -> None:
    path = Path(value)
    if not path.exists():
        raise ConfigError(f"'{key}' = {value!r}: no such folder")
    if not path.is_dir():
        raise ConfigError(f"'{key}' = {value!r}: not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"'{key}' = {value!r}: folder not readable")


def check_data_paths(config: Mapping[str, Any]) -> None:
    """For ``data.source: cbis``: ``data.root`` is set and a readable folder, and so is ``data.csv_dir`` if set;
    ``studies.root``, when set, is a readable folder holding at least one DICOM file
    (:func:`mammoseg.data.studies.check_studies_folder`, the check ``mammoseg predict`` makes too).

    Raises
    ------
    ConfigError
        Naming the key, its value and what is wrong.
    """
    if config["studies"]["root"]:
        _studies_folder(config["studies"]["root"])
    data = config["data"]
    if data["source"] != "cbis":
        return
    if not data["root"]:
        raise ConfigError("'data.root' is empty: data.source 'cbis' needs the folder of a CBIS-DDSM download")
    _readable_folder("data.root", data["root"])
    if data["csv_dir"]:
        _readable_folder("data.csv_dir", data["csv_dir"])


def _studies_folder(value: str) -> None:
    try:
        check_studies_folder(value)
    except InputError as exc:
        raise ConfigError(f"'studies.root' = {value!r}: {str(exc).removeprefix(f'{value}: ')}") from None
