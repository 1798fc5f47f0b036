"""Pure tensor math of the structured scoring methods (no modules, no hooks; results in float32).

Conventions: a weight is an ``[out, in]`` matrix; ``X`` are the inputs of that matrix, ``[tokens, in]``.
An *output projection* (``o_proj``, ``down_proj``, ``c_proj``, ...) has one input channel per removable unit
channel (head-major for attention: head ``h`` owns channels ``h*head_dim .. (h+1)*head_dim - 1``).
Higher score = more important = kept.

* FLAP fluctuation (An et al., 2024): ``S_j = Var_tokens(X_j) * ||W[:, j]||^2``; a head's score is the sum
  over its channels; scores are standardized per module before one global comparison; removed channels
  are compensated by the bias ``b = W[:, pruned] @ mean(X[:, pruned])``.
* Wanda-sp: ``S_j = mean_i |W_ij| * ||X_j||_2``.
* First-order Taylor (LLM-Pruner, Ma et al., 2023): per dependency group, ``|sum w * g|`` ("vector") or
  ``sum |w * g|`` ("element").
* Block Influence (ShortGPT, Men et al., 2024): ``BI = 1 - mean_tokens cos(x_in, x_out)``.
* Angular distance (Gromov et al., 2024): ``d = arccos(cos(x_l, x_{l+n})) / pi``.

Statistics stream batch by batch (`RunningMoments`), so activations are never stored.

Example:
    >>> import torch
    >>> from hf_prune.structure.scores import RunningMoments, fluctuation_scores, group_sum, standardize
    >>> x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    >>> stats = RunningMoments(2)
    >>> stats.add(x[:1]); stats.add(x[1:])
    >>> stats.mean.tolist(), stats.var.tolist(), stats.sum_sq.tolist()
    ([2.0, 0.0], [1.0, 0.0], [10.0, 0.0])
    >>> w = torch.tensor([[1.0, 5.0], [1.0, 5.0]])
    >>> fluctuation_scores(w, stats.var).tolist()
    [2.0, 0.0]
    >>> group_sum(torch.arange(6.0), 3).tolist()
    [3.0, 12.0]
    >>> standardize(torch.tensor([1.0, 2.0, 3.0])).tolist()
    [-1.0, 0.0, 1.0]
"""

from __future__ import annotations

import math

import torch


class RunningMoments:
    """Per-feature count, mean and sum of squared deviations, merged batch by batch (Chan et al.) in float64.

    ``var`` is the population variance over all tokens seen, ``sum_sq`` the sum of squares (``||X_j||^2``).
    """

    def __init__(self, features: int, device: torch.device | str | None = None) -> None:
        self.n = 0
        self.mean = torch.zeros(features, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Fold a batch ``[..., features]`` into the statistics."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.mean.device, torch.float64)
        nb = x.shape[0]
        if nb == 0:
            return
        mean_b = x.mean(0)
        m2_b = (x - mean_b).square().sum(0)
        total = self.n + nb
        delta = mean_b - self.mean
        self.mean += delta * (nb / total)
        self.m2 += m2_b + delta.square() * (self.n * nb / total)
        self.n = total

    @property
    def var(self) -> torch.Tensor:
        """Population variance per feature (float32); zeros before any data."""
        return (self.m2 / max(self.n, 1)).float()

    @property
    def sum_sq(self) -> torch.Tensor:
        """Sum of squares per feature, ``||X_j||_2^2`` over all tokens (float32)."""
        return (self.m2 + self.n * self.mean.square()).float()

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.mean).all()) and bool(torch.isfinite(self.m2).all())


class MixedMoments(RunningMoments):
    """Per-channel moments of a weighted mixture of calibration sources (`combine_moments`): ``mean`` is the raw
    mixture mean (FLAP's bias compensation adds it back), ``var`` and ``sum_sq`` those of the mixture of the
    sources each normalised to its own scale. Built once, after the statistics were summed over processes."""

    def __init__(self, features: int, device: torch.device | str | None = None) -> None:
        super().__init__(features, device)
        self.second = torch.zeros(features, dtype=torch.float64, device=device)  # E[x²] of the normalised mixture

    @property
    def sum_sq(self) -> torch.Tensor:
        return (self.second * self.n).float()


