"""The rules' resources (mem_mb, runtime) and retries as Snakemake schedules them, read from dry runs: the rules'
own defaults, their growth with the input size, and a profile's set-resources overriding them."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from tinyrun import REPO, TINY, snakemake

#: Rules that restart from where they stopped, and so are worth a retry (train: its _resume/ folder).
RESUMABLE = {"train"}


def scheduled(result) -> list[dict]:
    """The jobs of a dry run: per job its ``rule``, ``input`` (list of paths), ``wildcards`` and ``resources``
    ({name: str}) as Snakemake printed them."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = []
    for block in re.split(r"\n(?=(?:rule|checkpoint|localrule|localcheckpoint) \w+:\n)", result.stdout + result.stderr):
        head = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):\n", block)
        if not head:
            continue
        fields = dict(re.findall(r"^    (\w+): (.*)$", block, re.M))
        resources = dict(item.split("=", 1) for item in fields.get("resources", "").split(", ") if "=" in item)
        jobs.append({"rule": head.group(1), "input": fields.get("input", "").split(", "),
                     "wildcards": fields.get("wildcards", ""), "resources": resources})
    return jobs


def by_rule(jobs: list[dict]) -> dict[str, dict]:
    return {job["rule"]: job for job in jobs}


@pytest.fixture(scope="module")
def fresh_dry_run(tmp_path_factory):
    """A dry run of the tiny configuration in an empty folder: nothing exists yet, so what grows with the inputs
    is still unknown (<TBD>)."""
    workdir = tmp_path_factory.mktemp("resources")
    shutil.copy(TINY, workdir / "config.yaml")
    return workdir, scheduled(snakemake(workdir, "-n", timeout=300))


def test_rules_declare_memory_and_runtime(fresh_dry_run):
    _, jobs = fresh_dry_run
    rules = by_rule(jobs)
    assert {"synth", "restructure", "extract_shard", "train", "export_model"} <= set(rules)
    for rule, job in rules.items():
        if rule == "all":
            continue
        assert {"mem_mb", "runtime"} <= set(job["resources"]), f"{rule}: {job['resources']}"
    assert rules["train"]["resources"]["mem_mb"] == "8000" and rules["train"]["resources"]["gpu"] == "1"
    assert rules["restructure"]["resources"]["runtime"] == "120"
    # grows with the shards, which do not exist yet
    assert rules["train"]["resources"]["runtime"] == "<TBD>"
    assert rules["extract_shard"]["resources"]["runtime"] == "<TBD>"


def test_a_profile_overrides_the_rules_defaults(tmp_path):
    """The rules' defaults give way to a workflow profile's set-resources (as profiles/slurm sets train's)."""
    shutil.copy(TINY, tmp_path / "config.yaml")
    slurm = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile = tmp_path / "profile"
    profile.mkdir()
    (profile / "config.yaml").write_text(yaml.safe_dump({
        "set-resources": {"train": {"mem_mb": 1234, "runtime": 7}, "restructure": {"mem_mb": 99}},
    }))
    rules = by_rule(scheduled(snakemake(tmp_path, "-n", "--workflow-profile", str(profile), timeout=300)))
    assert rules["train"]["resources"]["mem_mb"] == "1234" and rules["train"]["resources"]["runtime"] == "7"
    assert rules["restructure"]["resources"]["mem_mb"] == "99"
    assert rules["restructure"]["resources"]["runtime"] == "120"  # not overridden: the rule's own
    assert slurm["set-resources"]["train"]["mem_mb"] != 8000  # the SLURM profile does override train's


def test_retries_only_where_a_rule_resumes():
    """``retries:`` is declared exactly by the rules that continue from their last state (a retry of another
    rule would redo its whole job, and a deterministic failure three times)."""
    declared = set()
    for path in [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]:
        for rule, body in re.findall(r"^(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*\n|\n)*)", path.read_text(), re.M):
            if re.search(r"^    retries: [1-9]", body, re.M):
                declared.add(rule)
    assert declared == RESUMABLE


def input_mb(workdir: Path, paths: list[str]) -> float:
    """Size in MiB of a job's input files as the dry run lists them (directories count as Snakemake counts them,
    by their own entry)."""
    return sum((workdir / path).stat().st_size for path in paths if path) / 1024**2


@pytest.mark.slow
@pytest.mark.workflow
def test_resources_grow_with_the_inputs_of_a_finished_run(tiny_run):
    """On the session's finished run, the size-dependent resources are computed from the real files: checked
    against the rules' formulas (common.smk) applied to the inputs' sizes read here."""
    workdir, config, _ = tiny_run
    train = [job for job in scheduled(snakemake(workdir, "-n", "--forcerun", "train", timeout=300))
             if job["rule"] == "train"]
    assert train, "no training job scheduled"
    for job in train:
        expected = math.ceil(30 + config["train"]["epochs"] * input_mb(workdir, job["input"]) / 20)
        assert job["resources"]["runtime"] == str(expected), job
    shards = [job for job in scheduled(snakemake(workdir, "-n", "--forcerun", "extract_shard", timeout=300))
              if job["rule"] == "extract_shard"]
    assert len(shards) == config["patches"]["n_shards"]
    for job in shards:
        assert job["resources"]["runtime"] == str(math.ceil(10 + 0.02 * input_mb(workdir, job["input"]))), job
