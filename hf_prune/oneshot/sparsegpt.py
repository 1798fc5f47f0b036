"""SparseGPT (Frantar & Alistarh, 2023): OBS-style pruning with weight updates from the input Hessian.

Matrices sharing one input (q/k/v, gate/up) are stacked and solved with one Hessian inverse; unstructured
thresholds stay per matrix (see `sparsegpt_prune`'s ``row_segments``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.stats import InputStats
from ..registry import register_method
from .base import PruningMethod
from .functional import finalize_hessian, sparsegpt_prune
from .options import SparseGPTOptions


def group_hessian(stats: InputStats | None, device: torch.device) -> torch.Tensor:
    """The float32 Hessian ``2/n sum x x^T`` of a group's shared input, from the statistics the pipeline collected
    for a method with ``needs_hessian = True`` (SparseGPT's; ADMM reuses it)."""
    assert stats is not None and stats.hessian is not None
    return finalize_hessian(stats.full_hessian(), stats.n_tokens).to(device)


def stack_group(weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Stack matrices that read one input (q/k/v, gate/up) along the rows: ``(stacked, row ranges of each)``."""
    bounds, start = [], 0
    for w in weights:
        bounds.append((start, start + w.shape[0]))
        start += w.shape[0]
    stacked = torch.cat(list(weights), 0) if len(weights) > 1 else weights[0]
    return stacked, bounds


@register_method("sparsegpt", options=SparseGPTOptions)
class SparseGPTPruning(PruningMethod):
    needs_hessian = True

    def prune_group(
        self, weights: Sequence[torch.Tensor], stats: InputStats | None, sparsities: Sequence[float], names: Sequence[str]
    ) -> list[torch.Tensor]:
        hessian = group_hessian(stats, weights[0].device)
        stacked, bounds = stack_group(weights)
        cfg = self.config
        new, _, _ = sparsegpt_prune(
            stacked, hessian, list(sparsities), cfg.nm, cfg.blocksize, cfg.dampening, cfg.max_damp_retries,
            row_segments=bounds, name=" + ".join(names),
        )
        return [new[a:b] for a, b in bounds]
