"""Usage by period, spending caps and their reports (docs/architecture.md)."""
