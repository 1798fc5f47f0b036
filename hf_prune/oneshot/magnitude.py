"""Magnitude pruning: score |W|, comparison group per matrix ("layer") or per output row ("row")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.stats import InputStats
from ..registry import register_method
from .base import PruningMethod
from .functional import magnitude_scores, prune_by_scores
from .options import MagnitudeOptions


@register_method("magnitude", options=MagnitudeOptions)
class MagnitudePruning(PruningMethod):
    needs_calibration = False

    def prune_group(
        self, weights: Sequence[torch.Tensor], stats: InputStats | None, sparsities: Sequence[float], names: Sequence[str]
    ) -> list[torch.Tensor]:
        group = self.config.magnitude_group
        return [prune_by_scores(w, magnitude_scores(w), s, self.config.nm, group)[0] for w, s in zip(weights, sparsities)]
