"""Where the removable units of each decoder block live, and what one unit costs in parameters.

Blocks are found generically (`hf_prune.core.model.find_blocks`); inside a block, attention and MLP projections are
recognised by their layout, not by model name: separate ``q/k/v_proj`` + ``o_proj``/``out_proj`` (Llama family,
Mistral, Qwen2/3, Gemma2/3, OPT, Qwen3-MoE), Phi-3's fused ``qkv_proj``, GPT-2's ``Conv1D`` ``c_attn``,
GPT-NeoX's per-head interleaved ``query_key_value``; MLPs ``gate/up/down_proj``, Phi-3 ``gate_up_proj``,
``c_fc/c_proj``, ``dense_h_to_4h/dense_4h_to_h`` and OPT's ``fc1/fc2``. MoE blocks have ``mlp=None`` (their
width is not prunable here) and an `ExpertsSpec` (routed experts can be removed), and can lose attention heads, the
attention sublayer or the whole block.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_prune.structure.arch import block_specs, unit_params
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> spec = block_specs(model)[0]
    >>> spec.attention.q, spec.mlp.output, spec.mlp.intermediate
    ('model.layers.0.self_attn.q_proj', 'model.layers.0.mlp.down_proj', 64)
    >>> unit_params(model, spec)["mlp_channel"]  # one row of gate and up, one column of down: 3 * 32
    96
"""

from __future__ import annotations

from torch import nn

from ..core.model import find_blocks
from ..errors import UnsupportedModelError
from . import modeling_hf_prune as shipped
from .plan import AttentionSpec, BlockSpec, ExpertsSpec, MlpSpec

SUPPORTED = ("Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3, Phi-3, GPT-2, OPT, GPT-NeoX; MoE models with "
             "transformers v5 fused experts (Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE, GPT-OSS: attention, depth and "
             "whole routed experts) and other models whose blocks use one of these layouts")


def _prefixed(layout: dict, prefix: str) -> dict:
    out = {}
    for key, value in layout.items():
        if key in ("module", "o", "q", "k", "v", "qkv", "output", "fused_gate_up") and isinstance(value, str):
            value = f"{prefix}.{value}" if value else prefix
        elif key in ("extra", "inputs"):
            value = tuple(f"{prefix}.{v}" for v in value)
        out[key] = value
    return out


def block_spec(block: nn.Module, prefix: str, index: int) -> BlockSpec:
    """The `BlockSpec` of one block whose path in the model is ``prefix``."""
    attn, mlp, moe = shipped.attention_layout(block), shipped.mlp_layout(block), shipped.experts_layout(block)
    experts = None
    if moe is not None:
        experts = ExpertsSpec(**{k: f"{prefix}.{v}" if k in ("module", "experts", "router") else v
                                 for k, v in moe.items()})
    return BlockSpec(index=index, module=prefix,
                     attention=None if attn is None else AttentionSpec(**_prefixed(attn, prefix)),
                     mlp=None if mlp is None else MlpSpec(**_prefixed(mlp, prefix)), experts=experts)


def block_specs(model: nn.Module) -> list[BlockSpec]:
    """One `BlockSpec` per decoder block (indices of the model as it is now).

    Raises `UnsupportedModelError` when no block has a recognisable attention or dense MLP.
    """
    prefix, blocks = find_blocks(model)
    specs = [block_spec(b, f"{prefix}.{i}", i) for i, b in enumerate(blocks)]
    removed_attention = any(isinstance(m, shipped.ZeroAttention) for m in blocks.modules())
    if all(s.attention is None and s.mlp is None and s.experts is None for s in specs) and not removed_attention:
        raise UnsupportedModelError(
            f"structured pruning cannot find attention heads or MLP channels in the blocks of "
            f"{type(model).__name__} ({prefix}: {type(blocks[0]).__name__}). Supported: {SUPPORTED}. "
            "Use unstructured or N:M pruning for this model, or open an issue with the model class name."
        )
    return specs


def num_params(module: nn.Module) -> int:
    """Parameters of ``module`` (and its children)."""
    return sum(p.numel() for p in module.parameters())


def _bias(module: nn.Module) -> int:
    return 1 if getattr(module, "bias", None) is not None else 0


def unit_params(model: nn.Module, spec: BlockSpec) -> dict[str, int]:
    """Parameters that go with one removable unit of the block described by ``spec``.

    Keys: ``mlp_channel`` (one intermediate channel: its input-projection rows and output-projection column),
    ``query_head``, ``kv_head`` (one key/value head: its k and v rows), ``attention`` (the whole attention
    sublayer), ``mlp`` (the whole MLP sublayer, its projections) and ``block`` (everything in the block).
    Units that do not exist in the block count 0. ``expert``: one routed expert (its slices of the experts
    module and its router row).
    """
    get = model.get_submodule
    out = {"mlp_channel": 0, "query_head": 0, "kv_head": 0, "attention": 0, "mlp": 0, "expert": 0,
           "block": num_params(get(spec.module))}
    e = spec.experts
    if e is not None:
        per = 0
        for path, names in ((e.experts, e.expert_tensors), (e.router, e.router_tensors)):
            module = get(path)
            per += sum(p.numel() // e.num_experts for n, p in module.named_parameters(recurse=False) if n in names)
        out["expert"] = per
    a = spec.attention
    if a is not None:
        o = get(a.o)
        hidden, d = shipped.out_features(o), a.head_dim
        if a.qkv is None:
            q, k = get(a.q), get(a.k)
            out["query_head"] = d * (shipped.in_features(q) + _bias(q)) + d * hidden
            out["kv_head"] = 2 * d * (shipped.in_features(k) + _bias(k))
        else:
            qkv = get(a.qkv)
            row = shipped.in_features(qkv) + _bias(qkv)
            if a.qkv_layout == "interleaved":  # MHA: a head takes its q, k and v rows
                out["query_head"] = 3 * d * row + d * hidden
            else:
                out["query_head"] = d * row + d * hidden
                out["kv_head"] = 2 * d * row
        out["attention"] = num_params(get(a.module))
    m = spec.mlp
    if m is not None:
        names = list(m.inputs) + ([m.fused_gate_up] if m.fused_gate_up else [])
        per_channel = sum(shipped.in_features(get(n)) + _bias(get(n)) for n in m.inputs)
        if m.fused_gate_up:
            fused = get(m.fused_gate_up)
            per_channel += 2 * (shipped.in_features(fused) + _bias(fused))
        out["mlp_channel"] = per_channel + shipped.out_features(get(m.output))
        out["mlp"] = sum(num_params(get(n)) for n in names) + num_params(get(m.output))
    return out
