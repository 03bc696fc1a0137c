"""Campaign tables (filled in by the campaigns work)."""
