"""Remove hidden (residual-stream) dimensions from every weight of a decoder, after folding linear maps that sit on
the residual stream's writers into them (what pruning-aware tuning needs at its end).

When every writer of the residual stream (the embeddings, each attention output projection, each MLP output
projection) leaves the same dimensions at exactly zero, those dimensions stay zero through the whole model, and
can be cut out without changing the logits:

* writers: a ``[d, d]`` map ``T`` that follows an output projection ``W`` (``y = T W x + T b``) is folded as
  ``W' = (T W)[K]``; after the embeddings, ``E' = (E Tᵀ)[:, K]`` (a diagonal ``T`` for tied embeddings, see below);
* readers: q/k/v, gate/up (fused ``qkv_proj`` / ``gate_up_proj`` too) and lm_head keep their input columns ``K``;
* RMSNorms (every hidden norm: before attention, before the MLP, the final one) keep their weights ``K``, times
  ``sqrt(d / d')``, and ``eps`` becomes ``eps d / d'``: the mean of squares over ``d'`` dimensions is ``d / d'``
  times the one over ``d`` when the rest are zero, so this is exact. Gemma's ``(1 + w)`` weights are rescaled as
  ``1 + w``, and its embedding scale ``sqrt(hidden_size)`` is compensated in ``E'``;
* tied embeddings stay tied when the embedding map is diagonal: ``E' = E[:, K] diag(g_K)``, and the final norm's
  weights are divided by ``g_K`` so lm_head, which reads the same ``E'``, gives the same logits. A non-diagonal map
  (or a gate near zero) unties them: lm_head then keeps ``E[:, K]``;
* the config gets ``hidden_size = d'``, ``head_dim`` set explicitly (``hidden_size`` is no longer a multiple of
  the heads), ``rms_norm_eps`` scaled, ``tie_word_embeddings`` as the result. The model reloads with stock
  transformers.

LayerNorm models (GPT-2, OPT, GPT-NeoX) cannot be cut this way: LayerNorm subtracts the mean over all ``d``
dimensions, which the zero dimensions shift, and no change of weights over ``d'`` dimensions undoes that.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                      num_attention_heads=4, vocab_size=100, tie_word_embeddings=False))
    >>> layout = hidden_layout(model)
    >>> layout.outputs, layout.tied
    (['model.layers.0.self_attn.o_proj', 'model.layers.0.mlp.down_proj'], False)
    >>> info = cut_hidden_(model, torch.arange(24), {}, None)
    >>> model.config.hidden_size, model.config.head_dim, info["tied"]
    (24, 8, False)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.model import find_blocks
from ..errors import ConfigError, UnsupportedModelError
from .arch import block_specs
from .modeling_hf_prune import keep_inputs

logger = logging.getLogger("hf_prune")

#: model types whose hidden dimension can be cut: ``{model_type: (norm weights are 1 + w, embeddings scaled by
#: sqrt(hidden_size))}``
HIDDEN_CUT_TYPES: dict[str, tuple[bool, bool]] = {
    "llama": (False, False), "mistral": (False, False), "qwen2": (False, False), "qwen3": (False, False),
    "phi3": (False, False), "gemma": (True, True),
}
_LAYERNORM = ("gpt2", "opt", "gpt_neox", "gptj", "bloom", "falcon", "phi")


@dataclass
class HiddenLayout:
    """Where the residual stream is written and read (module paths relative to the model)."""

    hidden: int
    head_dim: int
    embed: str
    lm_head: str | None
    tied: bool
    outputs: list[str] = field(default_factory=list)  # writers: attention and MLP output projections, in order
    inputs: list[str] = field(default_factory=list)  # readers: q/k/v (qkv), gate/up (gate_up)
    groups: list[list[str]] = field(default_factory=list)  # readers that share one input (one norm's output)
    norms: list[str] = field(default_factory=list)  # hidden RMSNorms, the final one last
    final_norm: str = ""
    norm_offset: bool = False
    embed_scale: bool = False


def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _is_rms_norm(module: nn.Module, hidden: int) -> bool:
    w = getattr(module, "weight", None)
    return ("RMSNorm" in type(module).__name__ and isinstance(w, torch.Tensor) and w.dim() == 1
            and w.numel() == hidden and getattr(module, "bias", None) is None)


def hidden_layout(model: nn.Module) -> HiddenLayout:
    """The `HiddenLayout` of a causal LM whose hidden dimension can be cut; `UnsupportedModelError` otherwise,
    naming what is supported and why."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in _LAYERNORM:
        raise UnsupportedModelError(
            f"hidden dimensions of {type(model).__name__} ({model_type}) cannot be removed exactly: its LayerNorms "
            "subtract the mean over all hidden dimensions, which changes when dimensions are dropped. Supported: "
            f"{', '.join(sorted(HIDDEN_CUT_TYPES))} (RMSNorm models). Prune heads and MLP channels instead "
            "(method='flap' or 'wanda-sp')"
        )
    if model_type not in HIDDEN_CUT_TYPES:
        raise UnsupportedModelError(
            f"removing hidden dimensions is supported for model types {', '.join(sorted(HIDDEN_CUT_TYPES))}; "
            f"{type(model).__name__} has model_type={model_type!r}. Open an issue with the model class name"
        )
    hidden = int(config.hidden_size)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embed_path = _path_of(model, embed)
    if embed_path is None or not isinstance(embed, nn.Embedding):
        raise UnsupportedModelError(f"{type(model).__name__}: no nn.Embedding input embeddings found")
    prefix, blocks = find_blocks(model)
    specs = block_specs(model)
    outputs: list[str] = []
    inputs: list[str] = []
    groups: list[list[str]] = []
    for spec in specs:
        a, m = spec.attention, spec.mlp
        if a is None or m is None or spec.experts is not None:
            raise UnsupportedModelError(
                f"block {spec.index} of {type(model).__name__} has no dense attention + MLP pair (MoE experts or a "
                "removed sublayer); hidden dimensions are cut in dense decoders only"
            )
        outputs += [a.o, m.output]
        attn_in, mlp_in = [p for p in (a.q, a.k, a.v, a.qkv) if p], [p for p in (*m.inputs, m.fused_gate_up) if p]
        inputs += attn_in + mlp_in
        groups += [attn_in, mlp_in]
    norms = []
    for i, block in enumerate(blocks):
        norms += [f"{prefix}.{i}.{n}" for n, c in block.named_children() if _is_rms_norm(c, hidden)]
    decoder_path = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    decoder = model.get_submodule(decoder_path) if decoder_path else model
    finals = [f"{decoder_path}.{n}" if decoder_path else n for n, c in decoder.named_children()
              if _is_rms_norm(c, hidden)]
    if len(finals) != 1:
        raise UnsupportedModelError(f"{type(model).__name__}: expected one final RMSNorm beside {prefix}, found "
                                    f"{finals or 'none'}")
    tied = head is not None and head.weight is embed.weight
    offset, scale = HIDDEN_CUT_TYPES[model_type]
    head_dim = getattr(config, "head_dim", None) or hidden // int(config.num_attention_heads)
    return HiddenLayout(hidden=hidden, head_dim=int(head_dim), embed=embed_path,
                        lm_head=_path_of(model, head), tied=tied, outputs=outputs, inputs=inputs, groups=groups,
                        norms=norms + finals, final_norm=finals[0], norm_offset=offset, embed_scale=scale)


