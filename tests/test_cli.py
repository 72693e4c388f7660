"""The `mammoseg` command: bad input ends with one clear line (no traceback), the config overlays work."""

from __future__ import annotations

import json
import subprocess
import sys

from mammoseg.cli import build_parser, resolve_config


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mammoseg.cli", *args], capture_output=True, text=True, timeout=120)


def test_config_json_overrides_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("patches:\n  n: 9\n  n_shards: 3\n")
    args = build_parser().parse_args(
        ["extract", "--config", str(path), "--config-json", json.dumps({"patches": {"n": 7}}),
         "--manifest", "m.csv", "--out", "s.h5", "--shard", "0"]
    )
    config = resolve_config(args)
    assert config["patches"]["n"] == 7
    assert config["patches"]["n_shards"] == 3  # from the file, untouched by the JSON
    assert config["patches"]["downscale"] == 4  # default


def test_bad_config_is_one_clear_line(tmp_path):
    result = run_cli("model", "summary", "--config-json", '{"train": {"loss": "focal"}}')
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "train.loss" in result.stderr and "bce_dice" in result.stderr


def test_missing_manifest_names_the_file(tmp_path):
    missing = tmp_path / "nope" / "manifest.csv"
    result = run_cli("extract", "--manifest", str(missing), "--out", str(tmp_path / "s.h5"), "--shard", "0")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "manifest.csv" in result.stderr
    assert not (tmp_path / "s.h5").exists()


def test_help_lists_every_stage():
    result = run_cli("--help")
    for stage in ("synth", "restructure", "fingerprint", "extract", "patches", "train", "model", "predict",
                  "evaluate", "summarise"):
        assert stage in result.stdout
