"""Pure tensor math of MoE expert-pruning scores (no modules, no hooks; statistics in float64).

One `ExpertStats` per MoE layer accumulates, batch by batch, what the scores need from the tokens routed to each
expert ``e``: with ``g`` the router weight a token gives ``e`` (after the model's own top-k normalisation) and
``y = E_e(x)`` the expert's output for that token,

* ``expert-frequency``: how many (token, top-k slot) pairs chose ``e``;
* ``ean`` (expert activation norm): mean over routed tokens of ``||y||_2`` (as the issue's references define it;
  the REAP authors' code sums instead, i.e. mean x frequency);
* ``reap`` (router-weighted expert activation pruning; llm-compressor's definition): mean over routed tokens of
  ``g * ||y||_2``, with ``g`` the weight the model really applies (after its own top-k renormalisation; the REAP
  authors' code defaults to the full-softmax probability, which can rank experts differently);
* ``easy-ep``: sum over routed tokens of ``g * ||y||_2 * c``, where ``c = max(0, 1 - cos(h_before, h_after))`` is
  the token's contribution: the residual stream before the MoE sublayer against the same plus the routed
  experts' output (shared experts excluded, as in the EASY-EP authors' code), so tokens the routed experts barely
  change count little;
* the largest ``|y|`` seen (the super-expert guard, `super_experts`).

Higher score = more important = kept. Experts no token chose score 0 (frequency, EAN, REAP, EASY-EP alike).

Example:
    >>> import torch
    >>> stats = ExpertStats(3)
    >>> topk = torch.tensor([[0, 1], [0, 2]])                    # 2 tokens, top-2
    >>> gates = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    >>> norms = torch.tensor([[2.0, 4.0], [6.0, 1.0]])           # ||E_e(x)|| per routed pair
    >>> stats.add(topk, gates, norms, contribution=torch.tensor([1.0, 0.5]), max_abs=torch.tensor([3.0, 1.0, 0.5]))
    >>> stats.scores("expert-frequency").tolist(), stats.scores("ean").tolist()
    ([2.0, 1.0, 1.0], [4.0, 4.0, 1.0])
    >>> stats.scores("reap").tolist()                          # (0.75*2 + 0.5*6) / 2, 0.25*4, 0.5*1
    [2.25, 1.0, 0.5]
    >>> stats.scores("easy-ep").tolist()                       # 0.75*2*1 + 0.5*6*0.5, 0.25*4*1, 0.5*1*0.5
    [3.0, 1.0, 0.25]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SCORES = ("expert-frequency", "ean", "reap", "easy-ep", "random")


class ExpertStats:
    """Per-expert running sums of one MoE layer (see the module docs); ``experts`` routed experts."""

    def __init__(self, experts: int) -> None:
        self.experts = experts
        self.count = torch.zeros(experts, dtype=torch.float64)
        self.norm_sum = torch.zeros(experts, dtype=torch.float64)
        self.gated_sum = torch.zeros(experts, dtype=torch.float64)
        self.easy_sum = torch.zeros(experts, dtype=torch.float64)
        self.max_abs = torch.zeros(experts, dtype=torch.float64)
        self.logit_gram = torch.zeros(experts, experts, dtype=torch.float64)  # sum over tokens of l l^T

    def add(self, topk: torch.Tensor, gates: torch.Tensor, norms: torch.Tensor, contribution: torch.Tensor | None = None,
            max_abs: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> None:
        """Fold a batch in: ``topk`` ``[tokens, k]`` chosen experts, ``gates`` ``[tokens, k]`` their router weights,
        ``norms`` ``[tokens, k]`` the norms of their outputs, ``contribution`` ``[tokens]`` (EASY-EP; ones when
        not given), ``max_abs`` ``[experts]`` the batch's largest ``|output|`` per expert, ``logits``
        ``[tokens, experts]`` the router logits (for `similarity`)."""
        if topk.shape != gates.shape or topk.shape != norms.shape:
            raise ValueError(f"topk {tuple(topk.shape)}, gates {tuple(gates.shape)} and norms {tuple(norms.shape)} "
                             "must all be [tokens, k]")
        if topk.numel() and (int(topk.min()) < 0 or int(topk.max()) >= self.experts):
            raise ValueError(f"expert indices must be in [0, {self.experts}); got {int(topk.min())}..{int(topk.max())}")
        idx = topk.reshape(-1).long().cpu()
        g = gates.reshape(-1).double().cpu()
        n = norms.reshape(-1).double().cpu()
        c = (torch.ones(topk.shape[0], dtype=torch.float64) if contribution is None
             else contribution.double().cpu()).unsqueeze(1).expand(topk.shape).reshape(-1)
        self.count.index_add_(0, idx, torch.ones_like(g))
        self.norm_sum.index_add_(0, idx, n)
        self.gated_sum.index_add_(0, idx, g * n)
        self.easy_sum.index_add_(0, idx, g * n * c)
        if max_abs is not None:
            self.max_abs = torch.maximum(self.max_abs, max_abs.double().cpu())
        if logits is not None:
            lg = logits.reshape(-1, self.experts).double()
            self.logit_gram += (lg.T @ lg).cpu()

    def similarity(self) -> torch.Tensor:
        """Cosine similarity of the experts' router logits over the calibration tokens, ``[experts, experts]``
        (M-SMoE's grouping signal: experts the router scores alike for the same tokens)."""
        d = self.logit_gram.diagonal().clamp_min(1e-30).sqrt()
        return self.logit_gram / d[:, None] / d[None, :]

    def all_reduce(self, sum_across: Callable[[list[torch.Tensor]], list[torch.Tensor]], rank: int = 0,
                   size: int = 1) -> None:
        """Combine the statistics of ``size`` processes in place (sums are summed; maxima are gathered as rows of
        a ``[size, experts]`` sum and reduced by max)."""
        rows = torch.zeros(size, self.experts, dtype=torch.float64)
        rows[rank] = self.max_abs
        self.count, self.norm_sum, self.gated_sum, self.easy_sum, self.logit_gram, rows = sum_across(
            [self.count, self.norm_sum, self.gated_sum, self.easy_sum, self.logit_gram, rows])
        self.max_abs = rows.max(0).values

    def scores(self, kind: str, seed: int = 0) -> torch.Tensor:
        """Per-expert score of ``kind`` (one of `SCORES`), float64 ``[experts]``."""
        routed = self.count.clamp_min(1)
        if kind == "expert-frequency":
            return self.count.clone()
        if kind == "ean":
            return self.norm_sum / routed
        if kind == "reap":
            return self.gated_sum / routed
        if kind == "easy-ep":
            return self.easy_sum.clone()
        if kind == "random":
            return torch.rand(self.experts, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        raise ValueError(f"expert score {kind!r}; allowed: {list(SCORES)}")


def token_contribution(before: torch.Tensor, after: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """EASY-EP's per-token contribution of a layer: ``max(0, 1 - cos(before, after))`` over ``[..., hidden]``,
    flattened to ``[tokens]`` (float32)."""
    a = before.reshape(-1, before.shape[-1]).float()
    b = after.reshape(-1, after.shape[-1]).float().to(a.device)
    return (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=eps)).clamp_min(0)


def super_experts(max_abs: dict[int, torch.Tensor], quantile: float = 0.995, fraction_of_max: float = 0.1,
                  median_ratio: float = 10.0) -> list[tuple[int, int]]:
    """``(layer, expert)`` pairs whose largest ``|down_proj output|`` is above the ``quantile`` of all experts'
    maxima (every layer given) and above ``fraction_of_max`` of the largest one (Super Experts, 2025), and at
    least ``median_ratio`` times the median maximum. The last test is hf_prune's: with few experts the quantile
    and fraction tests pass for the largest expert even when nothing stands out (24 experts: the 99.5th
    percentile lies between the top two), and a super expert is an outlier by definition. ``max_abs`` maps a
    layer index to its ``[experts]`` maxima (0 for experts no token reached)."""
    if not max_abs:
        return []
    layers = sorted(max_abs)
    values = torch.cat([max_abs[i].double().reshape(-1) for i in layers])
    seen = values[values > 0]
    if seen.numel() == 0:
        return []
    threshold = max(float(torch.quantile(values, quantile)), fraction_of_max * float(values.max()),
                    median_ratio * float(seen.median()))
    return [(i, int(e)) for i in layers for e in torch.nonzero(max_abs[i].double() > threshold).reshape(-1).tolist()]
