"""The admin listener: key management API, OpenAPI document (metrics and health later)."""
