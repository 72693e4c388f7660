"""Cluster orchestration: the two Snakemake profiles, and the tiny workflow through a real SLURM.

Quick tests check that both profiles declare what docs/cluster.md promises and that Snakemake 9 accepts every
key in them (a dry run fails on an unknown key or a bad value).

The SLURM test (marked ``slurm`` and ``slow``) brings up a single-node SLURM from Debian's packages with
tests/slurm/up.sh, adapts profiles/slurm to it the way docs/cluster.md tells a site to, runs the tiny config
through ``--executor slurm`` and checks that the result tables equal those of a local run of the same config.
Training runs with ``train.deterministic: true`` (TensorFlow op determinism) and the same seed in both runs, so
the tables are compared exactly, not with a tolerance. It skips, with the reason, where the machine cannot run
SLURM (not root, no apt-get, the install fails, or /etc/slurm/slurm.conf belongs to a real cluster).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tinyrun import TINY, job_environment, snakemake

from mammoseg.config.resolve import resolve_config

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = REPO / "tests" / "slurm"
DEFAULT_PROFILE = REPO / "profiles" / "default" / "config.yaml"
SLURM_PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
GPU_RULES = ("train", "predict_chunk")
# Exit code of tests/slurm/up.sh for "this machine cannot run SLURM" (a skip, not a failure).
CANNOT_RUN = 3


def tables(keys) -> tuple[str, ...]:
    """Result tables compared between the local and the SLURM run, relative to the results folder."""
    experiment = f"experiments/{keys.experiment}/test"
    return (f"restructured/{keys.data}/train/manifest.csv", f"restructured/{keys.data}/test/manifest.csv",
            f"patches/{keys.patches}/patches.csv", f"{experiment}/per_image.csv", f"{experiment}/lesions.csv",
            f"{experiment}/candidates.csv", f"{experiment}/summary.csv", f"{experiment}/froc.csv")
# Columns that legitimately differ between two runs: wall-clock times and absolute paths of the run folder.
VOLATILE_COLUMNS = re.compile(r"(^|_)(time|seconds|duration|elapsed|timestamp)s?$|_source$|^source_path$")


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def write_config(workdir: Path, **sections: dict) -> Path:
    """The tiny config, with ``sections`` merged in, as ``workdir/config.yaml``."""
    config = yaml.safe_load(TINY.read_text())
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def workflow_rules() -> list[str]:
    """The names of the workflow's rules and checkpoints but ``all`` (read from the Snakefile and the rule files)."""
    texts = [path.read_text() for path in [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]]
    return sorted(set(re.findall(r"^(?:rule|checkpoint) (\w+):", "\n".join(texts), re.M)) - {"all"})


def adapt_slurm_profile(dest: Path, *, partition: str, cpus: int, mem_mb: int, logdir: Path) -> Path:
    """profiles/slurm adapted to a site, as docs/cluster.md describes, written to ``dest/config.yaml``.

    Parameters
    ----------
    dest : folder of the new profile (created).
    partition : SLURM partition for every rule (the test cluster has one, ``debug``).
    cpus : CPUs of the node; ``cores`` and every ``cpus_per_gpu`` are capped to it.
    mem_mb : memory per job in MB; every ``mem_mb`` is capped to it (a request above the node's RealMemory
        would never be scheduled).
    logdir : where the plugin writes one log per SLURM job (kept for successful jobs too).
    """
    profile = yaml.safe_load(SLURM_PROFILE.read_text())
    profile["default-resources"] = {
        **profile["default-resources"], "slurm_partition": partition,
        "mem_mb": min(mem_mb, profile["default-resources"]["mem_mb"]), "runtime": 30,
    }
    for rule in workflow_rules():  # every rule declares its own mem_mb and runtime: cap them all
        profile["set-resources"].setdefault(rule, {})
    for resources in profile["set-resources"].values():
        resources.update(slurm_partition=partition, mem_mb=min(mem_mb, resources.get("mem_mb", mem_mb)), runtime=30)
        if "cpus_per_gpu" in resources:
            resources["cpus_per_gpu"] = min(cpus, resources["cpus_per_gpu"])
    profile["cores"] = min(cpus, profile["cores"])
    profile["latency-wait"] = 5
    profile["keep-going"] = False
    # No accounting database here: sacct cannot answer, and no account exists.
    profile["slurm-status-command"] = "squeue"
    profile["slurm-no-account"] = True
    # First status query 1 s after submission instead of 40 s (then +10 s per query without news).
    profile["slurm-init-seconds-before-status-checks"] = 1
    profile["slurm-logdir"] = str(logdir)
    profile["slurm-keep-successful-logs"] = True
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def submissions(stdout_and_err: str) -> dict[str, int]:
    """Count SLURM submissions per log folder (``rule_<name>`` or ``group_<group>_<rules>``) in Snakemake's output.

    The plugin prints ``... submitted with SLURM jobid N (log: <logdir>/<folder>[/<wildcards>...]/N.log)`` for
    each sbatch.
    """
    counts: dict[str, int] = {}
    pattern = r"submitted with SLURM jobid \d+ \(log: \S*?/((?:rule|group)_[^/\s]+)/\S*?\d+\.log\)"
    for folder in re.findall(pattern, stdout_and_err):
        counts[folder] = counts.get(folder, 0) + 1
    return counts


