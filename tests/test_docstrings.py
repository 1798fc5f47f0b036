"""Docstring examples are runnable (doctest), in every module of the package."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import hf_prune

# Modules whose examples need an optional dependency or a GPU are still imported and run when it is present.
MODULES = sorted(["hf_prune", *(m.name for m in pkgutil.walk_packages(hf_prune.__path__, "hf_prune."))])


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an optional extra (e.g. triton) is missing: say so instead of passing silently
        pytest.skip(f"{name} needs an optional dependency: {exc}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
