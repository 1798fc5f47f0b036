"""Least-squares refit of an output projection after width pruning (pure tensor math, no modules or hooks).

After a width method has chosen the kept input channels ``K`` of an output projection (``o_proj``: kept heads x
head_dim; ``down_proj`` / ``fc2`` / ``c_proj`` / ``dense_4h_to_h``: kept MLP channels), the projection's weight
on those columns is refit, together with an intercept, so the pruned layer reproduces the *dense* layer's
output on the calibration inputs ``X`` ``[tokens, in]``:

    minimize over W', b:   E || x_K^T W'^T + b - x^T W^T ||^2  +  lam * || W' - W_K ||^2

Writing ``W' = W_K + D`` (``P``: the pruned channels), the normal equations use only the second moments
``H = E[x x^T]`` and ``mu = E[x]``::

    [[H_KK + lam I, mu_K], [mu_K^T, 1]] [D^T; b] = [H_KP W_P^T; mu_P^T W_P^T]

solved by Cholesky in float64. ``lam = dampening * mean(diag H_KK)`` is a ridge *towards the original kept
weights*: as it grows the refit tends to ``W' = W_K`` with ``b = W_P mu_P``, which is exactly FLAP's bias
compensation, and with ``lam -> 0`` (and no intercept) it is the OBS update ``W'_K = W_K + W_P H_PK H_KK^-1``.
So the intercept replaces bias compensation; ``b`` is *added* to the projection's existing bias, like
`hf_prune.structure.plan.LayerPlan.attn_bias` / ``mlp_bias``.

Example:
    >>> import torch
    >>> from hf_prune.structure.reconstruct import SecondMoments, refit_projection
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(256, 6) + 1.0
    >>> X[:, 5] = 0.5 * X[:, 0] - X[:, 1] + 2.0          # channel 5 is predictable from 0, 1 and a constant
    >>> W = torch.randn(3, 6)
    >>> m = SecondMoments(6)
    >>> m.add(X[:100]); m.add(X[100:])
    >>> W2, b, _ = refit_projection(W, m.hessian, m.mean, [0, 1, 2, 3, 4], dampening=1e-9)
    >>> W2.shape, b.shape
    (torch.Size([3, 5]), torch.Size([3]))
    >>> bool(torch.allclose(X[:, :5] @ W2.T + b, X @ W.T, atol=1e-4))   # the removed channel is absorbed
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ..errors import NumericalError


def _rows(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch ``[..., features]`` as float32 rows ``[tokens, features]`` on ``device``."""
    return x.detach().reshape(-1, x.shape[-1]).to(device, torch.float32)