def read_table(path: Path) -> pd.DataFrame:
    """A result CSV with run-dependent columns dropped and rows in a canonical order."""
    table = pd.read_csv(path, keep_default_na=False)
    table = table.drop(columns=[c for c in table.columns if VOLATILE_COLUMNS.search(c)])
    return table.sort_values(list(table.columns)).reset_index(drop=True) if len(table.columns) else table


def tail(result: subprocess.CompletedProcess, n: int = 6000) -> str:
    return f"rc={result.returncode}\n--- stdout ---\n{result.stdout[-n:]}\n--- stderr ---\n{result.stderr[-n:]}"


# ----------------------------------------------------------------------------------------------------------------
# Quick: the profiles
# ----------------------------------------------------------------------------------------------------------------


def test_slurm_profile_declares_gpu_rules_groups_and_scopes():
    profile = yaml.safe_load(SLURM_PROFILE.read_text())
    assert profile["executor"] == "slurm"
    for rule in GPU_RULES:
        resources = profile["set-resources"][rule]
        assert {"gpu", "cpus_per_gpu", "mem_mb", "runtime", "slurm_partition"} <= set(resources), rule
        assert resources["gpu"] == 1
    # a chunk is predicted and evaluated in one submission, and `gpu` limits each submission, not the cluster
    (inference,) = [entry for entry in profile["group-components"] if entry.startswith("inference=")]
    assert int(inference.split("=")[1]) >= 1
    assert "gpu=local" in profile["set-resource-scopes"]
    assert "gpu=1" in profile["resources"]


def test_default_profile_is_local_with_one_gpu():
    profile = yaml.safe_load(DEFAULT_PROFILE.read_text())
    assert "executor" not in profile  # local
    assert profile["cores"] == "all"
    assert "gpu=1" in profile["resources"]
    assert profile["show-failed-logs"] is True and profile["rerun-incomplete"] is True


@pytest.mark.parametrize("profile_args", [(), ("--workflow-profile", str(SLURM_PROFILE.parent))],
                         ids=["default", "slurm"])
def test_snakemake_accepts_every_profile_key(tmp_path, profile_args):
    """A dry run reads the profile: an unknown key or a malformed value is an error before any DAG is built."""
    write_config(tmp_path)
    # no SLURM needed: a dry run never submits
    result = snakemake(tmp_path, "-n", *profile_args, timeout=120, local=False)
    assert result.returncode == 0, tail(result)
    used = re.search(r"Using workflow specific profile (\S+)", result.stdout + result.stderr)
    assert used is not None, tail(result)
    expected = "profiles/slurm" if profile_args else "profiles/default"
    assert used.group(1).rstrip("/").endswith(expected), used.group(1)


def test_adapted_profile_caps_every_rules_memory(tmp_path):
    """The rules declare their own mem_mb (above the test node's): the adapted profile caps each of them."""
    profile = yaml.safe_load((adapt_slurm_profile(tmp_path, partition="debug", cpus=2, mem_mb=1000,
                                                  logdir=tmp_path / "logs") / "config.yaml").read_text())
    assert {"train", "restructure", "synth", "export_model"} <= set(workflow_rules())
    for rule in workflow_rules():
        assert profile["set-resources"][rule]["mem_mb"] <= 1000, rule


