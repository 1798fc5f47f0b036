"""Method registry: ``name -> PruningMethod subclass``. Methods register themselves on import.

Example:
    >>> from hf_prune.registry import available_methods
    >>> sorted(available_methods())[:3]
    ['magnitude', 'sparsegpt', 'wanda']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .methods.base import PruningMethod

_REGISTRY: dict[str, type[PruningMethod]] = {}
T = TypeVar("T")


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: make a `PruningMethod` subclass available as ``PruningConfig(method=name)``."""

    def decorator(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"pruning method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = cls  # type: ignore[assignment]
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def _ensure_builtin() -> None:
    from . import methods  # noqa: F401  (importing registers the built-in methods)


def available_methods() -> list[str]:
    """Names accepted by ``PruningConfig(method=...)``."""
    _ensure_builtin()
    return list(_REGISTRY)


def get_method(name: str) -> type[PruningMethod]:
    """The method class registered under ``name``."""
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no pruning method {name!r}; registered: {sorted(_REGISTRY)}") from None
