"""N:M (2:4) decompress-in-register skinny GEMM: ``y = x @ W.T (+ bias)`` for 1-16 tokens.

Each program owns ``BLOCK_N`` output rows and ``BLOCK_B`` tokens. For every ``BLOCK_K`` slice of
the reduction it rebuilds the dense weight tile in registers from the packed values and the
``bits``-bit in-group indices (no dense weight ever touches memory), then multiplies with
``tl.dot`` in fp32 accumulation. Bytes read per weight: ``n/m * (itemsize + bits/8)``
(1.125 for 2:4 bf16 vs 2.0 dense).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_input, prepare_bias, use_fp32_dot


def index_bits(m: int) -> int:
    """Bits per stored index: ceil(log2 m) rounded up to 1, 2, 4 or 8 (matches hf_prune.formats)."""
    need = max(1, math.ceil(math.log2(m)))
    return next(b for b in (1, 2, 4, 8) if need <= b)


@triton.jit
def _nm_linear_kernel(
    x_ptr,
    v_ptr,
    i_ptr,
    b_ptr,
    y_ptr,
    B,
    N,
    K,
    stride_xb,
    stride_vn,
    stride_in,
    stride_yb,
    NN: tl.constexpr,
    MM: tl.constexpr,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    n_mask = rn < N
    b_mask = rb < B
    PER: tl.constexpr = 8 // BITS
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        mask2 = n_mask[:, None] & k_mask[None, :]
        grp = rk // MM
        pos = rk % MM
        w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for t in tl.static_range(NN):
            c = grp * NN + t  # compact column of the t-th kept entry of this group
            byte = tl.load(i_ptr + rn[:, None] * stride_in + (c // PER)[None, :], mask=mask2, other=0)
            idx = (byte.to(tl.int32) >> ((c % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
            val = tl.load(v_ptr + rn[:, None] * stride_vn + c[None, :], mask=mask2, other=0.0)
            w = tl.where(idx == pos[None, :], val.to(tl.float32), w)
        x = tl.load(
            x_ptr + rb[:, None] * stride_xb + rk[None, :], mask=b_mask[:, None] & k_mask[None, :], other=0.0
        )
        if FP32_DOT:  # fp32 inputs, or the CPU interpreter (its bf16 dot is unreliable)
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rb[:, None] * stride_yb + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=b_mask[:, None] & n_mask[None, :])


def nm_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    n: int,
    m: int,
    out_features: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """``x [tokens, in] -> [tokens, out]`` with an N:M weight given as packed ``values``/``indices``.

    Example (needs a GPU, or ``TRITON_INTERPRET=1`` on CPU):
        >>> y = nm_linear(x, values, indices, 2, 4, out_features, in_features)  # doctest: +SKIP
    """
    x = check_input(x, in_features)
    kept = in_features // m * n
    if in_features % m or values.shape != (out_features, kept):
        raise ValueError(f"values must be [{out_features}, {kept}] for {n}:{m} and in_features={in_features}")
    bits = index_bits(m)
    per = 8 // bits
    if indices.dtype != torch.uint8 or indices.shape != (out_features, (kept + per - 1) // per):
        raise ValueError(f"indices must be uint8 [{out_features}, {(kept + per - 1) // per}]")
    values = values.to(x.dtype).contiguous()
    indices = indices.contiguous()
    b = prepare_bias(bias, x, out_features)
    tokens = x.shape[0]
    y = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    block_b = 16  # tl.dot's minimum; masked rows cost nothing in memory traffic
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(tokens, block_b))
    _nm_linear_kernel[grid](
        x,
        values,
        indices,
        b,
        y,
        tokens,
        out_features,
        in_features,
        x.stride(0),
        values.stride(0),
        indices.stride(0),
        y.stride(0),
        NN=n,
        MM=m,
        BITS=bits,
        HAS_BIAS=bias is not None,
        FP32_DOT=use_fp32_dot(x),
        BLOCK_B=block_b,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return y
