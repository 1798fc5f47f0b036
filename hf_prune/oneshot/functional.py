"""Pure tensor math of the one-shot methods. No modules, hooks or I/O: tensors in, tensors out.

All math runs in float32 (Hessians, norms, Cholesky), whatever the model's dtype.

Example:
    >>> import torch
    >>> from hf_prune.oneshot.functional import sparsegpt_prune
    >>> _ = torch.manual_seed(0); W = torch.randn(8, 16); X = torch.randn(64, 16)
    >>> H = 2 * X.T @ X / 64
    >>> W2, keep, _ = sparsegpt_prune(W, H, 0.5, nm=(2, 4))
    >>> int((W2 == 0).sum()), keep.shape
    (64, torch.Size([8, 16]))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from ..core.masks import mask_from_scores
from ..errors import NumericalError

T = TypeVar("T")


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|."""
    return weight.abs()


def wanda_scores(weight: torch.Tensor, sum_sq: torch.Tensor) -> torch.Tensor:
    """Wanda: ``S_ij = |W_ij| * ||X_j||_2`` with ``sum_sq[j] = sum over tokens of x_j^2``."""
    return weight.abs() * sum_sq.clamp_min(0).sqrt().unsqueeze(0)


def prune_by_scores(
    weight: torch.Tensor, scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, group: str = "row"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the lowest-scoring weights. Returns ``(new_weight, keep_mask)``."""
    keep = mask_from_scores(scores, sparsity, nm, group)
    return weight * keep, keep


def finalize_hessian(hessian_sum: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``H = 2/n * sum x x^T`` (SparseGPT's normalisation)."""
    return hessian_sum * (2.0 / max(n_tokens, 1))


def layer_problem(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | Sequence[float],
    row_segments: Sequence[tuple[int, int]] | None,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], list[float]]:
    """The float32 working copies of a layer-wise reconstruction problem (SparseGPT, ADMM): ``(W, H, segments,
    sparsities)``, one sparsity per row segment, and inputs that never fired (zero Hessian diagonal) made inert:
    their weight column zeroed, their diagonal set to 1.

    Example:
        >>> W, H, seg, sp = layer_problem(torch.ones(2, 3), torch.diag(torch.tensor([1.0, 0.0, 2.0])), 0.5, None)
        >>> W[:, 1].tolist(), float(H[1, 1]), seg, sp
        ([0.0, 0.0], 1.0, [(0, 2)], [0.5])
    """
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float32).clone()
    segments = list(row_segments) if row_segments else [(0, W.shape[0])]
    sparsities = [float(sparsity)] * len(segments) if isinstance(sparsity, (int, float)) else list(sparsity)
    if len(sparsities) != len(segments):
        raise ValueError("one sparsity per row segment is required")
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, segments, sparsities


def with_dampening(
    hessian: torch.Tensor,
    factorise: Callable[[torch.Tensor], T | None],
    dampening: float = 0.01,
    max_retries: int = 3,
    name: str = "layer",
) -> tuple[T, float]:
    """``factorise(H + damp * mean(diag H) * I)``, which returns its result or ``None`` when the damped matrix is
    not usable; on ``None`` retried with 10x more dampening, at most ``max_retries`` times (a warning says so), then
    `NumericalError`. Returns ``(result, dampening_used)``. The one dampening loop of SparseGPT and ADMM.

    Example:
        >>> h = torch.eye(3); h[0, 0] = -0.01
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     _, damp = with_dampening(h, lambda a: a if int(torch.linalg.cholesky_ex(a)[1]) == 0 else None)
        >>> damp
        0.1
    """
    mean_diag = torch.diagonal(hessian).mean()
    damp = dampening
    for attempt in range(max_retries + 1):
        h = hessian.clone()
        h.diagonal().add_(damp * mean_diag)
        result = factorise(h)
        if result is not None:
            if attempt:
                warnings.warn(f"{name}: Cholesky failed with dampening={dampening}; succeeded with dampening={damp:g}",
                              stacklevel=2)
            return result, damp
        damp *= 10
    raise NumericalError(
        f"{name}: Cholesky factorisation of the damped Hessian failed even with dampening={damp / 10:g} "
        f"(started at {dampening}, {max_retries} retries). The calibration inputs of this layer are degenerate: "
        "use more or more varied calibration samples, raise PruningConfig.dampening, or exclude the layer "
        "with ignore=[...]"
    )


