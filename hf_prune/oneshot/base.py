"""Lifecycle side of a one-shot method: which statistics it needs and how it prunes a group of matrices.

The pipeline (`hf_prune.oneshot.pipeline`) owns hooks, devices and blocks; a method only sees float32 tensors.
Matrices that read the same input (q/k/v, gate/up) form a *group* and share one `InputStats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from ..config import PruningConfig
from ..core.stats import InputStats
from .functional import prune_by_scores


class PruningMethod:
    """Base class. Subclasses register with ``@register_method("name")``."""

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True
    needs_norms: ClassVar[bool] = False
    needs_hessian: ClassVar[bool] = False

    def __init__(self, config: PruningConfig) -> None:
        self.config = config

    @classmethod
    def supports_dual(cls) -> bool:
        """Whether dual importance (``domain_weight``, `hf_prune.core.sources`) applies: the method reads the
        activation statistics that are then kept per calibration source."""
        return cls.needs_norms or cls.needs_hessian

    def prune_group(
        self,
        weights: Sequence[torch.Tensor],
        stats: InputStats | None,
        sparsities: Sequence[float],
        names: Sequence[str],
    ) -> list[torch.Tensor]:
        """Return pruned float32 copies of ``weights`` (each ``[out, in]``, all with the same input)."""
        raise NotImplementedError


class ScoreMethod(PruningMethod):
    """A method that only ranks weights: `scores` (pure math, float32) is compared within ``compare_group()``
    (``"row"``: per output row; ``"layer"``: the whole matrix) or within each N:M group, and the lowest scores
    are zeroed; no weight update."""

    def scores(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        raise NotImplementedError

    def compare_group(self) -> str:
        return "row"

    def prune_group(
        self,
        weights: Sequence[torch.Tensor],
        stats: InputStats | None,
        sparsities: Sequence[float],
        names: Sequence[str],
    ) -> list[torch.Tensor]:
        group = self.compare_group()
        return [prune_by_scores(w, self.scores(w, stats), s, self.config.nm, group)[0]
                for w, s in zip(weights, sparsities)]
