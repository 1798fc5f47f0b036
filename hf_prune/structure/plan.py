"""Data contracts shared by structured scoring (which decides what to remove) and surgery (which removes it).

Scoring code only ever produces a `StructuredPlan`; surgery only ever consumes one. Indices always refer to the
model as it was *before* surgery (original block index, original head index, original channel index).

* `BlockSpec` / `AttentionSpec` / `MlpSpec` describe where the removable units of one decoder block live
  (produced by `hf_prune.structure.arch.block_specs`).
* `LayerPlan` says what one block keeps; `StructuredPlan` collects them plus whole blocks to drop.

Example:
    >>> from hf_prune.structure.plan import LayerPlan, StructuredPlan
    >>> plan = StructuredPlan(layers={0: LayerPlan(mlp_keep=[0, 2, 3])}, remove_blocks=[1])
    >>> plan.layers[0].mlp_keep, plan.remove_blocks
    ([0, 2, 3], [1])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class AttentionSpec:
    """Where the heads of one attention module live.

    Projections are given as module paths relative to the *model* (e.g. ``"model.layers.3.self_attn.q_proj"``).
    Separate q/k/v: ``q``, ``k``, ``v`` set, ``qkv`` None. Fused (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``,
    GPT-NeoX ``query_key_value``): ``qkv`` set and ``qkv_layout`` says how rows are ordered:
    ``"concat"`` = [all q | all k | all v] (Phi-3, GPT-2), ``"interleaved"`` = per head [q_h | k_h | v_h] (NeoX).
    ``o`` is the output projection whose *input* channels are ``num_heads * head_dim`` (head-major).
    Query head ``h`` uses key/value head ``h // (num_heads // num_kv_heads)``.
    """

    module: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    qkv_layout: str | None = None
    # q/k normalisation over head_dim (Qwen3/Gemma3 q_norm, k_norm) is per head_dim, so it is unaffected by
    # head removal; listed so surgery can assert that.
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class MlpSpec:
    """Where the intermediate channels of one MLP live.

    ``inputs``: projections whose *output rows* are intermediate channels (gate_proj, up_proj / fc1 / c_fc /
    dense_h_to_4h). ``fused_gate_up``: Phi-3's ``gate_up_proj`` whose rows are [gate | up], each half
    ``intermediate`` rows. ``output``: the projection whose *input columns* are intermediate channels.
    All paths are relative to the model.
    """

    module: str
    output: str
    intermediate: int
    inputs: tuple[str, ...] = ()
    fused_gate_up: str | None = None


@dataclass(frozen=True)
class ExpertsSpec:
    """Where the routed experts of one MoE sublayer live (transformers v5 fused experts).

    ``module`` is the MoE sublayer, ``experts`` the fused experts module (3-D ``gate_up_proj``/``down_proj``,
    any layout), ``router`` the module whose ``weight`` has one row per expert. ``expert_tensors`` /
    ``router_tensors`` name their tensors indexed by expert along dim 0. ``num_group``/``topk_group``:
    group-limited routing (DeepSeek-V3; experts ``[g * E/num_group, (g+1) * E/num_group)`` form group ``g``).
    """

    module: str
    experts: str
    router: str
    num_experts: int
    top_k: int | None
    num_group: int = 1
    topk_group: int = 1
    expert_tensors: tuple[str, ...] = ()
    router_tensors: tuple[str, ...] = ()
    #: why experts cannot be removed from this layout (None: they can); surgery refuses with it
    unsupported: str | None = None


@dataclass(frozen=True)
class BlockSpec:
    """One decoder block: its index and path, its attention and dense MLP (None when absent, e.g. MoE MLP) and its
    routed experts (None for a dense block)."""

    index: int
    module: str
    attention: AttentionSpec | None
    mlp: MlpSpec | None
    experts: ExpertsSpec | None = None


@dataclass
class LayerPlan:
    """What one block keeps. ``None`` means "unchanged".

    Args:
        mlp_keep: sorted original indices of intermediate channels to keep.
        heads_keep: sorted original indices of query heads to keep.
        kv_heads_keep: sorted original indices of key/value heads to keep. Every kept kv head must keep the
            same number of query heads, and every kept query head's kv head must be kept (GQA consistency).
        remove_attention: drop the whole attention sublayer (its residual branch becomes zero).
        remove_mlp: drop the whole MLP sublayer.
        attn_bias: added to the attention output projection's bias, shape [hidden] (FLAP bias compensation,
            or the intercept of the ``reconstruct=True`` refit).
        mlp_bias: added to the MLP output projection's bias, shape [hidden] (same two sources).
        attn_out_weight: ``reconstruct=True`` refit of the attention output projection on its kept input
            channels: replaces its weight after slicing, shape [hidden, kept heads * head_dim] in the
            ``[out, in]`` orientation (transposed for a GPT-2 ``Conv1D`` by surgery).
        mlp_out_weight: the same for the MLP output projection, shape [hidden, kept channels].
        experts_keep: sorted original indices of the routed experts to keep (MoE blocks).
        experts_merge_into: removed expert -> the kept expert it is folded into (original indices); surgery
            replaces each kept expert's tensors by the frequency-weighted average of itself and what it receives
            (`hf_prune.structure.expert_plan.merge_weights`). None: removed experts are dropped.
        experts_frequency: per original expert, the routing counts that weight the merge.
    """

    mlp_keep: list[int] | None = None
    heads_keep: list[int] | None = None
    kv_heads_keep: list[int] | None = None
    remove_attention: bool = False
    remove_mlp: bool = False
    attn_bias: torch.Tensor | None = None
    mlp_bias: torch.Tensor | None = None
    attn_out_weight: torch.Tensor | None = None
    mlp_out_weight: torch.Tensor | None = None
    experts_keep: list[int] | None = None
    experts_merge_into: dict[int, int] | None = None
    experts_frequency: list[float] | None = None


@dataclass
class StructuredPlan:
    """Per-block `LayerPlan` (keyed by original block index) plus original indices of whole blocks to drop."""

    layers: dict[int, LayerPlan] = field(default_factory=dict)
    remove_blocks: list[int] = field(default_factory=list)
