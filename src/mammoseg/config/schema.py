"""Load, validate and hash the workflow configuration.

The same JSON schema is used by the Snakefile (``snakemake.utils.validate``) and here, so a config that the
workflow accepts is one the command line accepts, with the same defaults.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

from mammoseg.errors import ConfigError

__all__ = ["ConfigError", "SCHEMA_PATH", "schema", "load_config", "validate_config", "in_schema_order",
           "section_hash"]

SCHEMA_PATH = Path(str(resources.files("mammoseg.config") / "config.schema.yaml"))


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    return SCHEMA_PATH.read_text()


def schema() -> dict:
    """The configuration schema (JSON Schema as a dict, a fresh copy)."""
    return yaml.safe_load(_schema_text())


def _with_defaults(validator_class):
    """A validator that fills ``default`` values in while it validates (the jsonschema FAQ recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, copy.deepcopy(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        return f"{error.message} at '{key}'; allowed keys: {', '.join(allowed)}"
    if error.validator == "enum":
        allowed_values = ", ".join(map(str, error.validator_value))
        return f"'{key}' = {error.instance!r} is not allowed; allowed values: {allowed_values}"
    hint = schema.get("description")
    return f"'{key}': {error.message}" + (f" ({hint})" if hint else "")


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate ``config`` against the schema and return a copy with every default filled in.

    Raises
    ------
    ConfigError
        Naming the offending key and the allowed values for each violation found.
    """
    filled = copy.deepcopy(config) if config else {}
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema())
    errors = sorted(validator.iter_errors(filled), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_describe(e) for e in errors))
    problems = _combination_problems(filled)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return in_schema_order(filled, schema())


def in_schema_order(value: Any, subschema: Mapping[str, Any]) -> Any:
    """``value`` with every mapping's keys in the schema's order, however the configuration was written.

    The order is part of what Snakemake compares when it decides whether a rule's params changed: without this,
    ``--config "train={folds: 2}"`` and the same value from a file would retrain the same model. Keys the
    schema does not name (free-form mappings) follow, sorted.
    """
    if not isinstance(value, Mapping):
        return value
    properties = subschema.get("properties", {}) if isinstance(subschema, Mapping) else {}
    ordered = [key for key in properties if key in value] + sorted(key for key in value if key not in properties)
    return {key: in_schema_order(value[key], properties.get(key, {})) for key in ordered}


def _combination_problems(config: dict[str, Any]) -> list[str]:
    """Settings that are each valid but not together (what a JSON schema cannot say readably)."""
    problems = []
    if config["evaluate"]["target_fppi"] > 0 and config["train"]["folds"] < 2:
        problems.append(f"'evaluate.target_fppi' = {config['evaluate']['target_fppi']} calibrates on out-of-fold "
                        f"predictions: it needs 'train.folds' >= 2 (got {config['train']['folds']})")
    if config["train"]["hard_negatives"]["per_image"] > 0 and config["train"]["folds"] < 2:
        problems.append(f"'train.hard_negatives.per_image' = {config['train']['hard_negatives']['per_image']} mines "
                        f"the out-of-fold maps of a first round: it needs 'train.folds' >= 2 "
                        f"(got {config['train']['folds']})")
    return problems


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds, unvalidated; a :class:`ConfigError` naming the file otherwise."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML config (or none, for all defaults) and validate it."""
    if path is None:
        return validate_config({})
    path = Path(path)
    raw = read_config_file(path)
    try:
        return validate_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def section_hash(*sections: Any) -> str:
    """A short, stable hash of config sections, recorded in every artefact built from them."""
    blob = json.dumps(sections, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_reference_markdown() -> str:
    """The configuration reference of config/README.md, generated from the schema (a test keeps them in sync)."""
    spec_tree = schema()
    lines = ["| key | allowed | default | meaning |", "|---|---|---|---|"]

    def allowed(spec: dict) -> str:
        if "enum" in spec:
            return " / ".join(f"`{v}`" for v in spec["enum"])
        symbols = {"minimum": "≥", "exclusiveMinimum": ">", "maximum": "≤"}
        bounds = [f"{symbol} {spec[key]}" for key, symbol in symbols.items() if key in spec]
        return " ".join([spec.get("type", ""), *bounds])

    def rows(prefix: str, properties: dict) -> None:
        for key, spec in properties.items():
            name = f"{prefix}{key}"
            if "properties" in spec:  # a section, or a group of keys inside one (train.augment, ...)
                rows(f"{name}.", spec["properties"])
                continue
            meaning = str(spec.get("description", "")).replace("|", "\\|")
            lines.append(f"| `{name}` | {allowed(spec)} | `{spec.get('default')}` | {meaning} |")

    rows("", spec_tree["properties"])
    return "\n".join(lines)


if __name__ == "__main__":  # python -m mammoseg.config.schema  → the reference table of config/README.md
    print(config_reference_markdown())
