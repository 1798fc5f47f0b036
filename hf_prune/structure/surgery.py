"""Physical structured surgery: apply a `StructuredPlan` to a model in place.

Two steps, kept apart: `resolve_plan` validates the whole plan against the model's `BlockSpec`s and turns it into
per-layer keep lists (pure index math, nothing is touched), then `apply_plan` slices the projections, replaces
removed attention sublayers, drops whole blocks and rewrites the config (`hf_prune.structure.config_io`).

Semantics of removals: a removed MLP becomes a `ZeroMlp` (OPT, whose fc1/fc2 sit in the block: zero channels and a
zero output bias), a removed attention becomes a `ZeroAttention` (it still advances the KV cache), so the residual
branch contributes nothing. With FLAP bias
compensation (``LayerPlan.attn_bias`` / ``mlp_bias``) the branch instead outputs its original output bias plus
the compensation, i.e. the mean output of what was removed. A ``reconstruct=True`` refit
(``LayerPlan.attn_out_weight`` / ``mlp_out_weight``) replaces the sliced output projection's weight; its intercept
travels in ``attn_bias`` / ``mlp_bias`` and is added to the bias like the compensation.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_prune.structure.plan import LayerPlan, StructuredPlan
    >>> from hf_prune.structure.surgery import apply_plan
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> plan = StructuredPlan(layers={l: LayerPlan(mlp_keep=list(range(32))) for l in (0, 1)}, remove_blocks=[2])
    >>> removed = apply_plan(model, plan)
    >>> model.config.intermediate_size, model.config.num_hidden_layers, len(model.model.layers)
    (32, 2, 2)
    >>> model(torch.tensor([[1, 2, 3]])).logits.shape
    torch.Size([1, 3, 100])
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..core.model import find_blocks, is_conv1d
from ..errors import ConfigError, UnsupportedModelError
from . import modeling_hf_prune as shipped
from .arch import block_specs, num_params
from .config_io import rewrite_config
from .expert_plan import merge_weights
from .plan import BlockSpec, LayerPlan, StructuredPlan


def _indices(values: list[int] | None, limit: int, what: str, layer: int) -> list[int] | None:
    if values is None:
        return None
    out = sorted(int(v) for v in values)
    if len(set(out)) != len(out):
        raise ConfigError(f"layer {layer}: {what} has repeated indices; give each kept index once")
    bad = [v for v in out if v < 0 or v >= limit]
    if bad:
        raise ConfigError(f"layer {layer}: {what} indices {bad[:5]} are out of range; allowed 0..{limit - 1}")
    return out


def _bias_vector(value: torch.Tensor | None, hidden: int, what: str, layer: int) -> torch.Tensor | None:
    if value is None:
        return None
    if tuple(value.shape) != (hidden,):
        raise ConfigError(f"layer {layer}: {what} must have shape [{hidden}] (hidden size), got {tuple(value.shape)}")
    return value.detach()


def _out_weight(value: torch.Tensor | None, shape: tuple[int, int], what: str, layer: int) -> torch.Tensor | None:
    if value is None:
        return None
    if tuple(value.shape) != shape:
        raise ConfigError(f"layer {layer}: {what} must have shape {list(shape)} ([hidden, kept input channels] of "
                          f"the output projection), got {list(value.shape)}")
    return value.detach()


def _resolve_heads(spec: BlockSpec, lp: LayerPlan, i: int) -> tuple[list[int], list[int]] | None:
    a = spec.attention
    if lp.heads_keep is None and lp.kv_heads_keep is None:
        return None
    if a is None:
        raise ConfigError(f"layer {i}: heads_keep/kv_heads_keep given but the block has no prunable attention "
                          "(already removed or unsupported); drop them from the plan")
    group = a.num_heads // a.num_kv_heads
    heads = _indices(lp.heads_keep, a.num_heads, "heads_keep", i)
    kv = _indices(lp.kv_heads_keep, a.num_kv_heads, "kv_heads_keep", i)
    if heads is None:
        heads = [h for k in kv for h in range(k * group, (k + 1) * group)]
    if kv is None:
        kv = sorted({h // group for h in heads})
    if not heads:
        raise ConfigError(f"layer {i}: the plan keeps no attention head; set remove_attention=True to drop the "
                          "attention sublayer instead")
    orphans = sorted({h for h in heads if h // group not in kv})
    if orphans:
        raise ConfigError(f"layer {i}: query heads {orphans} are kept but their key/value heads "
                          f"{sorted({h // group for h in orphans})} are not; keep those kv heads or drop the heads")
    counts = {k: sum(1 for h in heads if h // group == k) for k in kv}
    if len(set(counts.values())) != 1:
        raise ConfigError(f"layer {i}: kept query heads per kv head differ ({counts}); grouped-query attention "
                          "needs the same number of kept query heads in every kept kv group")
    return heads, kv


def resolve_plan(specs: list[BlockSpec], plan: StructuredPlan, hidden: int) -> tuple[dict[int, LayerPlan], list[int]]:
    """Validate the whole ``plan`` and return (per-layer cuts, indices of kept blocks). Touches nothing.

    Each cut is a normalised `LayerPlan`: keep lists sorted and range-checked (``heads_keep`` and
    ``kv_heads_keep`` both filled in when either was given), bias and weight tensors shape-checked and detached.

    Raises `ConfigError` naming the layer and what is allowed.
    """
    n = len(specs)
    removed = set(_indices(list(plan.remove_blocks), n, "remove_blocks", -1) or [])
    if len(removed) == n:
        raise ConfigError(f"the plan removes all {n} blocks; keep at least one")
    cuts: dict[int, LayerPlan] = {}
    for i, lp in sorted(plan.layers.items()):
        if not 0 <= int(i) < n:
            raise ConfigError(f"plan has a LayerPlan for block {i}; the model has blocks 0..{n - 1}")
        i = int(i)
        if i in removed:
            raise ConfigError(f"layer {i}: the plan both removes the block and prunes inside it; keep one of the two")
        spec = specs[i]
        cut = LayerPlan(remove_attention=lp.remove_attention, remove_mlp=lp.remove_mlp,
                        attn_bias=_bias_vector(lp.attn_bias, hidden, "attn_bias", i),
                        mlp_bias=_bias_vector(lp.mlp_bias, hidden, "mlp_bias", i))
        if lp.remove_attention:
            if lp.attn_out_weight is not None:
                raise ConfigError(f"layer {i}: remove_attention=True together with attn_out_weight; give one of "
                                  "them")
            if spec.attention is None:
                raise ConfigError(f"layer {i}: remove_attention=True but the block has no removable attention")
            if lp.heads_keep is not None or lp.kv_heads_keep is not None:
                raise ConfigError(f"layer {i}: remove_attention=True together with heads_keep; give one of them")
        else:
            resolved = _resolve_heads(spec, lp, i)
            if resolved is not None:
                cut.heads_keep, cut.kv_heads_keep = resolved
            if cut.attn_bias is not None and spec.attention is None:
                raise ConfigError(f"layer {i}: attn_bias given but the block has no attention output projection")
            if lp.attn_out_weight is not None:
                a = spec.attention
                if a is None:
                    raise ConfigError(f"layer {i}: attn_out_weight given but the block has no attention output "
                                      "projection")
                n_heads = len(cut.heads_keep) if cut.heads_keep is not None else a.num_heads
                cut.attn_out_weight = _out_weight(lp.attn_out_weight, (hidden, n_heads * a.head_dim),
                                                  "attn_out_weight", i)
        if lp.remove_mlp or lp.mlp_keep is not None or cut.mlp_bias is not None or lp.mlp_out_weight is not None:
            if spec.mlp is None:
                raise ConfigError(f"layer {i}: the block has no dense MLP (MoE or none), so mlp_keep/remove_mlp/"
                                  "mlp_bias cannot apply; remove the whole block or only prune attention")
        if lp.remove_mlp:
            if lp.mlp_keep is not None or lp.mlp_out_weight is not None:
                raise ConfigError(f"layer {i}: remove_mlp=True together with mlp_keep/mlp_out_weight; give one "
                                  "of them")
        else:
            if lp.mlp_keep is not None:
                cut.mlp_keep = _indices(lp.mlp_keep, spec.mlp.intermediate, "mlp_keep", i)
                if not cut.mlp_keep:
                    raise ConfigError(f"layer {i}: mlp_keep is empty; set remove_mlp=True to drop the MLP sublayer")
            if lp.mlp_out_weight is not None:
                n_ch = len(cut.mlp_keep) if cut.mlp_keep is not None else spec.mlp.intermediate
                cut.mlp_out_weight = _out_weight(lp.mlp_out_weight, (hidden, n_ch), "mlp_out_weight", i)
        if lp.experts_keep is not None or lp.experts_merge_into is not None:
            cut.experts_keep, cut.experts_merge_into, cut.experts_frequency = _resolve_experts(spec, lp, i)
        cuts[i] = cut
    return cuts, [i for i in range(n) if i not in removed]


def _resolve_experts(spec: BlockSpec, lp: LayerPlan, i: int
                     ) -> tuple[list[int] | None, dict[int, int] | None, list[float] | None]:
    e = spec.experts
    if e is None:
        raise ConfigError(f"layer {i}: experts_keep given but the block has no routed experts (dense or already "
                          "removed); drop it from the plan")
    if e.unsupported:
        raise UnsupportedModelError(f"layer {i}: routed experts cannot be removed from this layout: {e.unsupported}. "
                                    "Open an issue with the model class; width and depth methods still apply")
    keep = _indices(lp.experts_keep, e.num_experts, "experts_keep", i)
    n = e.num_experts if keep is None else len(keep)
    top_k = e.top_k or 1
    if n < top_k:
        raise ConfigError(f"layer {i}: experts_keep keeps {n} experts but the router picks num_experts_per_tok="
                          f"{top_k} per token; keep at least {top_k}")
    if e.num_group > 1 and keep is not None:
        size = e.num_experts // e.num_group
        per_group = [sum(1 for x in keep if x // size == g) for g in range(e.num_group)]
        if len(set(per_group)) != 1:
            raise ConfigError(f"layer {i}: group-limited routing (n_group={e.num_group}) needs the same number of "
                              f"kept experts in every group; experts_keep keeps {per_group} per group")
        if per_group[0] < 2 or per_group[0] * e.topk_group < top_k:
            raise ConfigError(f"layer {i}: group-limited routing scores a group by its best 2 experts and picks "
                              f"{top_k} experts from topk_group={e.topk_group} groups; keeping {per_group[0]} per "
                              f"group is too few (need >= 2 and >= {-(-top_k // e.topk_group)})")
    merge = None
    if lp.experts_merge_into is not None:
        if keep is None:
            raise ConfigError(f"layer {i}: experts_merge_into needs experts_keep (which experts stay)")
        kept = set(keep)
        merge = {int(r): int(k) for r, k in lp.experts_merge_into.items()}
        bad = {r: k for r, k in merge.items() if r in kept or k not in kept or not 0 <= r < e.num_experts}
        if bad:
            raise ConfigError(f"layer {i}: experts_merge_into maps {bad}; each key must be a removed expert and "
                              f"each value a kept one ({keep})")
        freq = lp.experts_frequency
        if freq is None or len(freq) != e.num_experts:
            raise ConfigError(f"layer {i}: experts_merge_into needs experts_frequency with one routing count per "
                              f"expert ({e.num_experts}), got {None if freq is None else len(freq)}")
    return keep, merge, None if merge is None else [float(f) for f in lp.experts_frequency]


def _set_weight(mod: nn.Module, value: torch.Tensor) -> None:
    """Overwrite a (sliced) Linear / Conv1D weight with ``value`` given as ``[out, in]``."""
    w = mod.weight
    if w.device.type == "meta":
        return
    value = value.t() if is_conv1d(mod) else value
    if tuple(value.shape) != tuple(w.shape):
        raise ConfigError(f"refit weight of shape {list(value.shape)} does not fit the projection's "
                          f"{list(w.shape)}")
    w.data.copy_(value.to(dtype=w.dtype, device=w.device))


def _removed_branch_bias(proj: nn.Module, compensation: torch.Tensor | None) -> torch.Tensor | None:
    """What a removed sublayer outputs: its output projection's bias plus the compensation (None without one)."""
    if compensation is None:
        return None
    bias = compensation.to(proj.weight.device, proj.weight.dtype)
    return bias if proj.bias is None else bias + proj.bias.data


