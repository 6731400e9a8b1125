"""Configuration: gateway.yaml and KEYGATE_* overrides, validated once at startup."""

from gateway.config.load import ConfigError, load
from gateway.config.model import Settings
from gateway.config.reader import parse_address

__all__ = ["ConfigError", "Settings", "load", "parse_address"]
