"""Registered structured methods: each decides what to remove and returns a `StructuredPlan`.

========================  ==========  ==========================================================
name                      structured  score
========================  ==========  ==========================================================
``"flap"``                width       input fluctuation of the output projections (FLAP)
``"wanda-sp"``            width       ``mean |W| * ||X||`` of the output projections
``"taylor"``              width       first-order Taylor ``w * dL/dw`` per dependency group
``"block-influence"``     depth       ShortGPT Block Influence, lowest blocks go
``"angular"``             depth       contiguous span with the smallest angular distance
``"finercut"``            sublayer    greedy removal of attention / MLP sublayers
========================  ==========  ==========================================================

Every method has ``plan(model, calibration, config, device, show_progress) -> (StructuredPlan, info)``;
surgery (`hf_prune.structure.surgery.apply_plan`) makes the model smaller afterwards. ``config.sparsity``
is the fraction of decoder-block parameters to remove.

Config fields read (with these defaults): ``sparsity``, ``width_units="both"`` (``"mlp"``, ``"heads"``),
``allocation="global"`` (``"uniform"``), ``gqa_mode="query"`` (``"group"``), ``bias_compensation=True``
(FLAP and Wanda-sp), ``round_to=1``, ``angular_last_token=True``, ``taylor_variant="element"``
(``"vector"``), ``finercut_tokens=2048``, ``reconstruct=False`` (width methods), ``dampening=0.01`` and
``max_damp_retries=3`` (reconstruction), plus ``batch_size``.

``reconstruct=True``: once a width method has chosen what each block keeps, every pruned output projection
is refit on its kept columns by least squares, with an intercept, so that it reproduces the *dense* layer's
output from the inputs the *pruned* model gives it (`hf_prune.structure.collect.sequential_refit`,
`hf_prune.structure.reconstruct.refit_projection`): block by block, attention before MLP, so the error of
earlier pruning is corrected instead of carried on. The refit weights and intercepts go into the plan
(``LayerPlan.attn_out_weight`` / ``mlp_out_weight``, ``attn_bias`` / ``mlp_bias``). The intercept does the
job of FLAP's bias compensation, so ``bias_compensation`` is not applied on top. No gradient steps.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_prune.registry import get_method
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                                      num_attention_heads=4, vocab_size=100)).eval()
    >>> method = get_method("block-influence")
    >>> method.structured
    'depth'
    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(sparsity=0.25, batch_size=4)
    >>> plan, info = method(cfg).plan(model, torch.randint(0, 100, (4, 16)), cfg, torch.device("cpu"), False)
    >>> len(plan.remove_blocks)
    1
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PruningConfig
from ..core.model import PrunableLayer, find_blocks, is_conv1d
from ..core.sources import active_mix, first_rows
from ..errors import CalibrationError, ConfigError
from ..oneshot.base import PruningMethod
from ..registry import register_method
from .allocate import WidthScores, allocate_width, check_choice, choose_blocks, span_length
from .arch import block_specs, num_params, unit_params
from .collect import (
    RefitJob,
    collect_depth_stats,
    collect_taylor_grads,
    collect_width_stats,
    sequential_refit,
)
from .finercut import greedy_sublayers
from .options import AngularOptions, FinerCutOptions, TaylorOptions, WidthOptions
from .plan import BlockSpec, LayerPlan, StructuredPlan
from .reconstruct import PairedMoments, refit_projection
from .scores import (
    best_span,
    bias_compensation,
    fluctuation_scores,
    group_sum,
    head_channels,
    standardize,
    taylor_importance,
    unit_terms,
    wanda_sp_scores,
)
from .units import attention_group_terms, mlp_group_terms


@functools.lru_cache(maxsize=1)
def _defaults() -> PruningConfig:
    return PruningConfig(method="flap", sparsity=0.2)


def option(config: Any, name: str) -> Any:
    """``config.<name>``, or the default of that field or option when ``config`` (e.g. a plain namespace) has
    none; options a method does not declare read as their default where they are declared."""
    value = getattr(config, name, None)
    return getattr(_defaults(), name) if value is None else value


# ------------------------------------------------------------------------------------- parameter costs
@dataclass(frozen=True)
class UnitCosts:
    """Parameters removed with one unit of one block (``kv_group``: a kv head with all of its query heads)."""

    mlp_channel: int = 0
    query_head: int = 0
    kv_group: int = 0
    attention: int = 0
    mlp: int = 0
    block: int = 0


def unit_costs(model: nn.Module, spec: BlockSpec) -> UnitCosts:
    """Parameter cost of each removable unit of one block (from `hf_prune.structure.arch.unit_params`)."""
    u = unit_params(model, spec)
    q_per_kv = spec.attention.num_heads // spec.attention.num_kv_heads if spec.attention is not None else 0
    return UnitCosts(u["mlp_channel"], u["query_head"], q_per_kv * u["query_head"] + u["kv_head"],
                     u["attention"], u["mlp"], u["block"])


def _budget(model: nn.Module, config: Any) -> tuple[float, int, list[nn.Module]]:
    sparsity = getattr(config, "sparsity", None)
    if not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise ConfigError(f"sparsity={sparsity!r}: structured pruning needs the fraction of decoder-block "
                          "parameters to remove, a number in (0, 1)")
    _, blocks = find_blocks(model)
    total = sum(num_params(b) for b in blocks)
    return float(sparsity) * total, total, list(blocks)


def require_calibration(name: str, calibration: torch.Tensor | None) -> torch.Tensor:
    if calibration is None or not isinstance(calibration, torch.Tensor) or calibration.dim() != 2:
        raise CalibrationError(f"method={name!r} needs calibration token ids [samples, seqlen]; got "
                               f"{type(calibration).__name__}")
    return calibration


def _depth_budget(
    name: str, model: nn.Module, calibration: torch.Tensor | None, config: Any
) -> tuple[torch.Tensor, float, int, list[int]]:
    """What a depth method starts from: the checked calibration, the parameter target, the parameters of all
    blocks and of each block."""
    calibration = require_calibration(name, calibration)
    target, total, blocks = _budget(model, config)
    return calibration, target, total, [num_params(b) for b in blocks]


def _weight(model: nn.Module, path: str) -> torch.Tensor:
    """The ``[out, in]`` float32 weight of a linear / Conv1D module."""
    module = model.get_submodule(path)
    layer = PrunableLayer(path, module, kind="conv1d" if is_conv1d(module) else "linear")
    return layer.read_weight().float()


class StructuredMethod(PruningMethod):
    """Base of the structured methods (``structured`` = ``"width"`` | ``"depth"`` | ``"sublayer"``)."""

    structured: ClassVar[str] = ""

    @classmethod
    def supports_dual(cls) -> bool:
        return False

    def plan(
        self, model: nn.Module, calibration: torch.Tensor | None, config: Any, device: torch.device,
        show_progress: bool = True,
    ) -> tuple[StructuredPlan, dict]:
        raise NotImplementedError

    def prune_group(self, weights, stats, sparsities, names):  # type: ignore[no-untyped-def]
        raise ConfigError(f"method={self.name!r} is structured: use hf_prune.prune, not the one-shot pipeline")


# ------------------------------------------------------------------------------------------ width
class _WidthMethod(StructuredMethod):
    structured = "width"
    options = WidthOptions
    standardized: ClassVar[bool] = True  # global threshold on per-module standardized scores
    compensates: ClassVar[bool] = False  # may add FLAP's bias compensation

    def scores(
        self, model: nn.Module, specs: list[BlockSpec], calibration: torch.Tensor, config: Any,
        device: torch.device, show_progress: bool,
    ) -> tuple[dict[int, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]], dict]:
        """Per block: (MLP channel scores, query-head scores, kv-group scores or None); plus stats."""
        raise NotImplementedError

    def plan(
        self, model: nn.Module, calibration: torch.Tensor | None, config: Any, device: torch.device,
        show_progress: bool = True,
    ) -> tuple[StructuredPlan, dict]:
        calibration = require_calibration(self.name, calibration)
        units, allocation = option(config, "width_units"), option(config, "allocation")
        gqa_mode, round_to = option(config, "gqa_mode"), option(config, "round_to")
        check_choice("width_units", units, ("mlp", "heads", "both"))
        target, total, blocks = _budget(model, config)
        specs = block_specs(model)
        scores, stats = self.scores(model, specs, calibration, config, device, show_progress)
        width: list[WidthScores] = []
        for spec in specs:
            c = unit_costs(model, spec)
            mlp_s, head_s, group_s = scores.get(spec.index, (None, None, None))
            kv = spec.attention.num_kv_heads if spec.attention is not None else 1
            width.append(WidthScores(spec.index, mlp_s, head_s, group_s, kv, c.mlp_channel, c.query_head, c.kv_group))
        layers, info = allocate_width(width, target, allocation, gqa_mode, units, round_to, self.standardized)
        if option(config, "reconstruct"):
            if active_mix(calibration) is not None:
                warnings.warn(f"{self.name}: reconstruct=True refits the output projections on all calibration rows "
                              "as one set; domain_weight applies to the choice of channels and heads only",
                              UserWarning, stacklevel=4)
            info["reconstruct"] = self._reconstruct(model, specs, layers, calibration, config, device, show_progress)
        elif self.compensates and option(config, "bias_compensation"):
            self._compensate(model, specs, layers, stats)
        # per-block widths are in the report's rows (runner.block_rows), not repeated here
        info.update({"method": self.name, "block_params": total, "sparsity": info["removed_params"] / total})
        return StructuredPlan(layers=layers), info

    @staticmethod
    def _compensate(model: nn.Module, specs: list[BlockSpec], layers: dict[int, LayerPlan], stats: dict) -> None:
        for spec in specs:
            plan = layers.get(spec.index)
            if plan is None:
                continue
            if plan.mlp_keep is not None and spec.mlp is not None:
                keep = set(plan.mlp_keep)
                pruned = [j for j in range(spec.mlp.intermediate) if j not in keep]
                plan.mlp_bias = bias_compensation(_weight(model, spec.mlp.output), stats[spec.mlp.output].mean,
                                                  pruned).cpu()
            if plan.heads_keep is not None and spec.attention is not None:
                a = spec.attention
                keep = set(plan.heads_keep)
                pruned = head_channels([h for h in range(a.num_heads) if h not in keep], a.head_dim)
                plan.attn_bias = bias_compensation(_weight(model, a.o), stats[a.o].mean, pruned).cpu()


    def _reconstruct(
        self, model: nn.Module, specs: list[BlockSpec], layers: dict[int, LayerPlan], calibration: torch.Tensor,
        config: Any, device: torch.device, show_progress: bool,
    ) -> dict[str, float]:
        """Refit every pruned output projection, sequentially (`sequential_refit`); fills the plans' weights and
        biases. Returns the largest dampening any refit needed (``{"max_dampening": ...}``)."""
        by_index = {s.index: s for s in specs}
        jobs: dict[int, list[RefitJob]] = {}
        which: dict[str, str] = {}
        for i, plan in sorted(layers.items()):
            spec = by_index[i]
            if plan.heads_keep is not None and spec.attention is not None:  # attention first: it feeds the MLP
                a = spec.attention
                jobs.setdefault(i, []).append(RefitJob(a.o, head_channels(plan.heads_keep, a.head_dim).tolist()))
                which[a.o] = "attn"
            if plan.mlp_keep is not None and spec.mlp is not None:
                jobs.setdefault(i, []).append(RefitJob(spec.mlp.output, list(plan.mlp_keep)))
                which[spec.mlp.output] = "mlp"
        damp0, retries = float(option(config, "dampening")), int(option(config, "max_damp_retries"))
        used = [damp0]

        def solve(i: int, job: RefitJob, m: PairedMoments) -> tuple[torch.Tensor, torch.Tensor]:
            w, b, damp = refit_projection(_weight(model, job.path), m.hessian, m.mean, job.keep, damp0, retries,
                                          job.path, cross=m.cross, dense_mean=m.dense_mean)
            used.append(damp)
            setattr(layers[i], f"{which[job.path]}_out_weight", w.cpu())
            setattr(layers[i], f"{which[job.path]}_bias", b.cpu())
            return w, b

        sequential_refit(model, jobs, calibration, option(config, "batch_size"), device, solve, show_progress,
                         desc=f"{self.name}: reconstruction")
        return {"max_dampening": max(used)}


class _ActivationWidthMethod(_WidthMethod):
    """Scores from the inputs of the attention / MLP output projections (FLAP, Wanda-sp)."""

    compensates = True

    @classmethod
    def supports_dual(cls) -> bool:
        return True  # collect_width_stats keeps general and domain moments apart under domain_weight

    def channel_scores(self, weight: torch.Tensor, stats: Any) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, model, specs, calibration, config, device, show_progress):  # type: ignore[no-untyped-def]
        stats = collect_width_stats(model, specs, calibration, option(config, "batch_size"), device, show_progress,
                                    desc=f"{self.name}: input statistics")
        out: dict[int, tuple] = {}
        for spec in specs:
            mlp_s = head_s = None
            if spec.mlp is not None:
                mlp_s = self.channel_scores(_weight(model, spec.mlp.output), stats[spec.mlp.output]).cpu()
            if spec.attention is not None:
                a = spec.attention
                head_s = group_sum(self.channel_scores(_weight(model, a.o), stats[a.o]), a.head_dim).cpu()
            out[spec.index] = (mlp_s, head_s, None)
        return out, stats


@register_method("flap")
class Flap(_ActivationWidthMethod):
    """FLAP (An et al., 2024): fluctuation ``Var(X_j) * ||W[:, j]||^2``, standardized, global, bias compensated.

    Scores follow the authors' implementation (which reproduces the paper's numbers): channel scores are
    standardized per module *before* they are pooled into heads, a head's score is the mean of its channels'
    standardized scores, and the attention channel metric is squared first. Pooling standardized channels
    keeps head scores near 0 unless a whole head is consistently weak, so heads are not removed more eagerly
    than MLP channels just because a layer has few of them.
    """

    standardized = False  # done here, at channel level

    def channel_scores(self, weight: torch.Tensor, stats: Any) -> torch.Tensor:
        return fluctuation_scores(weight, stats.var)

    def scores(self, model, specs, calibration, config, device, show_progress):  # type: ignore[no-untyped-def]
        raw, stats = super().scores(model, specs, calibration, config, device, show_progress)
        out: dict[int, tuple] = {}
        for spec in specs:
            mlp_s = raw[spec.index][0]
            head_s = None
            if spec.attention is not None:
                a = spec.attention
                channels = self.channel_scores(_weight(model, a.o), stats[a.o]).square()
                head_s = group_sum(standardize(channels), a.head_dim).cpu() / a.head_dim
            out[spec.index] = (None if mlp_s is None else standardize(mlp_s), head_s, None)
        return out, stats


@register_method("wanda-sp")
class WandaSp(_ActivationWidthMethod):
    """Wanda-sp: ``mean_i |W_ij| * ||X_j||`` per channel, summed per head."""

    def channel_scores(self, weight: torch.Tensor, stats: Any) -> torch.Tensor:
        return wanda_sp_scores(weight, stats.sum_sq)


# ------------------------------------------------------------------------------------------ taylor
def _taylor_params(model: nn.Module, specs: list[BlockSpec]) -> dict[str, nn.Parameter]:
    paths: list[str] = []
    for spec in specs:
        if spec.attention is not None:
            a = spec.attention
            paths += [p for p in (a.q, a.k, a.v, a.qkv, a.o) if p]
        if spec.mlp is not None:
            paths += [*spec.mlp.inputs, spec.mlp.output] + ([spec.mlp.fused_gate_up] if spec.mlp.fused_gate_up else [])
    params: dict[str, nn.Parameter] = {}
    for path in paths:
        module = model.get_submodule(path)
        for pname in ("weight", "bias"):
            p = getattr(module, pname, None)
            if isinstance(p, nn.Parameter):
                params[f"{path}.{pname}"] = p
    return params


class _TaylorTerms:
    """Accumulates per-unit ``(sum w*g, sum |w*g|)`` over the parameters of a group."""

    def __init__(self, model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
        self.model, self.grads = model, grads

    def terms(self, path: str, index: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit terms of module ``path``'s weight (``dim`` 0 = rows, 1 = columns of ``[out, in]``) and bias."""
        module = self.model.get_submodule(path)
        w = module.weight.detach()
        g = self.grads[f"{path}.weight"].to(w.device)
        prod = w.float() * g
        if is_conv1d(module):
            prod = prod.t()
        signed, absolute = unit_terms(prod, index, dim)
        bias = getattr(module, "bias", None)
        if dim == 0 and isinstance(bias, nn.Parameter) and f"{path}.bias" in self.grads:
            s_b, a_b = unit_terms(bias.detach().float() * self.grads[f"{path}.bias"].to(bias.device), index, 0)
            signed, absolute = signed + s_b, absolute + a_b
        return signed.cpu(), absolute.cpu()


