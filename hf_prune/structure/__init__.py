"""Structured pruning: remove MLP channels, attention heads, sublayers and whole blocks physically."""
