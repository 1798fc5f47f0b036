"""A CPU sparse forward for `SparseLinear` under ``policy="kernel"``: the weight as a CSR matrix (int32 indices)
times the input, through torch's CPU sparse kernels (MKL where the wheel has it), and the measurement that
decides, per layer, whether it beats the dense ``F.linear`` at all.

Dense matmuls on CPU are very well tuned; a CSR product only wins when the weight is very sparse (about 90%
and up, measured in ``benchmarks/compressed_cpu.py``) and few tokens go through it (decode), where the dense
product is bound by reading the weight. So the choice is made by timing both on the layer itself, once, at load
(`faster_than_dense`), never assumed.

Example:
    >>> import torch
    >>> w = torch.randn(8, 16); w[torch.rand(8, 16) < 0.9] = 0
    >>> x = torch.randn(3, 16)
    >>> torch.allclose(csr_linear(x, to_csr(w), None), reference_linear(x, w, None), atol=1e-6)
    True
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["to_csr", "csr_linear", "reference_linear", "csr_nbytes", "faster_than_dense", "CSR_DTYPES"]

#: value dtypes the CPU CSR product runs natively (bf16/fp16 fall back to slow generic code in torch)
CSR_DTYPES = (torch.float32, torch.float64)


def to_csr(weight: torch.Tensor) -> torch.Tensor:
    """The ``[out, in]`` weight as a CSR tensor with int32 row/column indices (half the index bytes of int64).

    Example:
        >>> to_csr(torch.eye(3)).col_indices().dtype
        torch.int32
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = weight.detach().to_sparse_csr()
        return torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                       csr.values(), csr.shape, check_invariants=False)


def csr_linear(x2d: torch.Tensor, csr: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2d @ W.T + bias`` for a ``[tokens, in]`` input and a CSR ``W``; returns ``[tokens, out]``."""
    y = torch.sparse.mm(csr, x2d.t()).t()
    return y + bias if bias is not None else y


def reference_linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The dense ground truth `csr_linear` is tested against."""
    return F.linear(x2d, weight, bias)


def csr_nbytes(csr: torch.Tensor) -> int:
    """Bytes held by a CSR tensor (values + both index arrays)."""
    return sum(t.numel() * t.element_size() for t in (csr.values(), csr.crow_indices(), csr.col_indices()))


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def faster_than_dense(weight: torch.Tensor, csr: torch.Tensor, tokens: int, *, margin: float = 0.9,
                      reps: int = 15) -> tuple[bool, float]:
    """Time the CSR product against the dense ``F.linear`` on this layer for ``tokens`` input rows, interleaved
    (dense, csr, dense, csr, ...; median of ``reps`` each). Returns ``(csr_wins, csr_seconds / dense_seconds)``;
    the CSR product wins only when it takes at most ``margin`` of the dense time, so noise never flips a layer
    to a path that is merely even.

    Example:
        >>> w = torch.zeros(64, 64); w[0, 0] = 1.0
        >>> wins, ratio = faster_than_dense(w, to_csr(w), tokens=1, reps=3)
        >>> isinstance(wins, bool) and ratio > 0
        True
    """
    if csr.values().dtype not in CSR_DTYPES or weight.device.type != "cpu":
        return False, float("inf")
    x = torch.randn(tokens, weight.shape[1], dtype=weight.dtype)
    with torch.inference_mode():
        for _ in range(3):  # warm both paths (allocator, MKL handles)
            F.linear(x, weight)
            csr_linear(x, csr, None)
        dense_t, csr_t = [], []
        for _ in range(reps):
            dense_t.append(_seconds(lambda: F.linear(x, weight)))
            csr_t.append(_seconds(lambda: csr_linear(x, csr, None)))
    dense_t.sort()
    csr_t.sort()
    ratio = csr_t[reps // 2] / max(dense_t[reps // 2], 1e-12)
    return ratio <= margin, ratio