@register_method("taylor", options=TaylorOptions)
class Taylor(_WidthMethod):
    """LLM-Pruner's first-order Taylor importance per dependency group (needs gradients; not block by block).

    Groups: MLP channel ``j`` = row ``j`` of every input projection (gate/up/fc, both halves of a fused
    gate_up) + column ``j`` of the output projection; query head ``h`` = its q rows + its o columns; a kv
    group (``gqa_mode="group"``) adds the kv head's k and v rows to its query heads. Raw scores estimate
    the loss change, so the global threshold compares them directly (no standardization).
    """

    standardized = False

    def scores(self, model, specs, calibration, config, device, show_progress):  # type: ignore[no-untyped-def]
        variant = option(config, "taylor_variant")
        check_choice("taylor_variant", variant, ("element", "vector"))
        grads = collect_taylor_grads(model, _taylor_params(model, specs), calibration, option(config, "batch_size"),
                                     device, show_progress)
        t = _TaylorTerms(model, grads)
        out: dict[int, tuple] = {}
        for spec in specs:
            mlp_s = head_s = group_s = None
            if spec.mlp is not None:
                mlp_s = taylor_importance(*mlp_group_terms(t, spec.mlp), variant)
            if spec.attention is not None:
                (hs, ha), (ks, ka) = attention_group_terms(t, spec.attention)
                head_s = taylor_importance(hs, ha, variant)
                q = spec.attention.num_heads // spec.attention.num_kv_heads
                gs = hs.view(-1, q).sum(1) + ks
                ga = ha.view(-1, q).sum(1) + ka
                group_s = taylor_importance(gs, ga, variant)
            out[spec.index] = (mlp_s, head_s, group_s)
        del grads
        return out, {}


