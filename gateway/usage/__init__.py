"""Usage by period, spending caps and their reports (DESIGN §4, §5)."""
