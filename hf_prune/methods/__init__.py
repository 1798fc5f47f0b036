"""Built-in one-shot methods; importing this package registers them."""

from . import magnitude, sparsegpt, wanda  # noqa: F401
from .base import InputStats, PruningMethod

__all__ = ["InputStats", "PruningMethod"]
