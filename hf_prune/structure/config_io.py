"""Make a structurally pruned model's config describe it.

`rewrite_config` first tries the stock fields (``intermediate_size``/``ffn_dim``/``n_inner``,
``num_attention_heads``, ``num_key_value_heads``, explicit ``head_dim``, ``num_hidden_layers``, trimmed
``layer_types``, ``attention_bias``/``mlp_bias``) and *verifies* the result by building the stock model class on
the meta device and comparing every parameter shape with the pruned model. When that fails (per-layer shapes,
removed attention sublayers, biases the stock class cannot have, head counts where the stock class derives
``head_dim`` from ``hidden_size``) the global fields stay as they were and the differences go to
``config.hf_prune_structure`` (read by hf_prune and by the ``trust_remote_code`` modeling file) and, under stock
field names, to transformers' ``config.per_layer_config``. That result is verified the same way.

Example:
    >>> from transformers import LlamaConfig
    >>> from hf_prune.structure.config_io import is_structured
    >>> is_structured(LlamaConfig())
    False
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from . import modeling_hf_prune as shipped

STRUCTURE_KEY = shipped.STRUCTURE_KEY


def is_structured(config: Any) -> bool:
    """True if ``config`` needs hf_prune (or the saved modeling file) to build the model."""
    return bool(getattr(config, STRUCTURE_KEY, None))


def describe(block: nn.Module) -> dict[str, Any]:
    """Shapes of one block as built: head counts, MLP width, removed attention, extra output biases."""
    out: dict[str, Any] = {"attention_removed": False}
    zero = next((m for m in block.children() if isinstance(m, shipped.ZeroAttention)), None)
    zero_mlp = next((m for m in block.children() if isinstance(m, shipped.ZeroMlp)), None)
    if zero_mlp is not None:
        out.update(mlp_removed=True, mlp_removed_bias=zero_mlp.bias is not None)
    attn, mlp = shipped.attention_layout(block), shipped.mlp_layout(block)
    if zero is not None:
        out.update(attention_removed=True, attention_bias=zero.bias is not None)
    elif attn is not None:
        o = block.get_submodule(attn["o"])
        out.update(num_heads=attn["num_heads"], num_kv_heads=attn["num_kv_heads"], head_dim=attn["head_dim"],
                   o_bias=o.bias is not None)
    if mlp is not None:
        out.update(intermediate=mlp["intermediate"], mlp_bias=block.get_submodule(mlp["output"]).bias is not None)
    moe = shipped.experts_layout(block)
    if moe is not None:
        out["num_experts"] = moe["num_experts"]
    return out


#: Config fields holding the routed-expert count (DeepSeek-V3, Mixtral/Qwen3-MoE/GPT-OSS, Qwen2-MoE/OLMoE); the
#: first one a config has is written (aliases write through to the canonical field).
EXPERT_FIELDS = ("n_routed_experts", "num_local_experts", "num_experts")


def _raw(config: Any) -> dict[str, Any]:
    return dict(config.__dict__)


def _trim_layers(config: Any, kept: list[int], n_before: int) -> None:
    sparse = None
    if _raw(config).get("mlp_only_layers") is not None and hasattr(config, "decoder_sparse_step"):
        only, step = set(config.mlp_only_layers), config.decoder_sparse_step
        experts = getattr(config, "num_experts", 0) or 0
        sparse = [i not in only and experts > 0 and (i + 1) % step == 0 for i in range(n_before)]
    for key, value in _raw(config).items():
        if isinstance(value, list) and len(value) == n_before and not key.startswith("_"):
            setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)
    dense_first = _raw(config).get("first_k_dense_replace")
    if isinstance(dense_first, int):  # DeepSeek: blocks below it are dense; kept ones stay in front, in order
        config.first_k_dense_replace = sum(1 for i in kept if i < dense_first)
    if sparse is not None:  # Qwen-MoE: which blocks are MoE follows the block index; make it explicit
        config.decoder_sparse_step = 1
        config.mlp_only_layers = [j for j, i in enumerate(kept) if not sparse[i]]


def _clean_copy(config: Any) -> Any:
    base = copy.deepcopy(config)
    base.per_layer_config = None
    for key in (STRUCTURE_KEY, "auto_map"):
        base.__dict__.pop(key, None)
    return base


def _meta_build(cls: type, config: Any, structured: bool = False) -> nn.Module:
    with torch.device("meta"):
        if not structured:
            return cls(config)
        model = cls.__new__(cls)
        with shipped.building(model, config):
            cls.__init__(model, config)
            shipped.finish_build(model)  # no-op when hf_prune's post_init hook already ran it
        return model


def _shape_diff(live: nn.Module, ref: nn.Module) -> tuple[list[str], list[str]]:
    """(problems, ref-only bias keys that the live model could add as zeros)."""
    a = {k: tuple(v.shape) for k, v in live.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    problems = [f"{k}: {a[k]} vs {b[k]}" for k in a.keys() & b.keys() if a[k] != b[k]]
    problems += [f"{k}: only in the pruned model" for k in a.keys() - b.keys()]
    addable = []
    for k in b.keys() - a.keys():
        path, _, leaf = k.rpartition(".")
        try:
            mod = live.get_submodule(path)
        except AttributeError:
            mod = None
        if leaf == "bias" and isinstance(mod, shipped._LINEAR) and mod.bias is None:
            addable.append(path)
        else:
            problems.append(f"{k}: only in the stock model")
    return problems, addable


def _uniform_fields(base: Any, ref: list[dict], actual: list[dict]) -> dict[str, Any] | None:
    """Stock config fields that describe every block, or None. Blocks of different kinds (dense and MoE blocks of
    one model) are compared within their kind; the fields of all kinds must agree."""
    kinds: dict[frozenset, list[int]] = {}
    for i, a in enumerate(actual):
        kinds.setdefault(frozenset(a), []).append(i)
    fields: dict[str, Any] = {}
    for members in kinds.values():
        if any(actual[i] != actual[members[0]] or ref[i] != ref[members[0]] for i in members):
            return None
        found = _kind_fields(base, ref[members[0]], actual[members[0]])
        if found is None or any(fields.get(k, v) != v for k, v in found.items()):
            return None
        fields.update(found)
    return fields


def _kind_fields(base: Any, r: dict, first: dict) -> dict[str, Any] | None:
    if first["attention_removed"] or first.get("mlp_removed"):
        return None
    fields: dict[str, Any] = {}
    if "num_heads" in first and (first["num_heads"], first["num_kv_heads"]) != (r["num_heads"], r["num_kv_heads"]):
        fields["num_attention_heads"] = first["num_heads"]
        if shipped._has_field(base, "num_key_value_heads"):
            fields["num_key_value_heads"] = first["num_kv_heads"]
        fields["head_dim"] = first["head_dim"]
    if "intermediate" in first and first["intermediate"] != r["intermediate"]:
        field = shipped.mlp_field(base)
        if field is None:
            return None
        fields[field] = first["intermediate"]
    if "num_experts" in first and first["num_experts"] != r.get("num_experts"):
        field = next((f for f in EXPERT_FIELDS if shipped._has_field(base, f)), None)
        if field is None:
            return None
        fields[field] = first["num_experts"]
    if first.get("o_bias") and not r.get("o_bias"):
        if not shipped._has_field(base, "attention_bias"):
            return None
        fields["attention_bias"] = True
    if first.get("mlp_bias") and not r.get("mlp_bias"):
        if not shipped._has_field(base, "mlp_bias"):
            return None
        fields["mlp_bias"] = True
    return fields


def _try_uniform(model: nn.Module, base: Any, fields: dict[str, Any]) -> bool:
    candidate = copy.deepcopy(base)
    for key, value in fields.items():
        setattr(candidate, key, value)
    try:
        ref = _meta_build(type(model), candidate)
    except Exception:  # the stock class cannot be built from these fields: not expressible
        return False
    problems, addable = _shape_diff(model, ref)
    if problems:
        return False
    for path in addable:  # e.g. attention_bias=True also gives q/k/v a bias: zeros keep the function
        shipped.add_bias(model.get_submodule(path))
    config = model.config
    config.per_layer_config = None
    config.__dict__.pop(STRUCTURE_KEY, None)
    for key, value in fields.items():
        setattr(config, key, value)
    return True


def _layer_entry(i: int, a: dict, r: dict) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if a["attention_removed"]:
        if not r["attention_removed"]:
            entry["attention_removed"] = True
            if a["attention_bias"]:
                entry["attention_bias"] = True
    elif "num_heads" in a:
        if a["head_dim"] != r.get("head_dim") or a["num_heads"] > r["num_heads"] or a["num_kv_heads"] > r["num_kv_heads"]:
            raise UnsupportedModelError(f"layer {i}: attention shape {a} cannot be built by shrinking {r}")
        if (a["num_heads"], a["num_kv_heads"]) != (r["num_heads"], r["num_kv_heads"]):
            entry.update(num_heads=a["num_heads"], num_kv_heads=a["num_kv_heads"])
        if a["o_bias"] and not r["o_bias"]:
            entry["o_bias"] = True
    if a.get("mlp_removed") and not r.get("mlp_removed"):
        entry["mlp_removed"] = True
        if a["mlp_removed_bias"]:
            entry["mlp_removed_bias"] = True
    if "num_experts" in a:
        if "num_experts" not in r or a["num_experts"] > r["num_experts"]:
            raise UnsupportedModelError(f"layer {i}: {a['num_experts']} routed experts cannot be built by shrinking "
                                        f"the config's {r.get('num_experts')}")
        if a["num_experts"] != r["num_experts"]:
            entry["num_experts"] = a["num_experts"]
    if "intermediate" in a:
        if a["intermediate"] > r["intermediate"]:
            raise UnsupportedModelError(f"layer {i}: MLP width {a['intermediate']} exceeds {r['intermediate']}")
        if a["intermediate"] != r["intermediate"]:
            entry["intermediate"] = a["intermediate"]
        if a["mlp_bias"] and not r["mlp_bias"]:
            entry["mlp_bias"] = True
    return entry


def _stock_overrides(base: Any, entry: dict) -> dict[str, Any]:
    """The same per-layer shapes under stock field names, where the stock meaning matches."""
    out: dict[str, Any] = {}
    field = shipped.mlp_field(base)
    if "intermediate" in entry and field is not None:
        out[field] = entry["intermediate"]
    # Head counts stay out: in transformers 5.23 the Llama-family config validators read num_attention_heads
    # globally, which raises on a heterogeneous config (save and load fail); hf_prune_structure carries them.
    skip = [name for name in ("attention", "mlp") if entry.get(f"{name}_removed")]
    if skip:
        out["skip"] = skip
    return out


def rewrite_config(model: nn.Module, prefix: str, kept: list[int], n_before: int) -> str:
    """Rewrite ``model.config`` after surgery; returns ``"stock"`` or ``"per_layer"`` (which path reloads it).

    ``kept``: original indices of the blocks still in the model (in order), ``n_before``: block count before.
    """
    config = model.config
    config.per_layer_config = None  # rebuilt from the modules below
    if len(kept) < n_before:
        _trim_layers(config, kept, n_before)
    blocks = model.get_submodule(prefix)
    base = _clean_copy(config)
    ref_model = _meta_build(type(model), base)
    ref = [describe(b) for b in shipped.find_structured_blocks(ref_model, prefix)]
    actual = [describe(b) for b in blocks]
    fields = _uniform_fields(base, ref, actual)
    if fields is not None and _try_uniform(model, base, fields):
        shipped.unbind_layer_configs(model)
        return "stock"
    layers, per_layer = {}, {}
    for i, (a, r) in enumerate(zip(actual, ref, strict=True)):
        entry = _layer_entry(i, a, r)
        if entry:
            layers[str(i)] = entry
            if overrides := _stock_overrides(base, entry):
                per_layer[i] = overrides
    version = 2 if any("num_experts" in e for e in layers.values()) else 1  # format 1 readers still load the rest
    config.__dict__[STRUCTURE_KEY] = {"format": version, "blocks": prefix, "layers": layers}
    config.per_layer_config = per_layer or None
    shipped.bind_layer_configs(model, blocks)
    check = _meta_build(type(model), copy.deepcopy(config), structured=True)
    problems, _ = _shape_diff(model, check)
    if problems:
        raise UnsupportedModelError(
            f"{type(model).__name__}: the pruned shapes cannot be rebuilt from the rewritten config "
            f"({'; '.join(sorted(problems)[:3])}); this architecture's structured save is not supported yet"
        )
    return "per_layer"
