"""Segment tables (filled in by the segmentation work)."""
