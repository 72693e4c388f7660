"""The README stays true: its Quickstart is what CI runs and every command in it works; the configuration reference
of config/README.md is the schema's."""

from __future__ import annotations

from mammoseg.config.schema import config_reference_markdown


def test_config_reference_matches_schema(repo_root):
    reference = (repo_root / "config" / "README.md").read_text()
    assert config_reference_markdown() in reference, "regenerate with: python -m mammoseg.config.schema"


def test_quickstart_commands_are_the_ci_commands(repo_root):
    readme = (repo_root / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert "make demo" in quickstart and "make test" in quickstart
    assert "make test" in (repo_root / ".ci" / "run").read_text()
    makefile = (repo_root / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile


def test_every_skip_reason_is_documented(repo_root):
    from mammoseg.data.restructure import SKIP_REASONS

    usage = (repo_root / "docs" / "usage.md").read_text()
    for code, (unit, meaning) in SKIP_REASONS.items():
        assert f"| `{code}` | {unit} | {meaning} |" in usage, code


# --- every command of the README runs as written ---------------------------------------------------------------
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402
from tinyrun import scheduled_jobs  # noqa: E402

#: Commands that are not run here, and why.
NOT_RUN = {
    "make demo": "the Quickstart: CI runs `make test`, and a fresh-clone `make demo` is checked by hand",
    "make test": "this test is part of it",
    ".venv/bin/pip": "the GPU install needs a GPU machine and the network",
}


def readme_commands(readme: str) -> list[str]:
    """Every command of the README's ```bash blocks, continuation lines joined, comments dropped, then every
    command quoted in its text (`.venv/bin/...`)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command:
                commands.append(re.sub(r"\s+", " ", command))
    outside_blocks = re.sub(r"```.*?```", "", readme, flags=re.S)
    commands += [re.sub(r"\s+", " ", c) for c in re.findall(r"`(\.venv/bin/[^`]+)`", outside_blocks)]
    return commands


def test_readme_commands_are_found(repo_root):
    commands = readme_commands((repo_root / "README.md").read_text())
    assert any(c.startswith(".venv/bin/snakemake") and "config/paper.yaml" in c for c in commands)
    assert any(c.startswith(".venv/bin/mammoseg predict") for c in commands)
    assert any(c.startswith(".venv/bin/snakemake --report") for c in commands)
    assert all(c.startswith((".venv/bin/", "make ")) for c in commands), [c for c in commands
                                                                        if not c.startswith((".venv/bin/", "make "))]


@pytest.mark.slow
@pytest.mark.workflow
def test_every_readme_command_runs_as_written_without_an_activated_environment(repo_root, tmp_path):
    """In a copy of the repository with the installed .venv and a finished (small) demo run, every README command
    runs from the root with the venv NOT on PATH: Snakemake commands as dry runs (the real runs are long; the
    data paths point at a synthetic download) but the report, mammoseg commands for real. A new threshold
    trains and predicts nothing, and the demo's own dry run schedules nothing after them."""
    copy = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=repo_root, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (repo_root / name).is_file():
            shutil.copy2(repo_root / name, target)
    venv = repo_root / ".venv"
    if not (venv / "bin" / "snakemake").exists():
        pytest.skip("the README's commands need the .venv that `make demo` installs")
    (copy / ".venv").symlink_to(venv)
    bin_dir = str(venv / "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir)
    # the copy's own package: the venv's editable install may point at another checkout of the repository
    env.update(OMP_NUM_THREADS="2", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(copy / "src"))

    def run(command: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)

    # the demo made small (config/config.yaml of the copy, so every command that uses the demo's configuration
    # finds its results: mammoseg predict its models), a finished run of it and a synthetic "download"
    demo = yaml.safe_load((copy / "config" / "config.yaml").read_text())
    for section, values in {"synth": {"n_train": 6, "n_test": 2, "rows": 512, "cols": 320}, "train": {"epochs": 1},
                            "export": {"onnx": False}, "evaluate": {"bootstrap": 20}}.items():
        demo[section] = {**demo.get(section, {}), **values}
    (copy / "config" / "config.yaml").write_text(yaml.safe_dump(demo, sort_keys=False))
    done = run(".venv/bin/snakemake --cores 2 --resources gpu=1", timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    download = tmp_path / "download"
    assert run(f".venv/bin/mammoseg synth --out {download}").returncode == 0
    studies = tmp_path / "new-studies"
    studies.mkdir()
    for k, dicom in enumerate(sorted((download / "CBIS-DDSM").rglob("*.dcm"))[:2]):
        shutil.copy(dicom, studies / f"{k}.dcm")
    places = {"/data/CBIS-DDSM/csv": str(download / "csv"), "/data/CBIS-DDSM": str(download / "CBIS-DDSM"),
              "/data/new-studies": str(studies)}
    ran = []
    for command in readme_commands((repo_root / "README.md").read_text()):
        if command.startswith(tuple(NOT_RUN)):
            continue
        for placeholder, path in places.items():
            command = command.replace(placeholder, path)
        if command.startswith(".venv/bin/snakemake") and " -n" not in command and "--report" not in command:
            command += " -n"
        done = run(command)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        ran.append((command, done))
    assert len(ran) >= 10, [command for command, _ in ran]
    assert (copy / "report.html").is_file()
    assert (copy / "results" / "new-studies" / "findings.csv").is_file()
    # what the README says of a new threshold: no training, no prediction, evaluation and summaries again
    # (and the new experiment folder's record, report pages and model export: all three name the threshold)
    (threshold,) = [done for command, done in ran if "infer={threshold: 0.4}" in command]
    jobs = scheduled_jobs(threshold)
    assert set(jobs) == {"evaluate_chunk", "summarise", "experiment_config", "report_pages", "export_model"}, jobs
    # and the demo's own dry run (the README's plain `snakemake -n`) still schedules nothing
    (plain,) = [done for command, done in ran if command.startswith(".venv/bin/snakemake -n --cores all")]
    assert scheduled_jobs(plain) == {}, plain.stdout[-2000:]
