"""The workflow used as a Snakemake module, as ``snakedeploy deploy-workflow`` sets it up: the configuration the
calling workflow passes (also what its Snakefile changes) is the one the workflow runs, after the schema's
defaults and validation (mammoseg.config.resolve.resolve_workflow_config)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tinyrun import REPO, TINY, failure, job_environment, scheduled_jobs

from mammoseg.config.resolve import merge, resolve_config, resolve_workflow_config
from mammoseg.config.schema import ConfigError, validate_config

#: The caller's Snakefile as snakedeploy writes it (a local path instead of github(...)), plus one setting changed
#: in the Snakefile itself, after its config file was read.
CALLER_SNAKEFILE = """\
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


config["patches"]["n_shards"] = {n_shards}


module mammoseg:
    snakefile:
        "{snakefile}"
    config:
        config


use rule * from mammoseg
"""


def test_the_given_config_is_completed_with_defaults_and_overrides_read_as_yaml():
    given = {"patches": {"n_shards": 3}, "train": {"epochs": "5"}}  # --config train={epochs: 5} as Snakemake kept it
    resolved = resolve_workflow_config(given, config_args=["train={epochs: 5}"], configfiles=["a.yaml"])
    defaults = validate_config({})
    assert resolved["patches"]["n_shards"] == 3 and resolved["train"]["epochs"] == 5
    assert resolved["train"]["batch_size"] == defaults["train"]["batch_size"]
    assert resolved == validate_config(merge(defaults, {"patches": {"n_shards": 3}, "train": {"epochs": 5}}))


def test_the_demo_is_the_start_only_when_nothing_but_overrides_was_given(tmp_path):
    demo = tmp_path / "demo.yaml"
    demo.write_text("patches: {n_shards: 7}\nmodel: {name: demo-x}\n")
    only_cli = resolve_workflow_config({"model": {"name": "cli"}}, config_args=["model={name: cli}"],
                                       demo_files=[demo])
    assert only_cli == resolve_config([demo], {"model": {"name": "cli"}})
    assert only_cli["patches"]["n_shards"] == 7
    caller = resolve_workflow_config({"patches": {"n_shards": 2}}, demo_files=[demo])  # a module's caller
    assert caller == validate_config({"patches": {"n_shards": 2}})
    assert resolve_workflow_config({}, demo_files=[demo]) == resolve_config([demo])


def test_an_invalid_given_config_names_where_it_came_from():
    with pytest.raises(ConfigError, match=r"n_shards.*the calling workflow's config"):
        resolve_workflow_config({"patches": {"n_shards": 0}})
    with pytest.raises(ConfigError, match=r"n_shards.*config from run\.yaml, --config"):
        resolve_workflow_config({"patches": {"n_shards": "0"}}, config_args=["patches={n_shards: 0}"],
                                configfiles=["run.yaml"])


def deploy(folder: Path, n_shards: int) -> Path:
    """A deployment of the repository's workflow in ``folder`` as snakedeploy lays it out: ``workflow/Snakefile``
    (a module statement) and ``config/config.yaml`` (here the tiny test configuration)."""
    (folder / "workflow").mkdir(parents=True)
    (folder / "config").mkdir()
    shutil.copy(TINY, folder / "config" / "config.yaml")
    (folder / "workflow" / "Snakefile").write_text(
        CALLER_SNAKEFILE.format(n_shards=n_shards, snakefile=REPO / "Snakefile"))
    return folder


def run_deployed(folder: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Snakemake in the deployment's folder, as its user runs it (it finds workflow/Snakefile itself)."""
    return subprocess.run([sys.executable, "-m", "snakemake", *args, "--cores", "2"], cwd=folder,
                          capture_output=True, text=True, env=job_environment(), timeout=timeout)


@pytest.mark.slow
@pytest.mark.workflow
def test_deployed_as_a_module_the_workflow_runs_with_the_callers_config(tmp_path):
    tiny_shards = yaml.safe_load(TINY.read_text())["patches"]["n_shards"]
    n_shards = tiny_shards + 1  # differs from the config file and from the schema's default
    assert n_shards != validate_config({})["patches"]["n_shards"]
    folder = deploy(tmp_path / "deployed", n_shards)

    dry = run_deployed(folder, "-n", "--resources", "gpu=1")
    jobs = scheduled_jobs(dry)
    assert jobs.get("extract_shard") == n_shards, failure(dry)
    assert {"synth", "restructure", "train", "export_model", "experiment_config"} <= set(jobs)

    # a real target: the resolved configuration of the experiment, as every later rule reads it
    done = run_deployed(folder, "experiment_config")
    assert done.returncode == 0, failure(done)
    (written,) = (folder / "results" / "experiments").glob("*/config.yaml")
    expected = resolve_config([TINY], {"patches": {"n_shards": n_shards}})
    assert yaml.safe_load(written.read_text()) == expected
