"""ADMM weight update with gradual mask selection (Boža, 2024, "Fast and Optimal Weight Update for Pruned Large
Language Models", arXiv 2401.02938).

For each output row ``w`` of a layer with dense weights ``w0`` and input Hessian ``H = 2/n X^T X`` the method
solves the layer-wise reconstruction problem

    min_w  (w - w0) H_d (w - w0)^T   subject to  w_j = 0 outside the row's mask,      H_d = H + damp * mean(diag H) I

(``(w - w0) H (w - w0)^T = 2/n ||X w0^T - X w^T||^2``; the dampening term is SparseGPT's, a small ridge towards
the dense weights; the paper's code instead damps by 0.1 after normalising, i.e. ``H + 0.1 diag(H)``). Everything
runs in the coordinates where ``diag(H_d) = 1`` (inputs scaled by their norms, ``Wn = W D^1/2``,
``Hn = D^-1/2 H_d D^-1/2`` with ``D = diag(H_d)``), where ``|Wn|`` is Wanda's score ``|w_ij| ||x_j||`` (up to the
dampening) and one ``rho`` suits every layer. ADMM splits ``w = z`` (``z`` carries the mask) and iterates, with
``U`` the scaled dual:

    Z <- P_mask(W + U)                       (keep the mask's entries, zero the rest)
    U <- U + W - Z
    W <- (Wn Hn + rho (Z - U)) (Hn + rho I)^-1

``(Hn + rho I)^-1`` is computed once (one Cholesky factorisation) and every iteration is one matrix product.

Gradual mask selection (the paper's): during the first ``prune_iterations`` iterations the mask is re-chosen from
the current point ``W + U`` with the target raised on a cubic schedule ``s_t = s (1 - (1 - (t+1)/k)^3)``: the
Euclidean projection onto "sparsity s_t" in these coordinates keeps the largest ``|W + U|`` (Wanda's score of the
current iterate), per output row (``group="row"``) or per matrix (``"layer"``, as the paper's code). For N:M the
N largest of every M are protected and the others are pruned gradually; the last selection is exactly N:M. Then
the mask stays fixed.

Final weights: ``final="projected"`` (default, the paper's code) returns the ADMM iterate projected onto the
mask, ``Z = P_mask(W + U)``; after the fixed-mask iterations its error is within 2% (mostly 0.3%) of the
optimum's for the same mask (measured on SmolLM2 layers). ``final="solve"`` returns the exact minimiser for the
final mask: per row, the kept weights solve ``Hn[K, K] w_K = (Wn Hn)_K`` (batched Cholesky over rows,
``out * k^3 / 3`` flops: slow on CPU). With a fixed external mask (``mask=...``) there is no selection:
``"projected"`` runs the ADMM iterations, which converge to the optimum for that mask; ``"solve"`` computes it
directly.

Example (the update reconstructs the layer's output better than masking alone):
    >>> import torch
    >>> from hf_prune.oneshot.admm import admm_prune
    >>> _ = torch.manual_seed(0); W = torch.randn(8, 16); X = torch.randn(256, 16) @ torch.randn(16, 16)
    >>> H = 2 * X.T @ X / 256
    >>> W2, keep, _ = admm_prune(W, H, 0.5, dampening=1e-6)
    >>> int((W2 == 0).sum()), torch.equal(W2 != 0, keep)
    (64, True)
    >>> err = lambda V: float((X @ (W - V).T).square().sum())
    >>> err(W2) < err(W * keep)
    True
    >>> import hf_prune
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> report = model.prune(hf_prune.PruningConfig(method="admm", structure="2:4"),
    ...                      calibration=torch.randint(0, 100, (4, 16)), verbose=False, show_progress=False)
    >>> round(report.achieved_sparsity, 2)
    0.5
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import PruningConfig, non_negative_int, option, positive
from ..core.masks import check_nm_shape, mask_from_scores, nm_mask, unstructured_mask
from ..core.stats import InputStats
from ..errors import ConfigError, NumericalError
from ..registry import get_method, register_method
from .base import PruningMethod, ScoreMethod
from .functional import damped_hessian, layer_problem, sparsegpt_prune
from .options import RankGroupOptions, SparseGPTOptions
from .ria import RIAOptions
from .sparsegpt import group_hessian, stack_group

#: where the mask comes from: ADMM's own gradual selection, or another one-shot method's (then fixed)
MASK_SOURCES = ("admm", "wanda", "ria", "magnitude", "sparsegpt")
#: how the final weights are obtained from the last ADMM state
FINALS = ("projected", "solve")
GROUPS = ("row", "layer")

#: float32 entries of the batched ``[rows, k, k]`` systems `masked_least_squares` factorises at once (64 MiB;
#: the batch's temporaries take about three times that)
SOLVE_CHUNK_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------------------------------ pure math
def cubic_sparsity(step: int, steps: int, target: float) -> float:
    """The sparsity of selection ``step`` (0-based) of ``steps``: ``target (1 - (1 - (step+1)/steps)^3)``; the last
    step reaches ``target`` exactly.

    >>> [round(cubic_sparsity(t, 4, 0.5), 4) for t in range(4)]
    [0.2891, 0.4375, 0.4922, 0.5]
    """
    if steps <= 0 or step >= steps - 1:
        return float(target)
    return float(target) * (1.0 - (1.0 - (step + 1) / steps) ** 3)


def masked_least_squares(
    weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, name: str = "layer"
) -> torch.Tensor:
    """Per row ``r``: ``argmin_w (w - weight[r]) H (w - weight[r])^T`` with ``w_j = 0`` where ``keep[r, j]`` is
    False. The kept entries solve ``H[K, K] w_K = (weight[r] H)_K``; rows are solved in batches (padded with
    identity rows where their kept counts differ). ``hessian`` must be positive definite.

    >>> H = torch.tensor([[2., 1.], [1., 2.]]); w = torch.tensor([[1., 1.]])
    >>> [round(v, 4) for v in masked_least_squares(w, H, torch.tensor([[True, False]]))[0].tolist()]  # (2 w0 + w1) / 2
    [1.5, 0.0]
    """
    rows, cols = weight.shape
    out = torch.zeros_like(weight)
    rhs = weight @ hessian
    counts = keep.sum(1)
    order = torch.argsort(counts, stable=True)  # similar counts share a batch: little padding
    sorted_counts = counts[order].tolist()
    chunk = max(1, SOLVE_CHUNK_ELEMENTS // max(int(sorted_counts[-1]), 1) ** 2) if rows else 1
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        k = max(int(sorted_counts[stop - 1]), 1)
        idx_rows = order[start:stop]
        sub_keep = keep[idx_rows]
        # kept columns first (ascending), then pruned ones as padding
        cols_idx = torch.sort((~sub_keep).to(torch.uint8), dim=1, stable=True).indices[:, :k]
        valid = torch.arange(k, device=weight.device).unsqueeze(0) < counts[idx_rows].unsqueeze(1)
        a = hessian[cols_idx.unsqueeze(2), cols_idx.unsqueeze(1)]
        pair = valid.unsqueeze(2) & valid.unsqueeze(1)
        a = torch.where(pair, a, torch.zeros((), dtype=a.dtype, device=a.device))
        a.diagonal(dim1=1, dim2=2).add_((~valid).to(a.dtype))
        b = torch.where(valid, rhs[idx_rows].gather(1, cols_idx), torch.zeros((), dtype=a.dtype, device=a.device))
        factor, info = torch.linalg.cholesky_ex(a)
        if bool((info != 0).any()):
            raise NumericalError(f"{name}: the masked least-squares system is not positive definite; raise "
                                 "PruningConfig.dampening or exclude the layer with ignore=[...]")
        x = torch.cholesky_solve(b.unsqueeze(2), factor).squeeze(2)
        out[idx_rows] = torch.zeros(len(idx_rows), cols, dtype=out.dtype, device=out.device).scatter_(
            1, cols_idx, torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)))
    return out


def _select(
    point: torch.Tensor,
    fraction: float,
    sparsities: Sequence[float],
    segments: Sequence[tuple[int, int]],
    nm: tuple[int, int] | None,
    group: str,
) -> torch.Tensor:
    """The keep-mask of one selection step: the largest ``|point|`` with ``fraction`` of each segment's target
    pruned (``fraction = 1``: the final mask; N:M is exact then, before it the N:M winners are protected)."""
    scores = point.abs()
    keep = torch.ones_like(point, dtype=torch.bool)
    for (r0, r1), target in zip(segments, sparsities):
        seg = scores[r0:r1]
        if nm is not None:
            winners = nm_mask(seg, *nm)
            if fraction >= 1.0:
                keep[r0:r1] = winners
            else:
                protected = seg.masked_fill(winners, float("inf"))
                keep[r0:r1] = unstructured_mask(protected, fraction * (1.0 - nm[0] / nm[1]), group)
        else:
            keep[r0:r1] = unstructured_mask(seg, fraction * float(target), group)
    return keep


def admm_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | Sequence[float],
    nm: tuple[int, int] | None = None,
    mask: torch.Tensor | None = None,
    iterations: int = 20,
    prune_iterations: int = 15,
    rho: float = 1.0,
    dampening: float = 0.01,
    max_retries: int = 3,
    group: str = "layer",
    final: str = "projected",
    row_segments: Sequence[tuple[int, int]] | None = None,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ADMM pruning (Boža, 2024): gradual mask selection plus the optimal weight update (see the module text).

    Args:
        weight: ``[out, in]``; cast to float32.
        hessian: ``[in, in]``, ``2/n sum x x^T`` (SparseGPT's statistics).
        sparsity: target per row segment (one value, or one per ``row_segments`` entry); ignored for N:M and with
            ``mask``.
        nm: ``(N, M)``: keep N of every M consecutive inputs per row; ``None`` for unstructured.
        mask: a fixed keep-mask ``[out, in]`` (True = keep) from another method: no selection, only the update.
        iterations: ADMM iterations (paper: 20); with ``mask`` and ``final="solve"`` none are needed.
        prune_iterations: the first iterations, in which the mask is re-selected on the cubic schedule (paper: 15).
        rho: ADMM penalty in the normalised coordinates (``diag Hn = 1``; paper: 1).
        dampening: relative dampening, a fraction of the mean Hessian diagonal (SparseGPT's).
        group: unstructured comparison group, ``"layer"`` (per row segment) or ``"row"``.
        final: ``"projected"``: ``P_mask(W + U)`` (paper); ``"solve"``: exact masked least squares.
        row_segments: row ranges of matrices stacked because they share one input (q/k/v, gate/up): thresholds
            and sparsities are per segment.

    Returns ``(new_weight, keep_mask, dampening_used)``; ``new_weight`` is zero exactly outside ``keep_mask``.

    Example (a fixed mask: the exact solve, and many ADMM iterations reaching it):
        >>> import torch
        >>> _ = torch.manual_seed(0); W = torch.randn(4, 8); X = torch.randn(64, 8); H = 2 * X.T @ X / 64
        >>> keep = torch.rand(4, 8) > 0.5
        >>> exact, _, _ = admm_prune(W, H, 0.5, mask=keep, final="solve")
        >>> iterated, _, _ = admm_prune(W, H, 0.5, mask=keep, iterations=300, final="projected")
        >>> torch.allclose(exact, iterated, atol=1e-4)
        True
    """
    if group not in GROUPS:
        raise ValueError(f"group={group!r}; allowed: {list(GROUPS)}")
    if final not in FINALS:
        raise ValueError(f"final={final!r}; allowed: {list(FINALS)}")
    if not (isinstance(iterations, int) and iterations >= 0):
        raise ValueError(f"iterations={iterations!r} must be an integer >= 0")
    if not (isinstance(prune_iterations, int) and 0 <= prune_iterations):
        raise ValueError(f"prune_iterations={prune_iterations!r} must be an integer >= 0")
    if mask is None and prune_iterations > iterations:
        raise ValueError(f"prune_iterations={prune_iterations} exceeds iterations={iterations}")
    if not rho > 0:
        raise ValueError(f"rho={rho!r} must be > 0")
    W0, H, segments, sparsities = layer_problem(weight, hessian, sparsity, row_segments)
    rows, cols = W0.shape
    if nm is not None:
        check_nm_shape(cols, nm[1], name)
    if mask is not None and tuple(mask.shape) != (rows, cols):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, the weight {(rows, cols)}")
    Hd, damp = damped_hessian(H, dampening, max_retries, name)
    del H
    scale = torch.diagonal(Hd).sqrt()
    Hn = Hd / scale.unsqueeze(0) / scale.unsqueeze(1)
    del Hd
    Wn = W0 * scale.unsqueeze(0)

    keep = mask.to(device=W0.device, dtype=torch.bool) if mask is not None else None
    if keep is not None and final == "solve":
        iterations = 0  # the exact solve needs no iterate
    if keep is None and (prune_iterations == 0 or iterations == 0):
        keep = _select(Wn, 1.0, sparsities, segments, nm, group)

    W, U = Wn, torch.zeros_like(Wn)
    if iterations:
        A = Hn.clone()
        A.diagonal().add_(rho)
        factor, info = torch.linalg.cholesky_ex(A)
        if int(info):
            raise NumericalError(f"{name}: Cholesky of (H + rho I) failed; the Hessian has NaN/Inf or is indefinite")
        A_inv = torch.cholesky_inverse(factor)
        del A, factor
        B = Wn @ Hn
        for t in range(iterations):
            V = W + U
            if mask is None and t < prune_iterations:
                fraction = cubic_sparsity(t, prune_iterations, 1.0)
                keep = _select(V, fraction, sparsities, segments, nm, group)
            assert keep is not None
            Z = V * keep
            U = V - Z  # = U + W - Z
            W = (B + rho * (Z - U)) @ A_inv
    assert keep is not None
    if final == "solve":
        new = masked_least_squares(Wn, Hn, keep, name)
    else:
        new = (W + U) * keep
    new = new / scale.unsqueeze(0)
    new[~keep] = 0.0
    return new, keep, damp


