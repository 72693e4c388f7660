"""How a run's configuration is put together: one resolver for the workflow and the command line.

A run's configuration is, in this order (later wins, mappings merged key by key):

1. the schema's defaults (``config.schema.yaml``: every key has one);
2. the config files the user gives (``--configfile A.yaml B.yaml``), in order; when none is given, the
   repository's demo, ``config/config.yaml`` (:func:`default_configfiles`);
3. the ``--config KEY=VALUE`` overrides, each VALUE read as YAML, so ``infer='{threshold: 0.4}'`` gives the
   number 0.4 (Snakemake's own parser keeps nested values as text).

The demo is one such file, never a base under the others: ``--configfile config/paper.yaml`` resolves to the
paper's settings and the schema's defaults, nothing of the demo. The workflow resolves the ``config`` object
Snakemake hands it (:func:`resolve_workflow_config`): the files and overrides as Snakemake merged them, or the
configuration a calling workflow passes to its ``module`` statement; ``mammoseg config show`` calls
:func:`resolve_config` with its own arguments. Both follow the order above, so both print and run exactly the
same configuration.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from mammoseg.config.schema import in_schema_order, read_config_file, schema, validate_config
from mammoseg.errors import ConfigError
from mammoseg.io.atomic import write_json_atomic, write_text_atomic

__all__ = ["DEMO_CONFIG", "default_configfiles", "parse_overrides", "merge", "resolve_config",
           "resolve_workflow_config", "config_yaml"]

#: The demo's config file, relative to the workflow's folder (the repository root).
DEMO_CONFIG = Path("config") / "config.yaml"


def default_configfiles(root: str | Path) -> list[Path]:
    """``[root/config/config.yaml]`` (the demo) if it exists, else ``[]`` (schema defaults alone)."""
    path = Path(root) / DEMO_CONFIG
    return [path] if path.is_file() else []


def parse_overrides(entries: Iterable[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (Snakemake's ``--config`` syntax) to a mapping, each VALUE parsed as YAML.

    Raises
    ------
    ConfigError
        For an entry without ``=`` or whose value is not valid YAML, naming the entry.
    """
    overrides: dict[str, Any] = {}
    for entry in entries or ():
        key, sep, value = str(entry).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--config {entry!r}: expected KEY=VALUE")
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {entry!r}: the value is not valid YAML: {exc}") from None
        overrides = merge(overrides, {key.strip(): parsed})
    return overrides


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``override``: mappings merged key by key (recursively), anything else replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_config(configfiles: Sequence[str | Path] = (),
                   overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Schema defaults, then each of ``configfiles`` in order, then ``overrides``; validated.

    Parameters
    ----------
    configfiles : YAML files, applied in order (pass :func:`default_configfiles` for "the demo unless told")
    overrides : already parsed ``--config`` values (:func:`parse_overrides`)

    Returns
    -------
    dict : the complete configuration, every key present.

    Raises
    ------
    ConfigError
        Naming the file that cannot be read, or the key that violates the schema and what is allowed (with the
        files the configuration came from).
    """
    merged: dict[str, Any] = {}
    for path in configfiles:
        merged = merge(merged, read_config_file(Path(path)))
    merged = merge(merged, overrides or {})
    try:
        return validate_config(merged)
    except ConfigError as exc:
        sources = ", ".join(str(p) for p in configfiles) or "no config file"
        raise ConfigError(f"{exc} (config from {sources}{', --config' if overrides else ''})") from None


def config_yaml(config: Mapping[str, Any]) -> str:
    """The configuration as YAML, keys in the schema's order (what ``mammoseg config show`` prints)."""
    return yaml.safe_dump(in_schema_order(config, schema()), sort_keys=False, default_flow_style=False)


def write_resolved(config: Mapping[str, Any], keys: Mapping[str, str], out_config: str | Path,
                   out_keys: str | Path) -> None:  # fmt: skip
    """Write a run's resolved configuration (YAML) and its stage keys (JSON) beside its results."""
    header = "# The resolved configuration of this experiment (mammoseg config show prints the same).\n"
    write_text_atomic(out_config, header + config_yaml(config))
    write_json_atomic(out_keys, dict(keys))


def resolve_workflow_config(given: Mapping[str, Any], *, config_args: Sequence[str] | None = None,
                            configfiles: Sequence[str | Path] = (),
                            demo_files: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The configuration of a workflow run, from the ``config`` Snakemake hands the Snakefile.

    Parameters
    ----------
    given : Snakemake's ``config``: the ``--configfile`` files with the ``--config`` values merged in, key by key,
        by Snakemake; or, when mammoseg runs as a module of another workflow, the configuration that workflow
        passes (``module mammoseg: ... config: config``), including what its Snakefile changed
    config_args : the ``--config KEY=VALUE`` strings: read again as YAML and merged over ``given``, because
        Snakemake keeps their nested values as text (``train='{epochs: 2}'`` gives it the string ``"2"``)
    configfiles : the ``--configfile`` files (only whether there are any matters)
    demo_files : the configuration to start from when nothing but ``--config`` gave one
        (:func:`default_configfiles`: the demo)

    Returns
    -------
    dict : schema defaults <- ``given`` (or ``demo_files``) <- ``config_args``, validated, every key present.

    Raises
    ------
    ConfigError
        For a key that violates the schema, naming it and where the configuration came from.
    """
    overrides = parse_overrides(config_args)
    only_overrides = not configfiles and set(given) <= set(overrides)
    merged: dict[str, Any] = {}
    for path in demo_files if only_overrides else ():
        merged = merge(merged, read_config_file(Path(path)))
    merged = merge(merge(merged, {} if only_overrides else given), overrides)
    try:
        return validate_config(merged)
    except ConfigError as exc:
        if only_overrides:
            sources = ", ".join(str(path) for path in demo_files) or "no config file"
        else:
            sources = ", ".join(str(path) for path in configfiles) or "the calling workflow's config"
        raise ConfigError(f"{exc} (config from {sources}{', --config' if overrides else ''})") from None
