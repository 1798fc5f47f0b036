"""One place for names that differ between the transformers releases hf_prune supports (see the README's
"Supported versions").

transformers renames arguments with a deprecation window (5.24 renamed the KV-cache argument
``past_key_values`` to ``cache``; both are accepted until 5.40). Everything in hf_prune that reads or passes a
cache, or a renamed training argument, goes through these helpers, so the next rename is a one-line change here.

Example:
    >>> from hf_prune.core.compat import cache_from_kwargs, pop_cache_kwargs
    >>> kwargs = {"cache": "C", "use_cache": True}
    >>> cache_from_kwargs(kwargs)
    'C'
    >>> pop_cache_kwargs(kwargs); kwargs
    {'use_cache': True}
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

#: Keyword names a KV cache arrives under, newest first: transformers >= 5.24 ``cache``; older releases
#: ``past_key_values`` (models) / ``past_key_value`` (some attention modules); GPT-NeoX's ``layer_past``.
CACHE_KWARGS: tuple[str, ...] = ("cache", "past_key_values", "past_key_value", "layer_past")


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    """The KV cache passed to a module under any of `CACHE_KWARGS`, else ``None``."""
    for name in CACHE_KWARGS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def pop_cache_kwargs(kwargs: dict[str, Any]) -> None:
    """Remove every KV-cache keyword from recorded block kwargs (calibration forwards never use a cache)."""
    for name in CACHE_KWARGS:
        kwargs.pop(name, None)


def output_cache(outputs: Any) -> Any:
    """The cache a model output carries (``outputs.cache`` from 5.24 on, ``outputs.past_key_values`` before)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


@functools.lru_cache(maxsize=64)
def _accepts(cls: type, name: str) -> bool:
    try:
        return name in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def cache_kwarg(model: Any) -> str:
    """The keyword ``model.forward`` takes its KV cache under: ``"cache"`` (transformers >= 5.24) or
    ``"past_key_values"``."""
    return "cache" if _accepts(type(model), "cache") else "past_key_values"


def activation_checkpointing_arg() -> str:
    """`TrainingArguments` field that turns on activation (gradient) checkpointing in this transformers:
    ``activation_checkpointing`` (5.24 on) or ``gradient_checkpointing``."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def is_activation_checkpointing(model: Any) -> bool:
    """Whether activation checkpointing is on, without the deprecated ``is_gradient_checkpointing``."""
    return any(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules())