# ------------------------------------------------------------------------------------------------ lifecycle
@dataclass
class ADMMOptions(SparseGPTOptions, RIAOptions, RankGroupOptions):
    """ADMM weight update and gradual mask selection (Boža 2024); a mask source's own options apply to it."""

    mask_from: str = option("admm", "where ADMM's mask comes from: 'admm' (gradual selection during the ADMM "
                            "iterations, the paper's method) or a fixed mask of 'wanda', 'ria', 'magnitude', "
                            "'sparsegpt' (then ADMM only computes the optimal weights for it)", choices=MASK_SOURCES)
    admm_iterations: int = option(20, "ADMM: iterations (paper: 20); each is one [out, in] x [in, in] product",
                                  check=non_negative_int)
    admm_prune_iterations: int = option(15, "ADMM: the first iterations, in which the mask is re-selected with a "
                                        "cubic sparsity schedule (paper: 15); mask_from='admm' only",
                                        check=non_negative_int)
    admm_rho: float = option(1.0, "ADMM: penalty rho, relative to the normalised Hessian (unit diagonal; paper: 1)",
                             check=positive)
    admm_group: str = option("layer", "ADMM: comparison group of its own mask selection, 'layer' (one threshold "
                             "per matrix, the paper's code) or 'row' (per output row, like Wanda)", choices=GROUPS)
    admm_final: str = option("projected", "ADMM: final weights, 'projected' (the last ADMM iterate on the mask, the "
                             "paper's code) or 'solve' (exact masked least squares per row by batched Cholesky; "
                             "slow on CPU)", choices=FINALS)

    def check_config(self, config: PruningConfig) -> None:
        super().check_config(config)
        if self.mask_from == "admm" and self.admm_prune_iterations > self.admm_iterations:
            raise ConfigError(f"admm_prune_iterations={self.admm_prune_iterations} exceeds admm_iterations="
                              f"{self.admm_iterations}: the mask is selected within the ADMM iterations")
        if self.admm_iterations == 0 and self.admm_final == "projected":
            raise ConfigError("admm_iterations=0 with admm_final='projected' is plain masking (no weight update); "
                              "use admm_iterations >= 1 or admm_final='solve'")


