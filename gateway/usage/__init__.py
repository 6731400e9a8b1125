"""Usage periods and their buckets, and a key's usage history (docs/architecture.md)."""
