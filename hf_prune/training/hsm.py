"""Pruning-aware tuning (PAT, Liu et al., AAAI 2025): the Hybrid Sparsification Module and its mask math. Pure
tensor math, no transformers.

An HSM computes ``y = g ⊙ (x + B(A x))`` with ``g = s ⊙ mask``: ``A`` (hidden -> r, Kaiming init) and ``B``
(r -> hidden, zero init) a low-rank adapter, ``s`` a learnable per-channel scale (init 1), and ``mask`` one
hidden-dimension mask shared by every HSM of the model. A diagonal HSM (``rank=0``) is ``y = g ⊙ x``.

The mask scalar of dimension ``j`` is ``sigmoid(T m_j) + bias`` with ``m`` initialised to 0 (every dimension at
1): the temperature ``T = 1 / (1 - log(step) / log(total))`` rises from 1 towards infinity and the bias
``max(0.5 - step / total, 0)`` decays, so the soft mask hardens to ``1[m >= 0]``. The paper's mask loss drives the
number of kept dimensions to the target and pushes each ``m_j`` away from 0 (`mask_loss`); the identity loss keeps
``A`` near orthonormal rows. hf_prune's default instead centres the logits on the top-``K``
threshold (`top_k_threshold`: ``sigmoid(T (m_j - θ) / σ)``, ``σ`` the local spread around it, `top_k_spread`), so
exactly ``K`` dimensions lead at every step and ``T`` alone sharpens the mask: no mask loss is needed; see
`hf_prune.training.pat` for why.

Example:
    >>> import torch
    >>> hsm = HybridSparsificationModule(4, rank=2)
    >>> x = torch.randn(3, 4)
    >>> torch.equal(hsm(x, torch.ones(4)), x)         # B = 0 and s = 1 at the start: the identity
    True
    >>> kept_dims(576, 0.25, multiple=8), temperature(1, 300), mask_bias(150, 300)
    (432, 1.0, 0.0)
    >>> float(mask_loss(torch.tensor([0.5, 0.5, -0.5, -0.5]), target=2))
    0.0
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

#: the temperature once the schedule ends (the authors' inference value)
MAX_TEMPERATURE = 1e6


class HybridSparsificationModule(nn.Module):
    """``y = (s ⊙ mask) ⊙ (x + B(A x))`` over the last dimension (``rank=0``: ``y = (s ⊙ mask) ⊙ x``).

    Args:
        hidden: the hidden size ``d``.
        rank: ``r`` of the low-rank adapter (0: a diagonal module, used after tied embeddings).
    """

    def __init__(self, hidden: int, rank: int) -> None:
        super().__init__()
        self.hidden, self.rank = hidden, rank
        self.scale = nn.Parameter(torch.ones(hidden))
        if rank > 0:
            self.lora_A = nn.Linear(hidden, rank, bias=False)  # Kaiming-uniform init (nn.Linear's default)
            self.lora_B = nn.Linear(rank, hidden, bias=False)
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = x
        if self.rank > 0:
            a = self.lora_A.weight
            z = x + F.linear(F.linear(x.to(a.dtype), a), self.lora_B.weight).to(x.dtype)
        gate = self.scale * mask.to(self.scale.dtype)
        return (z * gate.to(z.dtype)).to(x.dtype)

    def transform(self, mask: torch.Tensor) -> torch.Tensor:
        """The ``[d, d]`` matrix ``diag(s ⊙ mask) (I + B A)`` this module applies (float32)."""
        gate = self.scale.detach().float() * mask.float().to(self.scale.device)
        t = torch.eye(self.hidden, device=gate.device)
        if self.rank > 0:
            t = t + self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()
        return gate[:, None] * t

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, rank={self.rank}"


def kept_dims(hidden: int, sparsity: float, multiple: int) -> int:
    """Hidden dimensions kept when ``sparsity`` of ``hidden`` are removed, rounded to the nearest multiple of
    ``multiple`` (0 when the rounding leaves none)."""
    keep = hidden * (1.0 - sparsity)
    return int(round(keep / multiple)) * multiple


def temperature(step: int, total: int) -> float:
    """``T = 1 / (1 - log(step) / log(total))``: 1 up to step 1, `MAX_TEMPERATURE` from ``total`` on."""
    if step <= 1 or total <= 1:
        return 1.0
    if step >= total:
        return MAX_TEMPERATURE
    return min(1.0 / (1.0 - math.log(step) / math.log(total)), MAX_TEMPERATURE)


def mask_bias(step: int, total: int) -> float:
    """``max(0.5 - step / total, 0)``: keeps the soft mask near 1 early in training."""
    return max(0.5 - step / max(total, 1), 0.0)


def soft_mask(logits: torch.Tensor, temp: float, bias: float) -> torch.Tensor:
    """The training-time mask ``sigmoid(T m) + bias``."""
    return torch.sigmoid(temp * logits) + bias


def hard_mask(logits: torch.Tensor) -> torch.Tensor:
    """The inference mask ``1[m >= 0]`` (float)."""
    return (logits >= 0).to(logits.dtype)


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly ``k`` ones, at the largest logits (ties: the lower index)."""
    order = torch.argsort(logits.detach().float(), descending=True, stable=True)
    out = torch.zeros_like(logits, dtype=torch.float32)
    out[order[:k]] = 1.0
    return out