def _new_param(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.to(dtype=like.dtype, device=like.device).contiguous(),
                        requires_grad=like.requires_grad)


def _fold_output(module: nn.Module, t: torch.Tensor, keep: torch.Tensor) -> None:
    """``W' = (T W)[K]``, ``b' = (T b)[K]`` for a Linear ``[d, in]``."""
    if type(module).__name__ == "Conv1D":
        raise UnsupportedModelError("Conv1D output projections are not supported here")
    w = module.weight
    t = t.to(w.device)
    module.weight = _new_param((t @ w.data.float())[keep], w)
    if getattr(module, "bias", None) is not None:
        module.bias = _new_param((t @ module.bias.data.float())[keep], module.bias)
    module.out_features = len(keep)


def _fold_lora_output(wrapper: Any, t: torch.Tensor, keep: torch.Tensor) -> None:
    """The LoRA path of a folded output projection: ``B' = (T B)[K]`` for every adapter."""
    for b in wrapper.lora_B.values():
        w = b.weight
        b.weight = _new_param((t.to(w.device) @ w.data.float())[keep], w)
        if getattr(b, "bias", None) is not None:
            b.bias = _new_param((t.to(w.device) @ b.bias.data.float())[keep], b.bias)
        b.out_features = len(keep)
    wrapper.out_features = len(keep)