def combine_moments(general: RunningMoments, domain: RunningMoments, domain_weight: float) -> MixedMoments:
    """Dual importance of per-channel moments (`hf_prune.core.sources`): each side ``s`` is divided by its scale
    ``c_s`` (the mean over channels of its ``E[x²]``), the two are mixed with weights ``1 : λ``, and the result is
    put back in the units ``c̄ = (c_G + λ c_D) / (1 + λ)``:

    * ``sum_sq / n = c̄ · (E_G[x²]/c_G + λ E_D[x²]/c_D) / (1 + λ)`` (Wanda-sp's ``||X_j||²``);
    * ``var = c̄ · (E[x̂²] − E[x̂]²)`` of that normalised mixture, spread between the sources included (FLAP's
      fluctuation: a channel at +1 on one source and −1 on the other fluctuates);
    * ``mean = (μ_G + λ μ_D) / (1 + λ)`` in raw units (FLAP's bias compensation).

    With ``λ = 0`` this is the general side (with the token count of both).

    Example:
        >>> g, d = RunningMoments(2), RunningMoments(2)
        >>> g.add(torch.tensor([[1.0, 0.0], [1.0, 0.0]])); d.add(torch.tensor([[-1.0, 0.0], [-1.0, 0.0]]))
        >>> c = combine_moments(g, d, 1.0)
        >>> c.n, c.mean.tolist(), c.var.tolist(), c.sum_sq.tolist()
        (4, [0.0, 0.0], [1.0, 0.0], [4.0, 0.0])
    """
    lam = float(domain_weight)

    def normalised(m: RunningMoments) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        if not m.n:  # a side without tokens for this layer contributes nothing
            return torch.zeros_like(m.mean), torch.zeros_like(m.mean), None
        second = m.m2 / m.n + m.mean.square()
        scale = float(second.mean())
        scale = scale if scale > 0 else 1.0
        return m.mean / scale**0.5, second / scale, scale

    mg, eg, sg = normalised(general)
    md, ed, sd = normalised(domain)
    sg = sg if sg is not None else (sd if sd is not None else 1.0)
    sd = sd if sd is not None else sg
    wg, wd = (1.0 if general.n else 0.0), (lam if domain.n else 0.0)
    total = wg + wd if wg + wd > 0 else 1.0
    unit = (sg + lam * sd) / (1 + lam)
    mean_hat, second_hat = (wg * mg + wd * md) / total, (wg * eg + wd * ed) / total
    out = MixedMoments(general.mean.numel(), general.mean.device)
    out.n = general.n + domain.n
    out.mean = (wg * general.mean + wd * domain.mean) / total
    out.m2 = (second_hat - mean_hat.square()).clamp_min(0) * unit * out.n
    out.second = second_hat * unit
    return out


