"""Pruning during training: `PruningCallback` for transformers' `Trainer` and trl's `SFTTrainer`.

Modules: `schedules` (pure sparsity schedules), `state` (masks and their enforcement), `movement`
(movement-pruning scores), `lottery` (rewinding), `checkpoint` (state in Trainer checkpoints), `methods`
(the `TrainingMethod` objects, registered as ``gmp``, ``movement``, ``soft_movement``, ``lottery``, and the
constant mask of one-shot methods), `callback` (lifecycle only: drives a `TrainingMethod`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PruningCallback"]


def __getattr__(name: str) -> Any:  # lazy: importing the registry entries must not import the Trainer
    if name == "PruningCallback":
        from .callback import PruningCallback

        return PruningCallback
    raise AttributeError(name)