class SecondMoments:
    """Running ``sum x x^T``, ``sum x`` and token count of one layer's inputs (float64 accumulators).

    Each batch's ``X^T X`` is computed in float32 (fast) and folded into the float64 sum, so rounding does not
    grow with the number of batches. Memory: one ``[in, in]`` float64 matrix.
    """

    def __init__(self, features: int, device: torch.device | str | None = None) -> None:
        self.n = 0
        self.xx = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.x = torch.zeros(features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Fold a batch ``[..., features]`` into the sums."""
        x = _rows(x, self.xx.device)
        if x.shape[0] == 0:
            return
        self.xx += (x.t() @ x).double()
        self.x += x.sum(0, dtype=torch.float64)
        self.n += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """``E[x x^T]`` (float64, ``[in, in]``)."""
        return self.xx / max(self.n, 1)

    @property
    def mean(self) -> torch.Tensor:
        """``E[x]`` (float64, ``[in]``)."""
        return self.x / max(self.n, 1)


class PairedMoments(SecondMoments):
    """`SecondMoments` of the *pruned* model's layer input ``x~`` plus, over the same tokens, the cross moment
    ``sum x~ x^T`` with the *dense* model's input ``x`` and ``sum x`` (float64 accumulators).

    For the sequential refit: the pruned layer sees ``x~`` (upstream blocks already pruned and refit) but must
    reproduce the dense layer's output ``W x``. Memory: two ``[in, in]`` float64 matrices.
    """

    def __init__(self, features: int, device: torch.device | str | None = None) -> None:
        super().__init__(features, device)
        self.xd = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.d = torch.zeros(features, dtype=torch.float64, device=device)

    def add_pair(self, pruned: torch.Tensor, dense: torch.Tensor) -> None:
        """Fold paired batches ``[..., features]`` (same tokens, same order) into the sums."""
        p, d = _rows(pruned, self.xx.device), _rows(dense, self.xx.device)
        if p.shape != d.shape:
            raise ValueError(f"paired inputs differ in shape: {tuple(p.shape)} vs {tuple(d.shape)}")
        self.add(p)
        self.xd += (p.t() @ d).double()
        self.d += d.sum(0, dtype=torch.float64)

    @property
    def cross(self) -> torch.Tensor:
        """``E[x~ x^T]`` (float64, ``[in, in]``)."""
        return self.xd / max(self.n, 1)

    @property
    def dense_mean(self) -> torch.Tensor:
        """``E[x]`` of the dense input (float64, ``[in]``)."""
        return self.d / max(self.n, 1)


def refit_projection(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    mean: torch.Tensor,
    keep: Sequence[int] | torch.Tensor,
    dampening: float = 0.01,
    max_retries: int = 3,
    name: str = "layer",
    cross: torch.Tensor | None = None,
    dense_mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Refit ``weight`` ``[out, in]`` on its kept input columns ``keep`` with an intercept (see the module doc).

    Args:
        weight: the dense ``[out, in]`` weight (any float dtype).
        hessian: ``E[x x^T]`` of the layer's calibration inputs, ``[in, in]``.
        mean: ``E[x]``, ``[in]``.
        keep: original indices of the kept input columns (may be empty: then only the intercept is fit).
        dampening: ridge towards the original kept weights, relative to ``mean(diag H_KK)``; on a failed
            Cholesky it is retried with 10x more, at most ``max_retries`` times (a warning says so).
        name: used in warnings and errors.
        cross, dense_mean: sequential refit (`PairedMoments`): ``hessian``/``mean`` are then the pruned model's
            input moments ``E[x~ x~^T]``/``E[x~]``, ``cross`` is ``E[x~ x^T]`` and ``dense_mean`` ``E[x]``; the
            target stays the dense output ``W x``. The right-hand side becomes
            ``[C_K W^T - H~_KK W_K^T; mu^T W^T - mu~_K^T W_K^T]``, which is the one above when ``x~ = x``.

    Runs on ``hessian``'s device. Returns ``(new_weight [out, len(keep)], bias [out], dampening_used)``, float32;
    ``bias`` is to be *added* to the layer's existing bias. Raises `NumericalError` if the statistics are not
    finite or the Cholesky factorisation fails even after the retries.
    """
    device = hessian.device
    w = weight.detach().to(device, torch.float64)
    h = hessian.detach().to(device, torch.float64)
    mu = mean.detach().to(device, torch.float64)
    n_in = w.shape[1]
    if h.shape != (n_in, n_in) or mu.shape != (n_in,):
        raise ValueError(f"{name}: hessian {tuple(h.shape)} / mean {tuple(mu.shape)} do not match the weight's "
                         f"{n_in} input channels")
    if not (bool(torch.isfinite(h).all()) and bool(torch.isfinite(mu).all())):
        raise NumericalError(f"{name}: NaN/Inf in the calibration second moments of this layer's input; check the "
                             "calibration data or load the model in float32/bfloat16")
    k_idx = torch.as_tensor(keep, dtype=torch.long, device=device).reshape(-1)
    mask = torch.ones(n_in, dtype=torch.bool, device=device)
    mask[k_idx] = False
    p_idx = mask.nonzero().reshape(-1)
    k = k_idx.numel()
    if (cross is None) != (dense_mean is None):
        raise ValueError(f"{name}: cross and dense_mean go together (a sequential refit needs both)")
    if cross is None:
        w_p = w.index_select(1, p_idx)
        # Right-hand side [k + 1, out]: [H_KP W_P^T; mu_P^T W_P^T].
        rhs = torch.cat([h.index_select(0, k_idx).index_select(1, p_idx) @ w_p.t(),
                         (mu.index_select(0, p_idx) @ w_p.t()).unsqueeze(0)], 0)
    else:
        c = cross.detach().to(device, torch.float64)
        mu_d = dense_mean.detach().to(device, torch.float64)  # type: ignore[union-attr]
        if c.shape != (n_in, n_in) or mu_d.shape != (n_in,):
            raise ValueError(f"{name}: cross {tuple(c.shape)} / dense_mean {tuple(mu_d.shape)} do not match the "
                             f"weight's {n_in} input channels")
        if not (bool(torch.isfinite(c).all()) and bool(torch.isfinite(mu_d).all())):
            raise NumericalError(f"{name}: NaN/Inf in the paired calibration moments of this layer's input")
        w_k = w.index_select(1, k_idx)
        rhs = torch.cat([c.index_select(0, k_idx) @ w.t() - h.index_select(0, k_idx).index_select(1, k_idx) @ w_k.t(),
                         (mu_d @ w.t() - mu.index_select(0, k_idx) @ w_k.t()).unsqueeze(0)], 0)
    g = torch.empty(k + 1, k + 1, dtype=torch.float64, device=device)
    h_kk = h.index_select(0, k_idx).index_select(1, k_idx)
    g[:k, :k] = h_kk
    g[:k, k] = g[k, :k] = mu.index_select(0, k_idx)
    g[k, k] = 1.0
    scale = float(torch.diagonal(h_kk).mean()) if k else 0.0
    if not scale > 0:
        scale = 1.0
    damp = float(dampening)
    for attempt in range(max_retries + 1):
        a = g.clone()
        a.diagonal()[:k] += damp * scale
        factor, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            z = torch.cholesky_solve(rhs, factor)
            if bool(torch.isfinite(z).all()):
                if attempt:
                    warnings.warn(f"{name}: reconstruction Cholesky failed with dampening={dampening}; succeeded "
                                  f"with dampening={damp:g}", stacklevel=2)
                new_w = w.index_select(1, k_idx) + z[:k].t()
                return new_w.float(), z[k].float(), damp
        damp *= 10
    raise NumericalError(
        f"{name}: Cholesky factorisation of the reconstruction system failed even with dampening={damp / 10:g} "
        f"(started at {dampening}, {max_retries} retries). The calibration inputs of this layer are degenerate: "
        "use more or more varied calibration samples, raise PruningConfig.dampening, or set reconstruct=False"
    )
