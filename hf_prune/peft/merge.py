"""Merge LoRA adapters into a pruned base without filling its zeros.

peft's ``merge_and_unload()`` adds the dense ``scale * B @ A`` to every weight, so a 50%-sparse (or 2:4) base comes
back dense. `merge_and_unload` here adds ``delta ⊙ (W != 0)`` instead, with ``delta`` from each LoRA layer's own
``get_delta_weight`` (which handles ``fan_in_fan_out`` and the scale), then removes the adapters with peft's
``unload()``. The result is a plain transformers model with exactly the base's zeros.

For a plain `peft.LoraConfig` adapter this is a projection: training saw the dense update, the merged model
keeps only its part on the surviving weights (as SparseGPT-style pruning after fine-tuning would). An adapter
trained with `hf_prune.peft.MaskedLoraConfig` already trains with the mask, so its merge is exact; both kinds are
accepted. Supported LoRA layers: ``nn.Linear``/``Conv1D`` targets and ``target_parameters`` (e.g. fused MoE
expert tensors, masked expert by expert). DoRA and other LoRA variants are refused: their merged weight is not
``W + delta``. The weights must be in memory (not offloaded to the meta device by accelerate).

Example:
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> import hf_prune
    >>> from hf_prune.peft import merge_and_unload
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> _ = model.prune(hf_prune.PruningConfig(method="magnitude", sparsity=0.5), verbose=False,
    ...                 show_progress=False)
    >>> peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
    ...                                               init_lora_weights=False))
    >>> merged = merge_and_unload(peft_model)  # doctest: +ELLIPSIS
    hf_prune: merged adapter 'default' into 2 layers: kept all ... zeros of the base (...% of their weights)
    >>> float((merged.model.layers[0].self_attn.q_proj.weight == 0).float().mean())
    0.5
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from .masked_lora import MaskedLoraLayer, MaskedLoraModel
from .masking import add_masked_

logger = logging.getLogger("hf_prune")


@dataclass
class MergeReport:
    """What a masked merge did: which adapters went into how many layers, and the zero counts around it."""

    adapters: list[str]
    layers: int
    numel: int
    zeros_before: int
    zeros_after: int

    def __str__(self) -> str:
        names = ", ".join(repr(a) for a in self.adapters)
        kept = (f"kept all {self.zeros_before} zeros" if self.zeros_after == self.zeros_before
                else f"{self.zeros_before} zeros before, {self.zeros_after} after")
        share = 100.0 * self.zeros_before / max(self.numel, 1)
        return (f"hf_prune: merged adapter{'s' if len(self.adapters) > 1 else ''} {names} into {self.layers} "
                f"layers: {kept} of the base ({share:.1f}% of their weights)")


def _tuner(peft_model: Any) -> BaseTuner:
    from peft import PeftModel

    if isinstance(peft_model, PeftModel):
        return peft_model.base_model
    if isinstance(peft_model, BaseTuner):
        return peft_model
    raise UnsupportedModelError(
        f"merge_and_unload(peft_model) needs the PeftModel returned by peft.get_peft_model(model, config) or "
        f"PeftModel.from_pretrained(model, adapter_dir), got {type(peft_model).__name__}. A model without "
        "adapters has nothing to merge: use or save it as it is.")


def _adapters(tuner: BaseTuner, adapter_names: list[str] | None) -> list[str]:
    names = list(tuner.active_adapters) if adapter_names is None else list(adapter_names)
    unknown = [n for n in names if n not in tuner.peft_config]
    if unknown or not names:
        raise ConfigError(f"adapter_names={adapter_names!r}: no such adapter {unknown}; this model has "
                          f"{sorted(tuner.peft_config)}")
    return names


def _lora_targets(tuner: BaseTuner, names: list[str]) -> list[tuple[str, nn.Module, nn.Parameter]]:
    """``(module name, LoRA layer, base parameter)`` of every layer that holds one of ``names``; raises before
    anything is changed if an adapter or layer cannot be merged exactly with a mask."""
    from peft.tuners.lora import Linear, LoraLayer, ParamWrapper

    for name in names:
        if getattr(tuner.peft_config[name], "use_dora", False):
            raise ConfigError(
                f"adapter {name!r} uses DoRA (use_dora=True): DoRA rescales each weight column by a trained "
                "magnitude, so its merged weight is not W + a masked update and the zeros cannot be kept exactly. "
                "Train with hf_prune.peft.MaskedLoraConfig or a plain LoraConfig, or merge DoRA with peft "
                "(dense) and prune again.")
        if getattr(tuner.peft_config[name], "trainable_token_indices", None):
            raise ConfigError(f"adapter {name!r} trains token embeddings (trainable_token_indices), which this "
                              "masked merge would drop; merge the adapter with peft instead (embeddings are "
                              "not pruned)")
    targets = []
    for module_name, layer in tuner.model.named_modules():
        if not isinstance(layer, LoraLayer) or not any(n in layer.lora_A for n in names):
            continue
        if not isinstance(layer, (Linear, ParamWrapper)):
            raise UnsupportedModelError(
                f"{module_name} is a {type(layer).__module__}.{type(layer).__name__} LoRA layer; the masked merge "
                "supports LoRA on nn.Linear/Conv1D modules and target_parameters only. Leave this module out of "
                "target_modules.")
        variants = [n for n in names if n in getattr(layer, "lora_variant", {})]
        if variants:
            kind = type(layer.lora_variant[variants[0]]).__name__
            raise ConfigError(f"adapter {variants[0]!r} is a LoRA variant ({kind}) on {module_name}: its merged "
                              "weight is not W + delta, so it cannot be merged with a mask")
        if layer.merged:
            raise ConfigError(f"{module_name} already has adapters {layer.merged_adapters} merged densely "
                              "(peft's merge_adapter); call peft_model.unmerge_adapter() first")
        param = layer.get_param() if isinstance(layer, ParamWrapper) else layer.get_base_layer().weight
        targets.append((module_name, layer, param))
    return targets


@torch.no_grad()
def merge_and_unload(peft_model: Any, adapter_names: list[str] | None = None, *,
                     verbose: bool = True) -> nn.Module:
    """Merge LoRA (or masked LoRA) adapters into a sparse base, keeping its exact zeros, and return the base
    model without adapters (as peft's ``merge_and_unload()``, which would fill the zeros).

    Args:
        peft_model: a ``PeftModel`` with ``LoraConfig`` or `MaskedLoraConfig` adapters.
        adapter_names: adapters to merge; default: the active ones.
        verbose: print the one-line `MergeReport` (it is also logged to the ``hf_prune`` logger).
    """
    tuner = _tuner(peft_model)
    names = _adapters(tuner, adapter_names)
    if isinstance(tuner, MaskedLoraModel):
        layers = [m for m in tuner.model.modules()
                  if isinstance(m, MaskedLoraLayer) and any(n in m.masked_lora_A for n in names)]
        params = [m.get_base_layer().weight for m in layers]
        before = sum(int((p == 0).sum()) for p in params)
        model = tuner.merge_and_unload(adapter_names=names)
    else:
        from peft.tuners.lora import LoraModel

        if not isinstance(tuner, LoraModel):
            raise ConfigError(f"merge_and_unload merges LoraConfig and MaskedLoraConfig adapters; this model's "
                              f"adapters are {type(tuner).__name__} ({tuner.peft_config[names[0]].peft_type})")
        targets = _lora_targets(tuner, names)
        params = [p for _, _, p in targets]
        before = sum(int((p == 0).sum()) for p in params)
        for _, layer, param in targets:
            present = [n for n in names if n in layer.lora_A]
            delta = sum(layer.get_delta_weight(n).float() for n in present)
            add_masked_(param, delta)
            for n in present:
                if getattr(layer, "lora_bias", {}).get(n) and layer.lora_B[n].bias is not None:
                    bias = layer.get_base_layer().bias
                    bias.add_((layer.lora_B[n].bias * layer.scaling[n]).to(bias.dtype))
        layers = targets
        model = tuner.unload()
    report = MergeReport(adapters=names, layers=len(layers), numel=sum(p.numel() for p in params),
                         zeros_before=before, zeros_after=sum(int((p == 0).sum()) for p in params))
    logger.info("%s", report)
    if verbose:
        print(report)
    return model
