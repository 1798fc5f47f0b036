"""LoRAPrune's importance from LoRA alone (Zhang et al., 2023, "LoRAPrune: Structured Pruning Meets Low-Rank
Parameter-Efficient Fine-Tuning"). Pure tensor math, no peft.

A LoRA layer computes ``W' = W + s * B @ A`` with ``W`` frozen, so the gradient of ``W`` is never formed. One SGD
step on ``A`` and ``B`` changes ``B @ A`` by ``(B - G_B)(A - G_A) - B A = -(G_B A + B G_A - G_B G_A)``, so

    G_hat = s * (G_B @ A + B @ G_A - G_B @ G_A)          (an estimate of dL/dW', ``[out, in]``)
    I     = |G_hat ⊙ (W + s * B @ A)|                       (first-order Taylor importance of each weight)

and a structured unit's importance is the sum of ``I`` over its weights (`hf_prune.structure.units`). Only the
``[r, in]`` and ``[out, r]`` LoRA gradients are needed: the full ``[out, in]`` gradient, which true Taylor
importance needs for every layer at once, is built one matrix at a time and dropped.

Example:
    >>> import torch
    >>> a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0], [0.0]])          # r = 1, B = 0 (LoRA's start)
    >>> ga, gb = torch.zeros(1, 2), torch.tensor([[1.0], [2.0]])
    >>> estimated_weight_grad(a, b, ga, gb, scale=1.0).tolist()                     # G_B @ A
    [[1.0, 0.0], [2.0, 0.0]]
    >>> lora_importance(torch.tensor([[3.0, 1.0], [-1.0, 5.0]]), a, b, ga, gb, 1.0).tolist()
    [[3.0, 0.0], [2.0, 0.0]]
"""

from __future__ import annotations

import torch


def estimated_weight_grad(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """``s * (G_B A + B G_A - G_B G_A)`` in float32: ``a``/``grad_a`` are ``[r, in]``, ``b``/``grad_b``
    ``[out, r]``; returns ``[out, in]``."""
    a, b, ga, gb = (t.detach().float() for t in (a, b, grad_a, grad_b))
    if a.shape != ga.shape or b.shape != gb.shape or a.shape[0] != b.shape[1]:
        raise ValueError(f"LoRA shapes do not fit: A {tuple(a.shape)}, grad A {tuple(ga.shape)}, B {tuple(b.shape)}, "
                         f"grad B {tuple(gb.shape)}")
    return scale * (gb @ a + b @ ga - gb @ ga)


def lora_importance(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor,
                    grad_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``|G_hat ⊙ (W + s B A)|`` (float32, ``[out, in]``) of a frozen ``weight`` ``[out, in]`` and its LoRA pair."""
    g = estimated_weight_grad(a, b, grad_a, grad_b, scale)
    w = weight.detach().float().to(g.device) + scale * (b.detach().float() @ a.detach().float())
    return (g * w).abs_()