@register_method("admm", options=ADMMOptions)
class ADMMPruning(PruningMethod):
    """Shares SparseGPT's Hessian statistics; matrices reading one input are stacked and use one factorisation."""

    needs_hessian = True

    def __init__(self, config: PruningConfig) -> None:
        super().__init__(config)
        self.needs_norms = config.mask_from in ("wanda", "ria")  # type: ignore[misc]

    def _external_mask(
        self,
        weights: Sequence[torch.Tensor],
        stats: InputStats | None,
        sparsities: Sequence[float],
        hessian: torch.Tensor,
        stacked: torch.Tensor,
        bounds: list[tuple[int, int]],
        name: str,
    ) -> torch.Tensor | None:
        cfg = self.config
        source = cfg.mask_from
        if source == "admm":
            return None
        if source == "sparsegpt":
            _, keep, _ = sparsegpt_prune(stacked, hessian, list(sparsities), cfg.nm, cfg.blocksize, cfg.dampening,
                                         cfg.max_damp_retries, row_segments=bounds, name=name)
            return keep
        scorer = get_method(source)(cfg)
        assert isinstance(scorer, ScoreMethod)
        return torch.cat([mask_from_scores(scorer.scores(w, stats), s, cfg.nm, scorer.compare_group())
                          for w, s in zip(weights, sparsities)])

    def prune_group(
        self, weights: Sequence[torch.Tensor], stats: InputStats | None, sparsities: Sequence[float], names: Sequence[str]
    ) -> list[torch.Tensor]:
        cfg = self.config
        name = " + ".join(names)
        hessian = group_hessian(stats, weights[0].device)
        stacked, bounds = stack_group(weights)
        mask = self._external_mask(weights, stats, sparsities, hessian, stacked, bounds, name)
        new, _, _ = admm_prune(
            stacked, hessian, list(sparsities), cfg.nm, mask=mask, iterations=cfg.admm_iterations,
            prune_iterations=cfg.admm_prune_iterations, rho=cfg.admm_rho, dampening=cfg.dampening,
            max_retries=cfg.max_damp_retries, group=cfg.admm_group, final=cfg.admm_final, row_segments=bounds,
            name=name,
        )
        return [new[a:b] for a, b in bounds]