# ------------------------------------------------------------------------------------------ depth
@register_method("block-influence")
class BlockInfluence(StructuredMethod):
    """ShortGPT: remove the blocks with the lowest ``BI = 1 - mean cos(x_in, x_out)``."""

    structured = "depth"

    def plan(self, model, calibration, config, device, show_progress=True):  # type: ignore[no-untyped-def]
        calibration, target, total, costs = _depth_budget(self.name, model, calibration, config)
        stats = collect_depth_stats(model, calibration, option(config, "batch_size"), device, show_progress)
        chosen = choose_blocks(stats.block_influence, costs, target)
        removed = sum(costs[i] for i in chosen)
        info = {"method": self.name, "block_influence": stats.block_influence, "remove_blocks": chosen,
                "block_params": total, "removed_params": removed, "target_params": int(round(target)),
                "sparsity": removed / total}
        return StructuredPlan(remove_blocks=chosen), info


@register_method("angular", options=AngularOptions)
class Angular(StructuredMethod):
    """Gromov et al.: remove the contiguous span of ``n`` blocks with the smallest angular distance."""

    structured = "depth"

    def plan(self, model, calibration, config, device, show_progress=True):  # type: ignore[no-untyped-def]
        calibration, target, total, costs = _depth_budget(self.name, model, calibration, config)
        n = span_length(costs, target)
        last_token = bool(option(config, "angular_last_token"))
        info: dict[str, Any] = {"method": self.name, "block_params": total, "target_params": int(round(target)),
                                "span": n, "last_token": last_token}
        if n == 0:
            info.update({"remove_blocks": [], "removed_params": 0, "sparsity": 0.0})
            return StructuredPlan(), info
        stats = collect_depth_stats(model, calibration, option(config, "batch_size"), device, show_progress,
                                    all_token_span=None if last_token else n)
        dist = stats.span_distances(n, last_token)
        start = best_span(dist)
        chosen = list(range(start, start + n))
        removed = sum(costs[i] for i in chosen)
        info.update({"distances": dist.tolist(), "start": start, "remove_blocks": chosen,
                     "removed_params": removed, "sparsity": removed / total})
        return StructuredPlan(remove_blocks=chosen), info


