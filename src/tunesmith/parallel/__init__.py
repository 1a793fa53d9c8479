"""Transforms that change how a model executes, applied from outside (torchtitan style)."""

from tunesmith.parallel.ac import apply_activation_checkpointing

__all__ = ["apply_activation_checkpointing"]