def _norm_eps_name(norm: nn.Module) -> str:
    for name in ("variance_epsilon", "eps", "epsilon"):
        if isinstance(getattr(norm, name, None), float):
            return name
    raise UnsupportedModelError(f"{type(norm).__name__}: no eps attribute found")


def check_cut_hidden(model: nn.Module, keep: torch.Tensor, transforms: dict[str, torch.Tensor],
                     wrappers: dict[str, Any] | None = None) -> tuple[HiddenLayout, torch.Tensor, dict[str, str]]:
    """Everything `cut_hidden_` checks before it changes a weight (call it first when other weights change before
    the cut). Returns the layout, ``keep`` sorted, and each hidden norm's eps attribute name; raises
    `ConfigError` / `UnsupportedModelError` otherwise."""
    layout = hidden_layout_with(model, wrappers)
    d = layout.hidden
    keep = torch.as_tensor(keep, dtype=torch.long).cpu().sort().values
    d2 = int(keep.numel())
    if d2 == 0 or d2 > d or int(keep.unique().numel()) != d2 or int(keep.min()) < 0 or int(keep.max()) >= d:
        raise ConfigError(f"keep must be distinct hidden indices in [0, {d}), got {d2} of them")
    wrappers = wrappers or {}
    get = model.get_submodule
    eps_names = {path: _norm_eps_name(get(path)) for path in layout.norms}
    for path in layout.outputs + layout.inputs:
        module = get(path)
        base = module.get_base_layer() if path in wrappers else module
        if not isinstance(base, nn.Linear):
            raise UnsupportedModelError(f"{path}: {type(base).__name__} projections are not supported here "
                                        "(nn.Linear only)")
    for path, t in transforms.items():
        if tuple(t.shape) != (d, d):
            raise ConfigError(f"transforms[{path!r}] must be [{d}, {d}], got {list(t.shape)}")
    return layout, keep, eps_names