def mask_loss(logits: torch.Tensor, target: int) -> torch.Tensor:
    """``10 |#(m >= 0) - target| / target + mean((m⁺ - 0.5)²) + mean((m⁻ + 0.5)²)``.

    The count goes through a straight-through binarizer (forward ``1[m >= 0]``, backward the identity), so every
    logit is pushed down while too many dimensions are kept and up while too few are; the two means pull kept
    logits to +0.5 and dropped ones to -0.5 (an empty side adds 0).
    """
    binary = hard_mask(logits).detach() + logits - logits.detach()
    count = (10.0 / target) * (binary.sum() - target).abs()
    return count + polarisation_loss(logits)


def top_k_threshold(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The midpoint between the ``k``-th and ``(k+1)``-th largest logits (detached): ``m - θ`` has exactly ``k``
    positive entries (barring ties)."""
    top = torch.topk(logits.detach().float(), min(k + 1, logits.numel())).values
    return (top[k - 1] + top[k]) / 2 if k < logits.numel() else top[-1] - 1.0


def top_k_spread(logits: torch.Tensor, k: int, window: float = 0.1) -> torch.Tensor:
    """Half the gap between the logits ranked ``window * d`` above and below the top-``k`` threshold (detached): the
    local scale of the logits around the threshold. Dividing ``m - θ`` by it puts about ``window`` of the dimensions
    within one unit on each side, whatever the tails do (a few far-out logits would inflate a standard deviation
    and leave most dimensions undecided)."""
    values = torch.sort(logits.detach().float(), descending=True).values
    n = values.numel()
    w = max(1, int(round(window * n)))
    hi, lo = values[max(k - 1 - w, 0)], values[min(k + w, n - 1)]
    return ((hi - lo) / 2).clamp_min(1e-12)


def polarisation_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean((m⁺ - 0.5)²) + mean((m⁻ + 0.5)²)``: the mask loss without its count term (an empty side adds 0)."""
    pos, neg = logits[logits >= 0], logits[logits < 0]
    polar = logits.new_zeros(())
    if pos.numel():
        polar = polar + ((pos - 0.5) ** 2).mean()
    if neg.numel():
        polar = polar + ((neg + 0.5) ** 2).mean()
    return polar


def identity_loss(a: torch.Tensor) -> torch.Tensor:
    """``MSE(A Aᵀ, I)`` of an ``[r, d]`` down-projection: keeps its rows near orthonormal."""
    a = a.float()
    gram = a @ a.t()
    return F.mse_loss(gram, torch.eye(a.shape[0], device=a.device))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over tokens of ``KL(softmax(teacher) || softmax(student))``, the last dimension the vocabulary, in
    fp32; ``valid`` (the leading shape, bool) keeps only the tokens that count (all where ``None``; 0 if none do).

    Example:
        >>> t = torch.tensor([[[2.0, 0.0, -1.0]]])
        >>> float(distill_loss(t, t)), round(float(distill_loss(torch.zeros(1, 1, 3), t)), 4)
        (0.0, 0.5743)
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {list(student.shape)} and teacher logits {list(teacher.shape)} differ")
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.float().to(student.device), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    if valid is None:
        return kl.mean()
    valid = valid.to(kl.device, torch.bool)
    return (kl * valid).sum() / valid.sum().clamp_min(1)


def fill_map(gram: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """The least-squares map ``M`` (``[K, d - K]``) that predicts an input's dropped dimensions from its kept ones,
    ``u_drop ≈ u_keep M``, from the inputs' Gram matrix ``G = Σ uᵀu`` (``[d, d]``) and the kept-dimension mask
    ``keep`` (``[d]``): ``M = (G_KK + λ I)⁻¹ G_KD`` with ``λ = ridge · mean(diag G_KK)``. Computed in float64.

    Example:
        >>> u = torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])   # the second dimension is twice the first
        >>> round(float(fill_map(u.t() @ u, torch.tensor([1.0, 0.0]), ridge=0.0)), 4)
        2.0
    """
    keep = keep.bool().cpu()
    g = gram.double().cpu()
    gkk = g[keep][:, keep]
    gkd = g[keep][:, ~keep]
    lam = float(ridge) * float(gkk.diagonal().mean().clamp_min(1e-30))
    return torch.linalg.solve(gkk + lam * torch.eye(gkk.shape[0], dtype=torch.float64), gkd)


def fill_inputs(x: torch.Tensor, keep_idx: torch.Tensor, drop_idx: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x`` with its dropped dimensions (last axis) replaced by ``x_keep @ m`` (out of place)."""
    return x.index_copy(-1, drop_idx, (x.index_select(-1, keep_idx) @ m.to(x.dtype)).to(x.dtype))


def fold_fill(w: torch.Tensor, keep_idx: torch.Tensor, drop_idx: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The ``[out, d]`` weight that reads an unfilled input as ``w`` reads the filled one (`fill_inputs`):
    ``w[:, keep] += w[:, drop] @ mᵀ`` (out of place, in fp32, cast back)."""
    out = w.float().clone()
    out[:, keep_idx] += out[:, drop_idx] @ m.float().t()
    return out.to(w.dtype)
