"""Scores -> `StructuredPlan` under a parameter budget (pure bookkeeping: numbers in, plan out).

The budget is a number of parameters to remove (``sparsity * decoder-block parameters``); every removable
unit carries its parameter cost (from `hf_prune.structure.arch.unit_params`).

Width units of one block (`WidthScores`): MLP intermediate channels, and attention heads in one of two
GQA modes:

* ``"query"``: remove query heads only, the same number from every key/value group, so the layer stays a
  uniform GQA layer. One removal step ("slot") removes the r-th least important query head of *every*
  group. Key/value heads stay. When every group has a single query head (plain multi-head attention)
  there is nothing to remove this way, and heads are removed as whole groups (``"group"``).
* ``"group"``: remove whole key/value groups (the kv head and all of its query heads).

Allocation:

* ``"uniform"``: every block loses the same fraction of its MLP channels and of its head units (identical
  shapes in every block, so stock transformers can reload the model). Heads are rounded per block first,
  then the MLP fraction is set so that the total matches the budget.
* ``"global"``: one threshold over the (optionally per-module standardized, FLAP-style) scores of all
  units of all blocks; units are removed from the lowest score up while that brings the removed count
  closer to the budget. Every block keeps at least one MLP channel and one query head per kept group
  (and one kv group).

``round_to`` rounds the number of kept MLP channels of every block to a multiple (e.g. 8 or 32 for fast
kernels); it moves the budget by at most ``round_to / 2`` channels per block.

Example:
    >>> import torch
    >>> from hf_prune.structure.allocate import WidthScores, allocate_width
    >>> layers = [WidthScores(0, mlp=torch.tensor([4.0, 1.0, 3.0, 2.0]), mlp_cost=10),
    ...           WidthScores(1, mlp=torch.tensor([1.0, 2.0, 3.0, 4.0]), mlp_cost=10)]
    >>> plans, info = allocate_width(layers, target=40, allocation="uniform")
    >>> plans[0].mlp_keep, plans[1].mlp_keep, info["removed_params"]
    ([0, 2], [2, 3], 40)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .plan import LayerPlan
from .scores import standardize

ALLOCATIONS = ("uniform", "global")
GQA_MODES = ("query", "group")
WIDTH_UNITS = ("mlp", "heads", "both")


@dataclass
class WidthScores:
    """Scores (higher = more important) and parameter costs of the width units of one block.

    Args:
        index: original block index.
        mlp: ``[intermediate]`` channel scores, or None (MLP not pruned / absent).
        heads: ``[num_heads]`` query-head scores, or None (attention not pruned / absent).
        groups: ``[num_kv_heads]`` scores of whole kv groups for ``gqa_mode="group"``; default: the sum of
            the group's query-head scores.
        num_kv_heads: key/value heads (query head ``h`` belongs to group ``h // (num_heads // num_kv_heads)``).
        mlp_cost: parameters removed with one MLP channel.
        head_cost: parameters removed with one query head (its q rows and o columns).
        group_cost: parameters removed with one whole kv group (its kv head and all of its query heads).
    """

    index: int
    mlp: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    num_kv_heads: int = 1
    mlp_cost: int = 0
    head_cost: int = 0
    group_cost: int = 0

    @property
    def q_per_kv(self) -> int:
        return 0 if self.heads is None else self.heads.numel() // self.num_kv_heads

    def mode(self, gqa_mode: str) -> str:
        """The GQA mode actually used: ``"query"`` falls back to ``"group"`` with one query head per group."""
        return "group" if gqa_mode == "group" or self.q_per_kv <= 1 else "query"

    def group_scores(self) -> torch.Tensor:
        assert self.heads is not None
        if self.groups is not None:
            return self.groups.float()
        return self.heads.float().view(self.num_kv_heads, -1).sum(1)


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: {list(allowed)}")


# ----------------------------------------------------------------------------------------------- width
@dataclass
class _Kind:
    """One family of removable units in one block, removed in a fixed order (``order[r]`` = r-th removal)."""

    layer: int
    kind: str  # "mlp" | "head" | "group"
    sorted_scores: torch.Tensor  # score of the r-th removal (non-decreasing)
    cost: int  # parameters per removal step
    total: int  # removal steps available before the kind is empty
    cap: int  # removal steps allowed (keeps the minimum)


def _kinds(layer: WidthScores, units: str, gqa_mode: str, round_to: int, standardized: bool) -> list[_Kind]:
    norm = standardize if standardized else (lambda s: s.float())
    kinds = []
    if units in ("mlp", "both") and layer.mlp is not None and layer.mlp.numel() > 0:
        n = layer.mlp.numel()
        kinds.append(_Kind(layer.index, "mlp", torch.sort(norm(layer.mlp)).values, layer.mlp_cost, n,
                           n - min(n, max(1, round_to))))
    if units in ("heads", "both") and layer.heads is not None and layer.heads.numel() > 0:
        if layer.mode(gqa_mode) == "query":
            z = norm(layer.heads).view(layer.num_kv_heads, -1)
            slots = torch.sort(z, dim=1).values.mean(0)  # slot r: the r-th weakest head of every group
            q = layer.q_per_kv
            kinds.append(_Kind(layer.index, "head", slots, layer.head_cost * layer.num_kv_heads, q, q - 1))
        else:
            g = layer.num_kv_heads
            kinds.append(_Kind(layer.index, "group", torch.sort(norm(layer.group_scores())).values,
                               layer.group_cost, g, g - 1))
    return kinds


def _global_counts(kinds: list[_Kind], target: float) -> dict[tuple[int, str], int]:
    cands = [(float(k.sorted_scores[r]), i, r) for i, k in enumerate(kinds) for r in range(k.cap)]
    cands.sort()
    counts = [0] * len(kinds)
    removed = 0
    for _, i, r in cands:
        if removed >= target:
            break
        k = kinds[i]
        if r != counts[i]:
            continue
        if removed + k.cost - target > target - removed:
            continue  # overshoots more than it helps; smaller units further up may still fit
        counts[i] += 1
        removed += k.cost
    return {(k.layer, k.kind): c for k, c in zip(kinds, counts)}


def _uniform_counts(kinds: list[_Kind], target: float) -> dict[tuple[int, str], int]:
    heads = [k for k in kinds if k.kind != "mlp"]
    mlps = [k for k in kinds if k.kind == "mlp"]
    everything = sum(k.total * k.cost for k in kinds)
    fraction = target / everything if everything else 0.0
    counts: dict[tuple[int, str], int] = {}
    removed = 0
    for k in heads:
        c = min(k.cap, int(math.floor(fraction * k.total + 0.5)))
        counts[(k.layer, k.kind)] = c
        removed += c * k.cost
    if mlps:
        mlp_params = sum(k.total * k.cost for k in mlps)
        f_mlp = max(0.0, (target - removed) / mlp_params)
        for k in mlps:
            counts[(k.layer, k.kind)] = min(k.cap, int(math.floor(f_mlp * k.total + 0.5)))
    return counts


def _round_kept(n: int, removed: int, round_to: int) -> int:
    """Removed count after rounding the kept count ``n - removed`` to a multiple of ``round_to``."""
    if round_to <= 1:
        return removed
    kept = int(math.floor((n - removed) / round_to + 0.5)) * round_to
    kept = max(min(n, round_to), min(n, kept))
    return n - kept


def allocate_width(
    layers: Sequence[WidthScores],
    target: float,
    allocation: str = "global",
    gqa_mode: str = "query",
    units: str = "both",
    round_to: int = 1,
    standardized: bool = True,
) -> tuple[dict[int, LayerPlan], dict]:
    """Choose which MLP channels / heads each block keeps so that about ``target`` parameters go.

    ``standardized``: compare per-module standardized scores in the global threshold (FLAP, Wanda-sp);
    False for scores that are already comparable across layers (Taylor: an estimated loss change).
    Returns ``(plans by block index, info)``; blocks with nothing removed get no `LayerPlan`.
    Raises `ConfigError` if the budget cannot be met while keeping the per-block minimum.
    """
    check_choice("allocation", allocation, ALLOCATIONS)
    check_choice("gqa_mode", gqa_mode, GQA_MODES)
    check_choice("width_units", units, WIDTH_UNITS)
    if not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to={round_to!r} must be an integer >= 1")
    kinds = [k for layer in layers for k in _kinds(layer, units, gqa_mode, round_to, standardized)]
    if not kinds:
        raise ConfigError(f"width_units={units!r}: the model has no removable units of that kind")
    counts = _global_counts(kinds, target) if allocation == "global" else _uniform_counts(kinds, target)
    plans: dict[int, LayerPlan] = {}
    removed = 0
    for layer in layers:
        plan = LayerPlan()
        c_mlp = counts.get((layer.index, "mlp"))
        if c_mlp is not None:
            assert layer.mlp is not None
            n = layer.mlp.numel()
            c_mlp = _round_kept(n, c_mlp, round_to)
            if c_mlp:
                order = torch.sort(layer.mlp.float(), stable=True).indices
                plan.mlp_keep = sorted(order[c_mlp:].tolist())
                removed += c_mlp * layer.mlp_cost
        c_head = counts.get((layer.index, "head"))
        if c_head:
            assert layer.heads is not None
            per = layer.heads.float().view(layer.num_kv_heads, -1)
            order = torch.sort(per, dim=1, stable=True).indices  # within-group positions
            q = layer.q_per_kv
            drop = {g * q + int(j) for g in range(layer.num_kv_heads) for j in order[g, :c_head]}
            plan.heads_keep = [h for h in range(layer.heads.numel()) if h not in drop]
            removed += c_head * layer.num_kv_heads * layer.head_cost
        c_group = counts.get((layer.index, "group"))
        if c_group:
            assert layer.heads is not None
            order = torch.sort(layer.group_scores(), stable=True).indices
            kv_keep = sorted(order[c_group:].tolist())
            q = layer.q_per_kv
            plan.kv_heads_keep = kv_keep
            plan.heads_keep = [g * q + j for g in kv_keep for j in range(q)]
            removed += c_group * layer.group_cost
        if plan.mlp_keep is not None or plan.heads_keep is not None:
            plans[layer.index] = plan
    max_cost = max(k.cost for k in kinds)
    slack = max_cost / 2 if allocation == "global" else max_cost * len(layers) / 2
    if round_to > 1:
        slack += round_to * max(layer.mlp_cost for layer in layers) * len(layers) / 2
    if target - removed > slack + 1e-6:
        most = sum(k.cap * k.cost for k in kinds)
        raise ConfigError(
            f"sparsity is too high for width pruning: the budget is {int(target)} parameters but at most {most} "
            f"can go with width_units={units!r}, gqa_mode={gqa_mode!r} while every block keeps one MLP channel "
            "and one head per kv group. Lower sparsity, use width_units='both', or a depth method "
            "('block-influence', 'angular', 'finercut')"
        )
    return plans, {"removed_params": removed, "target_params": int(round(target)), "counts": counts}


# ----------------------------------------------------------------------------------------------- depth
def choose_blocks(scores: Sequence[float], costs: Sequence[int], target: float) -> list[int]:
    """Lowest-score blocks first while that brings the removed parameters closer to ``target``.

    At least one block always stays. Returns sorted block indices.

    Example:
        >>> choose_blocks([0.5, 0.1, 0.3, 0.9], [10, 10, 10, 10], target=18)
        [1, 2]
    """
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    chosen: list[int] = []
    removed = 0
    for i in order[: max(len(scores) - 1, 0)]:
        if removed >= target:
            break
        if removed + costs[i] - target > target - removed:
            continue
        chosen.append(i)
        removed += costs[i]
    _check_depth_budget(removed, target, costs)
    return sorted(chosen)


def span_length(costs: Sequence[int], target: float) -> int:
    """How many consecutive blocks (of mean cost) come closest to ``target`` parameters (at most all but one).

    Example:
        >>> span_length([10, 10, 10, 10], target=24)
        2
    """
    mean = sum(costs) / len(costs)
    n = int(math.floor(target / mean + 0.5))
    if n > len(costs) - 1:
        _check_depth_budget((len(costs) - 1) * mean, target, costs)
    return max(0, min(n, len(costs) - 1))


def _check_depth_budget(removed: float, target: float, costs: Sequence[int]) -> None:
    if target - removed > max(costs) / 2 + 1e-6:
        raise ConfigError(
            f"sparsity is too high for depth pruning: the budget is {int(target)} parameters but removing all "
            f"but one of the {len(costs)} blocks removes only {int(removed)}. Lower sparsity"
        )
