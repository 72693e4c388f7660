"""The config schema: defaults, clear errors naming the key and the allowed values, both shipped configs valid."""

from __future__ import annotations

import pytest
import yaml

from mammoseg.config import ConfigError, load_config, section_hash, validate_config


def test_defaults_fill_every_section():
    config = validate_config({})
    assert config["patches"]["n"] == 10 and config["patches"]["downscale"] == 4
    assert config["train"]["batch_size"] == 8 and config["train"]["val_fraction"] == 0.15
    assert config["data"]["source"] == "synthetic"


def test_partial_section_keeps_other_defaults():
    config = validate_config({"patches": {"n": 8}})
    assert config["patches"]["n"] == 8
    assert config["patches"]["n_shifted"] == 4


def test_input_is_not_mutated():
    raw = {"patches": {"n": 8}}
    validate_config(raw)
    assert raw == {"patches": {"n": 8}}


@pytest.mark.parametrize(
    "bad, must_mention",
    [
        ({"train": {"loss": "focal"}}, ["train.loss", "bce", "weighted_bce", "dice", "bce_dice"]),
        ({"patches": {"nn": 3}}, ["nn", "patches", "allowed keys", "downscale"]),
        ({"patches": {"n": 2}}, ["patches.n", "minimum"]),
        ({"data": {"source": "kaggle"}}, ["data.source", "synthetic", "cbis"]),
        ({"model": {"name": "../evil"}}, ["model.name"]),
        ({"infer": {"threshold": 1.5}}, ["infer.threshold"]),
    ],
)
def test_violations_name_key_and_allowed_values(bad, must_mention):
    with pytest.raises(ConfigError) as info:
        validate_config(bad)
    message = str(info.value)
    for word in must_mention:
        assert word in message, f"{word!r} missing from: {message}"


def test_shipped_configs_are_valid(repo_root):
    for name in ("config.yaml", "paper.yaml"):
        path = repo_root / "config" / name
        config = load_config(path)
        assert config["model"]["name"]


def test_paper_config_has_paper_settings(repo_root):
    path = repo_root / "config" / "paper.yaml"
    config = load_config(path)
    assert (config["patches"]["n"], config["patches"]["downscale"], config["patches"]["n_shifted"]) == (10, 4, 4)
    assert (config["train"]["batch_size"], config["train"]["epochs"]) == (8, 100)
    assert config["model"]["filters"] == 32 and config["model"]["batch_norm"] is True


def test_unreadable_config_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("patches: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(path)
    path.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_section_hash_is_stable_and_sensitive():
    a = validate_config({})["patches"]
    b = dict(a, n=a["n"] - 1)
    assert section_hash(a) == section_hash(dict(reversed(list(a.items()))))
    assert section_hash(a) != section_hash(b)
    assert len(section_hash(a)) == 16
