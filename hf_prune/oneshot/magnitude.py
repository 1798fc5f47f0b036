"""Magnitude pruning: score |W|, comparison group per matrix ("layer") or per output row ("row")."""

from __future__ import annotations

import torch

from ..core.stats import InputStats
from ..registry import register_method
from .base import ScoreMethod
from .functional import magnitude_scores
from .options import MagnitudeOptions


@register_method("magnitude", options=MagnitudeOptions)
class MagnitudePruning(ScoreMethod):
    needs_calibration = False

    def scores(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        return magnitude_scores(weight)

    def compare_group(self) -> str:
        return self.config.magnitude_group