@torch.no_grad()
def cut_hidden_(model: nn.Module, keep: torch.Tensor, transforms: dict[str, torch.Tensor],
                embed_transform: torch.Tensor | None, wrappers: dict[str, Any] | None = None,
                untie: bool = False) -> dict[str, Any]:
    """Fold ``transforms`` (``{output projection path: [d, d] map after it}``) and ``embed_transform`` (a
    ``[d, d]`` map after the embeddings, or a ``[d]`` diagonal; ``None``: the identity), then keep only the hidden
    dimensions ``keep`` in every weight, in place. The caller guarantees that the maps zero every other dimension.

    ``wrappers`` are peft LoRA layers at some of the paths (`hf_prune.peft.slicing.lora_wrappers`): their base
    layers are cut, ``lora_B`` of a folded projection gets the same map, and ``lora_A`` of a reader keeps the same
    columns. ``untie``: untie tied embeddings even if the map is diagonal.

    Returns ``{"hidden_before", "hidden_after", "tied", "untied_reason"}``.
    """
    layout, keep, eps_names = check_cut_hidden(model, keep, transforms, wrappers)
    d = layout.hidden
    d2 = int(keep.numel())
    ratio = d / d2
    wrappers = wrappers or {}
    get = model.get_submodule
    slicing = None
    if wrappers:
        from ..peft import slicing as _slicing  # optional: only when the model carries LoRA adapters

        slicing = _slicing
    embed = get(layout.embed)
    # the embedding scale (Gemma: sqrt(hidden_size), read from the config at every forward)
    c, c2 = (math.sqrt(d), math.sqrt(d2)) if layout.embed_scale else (1.0, 1.0)
    diag = None  # the embedding map as a diagonal, where it is one
    if embed_transform is None:
        diag = torch.ones(d)
    elif embed_transform.dim() == 1:
        diag = embed_transform.float().cpu()
    tied, reason = layout.tied, None
    if tied and diag is None:
        tied, reason = False, "the map after the embeddings is not diagonal"
    elif tied and diag is not None and bool((diag[keep].abs() < 1e-6 * max(float(diag.abs().max()), 1e-30)).any()):
        tied, reason = False, "a kept dimension's embedding gate is ~0"
    elif tied and untie:
        tied, reason = False, "untie=True"
    for path in layout.outputs:
        t = transforms.get(path)
        if t is None:
            t = torch.eye(d)
        t = t.float().cpu()
        module = get(path)
        base = module.get_base_layer() if path in wrappers else module
        _fold_output(base, t, keep)
        if path in wrappers:
            _fold_lora_output(wrappers[path], t, keep)
    for path in layout.inputs:
        module = get(path)
        base = module.get_base_layer() if path in wrappers else module
        keep_inputs(base, keep)
        if path in wrappers and slicing is not None:
            slicing.slice_lora_(wrappers[path], None, keep)
    # embeddings and lm_head
    e = embed.weight
    old = e.data.float()
    if diag is not None:
        new_e = old[:, keep] * diag[keep].to(old.device)[None, :]
    else:
        new_e = (old @ embed_transform.float().to(old.device).t())[:, keep]
    new_e = new_e * (c / c2)
    head = get(layout.lm_head) if layout.lm_head else None
    embed.weight = _new_param(new_e, e)
    embed.embedding_dim = d2
    if layout.embed_scale and isinstance(getattr(embed, "embed_scale", None), torch.Tensor):
        # transformers >= 5 scales inside the embedding module (a buffer set from hidden_size at init)
        embed.embed_scale.fill_(c2)
        if hasattr(embed, "scalar_embed_scale"):
            embed.scalar_embed_scale = c2
    if head is not None:
        hpath = layout.lm_head or ""
        hbase = head.get_base_layer() if hpath in wrappers else head
        if tied:
            hbase.weight = embed.weight
            hbase.in_features = d2
        else:
            source = old if layout.tied else hbase.weight.data.float()
            hbase.weight = _new_param(source[:, keep], hbase.weight)
            hbase.in_features = d2
        if hpath in wrappers and slicing is not None:
            slicing.slice_lora_(wrappers[hpath], None, keep)
            if tied:  # the final norm now carries 1 / (g c / c'): the LoRA path must see what it saw before
                for a in wrappers[hpath].lora_A.values():
                    a.weight.data.mul_((diag[keep] * (c / c2)).to(a.weight.device, a.weight.dtype)[None, :])
    # norms
    for path in layout.norms:
        norm = get(path)
        w = norm.weight.data.float()
        eff = (1.0 + w) if layout.norm_offset else w
        eff = eff[keep] * math.sqrt(ratio)
        if path == layout.final_norm and tied:
            eff = eff * (c2 / c) / diag[keep].to(eff.device)
        norm.weight = _new_param(eff - 1.0 if layout.norm_offset else eff, norm.weight)
        eps_name = eps_names[path]
        setattr(norm, eps_name, float(getattr(norm, eps_name)) * ratio)
    config = model.config
    config.hidden_size = d2
    config.head_dim = layout.head_dim
    if hasattr(config, "rms_norm_eps"):
        old_eps = float(config.rms_norm_eps)
        config.rms_norm_eps = old_eps * ratio
        # other RMSNorms built from the same config field (Qwen3's per-head q/k norms) get it on reload: give them
        # the same value now, so the model in memory is the one that reloads
        hidden_norms = {id(get(p)) for p in layout.norms}
        for module in model.modules():
            if "RMSNorm" in type(module).__name__ and id(module) not in hidden_norms:
                for name in ("variance_epsilon", "eps"):
                    if getattr(module, name, None) == old_eps:
                        setattr(module, name, old_eps * ratio)
    if layout.tied and not tied:
        config.tie_word_embeddings = False
        sub = getattr(config, "get_text_config", lambda: config)()
        sub.tie_word_embeddings = False
        logger.warning("hf_prune: the input embeddings and lm_head are untied (%s): lm_head is now a separate "
                       "%d x %d matrix", reason, int(new_e.shape[0]), d2)
    return {"hidden_before": d, "hidden_after": d2, "tied": tied, "was_tied": layout.tied, "untied_reason": reason}


def hidden_layout_with(model: nn.Module, wrappers: dict[str, Any] | None) -> HiddenLayout:
    """`hidden_layout` of a model whose projections may be peft LoRA wrappers (their base layers are looked at)."""
    if not wrappers:
        return hidden_layout(model)
    from ..peft import slicing

    with slicing.base_layers_in_place(model, wrappers):
        return hidden_layout(model)

