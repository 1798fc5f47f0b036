"""Docstring examples are runnable (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["hf_prune", "hf_prune.config", "hf_prune.masks", "hf_prune.api", "hf_prune.calibration",
           "hf_prune.methods.functional", "hf_prune.report", "hf_prune.targets", "hf_prune.evaluate",
           "hf_prune.memory", "hf_prune.registry"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