def fluctuation_scores(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """FLAP: ``S_j = Var(X_j) * ||W[:, j]||^2`` per input channel ``j`` of ``weight`` ``[out, in]``."""
    w = weight.float()
    return variance.float().to(w.device) * w.square().sum(0)


def wanda_sp_scores(weight: torch.Tensor, sum_sq: torch.Tensor) -> torch.Tensor:
    """Wanda-sp: ``S_j = mean_i |W_ij| * ||X_j||_2`` per input channel (``sum_sq`` = ``||X_j||^2``)."""
    w = weight.float()
    return w.abs().mean(0) * sum_sq.float().to(w.device).clamp_min(0).sqrt()


def group_sum(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum consecutive chunks of ``group_size`` (channels -> heads, head-major layout)."""
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    return scores.float().view(-1, group_size).sum(1)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """``(s - mean) / std`` (unbiased std) so scores of different modules can share one threshold.

    A module with a single unit, or with all scores equal, maps to zeros.
    """
    s = scores.float()
    if s.numel() < 2:
        return torch.zeros_like(s)
    std = s.std()
    if not bool(std > 0):
        return torch.zeros_like(s)
    return (s - s.mean()) / std


def bias_compensation(weight: torch.Tensor, mean: torch.Tensor, pruned: torch.Tensor | list[int]) -> torch.Tensor:
    """FLAP's bias for removed input channels: ``W[:, pruned] @ mean(X[pruned])`` (shape ``[out]``).

    Adding it to the output projection's bias keeps the layer's expected output unchanged.
    """
    w = weight.float()
    idx = torch.as_tensor(pruned, dtype=torch.long, device=w.device)
    return w.index_select(1, idx) @ mean.float().to(w.device).index_select(0, idx)


def head_channels(heads: torch.Tensor | list[int], head_dim: int) -> torch.Tensor:
    """Channel indices (head-major) of the given heads: ``[h*head_dim, ..., (h+1)*head_dim - 1]`` each."""
    h = torch.as_tensor(heads, dtype=torch.long).reshape(-1, 1)
    return (h * head_dim + torch.arange(head_dim)).reshape(-1)


def unit_terms(product: torch.Tensor, index: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit ``(sum w*g, sum |w*g|)`` of one parameter's ``product = w * g``.

    ``index`` is ``[units, k]``: the positions along ``dim`` (rows: 0, columns: 1; a bias has only dim 0)
    that belong to each unit. Everything along the other dimension belongs to the unit too.
    """
    units = index.shape[0]
    sel = product.float().index_select(dim, index.reshape(-1).to(product.device))
    if dim == 1:
        sel = sel.t()
    sel = sel.reshape(units, -1)
    return sel.sum(1), sel.abs().sum(1)


def taylor_importance(signed: torch.Tensor, absolute: torch.Tensor, variant: str = "element") -> torch.Tensor:
    """LLM-Pruner's first-order group importance from summed `unit_terms` of all group members.

    ``"vector"``: ``|sum_group w * g|``; ``"element"``: ``sum_group |w * g|``.
    """
    if variant == "vector":
        return signed.abs()
    if variant == "element":
        return absolute
    raise ValueError(f"taylor variant={variant!r}; allowed: 'element', 'vector'")


def token_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity per token of two ``[..., hidden]`` tensors, flattened to ``[tokens]`` (float32)."""
    a = a.reshape(-1, a.shape[-1]).float()
    b = b.reshape(-1, b.shape[-1]).float().to(a.device)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=eps)


def block_influence(cos_sum: float, count: int) -> float:
    """ShortGPT's ``BI = 1 - mean cos(x_in, x_out)`` from a running sum of token cosines."""
    return 1.0 - cos_sum / max(count, 1)


def angular_distance(cos: torch.Tensor) -> torch.Tensor:
    """``arccos(cos) / pi`` in [0, 1] (cosines are clamped to [-1, 1] first)."""
    return torch.arccos(cos.float().clamp(-1.0, 1.0)) / math.pi


def span_distances(states: torch.Tensor, n: int) -> torch.Tensor:
    """Angular distance between every boundary ``l`` and ``l + n``, averaged over samples.

    ``states`` is ``[samples, boundaries, hidden]`` (boundary ``l`` = input of block ``l``; the last one the
    output of the last block). Returns ``[boundaries - n]``: entry ``l`` scores removing blocks ``l..l+n-1``.
    """
    if not 1 <= n < states.shape[1]:
        raise ValueError(f"span length n={n} must be in [1, {states.shape[1] - 1}]")
    a, b = states[:, :-n], states[:, n:]
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)
    return angular_distance(cos).mean(0)


def best_span(distances: torch.Tensor) -> int:
    """Start of the span with the smallest distance (the first one on ties)."""
    return int(torch.argmin(distances).item())