# ----------------------------------------------------------------------------------------------------------------
# Slow: a real SLURM
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running single-node SLURM (tests/slurm/up.sh); stopped by its pid files (tests/slurm/down.sh) after."""
    if os.geteuid() != 0:
        pytest.skip("SLURM test needs root (installs Debian packages, starts munged/slurmctld/slurmd)")
    if not (shutil.which("slurmctld") or shutil.which("apt-get")):
        pytest.skip("SLURM test needs Debian's slurmctld package or apt-get to install it")
    state = tmp_path_factory.mktemp("slurm")
    started = time.monotonic()
    up = subprocess.run(["bash", str(SLURM_SCRIPTS / "up.sh"), str(state)], capture_output=True, text=True,
                        timeout=900)
    bring_up_s = time.monotonic() - started
    try:
        if up.returncode == CANNOT_RUN:
            pytest.skip(f"SLURM cannot run here: {up.stderr.strip().splitlines()[-1]}")
        assert up.returncode == 0, f"tests/slurm/up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield {"state": state, "env": {"SLURM_CONF": str(state / "etc" / "slurm.conf")}, "bring_up_s": bring_up_s}
    finally:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "down.sh"), str(state)], capture_output=True, timeout=120)


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_workflow_under_slurm_equals_local_run(slurm_cluster, tiny_run, tmp_path_factory):
    # the local run is the session's (conftest.py): the tiny config trains deterministically
    local_dir, _, _ = tiny_run
    slurm_dir = tmp_path_factory.mktemp("slurm-run")
    write_config(slurm_dir)
    assert resolve_config([slurm_dir / "config.yaml"])["train"]["deterministic"]

    profile = adapt_slurm_profile(slurm_dir / "site-profile", partition="debug", cpus=os.cpu_count() or 1,
                                  mem_mb=1000, logdir=slurm_dir / "slurm-logs")
    started = time.monotonic()
    cluster = snakemake(slurm_dir, "--workflow-profile", str(profile), env=job_environment(**slurm_cluster["env"]),
                        timeout=1500, local=False)
    slurm_s = time.monotonic() - started
    print(f"\nSLURM bring-up {slurm_cluster['bring_up_s']:.1f} s; tiny run under SLURM {slurm_s:.0f} s")
    assert cluster.returncode == 0, "SLURM run failed:\n" + tail(cluster)

    # every job went through sbatch; each chunk's prediction and evaluation went in one submission
    from mammoseg.config.keys import stage_keys
    from mammoseg.data.manifest import chunk_count, read_manifest

    config = resolve_config([slurm_dir / "config.yaml"])
    keys = stage_keys(config)
    output = cluster.stdout + cluster.stderr
    counts = submissions(output)
    assert counts.get("rule_train") == 1, counts
    group_jobs = sum(n for folder, n in counts.items() if folder.startswith("group_inference"))
    test_rows = read_manifest(slurm_dir / f"results/restructured/{keys.data}/test/manifest.csv")
    assert group_jobs == chunk_count(test_rows, config["infer"]["chunk_size"]) > 1, counts
    # only `all` and the rules the Snakefile declares `localrules` (seconds of work each) may run on the submit host
    snakefile = (REPO / "Snakefile").read_text()
    declared = re.search(r"^localrules:\n((?:[ \t]+\w+,?\n)+)", snakefile, re.M)
    local_rules = {"all", *re.findall(r"\w+", declared.group(1))}
    assert {"fingerprint", "summarise"} <= local_rules, local_rules
    assert set(re.findall(r"localrule (\w+):", output)) <= local_rules, output[-3000:]

    # training saw the fake GPU's CUDA_VISIBLE_DEVICES=0 and still ran on the CPU build of TensorFlow
    slurm_report = json.loads((slurm_dir / f"results/models/{keys.model}/fold-0/report.json").read_text())
    assert slurm_report["cuda_visible_devices"] == "0", slurm_report
    assert slurm_report["device"].startswith("CPU"), slurm_report
    assert "CUDA_VISIBLE_DEVICES='0'" in (slurm_dir / f"results/logs/train/{keys.model}/fold-0.log").read_text()

    # same tables, exactly (deterministic training, same seeds)
    for relative in tables(keys):
        local_table = read_table(local_dir / "results" / relative)
        slurm_table = read_table(slurm_dir / "results" / relative)
        assert len(local_table) > 0, f"{relative} is empty in the local run"
        pd.testing.assert_frame_equal(slurm_table, local_table, check_exact=True, obj=relative)

