"""The configuration (schema, defaults, validation) and the plan every stage reads."""

from mammoseg.config.schema import SCHEMA_PATH, ConfigError, load_config, section_hash, validate_config

__all__ = ["SCHEMA_PATH", "ConfigError", "load_config", "section_hash", "validate_config"]
