"""The README stays true: its configuration reference is the schema's, and its Quickstart is what CI runs."""

from __future__ import annotations

from mammoseg.config.schema import config_reference_markdown


def test_config_reference_matches_schema(repo_root):
    readme = (repo_root / "README.md").read_text()
    assert config_reference_markdown() in readme, "regenerate with: python -m mammoseg.config.schema"


def test_quickstart_commands_are_the_ci_commands(repo_root):
    readme = (repo_root / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert "make demo" in quickstart and "make test" in quickstart
    assert "make test" in (repo_root / ".ci" / "run").read_text()
    makefile = (repo_root / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile


def test_every_skip_reason_is_documented(repo_root):
    from mammoseg.data.restructure import SKIP_REASONS

    readme = (repo_root / "README.md").read_text()
    for code, (unit, meaning) in SKIP_REASONS.items():
        assert f"| `{code}` | {unit} | {meaning} |" in readme, code
