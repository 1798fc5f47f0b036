"""Wanda (Sun et al., 2024): score |W_ij| * ||X_j||_2, compared within each output row; no weight update."""

from __future__ import annotations

import torch

from ..core.stats import InputStats
from ..registry import register_method
from .base import ScoreMethod
from .functional import wanda_scores
from .options import OneShotOptions


@register_method("wanda", options=OneShotOptions)
class WandaPruning(ScoreMethod):
    needs_norms = True

    def scores(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        assert stats is not None and stats.sum_sq is not None
        return wanda_scores(weight, stats.sum_sq.to(weight.device))
