"""Registered routed-expert removal methods (MoE models with transformers v5 fused experts).

===================== ==================================================================================
name                  score of expert ``e`` (higher = kept; see `hf_prune.structure.expert_scores`)
===================== ==================================================================================
``"expert-frequency"`` how often the router picks ``e`` (top-k counts)
``"ean"``             mean ``||E_e(x)||`` over the tokens routed to ``e`` (expert activation norm)
``"reap"``            mean of router weight x ``||E_e(x)||`` over routed tokens (REAP)
``"easy-ep"``         sum of router weight x ``||E_e(x)||`` x the token's contribution of the layer (EASY-EP)
``"random-experts"``  seeded random baseline (``seed`` + block index)
===================== ==================================================================================

``sparsity`` is the fraction of routed experts removed. Statistics are collected block by block on the dense
model (`hf_prune.structure.collect.collect_expert_stats`); `plan_from_stats` turns them into a plan, so one
collection serves several scores, fractions and options (the benchmark does this). Options
(`hf_prune.structure.options.ExpertOptions`): ``expert_allocation`` (``"uniform"``: stock-loadable,
``"global"``: per-layer counts), ``super_expert_guard`` (on: super experts are never removed and are listed in
the report), ``expert_merge`` (fold removed experts into kept ones instead of dropping them). Shared experts,
dense blocks and attention are untouched. Follow with a one-shot method to prune inside the kept experts
(STUN: ``reap`` then ``wanda``).

Example:
    >>> import torch, hf_prune
    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> model = MixtralForCausalLM(MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=16,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
    ...     num_experts_per_tok=2)).eval()
    >>> report = model.prune(hf_prune.PruningConfig(method="reap", sparsity=0.5, num_calibration_samples=4,
    ...     seqlen=16), calibration=torch.randint(0, 100, (4, 16)), verbose=False, show_progress=False)
    >>> model.config.num_local_experts, [r.experts for r in report.blocks]
    (4, [(8, 4), (8, 4)])
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..core.model import find_blocks
from ..errors import ConfigError, UnsupportedModelError
from ..registry import register_method
from .arch import block_specs, num_params, unit_params
from .collect import collect_expert_stats
from .expert_plan import LayerExperts, allocate_experts, merge_targets
from .expert_scores import ExpertStats, super_experts
from .methods import StructuredMethod, option, require_calibration
from .options import ExpertOptions
from .plan import BlockSpec, LayerPlan, StructuredPlan


def moe_specs(model: nn.Module) -> list[BlockSpec]:
    """The `BlockSpec` of every block with routed experts; `UnsupportedModelError` when there is none."""
    specs = [s for s in block_specs(model) if s.experts is not None]
    if not specs:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no routed experts that hf_prune recognises (transformers v5 fused experts: "
            "an 'experts' module with 3-D gate_up_proj/down_proj next to a router 'gate'/'router'); expert methods "
            "need a MoE model. Use a width method (flap, wanda-sp, taylor) for dense models")
    return specs


def plan_from_stats(model: nn.Module, stats: dict[int, ExpertStats], config: Any, score: str
                    ) -> tuple[StructuredPlan, dict[str, Any]]:
    """The plan (and report info) that removes ``config.sparsity`` of the routed experts by ``score``, from
    statistics collected once (`collect_expert_stats`). Reads ``sparsity``, ``seed`` and the `ExpertOptions`."""
    sparsity = getattr(config, "sparsity", None)
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 < float(sparsity) < 1.0:
        raise ConfigError(f"sparsity={sparsity!r}: expert methods remove this fraction of the routed experts; "
                          "give a number in (0, 1), e.g. 0.25")
    specs = {s.index: s for s in moe_specs(model)}
    if set(stats) != set(specs):
        raise ConfigError(f"statistics cover blocks {sorted(stats)} but the model's MoE blocks are {sorted(specs)}; "
                          "collect them on this model")
    guard = bool(option(config, "super_expert_guard"))
    found = super_experts({i: s.max_abs for i, s in stats.items()}, float(option(config, "super_expert_quantile")),
                          float(option(config, "super_expert_fraction")),
                          float(option(config, "super_expert_median_ratio")))
    seed = int(getattr(config, "seed", 0) or 0)
    layers = [LayerExperts(i, stats[i].scores(score, seed=seed + i), specs[i].experts.top_k or 1,
                           specs[i].experts.num_group, specs[i].experts.topk_group,
                           frozenset(e for j, e in found if j == i) if guard else frozenset())
              for i in sorted(specs)]
    allocation = option(config, "expert_allocation")
    keep = allocate_experts(layers, float(sparsity), allocation)
    merge = bool(option(config, "expert_merge"))
    plans: dict[int, LayerPlan] = {}
    merges: dict[str, dict[str, int]] = {}
    removed_params = 0
    for i, kept in keep.items():
        e = specs[i].experts
        if len(kept) == e.num_experts:
            continue
        plan = LayerPlan(experts_keep=kept)
        if merge:
            targets = merge_targets(stats[i].similarity(), kept)
            plan.experts_merge_into, plan.experts_frequency = targets, stats[i].count.tolist()
            merges[str(i)] = {str(r): k for r, k in targets.items()}
        plans[i] = plan
        removed_params += (e.num_experts - len(kept)) * unit_params(model, specs[i])["expert"]
    total_experts = sum(s.experts.num_experts for s in specs.values())
    kept_experts = sum(len(k) for k in keep.values())
    block_params = sum(num_params(b) for b in find_blocks(model)[1])
    info: dict[str, Any] = {
        "method": score, "allocation": allocation, "merge": merge,
        "experts_before": total_experts, "experts_after": kept_experts,
        "expert_fraction_removed": 1 - kept_experts / total_experts,
        "super_experts": [[i, e] for i, e in found], "super_expert_guard": guard,
        "experts_keep": {str(i): k for i, k in keep.items()},
        "scores": {str(layer.index): layer.scores.tolist() for layer in layers},
        "frequency": {str(i): stats[i].count.tolist() for i in sorted(specs)},
        "block_params": block_params, "removed_params": removed_params,
        "sparsity": removed_params / max(block_params, 1),
    }
    if merge:
        info["merged_into"] = merges
    return StructuredPlan(layers=plans), info


class ExpertMethod(StructuredMethod):
    """Base of the expert-removal methods: collect routing statistics, then `plan_from_stats` with ``score``."""

    structured = "experts"
    options = ExpertOptions
    score: ClassVar[str] = ""

    def plan(self, model: nn.Module, calibration: torch.Tensor | None, config: Any, device: torch.device,
             show_progress: bool = True) -> tuple[StructuredPlan, dict]:
        calibration = require_calibration(self.name, calibration)
        specs = moe_specs(model)
        stats = collect_expert_stats(model, specs, calibration, option(config, "batch_size"), device, show_progress,
                                     desc=f"{self.name}: routing statistics")
        return plan_from_stats(model, stats, config, self.score)


@register_method("expert-frequency")
class ExpertFrequency(ExpertMethod):
    """Remove the experts the router picks least often (top-k counts over the calibration tokens)."""

    score = "expert-frequency"


@register_method("ean")
class Ean(ExpertMethod):
    """Expert activation norm: remove the experts whose outputs are smallest on the tokens routed to them."""

    score = "ean"


@register_method("reap")
class Reap(ExpertMethod):
    """REAP (router-weighted expert activation pruning): mean router weight x output norm over routed tokens."""

    score = "reap"


@register_method("easy-ep")
class EasyEp(ExpertMethod):
    """EASY-EP: router weight x output norm, weighted by how much the MoE layer changes each token."""

    score = "easy-ep"


@register_method("random-experts")
class RandomExperts(ExpertMethod):
    """Seeded random expert removal (a baseline; still honours the super-expert guard)."""

    score = "random"