def _cut_block(block: nn.Module, cut: LayerPlan) -> None:
    """Apply one cut resolved by `resolve_plan` (sorted, validated keep lists) to ``block``."""
    attn, mlp = shipped.attention_layout(block), shipped.mlp_layout(block)
    if cut.remove_attention:
        shipped.remove_attention(block, attn, _removed_branch_bias(block.get_submodule(attn["o"]), cut.attn_bias))
    else:
        if cut.heads_keep is not None:
            shipped.keep_heads(block, attn, cut.heads_keep, cut.kv_heads_keep)
        if cut.attn_out_weight is not None:
            _set_weight(block.get_submodule(attn["o"]), cut.attn_out_weight)
        if cut.attn_bias is not None:
            shipped.add_bias(block.get_submodule(attn["o"]), cut.attn_bias)
    if cut.experts_keep is not None:
        moe = shipped.experts_layout(block)
        experts = block.get_submodule(moe["experts"])
        merged = None
        if cut.experts_merge_into:  # from the original tensors, one layer at a time (no model-wide copies)
            tensors = {n: getattr(experts, n).detach() for n in moe["expert_tensors"]}
            if all(t.device.type != "meta" for t in tensors.values()):
                merged = merge_weights(tensors, cut.experts_keep, cut.experts_merge_into,
                                       torch.tensor(cut.experts_frequency))
        shipped.keep_experts(block, moe, cut.experts_keep)
        for name, value in (merged or {}).items():
            getattr(experts, name).data.copy_(value)
    if cut.remove_mlp:
        shipped.remove_mlp(block, mlp, _removed_branch_bias(block.get_submodule(mlp["output"]), cut.mlp_bias))
        return
    if cut.mlp_keep is not None:
        shipped.keep_channels(block, mlp, cut.mlp_keep)
    if cut.mlp_out_weight is not None:
        _set_weight(block.get_submodule(mlp["output"]), cut.mlp_out_weight)
    if cut.mlp_bias is not None:
        shipped.add_bias(block.get_submodule(mlp["output"]), cut.mlp_bias)


