"""Model audit: composes the existing techniques over a dataset into one report (issue 14)."""
