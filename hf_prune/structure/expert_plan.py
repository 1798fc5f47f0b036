"""Pure index and tensor math of routed-expert removal: how many experts each MoE layer loses, which ones, and
how removed experts are folded into kept ones (no modules, no hooks).

* `allocate_experts`: ``"uniform"`` removes ``round(sparsity * E)`` experts from every MoE layer (the checkpoint
  keeps one stock expert count); ``"global"`` removes ``round(sparsity * sum E)`` experts over all layers, the
  lowest by score relative to their layer's mean score (so layers whose experts matter alike lose fewer), which
  gives per-layer counts. Both keep at least ``top_k`` experts per layer, never remove a protected
  (super) expert, and with group-limited routing remove the same number from every group (each group keeps at
  least 2: the router ranks a group by its best two).
* `merge_weights`: M-SMoE / DERN style merging: each removed expert goes to the kept expert whose router logits
  are most similar, and every kept expert becomes the frequency-weighted average of itself and what it received,
  tensor by tensor (any fused layout: the average is element-wise per expert slice). No neuron alignment: experts
  cut from one MLP (MoEfication) do not share neurons, upcycled experts do.

Example:
    >>> import torch
    >>> from hf_prune.structure.expert_plan import LayerExperts, allocate_experts
    >>> layers = [LayerExperts(0, torch.tensor([4.0, 1.0, 3.0, 2.0]), top_k=2),
    ...           LayerExperts(1, torch.tensor([1.0, 1.0, 1.0, 9.0]), top_k=2, protected=frozenset({0}))]
    >>> allocate_experts(layers, 0.5, "uniform")
    {0: [0, 2], 1: [0, 3]}
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError


@dataclass
class LayerExperts:
    """One MoE layer's scores (higher = kept first) and constraints."""

    index: int
    scores: torch.Tensor
    top_k: int = 1
    num_group: int = 1
    topk_group: int = 1
    protected: frozenset[int] = field(default_factory=frozenset)

    @property
    def experts(self) -> int:
        return int(self.scores.numel())

    def min_keep_per_group(self) -> int:
        size = self.experts // self.num_group
        if self.num_group == 1:
            return max(self.top_k, 1)
        return min(size, max(2, -(-self.top_k // self.topk_group)))


def _removal_order(layer: LayerExperts, group: int | None = None) -> list[int]:
    """Removable experts of ``layer`` (of one group, when given), lowest score first; ties by index."""
    size = layer.experts // layer.num_group
    candidates = range(layer.experts) if group is None else range(group * size, (group + 1) * size)
    pool = [e for e in candidates if e not in layer.protected]
    return sorted(pool, key=lambda e: (float(layer.scores[e]), e))


def _remove_from(layer: LayerExperts, count: int) -> list[int]:
    """Up to ``count`` experts to remove from ``layer`` under its constraints (fewer where they bind)."""
    if layer.num_group == 1:
        return _removal_order(layer)[: max(0, min(count, layer.experts - layer.min_keep_per_group()))]
    size = layer.experts // layer.num_group
    per_group = min(count // layer.num_group, size - layer.min_keep_per_group())
    orders = [_removal_order(layer, g) for g in range(layer.num_group)]
    per_group = max(0, min([per_group] + [len(o) for o in orders]))
    return [e for o in orders for e in o[:per_group]]


def allocate_experts(layers: list[LayerExperts], sparsity: float, allocation: str) -> dict[int, list[int]]:
    """Sorted experts to keep per layer index; see the module docs."""
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity={sparsity!r}: expert pruning needs the fraction of routed experts to remove, "
                          "in [0, 1)")
    if allocation not in ("uniform", "global"):
        raise ConfigError(f"expert_allocation={allocation!r}; allowed: 'uniform', 'global'")
    removed: dict[int, list[int]] = {}
    if allocation == "uniform":
        for layer in layers:
            wanted = int(round(sparsity * layer.experts))
            removed[layer.index] = _remove_from(layer, wanted)
            if len(removed[layer.index]) < wanted:
                warnings.warn(f"layer {layer.index}: removes {len(removed[layer.index])} experts instead of {wanted} "
                              f"(it must keep top_k={layer.top_k}, protected super experts {sorted(layer.protected)}"
                              f"{', equal groups' if layer.num_group > 1 else ''}); the expert counts differ between "
                              "layers, so the checkpoint needs hf_prune or trust_remote_code to load", stacklevel=2)
    else:
        budget = int(round(sparsity * sum(layer.experts for layer in layers)))
        by_index = {layer.index: layer for layer in layers}
        # most each layer can lose: everything its constraints allow (whole rounds of one expert per group)
        limit = {layer.index: len(_remove_from(layer, layer.experts)) for layer in layers}
        ranked = []
        for layer in layers:
            mean = float(layer.scores.double().mean())
            rel = layer.scores.double() / mean if mean > 0 else torch.zeros_like(layer.scores, dtype=torch.float64)
            ranked += [(float(rel[e]), layer.index, e) for e in range(layer.experts) if e not in layer.protected]
        ranked.sort()
        wanted: dict[int, int] = {layer.index: 0 for layer in layers}
        taken = 0
        for _, i, _e in ranked:  # the lowest experts first, skipping layers that reached their limit
            if taken >= budget:
                break
            if wanted[i] < limit[i]:
                wanted[i] += 1
                taken += 1
        got = 0
        for i, count in wanted.items():
            layer = by_index[i]
            if layer.num_group > 1:  # whole rounds of one expert per group
                count = int(round(count / layer.num_group)) * layer.num_group
            removed[i] = _remove_from(layer, count)
            got += len(removed[i])
        if got < budget:
            warnings.warn(f"global expert allocation removes {got} experts instead of {budget}: every layer keeps "
                          "top_k experts, protected super experts and (with group-limited routing) equal groups",
                          stacklevel=2)
    return {layer.index: sorted(set(range(layer.experts)) - set(removed[layer.index])) for layer in layers}


def merge_targets(similarity: torch.Tensor, keep: list[int]) -> dict[int, int]:
    """Removed expert -> the kept expert whose router logits are most similar (ties: lower index)."""
    kept = torch.tensor(keep, dtype=torch.long)
    out = {}
    for e in range(similarity.shape[0]):
        if e in set(keep):
            continue
        sims = similarity[e].index_select(0, kept)
        out[e] = int(kept[int(torch.argmax(sims))])
    return out


def merge_weights(tensors: dict[str, torch.Tensor], keep: list[int], targets: dict[int, int],
                  frequency: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per tensor name: ``[len(keep), ...]`` values of the kept experts after folding every removed expert ``r``
    into ``targets[r]``: ``sum_j f_j W_j / sum_j f_j`` over the kept expert and what it received, with ``f`` the
    routing frequency (+1, so that an expert no token chose still counts a little). Computed in float32, returned
    in each tensor's dtype."""
    f = frequency.float() + 1.0
    position = {k: j for j, k in enumerate(keep)}
    out = {}
    for name, t in tensors.items():
        acc = t.index_select(0, torch.tensor(keep, dtype=torch.long, device=t.device)).float()
        weight = f[keep].clone().to(acc.device)
        acc *= weight.view(-1, *([1] * (t.dim() - 1)))
        for r, k in targets.items():
            j = position[k]
            acc[j] += float(f[r]) * t[r].float()
            weight[j] += float(f[r])
        out[name] = (acc / weight.view(-1, *([1] * (t.dim() - 1)))).to(t.dtype)
    return out
