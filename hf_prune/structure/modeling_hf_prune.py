"""Self-contained structure support for structurally pruned checkpoints (imports only torch and transformers).

hf_prune copies this very file into every checkpoint whose per-layer shapes stock transformers cannot express,
with an ``auto_map`` entry in config.json, so that a machine *without* hf_prune loads the checkpoint with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. hf_prune itself imports the same
functions (layout discovery, slicing, the zero attention module, the build hooks), so both load paths run one
code path.

How a pruned checkpoint is built: the model is constructed from the *global* config fields (full width, on the
meta device inside ``from_pretrained``), then every block listed under ``config.hf_prune_structure["layers"]`` is
shrunk to its stored shape before the weights are loaded. ``config.per_layer_config`` (transformers'
heterogeneous-config API) holds the same shapes under stock field names; it is hidden from the config while the
full-width model is built (stock modeling code reads the global fields) and restored afterwards.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_prune.structure.modeling_hf_prune import attention_layout, keep_heads
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> block = model.model.layers[0]
    >>> layout = attention_layout(block)
    >>> layout["num_heads"], layout["num_kv_heads"], layout["head_dim"]
    (4, 2, 8)
    >>> keep_heads(block, layout, [0, 1], [0])
    >>> attention_layout(block)["num_heads"], block.self_attn.num_key_value_groups
    (2, 2)
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - every transformers 5 has it
    Conv1D = None  # type: ignore[assignment,misc]

STRUCTURE_KEY = "hf_prune_structure"
#: Keywords a KV cache reaches an attention module under: ``cache`` (transformers >= 5.24), then the older
#: ``past_key_values`` / ``past_key_value``, and GPT-NeoX's ``layer_past``. (Kept here rather than imported from
#: hf_prune.core.compat: this file must run where hf_prune is not installed.)
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
#: Format of ``config.hf_prune_structure`` this file reads; 2 adds per-layer ``num_experts`` (checkpoints without it
#: are written as format 1, so older readers still load them).
FORMAT_VERSION = 2
_LINEAR = (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)


# ----------------------------------------------------------------------------------------------- linear helpers


# Deliberately a private twin of `hf_prune.core.model.is_conv1d`: this file is copied into checkpoints and loaded
# with ``trust_remote_code`` where hf_prune is not installed, so it may import only torch and transformers.
def _is_conv1d(mod: nn.Module) -> bool:
    return Conv1D is not None and isinstance(mod, Conv1D)


def out_features(mod: nn.Module) -> int:
    """Output width of an ``nn.Linear`` or GPT-2 ``Conv1D`` (weight ``[in, out]``)."""
    return mod.weight.shape[1] if _is_conv1d(mod) else mod.weight.shape[0]


def in_features(mod: nn.Module) -> int:
    """Input width of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    return mod.weight.shape[0] if _is_conv1d(mod) else mod.weight.shape[1]


def _param(value: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(value.contiguous(), requires_grad=like.requires_grad)


def keep_outputs(mod: nn.Module, rows: torch.Tensor) -> None:
    """Keep only the output channels ``rows`` (weight rows of a Linear, columns of a Conv1D, and bias)."""
    rows = rows.to(mod.weight.device)
    dim = 1 if _is_conv1d(mod) else 0
    mod.weight = _param(mod.weight.data.index_select(dim, rows), mod.weight)
    if getattr(mod, "bias", None) is not None:
        mod.bias = _param(mod.bias.data.index_select(0, rows.to(mod.bias.device)), mod.bias)
    if _is_conv1d(mod):
        mod.nf = len(rows)
    else:
        mod.out_features = len(rows)


def keep_inputs(mod: nn.Module, cols: torch.Tensor) -> None:
    """Keep only the input channels ``cols``."""
    cols = cols.to(mod.weight.device)
    dim = 0 if _is_conv1d(mod) else 1
    mod.weight = _param(mod.weight.data.index_select(dim, cols), mod.weight)
    if _is_conv1d(mod):
        mod.nx = len(cols)
    else:
        mod.in_features = len(cols)


def add_bias(mod: nn.Module, value: torch.Tensor | None = None) -> None:
    """Add ``value`` to the module's output bias, creating a zero bias first if it has none."""
    if getattr(mod, "bias", None) is None:
        w = mod.weight
        mod.bias = nn.Parameter(torch.zeros(out_features(mod), dtype=w.dtype, device=w.device),
                                requires_grad=w.requires_grad)
    if value is not None and mod.bias.device.type != "meta":
        mod.bias.data += value.to(dtype=mod.bias.dtype, device=mod.bias.device)


def head_rows(heads: list[int], head_dim: int, offset: int = 0) -> torch.Tensor:
    """Row indices of ``heads`` in a head-major projection of ``head_dim`` rows per head."""
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    base = torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)
    return base.reshape(-1) + offset


