"""Placement of contiguous layer ranges onto nodes: pure, deterministic functions."""
