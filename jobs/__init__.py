"""Thin Hydra entry points: config in, pipeline functions called, where the outputs went printed."""