def _upper_inverse_factor(h: torch.Tensor) -> torch.Tensor | None:
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info):
        return None
    upper, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
    return upper if int(info2) == 0 and bool(torch.isfinite(upper).all()) else None


def _positive_definite(h: torch.Tensor) -> torch.Tensor | None:
    _, info = torch.linalg.cholesky_ex(h)
    return h if int(info) == 0 and bool(torch.isfinite(h).all()) else None


def damped_inverse_cholesky(
    hessian: torch.Tensor, dampening: float = 0.01, max_retries: int = 3, name: str = "layer"
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (`with_dampening`: retried with more
    dampening on failure). Returns ``(U, dampening_used)``."""
    return with_dampening(hessian, _upper_inverse_factor, dampening, max_retries, name)


def damped_hessian(
    hessian: torch.Tensor, dampening: float = 0.01, max_retries: int = 3, name: str = "layer"
) -> tuple[torch.Tensor, float]:
    """``H + damp * mean(diag H) * I``, checked positive definite by a Cholesky factorisation (`with_dampening`:
    retried with more dampening on failure). Returns ``(H_d, dampening_used)``."""
    return with_dampening(hessian, _positive_definite, dampening, max_retries, name)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | Sequence[float],
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    max_retries: int = 3,
    row_segments: Sequence[tuple[int, int]] | None = None,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """SparseGPT (Frantar & Alistarh, 2023): prune and update the remaining weights via OBS.

    Args:
        weight: ``[out, in]``; cast to float32.
        hessian: ``[in, in]`` float32, ``2/n sum x x^T``.
        sparsity: target per row segment (one value for all rows, or one per ``row_segments`` entry).
        nm: ``(N, M)``: keep N of every M consecutive inputs per row; ``None`` for unstructured.
        row_segments: row ranges that are separate matrices stacked because they share one input
            (q/k/v, gate/up): unstructured thresholds are taken per segment, so stacking changes nothing but speed.

    Returns ``(new_weight, keep_mask, dampening_used)``.
    """
    W, H, segments, sparsities = layer_problem(weight, hessian, sparsity, row_segments)
    rows, cols = W.shape
    U, damp = damped_inverse_cholesky(H, dampening, max_retries, name)
    del H

    if nm is not None:
        n_keep, m = nm
        blocksize = max(m, blocksize - blocksize % m)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        # Work on the transposed block so that column i is a contiguous row: W1t[i] = W[:, i1 + i].
        W1t = W[:, i1:i2].t().contiguous()
        Err1t = torch.zeros_like(W1t)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        mask1t = torch.zeros_like(W1t, dtype=torch.bool)
        if nm is None:
            tmp = W1t.square() / d.square().unsqueeze(1)
            for (r0, r1), s in zip(segments, sparsities):
                seg = tmp[:, r0:r1].t().flatten()  # row-major over [rows, count]: same order as the reference
                k = int(seg.numel() * s)
                if k:
                    idx = torch.topk(seg, k, largest=False).indices
                    flat = torch.zeros(seg.numel(), dtype=torch.bool, device=W.device)
                    mask1t[:, r0:r1] = flat.scatter_(0, idx, True).view(r1 - r0, count).t()
        # err_i = (w_i - q_i) / d_i = w_i * [pruned] / d_i; the rank-1 update also turns column i into q_i.
        coef = mask1t.to(W1t.dtype) / d.unsqueeze(1)
        for i in range(count):
            if nm is not None and i % m == 0:
                tmp = W1t[i : i + m].square() / d[i : i + m].square().unsqueeze(1)
                idx = torch.topk(tmp, m - n_keep, dim=0, largest=False).indices
                mask1t[i : i + m].scatter_(0, idx, True)
                coef[i : i + m] = mask1t[i : i + m].to(W1t.dtype) / d[i : i + m].unsqueeze(1)
            err = torch.mul(W1t[i], coef[i], out=Err1t[i])
            W1t[i:].addr_(U1[i, i:], err, alpha=-1.0)
        W[:, i1:i2] = W1t.t()
        pruned[:, i1:i2] = mask1t.t()
        if i2 < cols:
            W[:, i2:] -= Err1t.t() @ U[i1:i2, i2:]
    W[pruned] = 0.0
    return W, ~pruned, damp
