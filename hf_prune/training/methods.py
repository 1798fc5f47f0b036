"""Registry entries of the training-time methods, so that ``PruningConfig(method="gmp")`` validates.

They are markers: the work happens in `hf_prune.training.PruningCallback`. Instantiating one for one-shot
pruning (`hf_prune.prune`) raises `ConfigError` before the model is touched.
"""

from __future__ import annotations

from typing import ClassVar

from ..config import PruningConfig
from ..errors import ConfigError
from ..oneshot.base import PruningMethod
from ..registry import register_method
from .options import LotteryOptions, MovementOptions, ScheduleOptions, SoftMovementOptions


class TrainingOnlyMethod(PruningMethod):
    """Base of methods that need training steps (gradients, weight updates) between mask updates."""

    training_only: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: PruningConfig) -> None:
        raise ConfigError(
            f"method={config.method!r} prunes during training and cannot run one-shot in hf_prune.prune(); use "
            f"Trainer(..., callbacks=[hf_prune.PruningCallback(PruningConfig(method={config.method!r}, ...))]), "
            "or pick a one-shot method ('magnitude', 'wanda', 'sparsegpt')"
        )


@register_method("gmp", options=ScheduleOptions)
class GradualMagnitudePruning(TrainingOnlyMethod):
    """Zhu & Gupta gradual magnitude pruning: |W| re-ranked every ``update_every`` steps along the schedule."""


@register_method("movement", options=MovementOptions)
class MovementPruning(TrainingOnlyMethod):
    """Sanh et al. hard movement pruning: top-k of scores S learned with a straight-through estimator."""


@register_method("soft_movement", options=SoftMovementOptions)
class SoftMovementPruning(TrainingOnlyMethod):
    """Soft movement pruning: keep sigmoid(S) > tau, with an L1 penalty on sigmoid(S)."""


@register_method("lottery", options=LotteryOptions)
class LotteryTicketPruning(TrainingOnlyMethod):
    """Iterative magnitude pruning with rewinding of the survivors to an early step (Frankle et al.)."""
