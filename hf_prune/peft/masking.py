"""Zero-pattern math shared by the masked LoRA layers and the masked merge. Pure tensor code, no peft.

* `masked_update` keeps an update only where the frozen weight is non-zero: ``delta ⊙ (weight != 0)``.
* `add_masked_` merges such an update in place (in fp32, written back in the weight's dtype); zeros stay exact.
* `fingerprint` summarises a weight's zero pattern (non-zero count and a sha256 of the packed bool mask), so an
  adapter can tell whether it is being loaded onto the base it was trained on.

Example:
    >>> import torch
    >>> w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> masked_update(w, torch.ones(2, 2)).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    >>> add_masked_(w, torch.full((2, 2), 0.5)).tolist()
    [[1.5, 0.0], [0.0, 2.5]]
    >>> fp = fingerprint(w)
    >>> fp["nonzeros"], fp["numel"], len(fp["sha256"])
    (2, 4, 64)
"""

from __future__ import annotations

import hashlib

import torch

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def masked_update(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``delta`` with every entry zeroed where ``weight`` is zero (same shape; ``torch.where``, so a NaN in
    ``delta`` at a pruned position cannot leak through). Differentiable in ``delta``."""
    if delta.shape != weight.shape:
        raise ValueError(f"the update has shape {tuple(delta.shape)} but the weight has {tuple(weight.shape)}")
    return torch.where(weight != 0, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


@torch.no_grad()
def add_masked_(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``weight += delta ⊙ (weight != 0)`` in place, summed in fp32 and written back in ``weight``'s dtype, so
    half-precision weights are rounded once; the zeros of ``weight`` stay exact zeros. Returns ``weight``."""
    delta = masked_update(weight, delta.to(device=weight.device))
    weight.copy_((weight.float() + delta.float()).to(weight.dtype))
    return weight


@torch.no_grad()
def fingerprint(weight: torch.Tensor) -> dict[str, int | str]:
    """``{"nonzeros", "numel", "sha256"}`` of ``weight != 0`` (as stored, bits packed 8 to a byte)."""
    mask = (weight != 0).flatten().cpu()
    padded = torch.zeros((mask.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: mask.numel()] = mask
    packed = (padded.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)
    digest = hashlib.sha256(packed.numpy().tobytes()).hexdigest()
    return {"nonzeros": int(mask.sum()), "numel": int(mask.numel()), "sha256": digest}
