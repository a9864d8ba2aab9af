"""Potstill: knowledge distillation of language models across the network."""

__version__ = "0.1.0"
