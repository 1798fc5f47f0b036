"""Shared helpers of the hf_prune sparse kernels (pure torch, no Triton)."""

from __future__ import annotations

import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_input(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """Validate a ``[tokens, in_features]`` activation and return it contiguous."""
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"expected x of shape [tokens, {in_features}], got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype}; kernels take float16, bfloat16 or float32")
    return x.contiguous()


def prepare_bias(bias: torch.Tensor | None, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """Bias as a contiguous tensor of x's dtype (a 1-element dummy when absent)."""
    if bias is None:
        return torch.empty(1, dtype=x.dtype, device=x.device)
    if bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    return bias.to(dtype=x.dtype, device=x.device).contiguous()


def use_fp32_dot(x: torch.Tensor) -> bool:
    """fp32 dot (ieee) for fp32 inputs and under ``TRITON_INTERPRET=1`` (whose bf16 dot is wrong)."""
    return x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
