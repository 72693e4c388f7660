"""The config schema: defaults, clear errors naming the key and the allowed values, both shipped configs valid."""

from __future__ import annotations

import pytest

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
    for name in ("config.yaml", "paper.yaml", "mias-dev.yaml"):
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


# --------------------------------------------------------------------------------------------------------------
# resolution: schema defaults <- config files <- --config (mammoseg.config.resolve)
# --------------------------------------------------------------------------------------------------------------
from mammoseg.config.keys import stage_keys  # noqa: E402
from mammoseg.config.resolve import default_configfiles, parse_overrides, resolve_config  # noqa: E402

#: What Marita et al. fix (the paper, sections 3.2-3.4), key by key.
PAPER = {
    ("data", "source"): "cbis", ("data", "abnormality"): "mass",
    ("patches", "n"): 10, ("patches", "downscale"): 4, ("patches", "n_shifted"): 4,
    ("patches", "n_negative"): 0,  # only windows around lesions
    ("model", "depth"): 6, ("model", "filters"): 32, ("model", "max_filters"): 1024,
    ("model", "convs_per_level"): 2, ("model", "batch_norm"): True, ("model", "dropout"): 0.25,
    ("model", "upsampling"): "transpose", ("model", "kernel_size"): 3,
    ("train", "batch_size"): 8, ("train", "epochs"): 100, ("train", "learning_rate"): 0.001,
    ("train", "val_fraction"): 0.15, ("train", "loss"): "weighted_bce", ("train", "early_stopping_patience"): 0,
    ("train", "lr_schedule"): "none", ("train", "folds"): 1,
    ("infer", "mode"): "paper", ("infer", "threshold"): 0.5,
}


def _get(config, key):
    section, name = key
    return config[section][name]


def test_paper_config_resolves_to_exactly_the_paper(repo_root):
    paper = resolve_config([repo_root / "config" / "paper.yaml"])
    for key, value in PAPER.items():
        assert _get(paper, key) == value, key


def test_paper_config_takes_nothing_from_the_demo(repo_root):
    """Every key on which the demo departs from the schema resolves, for the paper, to the schema's default."""
    demo = resolve_config([repo_root / "config" / "config.yaml"])
    defaults = validate_config({})
    paper = resolve_config([repo_root / "config" / "paper.yaml"])
    departures = [(s, k) for s in defaults if isinstance(defaults[s], dict) for k in defaults[s]
                  if demo[s][k] != defaults[s][k]]
    assert ("patches", "max_shift") in departures and ("model", "bn_momentum") in departures
    own = {("model", "name"), ("data", "root")}  # names and paths that each config sets for itself
    for key in departures:
        if key in PAPER:
            assert _get(paper, key) == PAPER[key], key
        elif key not in own:
            assert _get(paper, key) == _get(defaults, key) != _get(demo, key), key


def test_files_then_overrides_in_order(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model:\n  depth: 3\n  filters: 8\n")
    b.write_text("model:\n  depth: 5\n")
    config = resolve_config([a, b], parse_overrides(["model={filters: 4}", "experiment=trial"]))
    assert config["model"]["depth"] == 5 and config["model"]["filters"] == 4 and config["experiment"] == "trial"
    assert config["model"]["max_filters"] == 1024  # default


def test_overrides_are_yaml_so_numbers_are_numbers():
    # Snakemake passes `--config infer='{threshold: 0.4}'` with the 0.4 as text; we parse the raw argument
    config = resolve_config([], parse_overrides(["infer={threshold: 0.4}"]))
    assert config["infer"]["threshold"] == 0.4
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["infer"])
    with pytest.raises(ConfigError, match="YAML"):
        parse_overrides(["infer={threshold: [0.4"])


def test_a_bad_value_names_the_key_and_the_files(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("train:\n  loss: focal\n")
    with pytest.raises(ConfigError, match=r"train\.loss.*a\.yaml"):
        resolve_config([a])


def test_the_demo_is_the_default_only_when_no_file_is_given(repo_root, tmp_path):
    assert default_configfiles(repo_root) == [repo_root / "config" / "config.yaml"]
    assert default_configfiles(tmp_path) == []


def test_stage_keys_change_exactly_with_the_settings_of_their_stage(repo_root):
    base = resolve_config([repo_root / "config" / "config.yaml"])
    keys = stage_keys(base)

    def changed(**sections):
        other = resolve_config([repo_root / "config" / "config.yaml"], sections)
        new = stage_keys(other)
        return {name for name, key in keys.as_dict().items() if new.as_dict()[name] != key}

    assert changed(infer={"threshold": 0.4}) == {"experiment"}
    assert changed(infer={"mode": "blended"}) == {"inference", "experiment"}
    assert changed(infer={"batch_size": 3, "chunk_size": 7}) == set()  # how, not what
    assert changed(infer={"breast_mask": True}) == {"inference", "experiment"}  # the saved map changes
    assert changed(evaluate={"iou_threshold": 0.2}) == {"experiment"}
    assert changed(evaluate={"postprocess": {"top_k": 3}}) == {"experiment"}
    # calibration needs cross-validation: compared with the same folds uncalibrated
    folds = {"train": {"folds": 2}}
    calibrated = resolve_config([repo_root / "config" / "config.yaml"], {**folds, "evaluate": {"target_fppi": 1.0}})
    uncalibrated = resolve_config([repo_root / "config" / "config.yaml"], folds)
    assert {name for name, key in stage_keys(calibrated).as_dict().items()
            if stage_keys(uncalibrated).as_dict()[name] != key} == {"experiment"}
    mined = resolve_config([repo_root / "config" / "config.yaml"], {"train": {"folds": 2, "hard_negatives":
                                                                             {"per_image": 2}}})
    assert {name for name, key in stage_keys(mined).as_dict().items()
            if stage_keys(uncalibrated).as_dict()[name] != key} == {"model", "inference", "experiment"}
    assert changed(train={"epochs": 3}) == {"model", "inference", "experiment"}
    assert changed(train={"augment": {"flip": True}}) == {"model", "inference", "experiment"}
    assert changed(patches={"downscale": 2}) == {"patches", "model", "inference", "experiment"}
    assert changed(patches={"compression": "none"}) == set()
    assert changed(synth={"seed": 5}) == {"synth", "data", "patches", "model", "inference", "experiment"}
    assert changed(experiment="named") == {"experiment"}
    windows = f"mass-n{base['patches']['n']}d{base['patches']['downscale']}-"  # the patches key names its windows
    assert keys.model.startswith("demo-") and keys.patches.startswith(windows)


def test_the_resolved_configuration_has_the_schemas_key_order_however_it_was_written():
    """Snakemake compares a rule's params including their key order: two spellings of one configuration must
    resolve to equal, equally ordered settings, or an unchanged model would be retrained."""
    from mammoseg.config.keys import stage_settings

    written = validate_config({"train": {"hard_negatives": {"min_prob": 0.5, "per_image": 0}, "folds": 2}})
    defaulted = validate_config({"train": {"folds": 2}})
    assert written == defaulted
    assert repr(stage_settings(written)) == repr(stage_settings(defaulted))
    assert list(written["train"]["hard_negatives"]) == ["per_image", "min_prob"]  # the schema's order
