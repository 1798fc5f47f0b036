"""Wanda (Sun et al., 2024): score |W_ij| * ||X_j||_2, compared within each output row; no weight update."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.stats import InputStats
from ..registry import register_method
from .base import PruningMethod
from .functional import prune_by_scores, wanda_scores
from .options import OneShotOptions


@register_method("wanda", options=OneShotOptions)
class WandaPruning(PruningMethod):
    needs_norms = True

    def prune_group(
        self, weights: Sequence[torch.Tensor], stats: InputStats | None, sparsities: Sequence[float], names: Sequence[str]
    ) -> list[torch.Tensor]:
        assert stats is not None and stats.sum_sq is not None
        return [
            prune_by_scores(w, wanda_scores(w, stats.sum_sq.to(w.device)), s, self.config.nm, "row")[0]
            for w, s in zip(weights, sparsities)
        ]
