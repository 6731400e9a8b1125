"""keygate: an API-key gateway."""

__version__ = "0.1.0"
