"""Movement pruning (Sanh et al. 2020): pure tensor math of the scores.

The forward pass uses ``W' = W * M``. Scores ``S`` (initialised to 0) are trained by the straight-through
estimator ``dL/dS = dL/dW' * W``, so ``S`` accumulates ``-lr * (dL/dW') * W``. Hard movement keeps the top-k of
``S``; soft movement keeps ``sigmoid(S) > tau`` and adds ``l1 * sum(sigmoid(S))`` to the loss, whose gradient
``l1 * sigmoid(S) * (1 - sigmoid(S))`` pushes unused scores down.

Masked weights are exact zeros in the model, but the method needs their (frozen) values ``W`` for the score
update and for regrowth: `MovementScores` keeps them, so a weight that comes back resumes its old value.

Example:
    >>> import torch
    >>> from hf_prune.training.movement import score_step
    >>> s = torch.zeros(2); g = torch.tensor([1.0, -1.0]); w = torch.tensor([2.0, 2.0])
    >>> score_step(s, g, w, lr=0.5).tolist()     # weights moving away from zero gain score
    [-1.0, 1.0]
"""

from __future__ import annotations

import torch

from .sharded import local


def score_step(scores: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, lr: float = 1.0,
               l1: float = 0.0) -> torch.Tensor:
    """One straight-through update in place: ``S -= lr * (dL/dW' * W + l1 * sigmoid'(S))``. Returns ``S``."""
    update = grad.float() * weight.float()
    if l1:
        sig = torch.sigmoid(scores)
        update = update + l1 * sig * (1.0 - sig)
    return scores.sub_(lr * update)


def soft_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Soft movement: keep ``sigmoid(S) > threshold``."""
    return torch.sigmoid(scores) > threshold


def soft_threshold(progress: float, final_threshold: float) -> float:
    """Soft movement's threshold at schedule ``progress`` in [0, 1]: 0 (keep all) up to ``final_threshold``."""
    return float(final_threshold) * min(max(progress, 0.0), 1.0)


class MovementScores:
    """Scores ``S`` (float32) and frozen values of masked weights, one tensor each per parameter (over this
    process's rows when FSDP2 shards the parameter, like its mask)."""

    def __init__(self, params: dict) -> None:
        self.scores = {n: torch.zeros_like(local(e.param.data), dtype=torch.float32) for n, e in params.items()}
        self.frozen = {n: torch.zeros_like(local(e.param.data)) for n, e in params.items()}

    def dense_weight(self, entry) -> torch.Tensor:
        """``W``: the live weight where kept, the frozen value where masked."""
        return torch.where(entry.mask, local(entry.param.data), self.frozen[entry.name])

    @torch.no_grad()
    def step(self, params: dict, lr: float, l1: float = 0.0) -> None:
        """Update every score from the current gradients (call before the gradients are masked)."""
        for name, entry in params.items():
            if entry.param.grad is None:
                continue
            score_step(self.scores[name], local(entry.param.grad), self.dense_weight(entry), lr, l1)

    @torch.no_grad()
    def on_mask_change(self, entry, new_mask: torch.Tensor) -> None:
        """Before ``new_mask`` is installed: freeze newly masked values, restore regrown ones."""
        old = entry.mask
        newly_masked = old & ~new_mask
        regrown = ~old & new_mask
        frozen = self.frozen[entry.name]
        values = local(entry.param.data)
        frozen[newly_masked] = values[newly_masked]
        values[regrown] = frozen[regrown]
        frozen[regrown] = 0
