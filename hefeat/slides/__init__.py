"""Slides: reading at physical resolution, tissue, tiling, QC and synthetic cohorts."""
