"""Mixpert training: the model split, weights, checkpoints, and the joint / expert / router stages."""

__version__ = "0.1.0"