# ---------------------------------------------------------------------------------------- sublayer
@register_method("finercut", options=FinerCutOptions)
class FinerCut(StructuredMethod):
    """FinerCut: greedily remove the attention / MLP sublayers whose removal changes the output least.

    Uses the first ``finercut_tokens`` (default 2048) calibration tokens: ``max(1, tokens // seqlen)``
    sequences, each cut to at most ``tokens`` positions. A block whose attention and MLP both go is
    removed as a whole block.
    """

    structured = "sublayer"

    def plan(self, model, calibration, config, device, show_progress=True):  # type: ignore[no-untyped-def]
        calibration = require_calibration(self.name, calibration)
        tokens = int(option(config, "finercut_tokens"))
        seqlen = min(calibration.shape[1], tokens)
        calib = first_rows(calibration, max(1, tokens // seqlen))[:, :seqlen]
        target, total, blocks = _budget(model, config)
        specs = block_specs(model)
        costs: dict[tuple[int, str], int] = {}
        for spec in specs:
            c = unit_costs(model, spec)
            if spec.attention is not None:
                costs[(spec.index, "attention")] = c.attention
            if spec.mlp is not None:
                costs[(spec.index, "mlp")] = c.mlp
        order = greedy_sublayers(model, specs, costs, calib, option(config, "batch_size"), device, target,
                                 show_progress)
        layers: dict[int, LayerPlan] = {}
        for step in order:
            plan = layers.setdefault(step["block"], LayerPlan())
            if step["sublayer"] == "attention":
                plan.remove_attention = True
            else:
                plan.remove_mlp = True
        both = sorted(i for i, p in layers.items() if p.remove_attention and p.remove_mlp)
        for i in both:
            del layers[i]
        removed = sum(s["params"] for s in order)
        info = {"method": self.name, "order": order, "block_params": total, "removed_params": removed,
                "target_params": int(round(target)), "sparsity": removed / total, "tokens": calib.numel()}
        return StructuredPlan(layers=layers, remove_blocks=both), info
