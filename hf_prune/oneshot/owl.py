"""OWL's per-block sparsities (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity") and the self-tuned default.

OWL gives each decoder block a sparsity ``s_b = s - lam * (normalised outlier ratio of b - mean)``: blocks where more
Wanda scores ``|W_ij| ||x_j||`` exceed ``M`` times their mean keep more weights. The paper fixes ``M = 5`` and
``lam = 0.08`` (tuned on LLaMA at 70%). On other models the outlier profile can point the wrong way: in
SmolLM2-135M the outlier ratio *rises* with depth (0.5% in blocks 1-8, 1.2-2.4% in the last ten at ``M = 5``; block 0
is an exception at 1.5%), so OWL moves sparsity onto the early blocks, which the model needs most, and at 60% it
loses to uniform sparsity. Measured with a Wanda proxy at 60% (next-token loss on 16 calibration samples, uniform
4.828): OWL as published (``M = 5, lam = 0.08``) 4.886; OWL inverted (``lam = -0.04``) 4.779-4.810; a linear depth
ramp (sparsity from ``s - 0.1`` in block 0 to ``s + 0.1`` in the last) 4.591. The cause is the direction of the
allocation, not ``lam``, ``M`` or the normalisation.

The default (``owl_lambda="auto"``, ``owl_threshold="auto"``) therefore chooses from the calibration data: every
candidate allocation (uniform; OWL at several ``M`` and ``lam``, in both directions; a depth ramp) prunes a
*proxy* of the model — masks from the dense statistics of OWL's own pass, scored by the method itself where it only
ranks weights (magnitude, Wanda, RIA) and by Wanda for SparseGPT and ADMM, no weight update — and the
candidate with the lowest next-token loss on ``owl_search_samples`` calibration samples wins. Uniform is a
candidate, so the choice is never worse than uniform on those samples for the proxy. All candidates run together
in one more sweep over the blocks (one block on the device at a time, as everywhere in hf_prune).

Example:
    >>> [round(s, 3) for s in owl_block_sparsities([0.01, 0.02, 0.03], 0.5, 0.1)]   # more outliers: lower sparsity
    [0.6, 0.5, 0.4]
    >>> [round(s, 3) for s in owl_block_sparsities([0.01, 0.02, 0.03], 0.5, -0.1)]  # inverted
    [0.4, 0.5, 0.6]
    >>> [round(s, 3) for s in depth_ramp(3, 0.5, 0.1)]      # early blocks keep more
    [0.4, 0.5, 0.6]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

#: outlier thresholds ``M`` tried by the search (the paper's grid is 3-10, its default 5)
SEARCH_THRESHOLDS = (3.0, 5.0, 10.0)
#: ``lam`` values tried (signed: negative inverts OWL's direction); the paper's grid is 0.02-0.2, its default 0.08
SEARCH_LAMBDAS = (0.04, 0.08, -0.04, -0.08)
#: depth-ramp spreads tried
SEARCH_RAMPS = (0.05, 0.1, 0.15, 0.2)


def owl_block_sparsities(outlier_ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """OWL's allocation: densities are the min-max normalised outlier ratios scaled to ``[0, 2|lam|]``, shifted so
    that their mean is ``1 - sparsity``; a block's sparsity is ``1 - density``. A negative ``lam`` inverts the
    direction (more outliers, more sparsity). Uniform if all ratios are equal. Clamped to ``[0, 0.999]``."""
    ratios = torch.tensor(list(outlier_ratios), dtype=torch.float64)
    if len(ratios) == 0 or float(ratios.max() - ratios.min()) == 0.0:
        return [float(sparsity)] * len(ratios)
    density = (ratios - ratios.min()) / (ratios.max() - ratios.min()) * (2 * abs(lam))
    if lam < 0:
        density = 2 * abs(lam) - density
    density = density - density.mean() + (1 - sparsity)
    return [float(min(max(1 - d, 0.0), 0.999)) for d in density]


def depth_ramp(n_blocks: int, sparsity: float, spread: float) -> list[float]:
    """Sparsity rising linearly with depth from ``sparsity - spread`` to ``sparsity + spread`` (mean ``sparsity``)."""
    if n_blocks < 2:
        return [float(sparsity)] * n_blocks
    return [float(min(max(sparsity - spread + 2 * spread * i / (n_blocks - 1), 0.0), 0.999)) for i in range(n_blocks)]


def owl_outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """OWL's layer-wise outlier distribution of one block: the fraction of all its Wanda scores that exceed
    ``threshold`` x the mean score (mean taken over every prunable matrix of the block together)."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > threshold * flat.mean()).float().mean())


@dataclass
class Candidate:
    """One per-block allocation tried by the search; ``label`` says how it was made."""

    label: dict
    block_sparsity: list[float]
    loss: float | None = field(default=None)


def candidates(ratios: dict[float, list[float]], sparsity: float, lambdas: Sequence[float] = SEARCH_LAMBDAS,
               ramps: Sequence[float] = SEARCH_RAMPS) -> list[Candidate]:
    """The search's allocations for a target ``sparsity``: uniform first, then OWL for every threshold in
    ``ratios`` and every value of ``lambdas``, then the depth ramps of ``ramps``. Allocations that had to be clamped to
    ``[0, 0.999]`` (their mean would miss the target) and duplicates are dropped."""
    n = len(next(iter(ratios.values()))) if ratios else 0
    out = [Candidate({"kind": "uniform"}, [float(sparsity)] * n)]
    for threshold, block_ratios in ratios.items():
        for lam in lambdas:
            if sparsity - abs(lam) >= 0 and sparsity + abs(lam) < 1:
                out.append(Candidate({"kind": "owl", "threshold": threshold, "lambda": lam},
                                     owl_block_sparsities(block_ratios, sparsity, lam)))
    for spread in ramps:
        if sparsity - spread >= 0 and sparsity + spread < 1:
            out.append(Candidate({"kind": "depth_ramp", "spread": spread}, depth_ramp(n, sparsity, spread)))
    seen, unique = set(), []
    for c in out:
        sig = tuple(round(s, 6) for s in c.block_sparsity)
        clamped = abs(sum(c.block_sparsity) / max(n, 1) - sparsity) > 1e-6
        if sig not in seen and not clamped:
            seen.add(sig)
            unique.append(c)
    return unique


def keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning the ``round(sparsity * cols)`` lowest scores of each row (ties at the threshold are pruned
    too; pass a ``[1, n]`` view to compare a whole matrix). No sort is stored: one ``kthvalue`` per call.

    >>> keep_mask(torch.tensor([[3.0, 1.0, 2.0, 4.0], [0.5, 0.1, 0.9, 0.2]]), 0.5)
    tensor([[ True, False, False,  True],
            [ True, False,  True, False]])
    """
    k = int(round(float(sparsity) * scores.shape[1]))
    if k <= 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    threshold = scores.kthvalue(k, dim=1, keepdim=True).values
    return scores > threshold
