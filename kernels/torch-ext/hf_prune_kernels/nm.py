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

from ._common import accumulate, check_input, output_tile, prepare_launch, store_output


def index_bits(m: int) -> int:
    """Bits per stored index: ceil(log2 m) rounded up to 1, 2, 4 or 8 (matches hf_prune.nn.packing)."""
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
    rn, rb, n_mask, b_mask = output_tile(B, N, BLOCK_B, BLOCK_N)
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
        acc = accumulate(acc, x_ptr, stride_xb, rb, rk, b_mask, k_mask, w, FP32_DOT)
    store_output(acc, b_ptr, y_ptr, stride_yb, rb, rn, b_mask, n_mask, HAS_BIAS)


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
    b, y, grid, meta = prepare_launch(x, bias, out_features, block_n, block_k)
    _nm_linear_kernel[grid](
        x,
        values,
        indices,
        b,
        y,
        x.shape[0],
        out_features,
        in_features,
        x.stride(0),
        values.stride(0),
        indices.stride(0),
        y.stride(0),
        NN=n,
        MM=m,
        BITS=bits,
        **meta,
    )
    return y
