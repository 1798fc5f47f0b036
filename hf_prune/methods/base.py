"""Lifecycle side of a one-shot method: which statistics it needs and how it prunes a group of matrices.

The pipeline (`hf_prune.pipeline`) owns hooks, devices and blocks; a method only sees float32 tensors.
Matrices that read the same input (q/k/v, gate/up) form a *group* and share one `InputStats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from ..config import PruningConfig


class InputStats:
    """Running statistics of one input: sum of squares per feature and/or the Hessian sum ``sum x x^T``.

    Accumulated in float32 from inputs of any dtype. The Hessian is symmetric, so only its upper block
    triangle is accumulated (``chunks`` column blocks: ~(k+1)/2k of the FLOPs); `full_hessian` mirrors it.
    """

    chunks: int = 4

    def __init__(self, in_features: int, device: torch.device, norms: bool, hessian: bool) -> None:
        self.n_tokens = 0
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device) if norms else None
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        xf = x.to(self.sum_sq.device if self.sum_sq is not None else self.hessian.device, torch.float32)
        self.n_tokens += xf.shape[0]
        if self.sum_sq is not None:
            self.sum_sq += xf.square().sum(0)
        if self.hessian is not None:
            cols = xf.shape[1]
            k = self.chunks if cols >= 64 * self.chunks else 1
            bounds = [cols * i // k for i in range(k + 1)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                self.hessian[a:b, a:].addmm_(xf[:, a:b].t(), xf[:, a:])

    def full_hessian(self) -> torch.Tensor:
        """The symmetric Hessian sum (the accumulated upper triangle mirrored)."""
        assert self.hessian is not None
        return torch.triu(self.hessian) + torch.triu(self.hessian, 1).t()

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.sum_sq, self.hessian) if t is not None)


class PruningMethod:
    """Base class. Subclasses register with ``@register_method("name")``."""

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True
    needs_norms: ClassVar[bool] = False
    needs_hessian: ClassVar[bool] = False

    def __init__(self, config: PruningConfig) -> None:
        self.config = config

    def prune_group(
        self,
        weights: Sequence[torch.Tensor],
        stats: InputStats | None,
        sparsities: Sequence[float],
        names: Sequence[str],
    ) -> list[torch.Tensor]:
        """Return pruned float32 copies of ``weights`` (each ``[out, in]``, all with the same input)."""
        raise NotImplementedError
