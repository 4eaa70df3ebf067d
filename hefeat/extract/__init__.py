"""Extraction: encoders, the batched tile pipeline, feature files and interop."""
