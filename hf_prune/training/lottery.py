"""Lottery tickets with rewinding (Frankle et al.): iterative magnitude pruning, survivors rewound to step k.

Rounds prune at evenly spaced steps between ``start_step`` and ``end_step`` (`schedules.lottery_round_steps`);
round ``r`` of ``R`` keeps ``(1 - s)^(r/R)`` of the weights (`schedules.lottery_sparsity`), ranked by the
magnitude of the trained weights, then every surviving weight is reset to its value at
``lottery_rewind_step`` and its optimizer moments are zeroed. The learning-rate schedule is not rewound
(the Trainer owns it).

Example:
    >>> import torch
    >>> from hf_prune.training.lottery import rewound
    >>> rewound(torch.tensor([5., 6., 7.]), torch.tensor([1., 2., 3.]), torch.tensor([True, False, True])).tolist()
    [1.0, 0.0, 3.0]
"""

from __future__ import annotations

import torch

from .sharded import local


def rewound(current: torch.Tensor, early: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Survivors take their early value, pruned weights are zero."""
    return torch.where(keep, early.to(current.dtype), torch.zeros((), dtype=current.dtype, device=current.device))


class RewindSnapshot:
    """Copies of the prunable parameters at the rewind step (this process's rows under FSDP2)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def take(self, params: dict, step: int) -> None:
        self.step = step
        self.tensors = {n: local(e.param.data).detach().clone() for n, e in params.items()}

    @property
    def taken(self) -> bool:
        return self.step is not None

    @torch.no_grad()
    def rewind_(self, params: dict) -> None:
        for name, entry in params.items():
            values = local(entry.param.data)
            values.copy_(rewound(values, self.tensors[name], entry.mask))
