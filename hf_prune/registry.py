"""Method registry: ``name -> MethodSpec(family, options class, implementation)``. Imports nothing of hf_prune.

Every method registers itself with `register_method` where it is defined; importing ``hf_prune`` imports the
built-in families (``hf_prune.oneshot``, ``hf_prune.structure``, ``hf_prune.training``), so the registry is
complete whenever any part of hf_prune is in use. Families:

* ``"oneshot"``: zero weights after ``from_pretrained`` (`hf_prune.prune`), block by block;
* ``"structured"``: physically remove channels, heads, sublayers or blocks (`hf_prune.prune`);
* ``"training"``: prune during training (`hf_prune.PruningCallback`); one-shot methods also run there as a
  constant starting mask.

Example:
    >>> import hf_prune
    >>> from hf_prune.registry import available_methods, get_spec, is_training_only
    >>> {"magnitude", "wanda", "sparsegpt", "flap"} <= set(available_methods(training=False))
    True
    >>> is_training_only("gmp"), is_training_only("wanda")
    (True, False)
    >>> get_spec("sparsegpt").family
    'oneshot'
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

FAMILIES = ("oneshot", "structured", "training")
T = TypeVar("T")


@dataclass(frozen=True)
class MethodSpec:
    """What a registered name stands for."""

    name: str
    family: str
    implementation: type
    #: dataclass of the method's own options (fields with ``help`` metadata); ``None``: no options
    options: type | None = None
    #: structured methods: what they remove (``"width"``, ``"depth"``, ``"sublayer"``)
    structured_kind: str | None = None

    @property
    def training_only(self) -> bool:
        return self.family == "training"


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, *, family: str | None = None, options: type | None = None) -> Callable[[T], T]:
    """Class decorator: make a method available as ``PruningConfig(method=name)``.

    Args:
        name: the method name users pass.
        family: one of `FAMILIES`; by default read off the class: ``training_only = True`` -> ``"training"``,
            a ``structured`` kind -> ``"structured"``, else ``"oneshot"``.
        options: its options dataclass (a `hf_prune.config.MethodOptions`); by default the class attribute
            ``options`` (``None``: the method takes no options).
    """

    def decorator(cls: T) -> T:
        kind = getattr(cls, "structured", None)
        fam = family or ("training" if getattr(cls, "training_only", False) else "structured" if kind else "oneshot")
        if fam not in FAMILIES:
            raise ValueError(f"family={fam!r}; allowed: {list(FAMILIES)}")
        old = _REGISTRY.get(name)
        if old is not None and old.implementation.__qualname__ != cls.__qualname__:  # type: ignore[attr-defined]
            raise ValueError(f"pruning method {name!r} is already registered by {old.implementation.__qualname__}")
        opts = options if options is not None else getattr(cls, "options", None)
        _REGISTRY[name] = MethodSpec(name, fam, cls, opts, kind)  # type: ignore[arg-type]
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def available_methods(training: bool | None = None, family: str | None = None) -> list[str]:
    """Names accepted by ``PruningConfig(method=...)``.

    ``training=None``: all; ``False``: methods `hf_prune.prune` runs (one-shot and structured); ``True``:
    training-only methods (`hf_prune.PruningCallback`, which also accepts the one-shot ones as a constant
    starting mask). ``family`` narrows to one family.
    """
    specs = _REGISTRY.values()
    if training is not None:
        specs = [s for s in specs if s.training_only == training]
    if family is not None:
        specs = [s for s in specs if s.family == family]
    return [s.name for s in specs]


def get_spec(name: str) -> MethodSpec:
    """The `MethodSpec` registered under ``name``; `KeyError` listing the registered names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"no pruning method {name!r}; registered: {sorted(_REGISTRY)}.{hint}") from None


def get_method(name: str) -> Any:
    """The implementation class registered under ``name``."""
    return get_spec(name).implementation


def is_training_only(name: str) -> bool:
    """True for methods that only run during training (inside `hf_prune.PruningCallback`)."""
    return get_spec(name).training_only


def all_option_classes() -> list[type]:
    """Every registered options class (each once), for the CLI and for reading legacy flat configs."""
    seen: list[type] = []
    for spec in _REGISTRY.values():
        if spec.options is not None and spec.options not in seen:
            seen.append(spec.options)
    return seen
