"""RIA, Relative Importance and Activations (Zhang et al., ICLR 2024): a Wanda-style one-shot method whose
weight term is relative to the weight's row *and* column, so that no input channel or output row is emptied
wholesale:

    S_ij = (|W_ij| / sum_k |W_ik|  +  |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** alpha      (alpha = 0.5)

Scores are compared within each output row (unstructured) or within each N:M group; no weight update. RIA's
channel permutation for N:M is not included.

Example (the scores against a naive loop; then a pruned layer):
    >>> import torch
    >>> from hf_prune.oneshot.ria import ria_scores
    >>> w, sum_sq = torch.randn(3, 4), torch.rand(4) + 0.1
    >>> naive = torch.tensor([[(abs(w[i, j]) / w[i].abs().sum() + abs(w[i, j]) / w[:, j].abs().sum())
    ...                        * sum_sq[j].sqrt() ** 0.5 for j in range(4)] for i in range(3)])
    >>> torch.allclose(ria_scores(w, sum_sq, 0.5), naive)
    True
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> import hf_prune
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> report = model.prune(hf_prune.PruningConfig(method="ria", structure="2:4"),
    ...                      calibration=torch.randint(0, 100, (4, 16)), verbose=False, show_progress=False)
    >>> round(report.achieved_sparsity, 2)
    0.5
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import non_negative, option
from ..core.stats import InputStats
from ..registry import register_method
from .base import ScoreMethod
from .options import OneShotOptions


@dataclass
class RIAOptions(OneShotOptions):
    """RIA's activation exponent."""

    ria_alpha: float = option(0.5, "RIA: exponent a of the input-norm factor ||X_j||^a (paper: 0.5)",
                              check=non_negative)


def ria_scores(weight: torch.Tensor, sum_sq: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(|W|/row sums + |W|/column sums) * ||X_j||^alpha``; ``sum_sq[j]`` = sum over tokens of ``x_j^2``."""
    a = weight.abs()
    tiny = torch.finfo(a.dtype).tiny  # an all-zero row or column scores 0, not NaN
    relative = a / a.sum(1, keepdim=True).clamp_min(tiny) + a / a.sum(0, keepdim=True).clamp_min(tiny)
    return relative * sum_sq.clamp_min(0).sqrt().pow(alpha).unsqueeze(0)


@register_method("ria", options=RIAOptions)
class RIAPruning(ScoreMethod):
    needs_norms = True

    def scores(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        assert stats is not None and stats.sum_sq is not None
        return ria_scores(weight, stats.sum_sq.to(weight.device), float(self.config.options.ria_alpha))
