"""Structured surgery on a model that carries peft LoRA adapters: the adapters are cut along with their base layers.

`lora_wrappers` finds the LoRA layers (``peft.tuners.lora.LoraLayer``) of a model; `base_layers_in_place`
temporarily puts each wrapper's base layer where the wrapper was, so the structured code
(`hf_prune.structure`), which knows ``nn.Linear`` and ``Conv1D`` only, sees a plain transformers model; on exit
each wrapper goes back around whatever module then sits at its path (the sliced base layer). `slice_lora_`
keeps the rows of ``lora_B`` and the columns of ``lora_A`` that match the base layer's kept outputs and inputs, so
``W + s B A`` of the smaller layer is exactly the kept part of the larger one and stock peft's
``merge_and_unload()`` keeps working.

Example:
    >>> import torch, peft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                                      num_attention_heads=4, vocab_size=50))
    >>> pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["down_proj"]))
    >>> wrappers = lora_wrappers(pm.get_base_model())
    >>> list(wrappers)
    ['model.layers.0.mlp.down_proj']
    >>> slice_lora_(wrappers['model.layers.0.mlp.down_proj'], None, torch.arange(8))
    >>> wrappers['model.layers.0.mlp.down_proj'].lora_A['default'].weight.shape
    torch.Size([2, 8])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..errors import ConfigError


def lora_wrappers(model: nn.Module, outermost: bool = False) -> dict[str, Any]:
    """``{module path: LoRA layer}`` of every peft LoRA layer in ``model`` (paths relative to ``model``).

    ``outermost``: leave out LoRA layers nested in another one's ``base_layer`` (peft nests parameter wrappers on
    fused experts); swapping the outer ones out (`base_layers_in_place`) takes what they nest along."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and not (outermost and ".base_layer" in name)}


def is_projection(wrapper: Any) -> bool:
    """Whether the LoRA layer wraps a plain ``nn.Linear`` or GPT-2 ``Conv1D`` (not a parameter wrapper, an embedding
    or a convolution)."""
    base = wrapper.get_base_layer()
    return isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D"


def check_sliceable(wrappers: dict[str, Any]) -> None:
    """Refuse LoRA layers whose adapters cannot be cut with their base layer (DoRA and other LoRA variants,
    embedding adapters, merged adapters, quantized base layers); raises `ConfigError` naming the layer."""
    for path, w in wrappers.items():
        weight = getattr(w.get_base_layer(), "weight", None)
        if weight is None or not weight.is_floating_point() or type(weight).__name__ in ("Int8Params", "Params4bit"):
            raise ConfigError(f"{path}: the base layer is quantized ({type(w.get_base_layer()).__name__}, weight "
                              f"{type(weight).__name__}); structured pruning needs floating-point base weights: "
                              "load the model unquantized (QLoRA bases cannot be cut)")
        variants = {k: type(v).__name__ for k, v in getattr(w, "lora_variant", {}).items()}
        if variants or any(getattr(w, "use_dora", {}).values()):
            raise ConfigError(f"{path}: LoRA variant {variants or 'DoRA'} cannot be cut with its base layer; "
                              "use plain LoRA (use_dora=False) for structured pruning during LoRA training")
        if len(getattr(w, "lora_embedding_A", {})):
            raise ConfigError(f"{path}: embedding LoRA adapters are not supported by structured pruning; leave the "
                              "embeddings out of target_modules")
        if getattr(w, "merged_adapters", None):
            raise ConfigError(f"{path}: adapters {w.merged_adapters} are merged into the base weights; unmerge them "
                              "(model.unmerge_adapter()) before structured pruning")


@contextmanager
def base_layers_in_place(model: nn.Module, wrappers: dict[str, Any]) -> Iterator[None]:
    """Within the block, each wrapper's path holds its base layer; afterwards the wrapper is put back around the
    module found at its path (skipped where the path no longer exists, e.g. a removed sublayer)."""
    for path, wrapper in wrappers.items():
        model.set_submodule(path, wrapper.get_base_layer())
    try:
        yield
    finally:
        for path, wrapper in wrappers.items():
            try:
                current = model.get_submodule(path)
            except AttributeError:
                continue
            if current is not wrapper.get_base_layer():
                wrapper.base_layer = current
            model.set_submodule(path, wrapper)


def _keep(param: nn.Parameter, dim: int, index: torch.Tensor) -> nn.Parameter:
    value = param.data.index_select(dim, index.to(param.device)).contiguous()
    return nn.Parameter(value, requires_grad=param.requires_grad)


@torch.no_grad()
def slice_lora_(wrapper: Any, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    """Keep output ``rows`` (of ``lora_B``, and its bias) and input ``cols`` (of ``lora_A``) of every adapter of
    ``wrapper``, in ``[out, in]`` orientation (a GPT-2 ``Conv1D`` base included: peft's LoRA matrices are plain
    ``[r, in]`` / ``[out, r]`` linears), and update the wrapper's ``in_features`` / ``out_features``."""
    for name, a in wrapper.lora_A.items():
        if cols is not None:
            a.weight = _keep(a.weight, 1, cols)
            a.in_features = len(cols)
        if rows is not None:
            b = wrapper.lora_B[name]
            b.weight = _keep(b.weight, 0, rows)
            if getattr(b, "bias", None) is not None:
                b.bias = _keep(b.bias, 0, rows)
            b.out_features = len(rows)
    if cols is not None:
        wrapper.in_features = len(cols)
    if rows is not None:
        wrapper.out_features = len(rows)
