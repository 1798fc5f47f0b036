"""LoRA on pruned models without losing the zeros (needs ``pip install 'peft>=0.21'``).

* `MaskedLoraConfig`: a peft method (``PeftType.MASKED_LORA``, registered with peft when ``hf_prune`` is
  imported) whose update is ``(B @ A) ⊙ (W != 0)``: trains, runs, saves/loads (``save_pretrained``,
  ``PeftModel.from_pretrained``) and merges (``merge_and_unload()``) without touching the base's zeros.
* `merge_and_unload`: a masked merge for plain ``peft.LoraConfig`` adapters (peft's own merge fills the zeros).

Example:
    >>> import torch
    >>> from peft import get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> import hf_prune
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> _ = model.prune(hf_prune.PruningConfig(method="magnitude", sparsity=0.5), verbose=False,
    ...                 show_progress=False)
    >>> peft_model = get_peft_model(model, hf_prune.peft.MaskedLoraConfig(r=4, target_modules=["q_proj"]))
    >>> peft_model.peft_config["default"].peft_type
    <PeftType.MASKED_LORA: 'MASKED_LORA'>
    >>> merged = hf_prune.peft.merge_and_unload(peft_model, verbose=False)
    >>> float((merged.model.layers[0].self_attn.q_proj.weight == 0).float().mean())
    0.5
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("peft") is None:
    raise ImportError("hf_prune.peft needs peft: pip install 'peft>=0.21'")

from .masked_lora import (  # noqa: E402
    MaskedLoraConfig,
    MaskedLoraLayer,
    MaskedLoraLinear,
    MaskedLoraModel,
    MaskMismatchError,
    register,
)
from .merge import MergeReport, merge_and_unload  # noqa: E402

register()

__all__ = [
    "MaskMismatchError",
    "MaskedLoraConfig",
    "MaskedLoraLayer",
    "MaskedLoraLinear",
    "MaskedLoraModel",
    "MergeReport",
    "merge_and_unload",
    "register",
]