def qkv_rows(layout: dict, heads: list[int], kv_heads: list[int]) -> torch.Tensor:
    """Rows to keep of a fused q/k/v projection (``concat`` [q|k|v] or NeoX ``interleaved`` per head [q|k|v])."""
    d, nq, nkv = layout["head_dim"], layout["num_heads"], layout["num_kv_heads"]
    if layout["qkv_layout"] == "interleaved":
        return head_rows(heads, 3 * d)
    return torch.cat([head_rows(heads, d), head_rows(kv_heads, d, nq * d), head_rows(kv_heads, d, (nq + nkv) * d)])


# ------------------------------------------------------------------------------------------- layout discovery


def _child(module: nn.Module, name: str) -> nn.Module:
    return module.get_submodule(name) if name else module


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _attention_in(name: str, m: nn.Module) -> dict | None:
    def lin(attr: str) -> bool:
        return isinstance(getattr(m, attr, None), _LINEAR)

    base = {"module": name, "q": None, "k": None, "v": None, "qkv": None, "qkv_layout": None, "extra": ()}
    if lin("q_proj") and lin("k_proj") and lin("v_proj") and (lin("o_proj") or lin("out_proj")):
        o = "o_proj" if lin("o_proj") else "out_proj"
        d = int(getattr(m, "head_dim", 0) or 0)
        if not d:
            return None
        extra = tuple(_join(name, x) for x in ("q_norm", "k_norm") if getattr(m, x, None) is not None)
        return {**base, "o": _join(name, o), "q": _join(name, "q_proj"), "k": _join(name, "k_proj"),
                "v": _join(name, "v_proj"), "num_heads": out_features(m.q_proj) // d,
                "num_kv_heads": out_features(m.k_proj) // d, "head_dim": d, "extra": extra}
    if lin("qkv_proj") and lin("o_proj"):  # Phi-3: [all q | all k | all v]
        d = int(getattr(m, "head_dim", 0) or 0)
        if not d:
            return None
        nq = in_features(m.o_proj) // d
        nkv = (out_features(m.qkv_proj) - nq * d) // (2 * d)
        return {**base, "o": _join(name, "o_proj"), "qkv": _join(name, "qkv_proj"), "qkv_layout": "concat",
                "num_heads": nq, "num_kv_heads": nkv, "head_dim": d}
    if lin("c_attn") and lin("c_proj") and not hasattr(m, "q_attn"):  # GPT-2: Conv1D [q | k | v]
        d = int(getattr(m, "head_dim", 0) or 0)
        if not d:
            return None
        nq = in_features(m.c_proj) // d
        return {**base, "o": _join(name, "c_proj"), "qkv": _join(name, "c_attn"), "qkv_layout": "concat",
                "num_heads": nq, "num_kv_heads": nq, "head_dim": d}
    if lin("query_key_value") and lin("dense"):  # GPT-NeoX: per head [q_h | k_h | v_h]
        d = int(getattr(m, "head_size", 0) or getattr(m, "head_dim", 0) or 0)
        if not d:
            return None
        nq = in_features(m.dense) // d
        return {**base, "o": _join(name, "dense"), "qkv": _join(name, "query_key_value"),
                "qkv_layout": "interleaved", "num_heads": nq, "num_kv_heads": nq, "head_dim": d}
    return None


def attention_layout(block: nn.Module) -> dict | None:
    """Where the heads of ``block``'s self-attention live, as a dict with the fields of
    `hf_prune.structure.plan.AttentionSpec` (paths relative to the block); None if there is none."""
    for name, child in block.named_children():
        found = _attention_in(name, child)
        if found is not None:
            return found
    return None


def _mlp_in(name: str, m: nn.Module) -> dict | None:
    def lin(attr: str) -> bool:
        return isinstance(getattr(m, attr, None), _LINEAR)

    def spec(output: str, inputs: tuple[str, ...], inter: int, fused: str | None = None) -> dict:
        return {"module": name, "output": _join(name, output), "intermediate": inter,
                "inputs": tuple(_join(name, i) for i in inputs), "fused_gate_up": fused and _join(name, fused)}

    if lin("gate_proj") and lin("up_proj") and lin("down_proj"):
        return spec("down_proj", ("gate_proj", "up_proj"), out_features(m.gate_proj))
    if lin("gate_up_proj") and lin("down_proj"):  # Phi-3: rows [gate | up]
        return spec("down_proj", (), in_features(m.down_proj), "gate_up_proj")
    if lin("c_fc") and lin("c_proj"):
        return spec("c_proj", ("c_fc",), out_features(m.c_fc))
    if lin("dense_h_to_4h") and lin("dense_4h_to_h"):
        return spec("dense_4h_to_h", ("dense_h_to_4h",), out_features(m.dense_h_to_4h))
    if lin("fc1") and lin("fc2"):  # OPT: the projections live in the decoder layer itself
        return spec("fc2", ("fc1",), out_features(m.fc1))
    return None


def mlp_layout(block: nn.Module) -> dict | None:
    """Where the intermediate channels of ``block``'s dense MLP live, as a dict with the fields of
    `hf_prune.structure.plan.MlpSpec` (paths relative to the block); None for MoE or no MLP."""
    for name, child in block.named_children():
        found = _mlp_in(name, child)
        if found is not None:
            return found
    return _mlp_in("", block)


def _expert_tensors(module: nn.Module, experts: int) -> list[str]:
    """Names of ``module``'s own parameters and buffers indexed by expert along dim 0 (``[experts, ...]``)."""
    named = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    return [n for n, t in named if t is not None and t.dim() >= 1 and t.shape[0] == experts]


def _experts_in(name: str, m: nn.Module) -> dict | None:
    experts = getattr(m, "experts", None)
    if experts is None:
        return None
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)) or gate_up.dim() != 3:
        return None
    n = gate_up.shape[0]
    router_name = next((r for r in ("gate", "router") if isinstance(getattr(getattr(m, r, None), "weight", None),
                                                                      torch.Tensor)), None)
    if router_name is None or getattr(m, router_name).weight.shape[0] != n or down.shape[0] != n:
        return None
    router = getattr(m, router_name)
    top_k = getattr(router, "top_k", None) or getattr(m, "top_k", None)
    expert_tensors, router_tensors = _expert_tensors(experts, n), _expert_tensors(router, n)
    return {"module": name, "experts": _join(name, "experts"), "router": _join(name, router_name),
            "num_experts": int(n), "top_k": None if top_k is None else int(top_k),
            "num_group": int(getattr(router, "num_group", None) or getattr(router, "n_group", None) or 1),
            "topk_group": int(getattr(router, "topk_group", None) or 1),
            "expert_tensors": tuple(expert_tensors), "router_tensors": tuple(router_tensors),
            "unsupported": _unsupported_experts(experts, router, n, expert_tensors, router_tensors, top_k)}


