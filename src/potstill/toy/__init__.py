"""Tiny models and synthetic tasks built on the spot: no download, no GPU."""
