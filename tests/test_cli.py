"""The `mammoseg` command: the configuration it resolves, one clear line for bad input, every stage listed."""

from __future__ import annotations

import subprocess
import sys

import yaml

from mammoseg.cli import build_parser, resolved_config


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mammoseg.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_configfiles_apply_in_order_then_config_overrides(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("patches:\n  n: 9\n  n_shards: 3\n")
    second.write_text("patches:\n  n: 8\n")
    args = build_parser().parse_args(["config", "show", "--configfile", str(first), str(second),
                                      "--config", "patches={n: 7}", "infer={threshold: 0.4}"])
    config = resolved_config(args)
    assert config["patches"]["n"] == 7  # --config wins
    assert config["patches"]["n_shards"] == 3  # from the first file, untouched by the second
    assert config["patches"]["downscale"] == 4  # the schema's default
    assert config["infer"]["threshold"] == 0.4 and isinstance(config["infer"]["threshold"], float)


def test_config_show_prints_what_it_resolves(repo_root):
    done = run_cli("config", "show", "--configfile", str(repo_root / "config" / "paper.yaml"), "--keys",
                   cwd=repo_root)
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    assert shown["patches"]["max_shift"] == 0.25 and shown["model"]["bn_momentum"] == 0.99  # nothing of the demo
    assert shown["model"]["name"] == "paper-unet"
    assert "#   experiment: paper-unet-" in done.stdout


def test_no_configfile_means_the_demo_in_the_repository(repo_root, tmp_path):
    demo = yaml.safe_load(run_cli("config", "show", cwd=repo_root).stdout)
    assert demo["model"]["name"] == "demo" and demo["patches"]["n_negative"] == 4
    elsewhere = yaml.safe_load(run_cli("config", "show", cwd=tmp_path).stdout)
    assert elsewhere["model"]["name"] == "unet"  # no config/config.yaml there: the schema's defaults


def test_bad_config_is_one_clear_line(tmp_path):
    result = run_cli("model", "summary", "--config", "train={loss: focal}", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "train.loss" in result.stderr and "bce_dice" in result.stderr


def test_missing_manifest_names_the_file(tmp_path):
    missing = tmp_path / "nope" / "manifest.csv"
    result = run_cli("plan", "--manifest", str(missing), "--out", str(tmp_path / "plan.json"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert str(missing) in result.stderr
    assert not (tmp_path / "plan.json").exists()


def test_help_lists_every_stage():
    result = run_cli("--help")
    for stage in ("config", "synth", "restructure", "fingerprint", "plan", "extract", "patches", "train", "model",
                  "predict", "evaluate", "summarise"):
        assert stage in result.stdout