def _unsupported_experts(experts: nn.Module, router: nn.Module, n: int, expert_tensors: list[str],
                         router_tensors: list[str], top_k: Any) -> str | None:
    """Why removing experts from this layout would be unsafe (None: supported). Surgery slices only the listed
    tensors along dim 0, so any other tensor of the experts or router with an expert-sized dimension (e.g. a
    ``[1, E]`` correction bias in a child module) would be left inconsistent; and the statistics call the
    experts module as ``experts(hidden, top_k_index, top_k_weights)``."""
    import inspect

    if top_k is None:
        return "the router has no top_k"
    for module, handled in ((experts, expert_tensors), (router, router_tensors)):
        named = list(module.named_parameters()) + list(module.named_buffers())
        odd = [k for k, t in named if k not in handled and t is not None and n in tuple(t.shape)]
        if odd:
            return f"{type(module).__name__} has expert-sized tensors hf_prune does not slice: {odd}"
    try:
        params = list(inspect.signature(experts.forward).parameters)
    except (TypeError, ValueError):
        params = []
    if len(params) < 3:
        return (f"{type(experts).__name__}.forward takes {params}, not (hidden_states, top_k_index, "
                "top_k_weights)")
    return None


def experts_layout(block: nn.Module) -> dict | None:
    """Where the routed experts of ``block``'s MoE sublayer live (transformers v5 fused experts: a module with 3-D
    ``gate_up_proj``/``down_proj`` and a router ``gate``/``router`` whose ``weight`` has one row per expert), as a
    dict: ``module``, ``experts``, ``router`` (paths relative to the block), ``num_experts``, ``top_k``,
    ``num_group``/``topk_group`` (group-limited routing; 1 when absent) and the names of the experts' and the
    router's tensors indexed by expert. None for a block without routed experts."""
    for name, child in block.named_children():
        found = _experts_in(name, child)
        if found is not None:
            return found
    return None


