"""The tiny workflow (tests/data/tiny.yaml) run from tests: the command line, its environment, and reading what a
dry run schedules. conftest.py runs it once per session (fixture ``tiny_run``) for every test that only inspects
a finished run or asks what a change would schedule; tests that must change a run itself make their own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny.yaml"


def job_environment(**extra: str) -> dict[str, str]:
    """This process's environment with the venv's bin first on PATH (jobs, local or SLURM, find ``mammoseg``),
    thread pools capped at the test machine's 2 cores, and ``extra`` on top."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def snakemake(workdir: Path, *args: str, timeout: int = 900, env: dict[str, str] | None = None,
              local: bool = True) -> subprocess.CompletedProcess:
    """Run the repository's workflow in ``workdir`` on ``workdir/config.yaml``; ``local``: on 2 cores with one
    GPU slot (off: the caller gives the executor, e.g. a SLURM profile). ``timeout -k`` kills the whole run
    (Snakemake and its jobs) if it hangs."""
    command = [
        "timeout", "-k", "10", str(timeout),
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(workdir / "config.yaml"), *(("--cores", "2", "--resources", "gpu=1") if local else ()),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env or job_environment(),
                          timeout=timeout + 60)


def scheduled_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Parse the 'Job stats' table of a dry run into {rule: count}; {} when nothing is scheduled. The default
    target ``all``, re-run whenever anything is, is left out."""
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if not match:
            break
        counts[match.group(1)] = int(match.group(2))
    counts.pop("total", None)
    counts.pop("all", None)
    return counts


def failure(result: subprocess.CompletedProcess, n: int = 5000) -> str:
    """The ends of a failed run's output, for an assertion message."""
    return f"exit {result.returncode}\n{result.stdout[-n:]}\n{result.stderr[-n:]}"
