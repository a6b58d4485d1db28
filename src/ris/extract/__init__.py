"""Extraction: files in, features out, locally (pipeline) or on a Ray cluster (ray)."""