# -------------------------------------------------------------------------------------------------- mutation


def _set_attrs(module: nn.Module, values: dict[str, int]) -> None:
    for attr, value in values.items():
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)


def keep_heads(block: nn.Module, layout: dict, heads: list[int], kv_heads: list[int]) -> None:
    """Keep query heads ``heads`` and key/value heads ``kv_heads`` (original indices, sorted) of the block's
    attention: slices q/k/v (or the fused projection) and the output projection, and updates the head counts
    the attention forward reads."""
    d = layout["head_dim"]
    q = head_rows(heads, d)
    if layout["qkv"] is None:
        keep_outputs(_child(block, layout["q"]), q)
        kv = head_rows(kv_heads, d)
        keep_outputs(_child(block, layout["k"]), kv)
        keep_outputs(_child(block, layout["v"]), kv)
    else:
        keep_outputs(_child(block, layout["qkv"]), qkv_rows(layout, heads, kv_heads))
    keep_inputs(_child(block, layout["o"]), q)
    nq, nkv = len(heads), len(kv_heads)
    attn = _child(block, layout["module"])
    _set_attrs(attn, {"num_heads": nq, "num_attention_heads": nq, "num_key_value_heads": nkv,
                      "num_kv_heads": nkv, "num_key_value_groups": nq // nkv})
    if hasattr(attn, "split_size"):  # GPT-2 splits the fused output into q, k, v of this width
        attn.split_size = nq * d


def keep_channels(block: nn.Module, layout: dict, channels: list[int]) -> None:
    """Keep the intermediate MLP channels ``channels`` (original indices, sorted)."""
    idx = torch.tensor(channels, dtype=torch.long)
    for name in layout["inputs"]:
        keep_outputs(_child(block, name), idx)
    if layout["fused_gate_up"]:
        keep_outputs(_child(block, layout["fused_gate_up"]), torch.cat([idx, idx + layout["intermediate"]]))
    keep_inputs(_child(block, layout["output"]), idx)
    _set_attrs(_child(block, layout["module"]), {"intermediate_size": len(channels), "ffn_dim": len(channels)})


def keep_experts(block: nn.Module, layout: dict, experts: list[int]) -> None:
    """Keep the routed experts ``experts`` (original indices, sorted) of the block's MoE sublayer: slices every
    expert-indexed tensor of the experts module (``gate_up_proj``, ``down_proj``, their biases, in any layout) and
    of the router (``weight``, ``bias``, DeepSeek's ``e_score_correction_bias``), and updates the expert counts the
    forwards read (``num_experts`` of the experts module, router and block)."""
    idx = torch.tensor(experts, dtype=torch.long)
    for path, names in ((layout["experts"], layout["expert_tensors"]), (layout["router"], layout["router_tensors"])):
        module = _child(block, path)
        for name in names:
            if name in module._parameters:
                old = module._parameters[name]
                module._parameters[name] = _param(old.data.index_select(0, idx.to(old.device)), old)
            else:
                old = module._buffers[name]
                module._buffers[name] = old.index_select(0, idx.to(old.device)).contiguous()
    n = len(experts)
    for path in (layout["experts"], layout["router"], layout["module"]):
        _set_attrs(_child(block, path), {"num_experts": n})
    if hasattr(_child(block, layout["router"]), "n_routed_experts"):
        _set_attrs(_child(block, layout["router"]), {"n_routed_experts": n})


class ZeroAttention(nn.Module):
    """Stands in for a removed self-attention sublayer: its residual branch is zero (or a constant ``bias``).

    It still writes a one-float-per-token placeholder into the KV cache at its ``layer_idx``, so the cache's
    sequence length (read from layer 0 by ``get_seq_length``) and sliding-window bookkeeping stay right.
    """

    def __init__(self, hidden_size: int, layer_idx: int | None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder caches
        if cache is not None and self.layer_idx is not None and hasattr(cache, "update"):
            b, t = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(b, 1, t, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        out = hidden_states.new_zeros(*hidden_states.shape[:-1], self.hidden_size)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out, None

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, layer_idx={self.layer_idx}, bias={self.bias is not None}"


class ZeroMlp(nn.Module):
    """Stands in for a removed MLP sublayer: its residual branch is zero (or a constant ``bias``)."""

    def __init__(self, hidden_size: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = hidden_states.new_zeros(*hidden_states.shape[:-1], self.hidden_size)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, bias={self.bias is not None}"


def remove_mlp(block: nn.Module, layout: dict, bias: torch.Tensor | None = None) -> None:
    """Remove the block's MLP: replace its module by a `ZeroMlp` (constant output ``bias`` if given), or, where
    the projections live in the block itself (OPT ``fc1``/``fc2``), keep zero channels and set the output bias."""
    out = _child(block, layout["output"])
    if bias is not None:
        bias = bias.detach().to(dtype=out.weight.dtype, device=out.weight.device).clone()
    if layout["module"]:
        block.set_submodule(layout["module"], ZeroMlp(out_features(out), bias))
        return
    keep_channels(block, layout, [])
    if out.bias is not None or bias is not None:
        add_bias(out)
        out.bias.data.zero_()
        if bias is not None:
            out.bias.data += bias


def remove_attention(block: nn.Module, layout: dict, bias: torch.Tensor | None = None) -> None:
    """Replace the block's attention by a `ZeroAttention` (constant output ``bias`` if given)."""
    attn = _child(block, layout["module"])
    o = _child(block, layout["o"])
    hidden = out_features(o)
    if bias is not None:
        bias = bias.detach().to(dtype=o.weight.dtype, device=o.weight.device).clone()
    block.set_submodule(layout["module"], ZeroAttention(hidden, getattr(attn, "layer_idx", None), bias))


def renumber(block: nn.Module, index: int) -> None:
    """Set every ``layer_idx`` inside ``block`` (KV-cache slot) to ``index``."""
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


# ------------------------------------------------------------------------------------- per-layer config views


class LayerConfig:
    """A read-through view of the model config with a few per-layer overrides (head counts, MLP width).

    Bound as ``.config`` on attention/MLP modules of a structurally pruned model, because some forwards read
    shapes from their config at run time (Phi-3 attention reads ``num_attention_heads``). Everything else,
    including later changes such as the attention implementation, comes from the live model config.
    """

    def __init__(self, parent: Any, overrides: dict[str, Any]) -> None:
        self.__dict__["_parent"] = parent
        self.__dict__["_overrides"] = dict(overrides)

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__
        if name.startswith("__") or "_parent" not in state:
            raise AttributeError(name)
        if name in state["_overrides"]:
            return state["_overrides"][name]
        return getattr(state["_parent"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._parent, name, value)

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"LayerConfig({self._overrides})"


def _has_field(config: Any, name: str) -> bool:
    check = getattr(config, "_hasattr_without_heterogeneous_validation", None)
    return check(name) if check is not None else hasattr(config, name)


MLP_FIELDS = ("intermediate_size", "ffn_dim", "n_inner")


def mlp_field(config: Any) -> str | None:
    """The config field holding the MLP width (``intermediate_size``, OPT ``ffn_dim``, GPT-2 ``n_inner``)."""
    return next((f for f in MLP_FIELDS if _has_field(config, f)), None)


def bind_layer_configs(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Give every attention/MLP module that keeps a ``config`` a `LayerConfig` with its own shapes."""
    config = model.config
    fields = [f for f in ("num_attention_heads", "num_key_value_heads") if _has_field(config, f)]
    width = mlp_field(config)
    for block in blocks:
        attn, mlp = attention_layout(block), mlp_layout(block)
        if attn is not None:
            module = _child(block, attn["module"])
            if hasattr(module, "config"):
                values = (attn["num_heads"], attn["num_kv_heads"])
                module.config = LayerConfig(config, dict(zip(fields, values, strict=False)))
        if mlp is not None and mlp["module"] and width is not None:
            module = _child(block, mlp["module"])
            if hasattr(module, "config"):
                module.config = LayerConfig(config, {width: mlp["intermediate"]})


def unbind_layer_configs(model: nn.Module) -> None:
    """Point modules bound by `bind_layer_configs` back at the model config."""
    for module in model.modules():
        if isinstance(module.__dict__.get("config"), LayerConfig):
            module.config = model.config


# ------------------------------------------------------------------------------------------- load-time shrink


def find_structured_blocks(model: nn.Module, path: str) -> nn.ModuleList:
    """The decoder-block list named ``path`` in the saved model, also from a base model (``model.layers`` ->
    ``layers``)."""
    parts = path.split(".")
    for start in range(len(parts)):
        try:
            found = model.get_submodule(".".join(parts[start:]))
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return found
    raise ValueError(f"{type(model).__name__} has no decoder-block list {path!r} (from config.{STRUCTURE_KEY})")


def _first_heads(layout: dict, nq: int, nkv: int) -> tuple[list[int], list[int]]:
    group, new_group = layout["num_heads"] // layout["num_kv_heads"], nq // nkv
    heads = [kv * group + j for kv in range(nkv) for j in range(new_group)]
    return heads, list(range(nkv))


def _zero_bias(mod: nn.Module, wanted: Any) -> torch.Tensor | None:
    """A zero output bias shaped for ``mod`` if ``wanted`` (the checkpoint's value is loaded into it later)."""
    if not wanted:
        return None
    return torch.zeros(out_features(mod), dtype=mod.weight.dtype, device=mod.weight.device)


def _ensure_bias(mod: nn.Module, wanted: Any) -> None:
    """Give ``mod`` an output bias if ``wanted`` and it has none."""
    if wanted and mod.bias is None:
        add_bias(mod)


def apply_layer_entry(block: nn.Module, entry: dict) -> None:
    """Shrink one freshly built (usually meta) block to the shapes recorded in ``entry``; idempotent."""
    attn = attention_layout(block)
    if entry.get("attention_removed"):
        if attn is not None:
            remove_attention(block, attn, _zero_bias(_child(block, attn["o"]), entry.get("attention_bias")))
    elif attn is not None:
        nq, nkv = entry.get("num_heads", attn["num_heads"]), entry.get("num_kv_heads", attn["num_kv_heads"])
        if (nq, nkv) != (attn["num_heads"], attn["num_kv_heads"]):
            keep_heads(block, attn, *_first_heads(attn, nq, nkv))
        _ensure_bias(_child(block, attn["o"]), entry.get("o_bias"))
    moe = experts_layout(block)
    if moe is not None and entry.get("num_experts", moe["num_experts"]) != moe["num_experts"]:
        keep_experts(block, moe, list(range(int(entry["num_experts"]))))
    mlp = mlp_layout(block)
    if entry.get("mlp_removed"):
        if mlp is not None:
            remove_mlp(block, mlp, _zero_bias(_child(block, mlp["output"]), entry.get("mlp_removed_bias")))
    elif mlp is not None:
        width = entry.get("intermediate", mlp["intermediate"])
        if width != mlp["intermediate"]:
            keep_channels(block, mlp, list(range(width)))
        _ensure_bias(_child(block, mlp["output"]), entry.get("mlp_bias"))


def apply_structure(model: nn.Module) -> None:
    """Shrink a model built from a structurally pruned config to the recorded per-layer shapes (idempotent)."""
    structure = getattr(model.config, STRUCTURE_KEY, None)
    if not structure:
        return
    if int(structure.get("format", 1)) > FORMAT_VERSION:
        raise ValueError(f"config.{STRUCTURE_KEY} has format {structure['format']}; this code reads format "
                         f"<= {FORMAT_VERSION}: upgrade hf_prune or use the modeling file saved with the checkpoint")
    blocks = find_structured_blocks(model, structure["blocks"])
    for key, entry in structure.get("layers", {}).items():
        apply_layer_entry(blocks[int(key)], entry)
    bind_layer_configs(model, blocks)


# --------------------------------------------------------------------------------------------- build hooks

# id(config) -> (config, weak reference to the owner model, hidden heterogeneity spec, finalizer). Module-level,
# not on the config, so that nothing of it can end up in a serialised config. An entry lives only while its owner
# is being built: `finish_build` ends it; when the owner's ``__init__`` raises, `building` ends it (try/finally)
# where the whole ``__init__`` is wrapped, and a finalizer on the owner where only ``PreTrainedModel.__init__``
# and ``post_init`` are hooked (hf_prune's loader) ends it when the half-built owner is freed. Ending a build
# always puts the hidden spec back on the config.
_BUILDS: dict[int, tuple[Any, Any, Any, Any]] = {}


def _take_build(key: int) -> Any:
    """Remove the (existing) entry of config ``key`` and return the heterogeneity spec it hid."""
    _, _, spec, finalizer = _BUILDS.pop(key)
    finalizer.detach()
    return spec


def _restore_spec(config: Any, spec: Any) -> None:
    if spec is not None:
        config.__dict__["_heterogeneity_spec"] = spec


def _owner_freed(key: int) -> None:
    """Finalizer of an owner model that never reached `finish_build` (its ``__init__`` raised)."""
    entry = _BUILDS.get(key)
    if entry is not None and entry[1]() is None:
        _restore_spec(entry[0], _take_build(key))


def _owns(model: nn.Module, config: Any) -> bool:
    entry = _BUILDS.get(id(config))
    return entry is not None and entry[1]() is model


def begin_build(model: nn.Module, config: Any) -> None:
    """Call at the start of the outermost model's ``__init__``: if ``config`` describes a structurally pruned
    model, hide its per-layer overrides so stock modules are built from the global (full) shapes."""
    if id(config) in _BUILDS or not getattr(config, STRUCTURE_KEY, None):
        return
    spec = config.__dict__.pop("_heterogeneity_spec", None)
    finalizer = weakref.finalize(model, _owner_freed, id(config))
    finalizer.atexit = False
    _BUILDS[id(config)] = (config, weakref.ref(model), spec, finalizer)


def finish_build(model: nn.Module) -> None:
    """Call in the outermost model's ``post_init`` (before weights are initialised): shrink the blocks to the
    recorded shapes and restore the per-layer overrides. A no-op for every other model."""
    config = getattr(model, "config", None)
    if not _owns(model, config):
        return
    spec = _take_build(id(config))
    try:
        apply_structure(model)
    finally:
        _restore_spec(config, spec)


@contextlib.contextmanager
def building(model: nn.Module, config: Any) -> Iterator[None]:
    """Wrap a whole outermost ``__init__`` (with `finish_build` inside it): `begin_build` on entry, and on the
    way out -- also when ``__init__`` raises -- end a build that `finish_build` did not, restoring the config."""
    begin_build(model, config)
    try:
        yield
    finally:
        if _owns(model, config):
            _restore_spec(config, _take_build(id(config)))


# --------------------------------------------------------------------- trust_remote_code classes (auto_map)

_CLASSES: dict[str, type] = {}
PREFIX = "HfPrune"


def structured_class(base: type) -> type:
    """A subclass of the stock transformers class ``base`` that builds structurally pruned checkpoints."""
    name = PREFIX + base.__name__
    if name not in _CLASSES:
        def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
            with building(self, config):
                base.__init__(self, config, *args, **kwargs)

        def post_init(self: Any) -> None:
            finish_build(self)
            base.post_init(self)

        _CLASSES[name] = type(name, (base,), {"__init__": __init__, "post_init": post_init, "__module__": __name__})
        _share_weight_renames(base, name)
    return _CLASSES[name]


def _share_weight_renames(base: type, name: str) -> None:
    """transformers skips its checkpoint key renames (e.g. GPT-NeoX ``embed_out`` -> ``lm_head``) for custom
    classes unless they are registered: register the stock class's renames under the subclass name."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # pragma: no cover - older transformers: no renames to share
        return
    mapping = get_checkpoint_conversion_mapping(base.__name__)
    if mapping is None:
        mapping = get_checkpoint_conversion_mapping(getattr(base.config_class, "model_type", None))
    if mapping:
        register_checkpoint_conversion_mapping(name, mapping, overwrite=True)


def __getattr__(name: str) -> type:
    """``HfPrune<StockClass>`` (e.g. ``HfPruneLlamaForCausalLM``), as named in a checkpoint's ``auto_map``."""
    if name.startswith(PREFIX) and hasattr(transformers, name[len(PREFIX):]):
        return structured_class(getattr(transformers, name[len(PREFIX):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["STRUCTURE_KEY", "ZeroAttention", "ZeroMlp", "remove_mlp", "LayerConfig", "attention_layout", "mlp_layout", "keep_heads",
           "keep_channels", "remove_attention", "apply_structure", "begin_build", "finish_build", "building",
           "structured_class"]
