"""Tiled-bitmask unstructured skinny GEMM: ``y = x @ W.T (+ bias)`` for 1-16 tokens.

The weight is a row-major bitmask (1 bit per weight, LSB first) plus the kept values in row-major
order. :func:`bitmask_tile_offsets` precomputes, once per weight, where each ``(row, k-tile)``
starts in ``values``; the kernel then decodes a ``[BLOCK_N, BLOCK_K]`` tile in registers (bit
test + in-tile prefix sum gives each kept weight's slot), gathers the values and multiplies with
``tl.dot``. Bytes read per weight: ``1/8 + density * itemsize`` (bf16 at 70 %: 0.725 vs 2.0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import accumulate, check_input, output_tile, prepare_launch, store_output

BITMASK_BLOCK_K = 64

_POPCOUNT = None


def bitmask_tile_offsets(bitmask: torch.Tensor, block_k: int = BITMASK_BLOCK_K) -> torch.Tensor:
    """int64 ``[out, ceil(in/block_k)]``: index in ``values`` of the first kept weight of each tile.

    Example:
        >>> bitmask_tile_offsets(torch.tensor([[255] * 8 + [1], [3] * 9], dtype=torch.uint8)).tolist()
        [[0, 64], [65, 81]]
    """
    global _POPCOUNT
    if block_k % 8:
        raise ValueError("block_k must be a multiple of 8")
    if _POPCOUNT is None:
        _POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
    rows, nbytes = bitmask.shape
    per_tile = block_k // 8
    pad = (-nbytes) % per_tile
    counts = _POPCOUNT.to(bitmask.device)[bitmask.long()]
    if pad:
        counts = torch.nn.functional.pad(counts, (0, pad))
    tiles = counts.reshape(rows, -1, per_tile).sum(-1).flatten()
    starts = torch.cumsum(tiles, 0) - tiles
    return starts.reshape(rows, -1).contiguous()


@triton.jit
def _bitmask_linear_kernel(
    x_ptr,
    m_ptr,
    v_ptr,
    t_ptr,
    b_ptr,
    y_ptr,
    B,
    N,
    K,
    stride_xb,
    stride_mn,
    stride_tn,
    stride_yb,
    HAS_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rn, rb, n_mask, b_mask = output_tile(B, N, BLOCK_B, BLOCK_N)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    n_tiles = tl.cdiv(K, BLOCK_K)
    for kt in range(0, n_tiles):
        rk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        mask2 = n_mask[:, None] & k_mask[None, :]
        byte = tl.load(m_ptr + rn[:, None] * stride_mn + (rk // 8)[None, :], mask=mask2, other=0)
        bit = (byte.to(tl.int32) >> (rk % 8)[None, :]) & 1
        slot = tl.cumsum(bit, axis=1) - bit  # exclusive prefix sum inside the tile
        base = tl.load(t_ptr + rn * stride_tn + kt, mask=n_mask, other=0)
        w = tl.load(v_ptr + base[:, None] + slot, mask=mask2 & (bit == 1), other=0.0)
        acc = accumulate(acc, x_ptr, stride_xb, rb, rk, b_mask, k_mask, w, FP32_DOT)
    store_output(acc, b_ptr, y_ptr, stride_yb, rb, rn, b_mask, n_mask, HAS_BIAS)


def bitmask_linear(
    x: torch.Tensor,
    bitmask: torch.Tensor,
    values: torch.Tensor,
    tile_offsets: torch.Tensor,
    out_features: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    block_n: int = 64,
    block_k: int = BITMASK_BLOCK_K,
) -> torch.Tensor:
    """``x [tokens, in] -> [tokens, out]`` with a bitmask-compressed weight.

    ``tile_offsets`` must come from :func:`bitmask_tile_offsets` with the same ``block_k``.

    Example (needs a GPU, or ``TRITON_INTERPRET=1`` on CPU):
        >>> y = bitmask_linear(x, bitmask, values, bitmask_tile_offsets(bitmask), out_f, in_f)  # doctest: +SKIP
    """
    x = check_input(x, in_features)
    nbytes = (in_features + 7) // 8
    if bitmask.dtype != torch.uint8 or bitmask.shape != (out_features, nbytes):
        raise ValueError(f"bitmask must be uint8 [{out_features}, {nbytes}]")
    n_tiles = triton.cdiv(in_features, block_k)
    if tile_offsets.shape != (out_features, n_tiles):
        raise ValueError(
            f"tile_offsets must be [{out_features}, {n_tiles}] (computed with block_k={block_k})"
        )
    values = values.to(x.dtype).contiguous()
    b, y, grid, meta = prepare_launch(x, bias, out_features, block_n, block_k)
    _bitmask_linear_kernel[grid](
        x,
        bitmask.contiguous(),
        values,
        tile_offsets.contiguous(),
        b,
        y,
        x.shape[0],
        out_features,
        in_features,
        x.stride(0),
        bitmask.stride(0),
        tile_offsets.stride(0),
        y.stride(0),
        **meta,
    )
    return y
