"""Butterfly: one neural network split across several machines, with verified results."""

__version__ = "0.1.0"
