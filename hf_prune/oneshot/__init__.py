"""Built-in one-shot methods; importing this package registers them."""

from ..core.stats import InputStats
from . import magnitude, sparsegpt, wanda  # noqa: F401
from .base import PruningMethod

__all__ = ["InputStats", "PruningMethod"]
