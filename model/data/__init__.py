"""Corpus building, synthetic task data and token packing."""