def apply_plan(model: nn.Module, plan: StructuredPlan) -> dict[int, int]:
    """Physically apply ``plan`` to ``model`` in place and rewrite ``model.config`` to describe the result.

    Returns the number of parameters removed per block, keyed by *original* block index (a removed block counts
    all its parameters; FLAP biases added to a bias-free projection count negative). The whole plan is validated
    first (`ConfigError`); nothing is changed when it is invalid. Works on CPU, GPU and meta tensors.
    """
    specs = block_specs(model)
    prefix, blocks = find_blocks(model)
    hidden = model.config.get_text_config(decoder=True).hidden_size if hasattr(model, "config") else None
    if hidden is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no config.hidden_size; structured surgery needs it")
    cuts, kept = resolve_plan(specs, plan, hidden)
    if len(kept) < len(blocks) and getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise ConfigError("this GPT-2 config scales attention by 1/(layer index); removing blocks would change "
                          "the scaling of later blocks on reload. Prune heads/channels only, or keep all blocks")
    before = [num_params(b) for b in blocks]
    try:
        for i, cut in cuts.items():
            _cut_block(blocks[i], cut)
        if len(kept) < len(blocks):
            new_blocks = nn.ModuleList([blocks[i] for i in kept])
            for new_index, block in enumerate(new_blocks):
                shipped.renumber(block, new_index)
            model.set_submodule(prefix, new_blocks)
            blocks = new_blocks
        rewrite_config(model, prefix, kept, n_before=len(before))
    except BaseException:
        model._hf_prune_incomplete = True  # weights were cut: never let it look like a finished model
        raise
    counts = {e["num_experts"] for b in blocks if (e := shipped.experts_layout(b)) is not None}
    if len(counts) == 1 and isinstance(getattr(model, "num_experts", None), int):
        model.num_experts = counts.pop()  # the causal LM sizes its load-balancing loss with it
    elif len(counts) > 1 and getattr(model.config, "output_router_logits", False):
        warnings.warn("the MoE layers now have different expert counts, which transformers' load-balancing loss "
                      "cannot handle; config.output_router_logits is set to False (train without the aux loss, or "
                      "prune with expert_allocation='uniform')", stacklevel=2)
        model.config.output_router_logits = False
    after = dict(zip(kept, (num_params(b) for b in blocks), strict=True))
    return {i: before[i] - after.get(i, 0) for i in range(len(before)) if before[i] != after.get(i, 0)}
