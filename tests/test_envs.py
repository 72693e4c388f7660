"""The conda environments (``envs/*.yaml``, ``snakemake --sdm conda``) against ``pyproject.toml`` and the rules.

mammoseg is installed into each environment with ``--no-deps`` (``envs/install-mammoseg.sh``), so a runtime
dependency that an environment lacks is an ImportError in the middle of a cluster run, where no test of the pip
route would see it. Read from the files alone: conda is not needed.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
ENVS = ROOT / "envs"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: What each environment must hold, as pyproject.toml's groups: the core dependencies plus these extras.
ENV_EXTRAS = {"base": [], "tensorflow": ["tf", "onnx"]}
#: conda-forge names that differ from the PyPI name of the same package (for entries outside the pip: list).
CONDA_TO_PYPI = {"pytables": "tables", "pytorch": "torch", "py-opencv": "opencv-python"}
#: Import names that differ from the distribution that provides them.
IMPORT_TO_PYPI = {"PIL": "pillow", "skimage": "scikit-image", "yaml": "pyyaml"}
#: Conda packages that are the environment's tooling, not a library mammoseg imports.
TOOLING = {"python", "pip", "setuptools"}


def env_packages(path: Path) -> dict[str, str | None]:
    """{canonical PyPI name: pinned version or None} of an environment file, conda and pip entries alike."""
    spec = yaml.safe_load(path.read_text())
    found: dict[str, str | None] = {}
    for entry in spec["dependencies"]:
        if isinstance(entry, dict):
            for line in entry.get("pip", []):
                requirement = Requirement(line)
                pins = [s.version for s in requirement.specifier if s.operator == "=="]
                found[canonicalize_name(requirement.name)] = pins[0] if pins else None
        else:
            name, version = re.fullmatch(r"([\w.\-]+)\s*(?:==?\s*(\S+))?", entry.strip()).groups()
            if name not in TOOLING:
                found[canonicalize_name(CONDA_TO_PYPI.get(name, name))] = version
    return found


def required(env: str) -> list[Requirement]:
    """pyproject.toml's requirements that environment ``env`` must satisfy."""
    lines = list(PYPROJECT["project"]["dependencies"])
    for extra in ENV_EXTRAS[env]:
        lines += PYPROJECT["project"]["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def rule_envs() -> dict[str, str]:
    """{rule: environment file named by its ``conda:``} of every rule and checkpoint of the workflow."""
    found = {}
    for path in [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]:
        for match in re.finditer(r"^(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*\n|\n)*)", path.read_text(), re.M):
            conda = re.search(r"^\s+conda:\s*\n\s+\"([^\"]+)\"", match.group(2), re.M)
            found[match.group(1)] = conda and (path.parent / conda.group(1)).resolve()
    return found


def test_env_packages_reads_pins_and_maps_conda_names(tmp_path):
    env = tmp_path / "e.yaml"
    env.write_text("dependencies:\n  - python=3.11\n  - pytables=3.9\n  - libjpeg-turbo\n  - pip:\n"
                   "      - Scikit_Image==0.26.0\n      - tqdm>=4\n")
    assert env_packages(env) == {"tables": "3.9", "libjpeg-turbo": None, "scikit-image": "0.26.0", "tqdm": None}


@pytest.mark.parametrize("env", sorted(ENV_EXTRAS))
def test_every_dependency_is_pinned_within_pyproject(env):
    packages = env_packages(ENVS / f"{env}.yaml")
    problems = []
    for requirement in required(env):
        name = canonicalize_name(requirement.name)
        if name not in packages:
            problems.append(f"{requirement.name} missing")
        elif packages[name] is None:
            problems.append(f"{requirement.name} not pinned (==)")
        elif not requirement.specifier.contains(packages[name], prereleases=True):
            problems.append(f"{requirement.name}=={packages[name]} outside pyproject's {requirement.specifier}")
    assert not problems, f"envs/{env}.yaml: " + "; ".join(problems)


@pytest.mark.parametrize("env", sorted(ENV_EXTRAS))
def test_environment_python_is_one_the_package_supports(env):
    spec = yaml.safe_load((ENVS / f"{env}.yaml").read_text())
    python = next(entry for entry in spec["dependencies"] if isinstance(entry, str) and entry.startswith("python="))
    version = python.partition("=")[2]
    assert Requirement(f"python{PYPROJECT['project']['requires-python']}").specifier.contains(f"{version}.0")
    assert spec["name"] == f"mammoseg-{env}"


def test_every_environment_is_used_and_has_its_post_deploy_script():
    used = {path for path in rule_envs().values() if path}
    for env in ENV_EXTRAS:
        assert (ENVS / f"{env}.yaml").resolve() in used, f"envs/{env}.yaml: no rule uses it"
        script = ENVS / f"{env}.post-deploy.sh"
        assert script.resolve() == (ENVS / "install-mammoseg.sh").resolve(), f"{script.name}: not the install script"
    assert {path.stem for path in ENVS.glob("*.yaml")} == set(ENV_EXTRAS), "an env file this test does not check"


def test_every_rule_that_runs_a_job_names_an_existing_environment():
    envs = rule_envs()
    assert {"restructure", "train", "predict_chunk", "evaluate_chunk"} <= set(envs), "rules not found: parser broken"
    missing = sorted(rule for rule, path in envs.items() if rule != "all" and (path is None or not path.is_file()))
    assert not missing, f"rules without an existing conda: environment: {missing}"


def test_tensorflow_runs_only_in_the_tensorflow_environment():
    """The rules that train, mine, predict or export a Keras model use envs/tensorflow.yaml (base.yaml has none)."""
    assert "tensorflow-cpu" not in env_packages(ENVS / "base.yaml")
    needs_tf = {"train", "mine", "predict_chunk", "export_model"}
    for rule, path in rule_envs().items():
        if rule in needs_tf:
            assert path.name == "tensorflow.yaml", f"rule {rule} runs TensorFlow but uses {path.name}"


def test_every_third_party_import_of_the_package_is_declared():
    """What src/mammoseg imports (at any depth) is a dependency or extra of pyproject.toml, so that the check of
    the environments above covers everything the rules can import."""
    declared = {canonicalize_name(Requirement(line).name) for line in PYPROJECT["project"]["dependencies"]}
    for extra in ("tf", "onnx"):
        extras = PYPROJECT["project"]["optional-dependencies"][extra]
        declared |= {canonicalize_name(Requirement(line).name) for line in extras}
    declared |= {"tensorflow"}  # tensorflow-cpu (tf) or tensorflow[and-cuda] (gpu) provides the module
    undeclared = set()
    for path in (ROOT / "src" / "mammoseg").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "mammoseg":
                    continue
                if canonicalize_name(IMPORT_TO_PYPI.get(top, top)) not in declared:
                    undeclared.add(f"{top} ({path.relative_to(ROOT)})")
    assert not undeclared, f"imported but not in pyproject.toml: {sorted(undeclared)}"
