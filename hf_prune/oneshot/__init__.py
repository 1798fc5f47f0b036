"""One-shot methods, one module each; importing this package imports every module in it, and each method
registers itself (`hf_prune.registry.register_method`). A new method is one new file here."""

import importlib
import pkgutil

from ..core.stats import InputStats
from .base import PruningMethod

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["InputStats", "PruningMethod"]
