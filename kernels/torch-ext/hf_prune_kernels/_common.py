"""Shared pieces of the hf_prune sparse kernels: host-side input checks (pure torch) and the ``@triton.jit``
helpers that both skinny GEMMs (``nm.py``, ``bitmask.py``) run around their own weight decode: the output
tile of a program (`output_tile`), one ``x @ w.T`` step of the reduction (`accumulate`) and the epilogue
(bias add, cast to the output dtype, masked store; `store_output`). `prepare_launch` is the host side of the
same: bias, output buffer, grid and the constexpr arguments both kernels take."""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_B = 16  # tokens per program: tl.dot's minimum; masked rows cost nothing in memory traffic


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


def prepare_launch(
    x: torch.Tensor, bias: torch.Tensor | None, out_features: int, block_n: int, block_k: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], dict[str, Any]]:
    """``(bias, y, grid, meta)`` for a launch: the bias from `prepare_bias`, the empty ``[tokens, out]``
    output, the grid (output-row blocks x token blocks, as `output_tile` reads it) and the constexpr
    arguments both kernels take (``HAS_BIAS``, ``FP32_DOT``, ``BLOCK_B``, ``BLOCK_N``, ``BLOCK_K``)."""
    tokens = x.shape[0]
    y = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(tokens, BLOCK_B))
    meta = {
        "HAS_BIAS": bias is not None,
        "FP32_DOT": use_fp32_dot(x),
        "BLOCK_B": BLOCK_B,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
    }
    return prepare_bias(bias, x, out_features), y, grid, meta


@triton.jit
def output_tile(B, N, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's output rows ``rn`` (grid axis 0) and tokens ``rb`` (axis 1), with their bounds masks."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    return rn, rb, rn < N, rb < B


@triton.jit
def accumulate(acc, x_ptr, stride_xb, rb, rk, b_mask, k_mask, w, FP32_DOT: tl.constexpr):
    """``acc += x[rb, rk] @ w.T`` for a decoded ``[BLOCK_N, BLOCK_K]`` weight tile ``w``; fp32 accumulation."""
    x = tl.load(
        x_ptr + rb[:, None] * stride_xb + rk[None, :], mask=b_mask[:, None] & k_mask[None, :], other=0.0
    )
    if FP32_DOT:  # fp32 inputs, or the CPU interpreter (its bf16 dot is unreliable)
        acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    return acc


@triton.jit
def store_output(acc, b_ptr, y_ptr, stride_yb, rb, rn, b_mask, n_mask, HAS_BIAS: tl.constexpr):
    """Epilogue: add the bias (fp32), cast to ``y``'s dtype and store the ``[BLOCK_B, BLOCK_N]`` tile."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rb[:, None] * stride_yb + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=b_mask[:, None] & n_mask[None, :])
