"""Method registry: ``name -> PruningMethod subclass``. Methods register themselves on import.

A class with ``training_only = True`` (gradual magnitude, movement, lottery ticket) is accepted by
`PruningConfig` but only runs inside `hf_prune.PruningCallback`; one-shot `hf_prune.prune` refuses it.

Example:
    >>> from hf_prune.registry import available_methods, is_training_only
    >>> {"magnitude", "wanda", "sparsegpt", "flap"} <= set(available_methods(training=False))
    True
    >>> is_training_only("gmp"), is_training_only("wanda")
    (True, False)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .oneshot.base import PruningMethod

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
    from . import oneshot as methods  # noqa: F401  (importing registers the built-in methods)
    from .structure import methods as _structured_methods  # noqa: F401  (registers flap, taylor, angular, ...)
    from .training import methods as _training_methods  # noqa: F401  (registers gmp, movement, lottery)


def available_methods(training: bool | None = None) -> list[str]:
    """Names accepted by ``PruningConfig(method=...)``.

    ``training=None``: all; ``False``: one-shot methods (`hf_prune.prune`); ``True``: training-only methods
    (`hf_prune.PruningCallback`, which also accepts the one-shot ones as a constant starting mask).
    """
    _ensure_builtin()
    if training is None:
        return list(_REGISTRY)
    return [name for name, cls in _REGISTRY.items() if bool(getattr(cls, "training_only", False)) == training]


def is_training_only(name: str) -> bool:
    """True for methods that only run during training (inside `hf_prune.PruningCallback`)."""
    return bool(getattr(get_method(name), "training_only", False))


def get_method(name: str) -> type[PruningMethod]:
    """The method class registered under ``name``."""
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no pruning method {name!r}; registered: {sorted(_REGISTRY)}") from None
