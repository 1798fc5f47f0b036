"""transformers integration: a ``quantization_config`` for compressed sparse checkpoints and the
``HfQuantizer`` that loads them into :class:`hf_prune.nn.SparseLinear` layers.

``register()`` (idempotent, run when ``hf_prune.formats`` is imported) adds both to transformers'
registries under ``quant_method = "hf_prune_sparse"`` so that plain
``AutoModelForCausalLM.from_pretrained(path)`` dispatches here.

On-disk contract (written by :func:`hf_prune.formats.save.save_sparse_pretrained`):

* ``config.json`` carries ``quantization_config = {"quant_method": "hf_prune_sparse",
  "sparse_format": "bitmask" | "N:M", "modules": {name: [out, in]}, "requires": "pip install hf_prune ..."}``.
* For every compressed linear ``<name>``, the safetensors hold ``<name>.weight_values`` plus
  ``<name>.weight_bitmask`` (bitmask) or ``<name>.weight_indices`` (N:M), and a zero-size
  placeholder ``<name>.weight``. The placeholder is what makes stock transformers (without
  hf_prune) refuse to load: its shape mismatches the model's weight and ``from_pretrained`` raises
  instead of silently running with randomly initialised weights. A zero-size tensor named
  :data:`SENTINEL_KEY` shows up in its load report to say what to install.

What the compressed layers hold at inference is chosen at load, per model, with the loading attribute
``policy`` (`hf_prune.nn.sparse_linear`): ``from_pretrained(path, quantization_config=HfPruneSparseConfig(
policy="memory"))``, as transformers does for GPTQ/AWQ loading attributes. Default ``"auto"``: ``"kernel"`` on
CUDA with the kernels, else ``"speed"`` (decompressed once: dense speed). The policy is a loading attribute only:
it is never written to ``config.json``.

Example:
    >>> from hf_prune.formats.quantizer import register, HfPruneSparseConfig
    >>> register(); register()  # idempotent
    >>> HfPruneSparseConfig(sparse_format="2:4", modules={"model.layers.0.mlp.up_proj": [128, 64]}).sparse_format
    '2:4'
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn
from transformers.quantizers import auto as quantizers_auto
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..nn.packing import parse_format
from ..nn.policy import set_policy
from ..nn.sparse_linear import SparseLinear, check_policy

__all__ = [
    "QUANT_METHOD",
    "SENTINEL_KEY",
    "REQUIRES",
    "HfPruneSparseConfig",
    "HfPruneSparseQuantizer",
    "register",
]

logger = logging.getLogger("hf_prune.formats")

QUANT_METHOD = "hf_prune_sparse"
FORMAT_VERSION = 1
REQUIRES = (
    "This checkpoint stores compressed sparse weights written by hf_prune. To load it: "
    "`pip install hf_prune`, then `import hf_prune` before `from_pretrained`."
)
SENTINEL_KEY = (
    "hf_prune_sparse: compressed checkpoint, load it after `pip install hf_prune` and `import hf_prune`"
)


class HfPruneSparseConfig(QuantizationConfigMixin):
    """``quantization_config`` of a compressed sparse checkpoint.

    Args:
        sparse_format: ``"bitmask"`` or ``"N:M"`` (e.g. ``"2:4"``).
        modules: compressed ``nn.Linear`` names mapped to their ``[out_features, in_features]``.
        requires / format_version: informational; ``requires`` tells users without hf_prune what
            to install (stock transformers prints unknown configs' fields in its warnings).
        policy: loading attribute, what the compressed layers hold at inference: ``"auto"`` (default),
            ``"speed"``, ``"memory"`` or ``"kernel"`` (`hf_prune.nn.sparse_linear`). Not saved.

    Example:
        >>> c = HfPruneSparseConfig.from_dict({"quant_method": "hf_prune_sparse", "sparse_format": "bitmask"})
        >>> c.to_dict()["sparse_format"], c.modules
        ('bitmask', {})
    """

    def __init__(
        self,
        sparse_format: str = "2:4",
        modules: dict[str, list[int]] | None = None,
        format_version: int = FORMAT_VERSION,
        requires: str = REQUIRES,
        quant_method: str = QUANT_METHOD,
        policy: str = "auto",
        **kwargs: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(
                f"HfPruneSparseConfig got quant_method={quant_method!r}, expected {QUANT_METHOD!r}"
            )
        if int(format_version) > FORMAT_VERSION:
            raise ValueError(
                f"checkpoint uses hf_prune sparse format version {format_version}, this hf_prune reads up to "
                f"{FORMAT_VERSION}: `pip install -U hf_prune`"
            )
        self.quant_method = QUANT_METHOD
        self.sparse_format = str(parse_format(sparse_format))
        modules = dict(modules or {})
        for name, shape in modules.items():
            if not (
                isinstance(shape, (list, tuple))
                and len(shape) == 2
                and all(isinstance(s, int) and s > 0 for s in shape)
            ):
                raise ValueError(
                    f"quantization_config.modules[{name!r}] must be [out_features, in_features], got {shape!r}"
                )
        self.modules = {k: [int(v[0]), int(v[1])] for k, v in modules.items()}
        self.format_version = int(format_version)
        self.requires = requires
        self.policy = check_policy(policy)
        for k, v in kwargs.items():  # keep unknown (newer, informational) fields round-trippable
            setattr(self, k, v)

    def get_loading_attributes(self) -> dict[str, Any]:
        """What a ``quantization_config`` passed to ``from_pretrained`` overrides in the checkpoint's (transformers
        merges these for pre-quantized checkpoints)."""
        return {"policy": self.policy}

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.pop("policy", None)  # a loading choice of this machine, not a property of the checkpoint
        return data


class HfPruneSparseQuantizer(HfQuantizer):
    """Loads ``hf_prune_sparse`` checkpoints: swaps the listed ``nn.Linear`` for ``SparseLinear``
    before weights load, lets the compressed tensors (whose size depends on the data) in, then
    validates every layer and fails with the module name if anything is missing or corrupt.

    Example:
        >>> q = HfPruneSparseQuantizer(HfPruneSparseConfig("bitmask"), pre_quantized=True)
        >>> q.is_serializable(), q.is_trainable
        (True, False)
    """

    requires_calibration = True  # only pre-compressed checkpoints; compress with save_sparse_pretrained
    quantization_config: HfPruneSparseConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "hf_prune sparse checkpoints cannot be disk-offloaded; use a cpu/cuda device_map"
            )

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        # True for SparseLinear's compressed buffers: their checkpoint shape legitimately differs from
        # the zero-size placeholders built before loading (nnz is only known from the data).
        module_name, _, tensor_name = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return isinstance(module, SparseLinear) and tensor_name in module.compressed_names

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        cfg = self.quantization_config
        if not cfg.modules:
            raise ValueError("hf_prune_sparse quantization_config lists no modules (corrupt config.json)")
        problems = []
        for name, (out_f, in_f) in cfg.modules.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                problems.append(f"{name}: not found in {type(model).__name__}")
                continue
            if not isinstance(module, nn.Linear):
                problems.append(f"{name}: is {type(module).__name__}, expected nn.Linear")
                continue
            if (module.out_features, module.in_features) != (out_f, in_f):
                problems.append(
                    f"{name}: metadata says [{out_f}, {in_f}] but the model config builds "
                    f"[{module.out_features}, {module.in_features}]"
                )
                continue
            sparse = SparseLinear(
                in_f,
                out_f,
                bias=module.bias is not None,
                sparse_format=cfg.sparse_format,
                device=module.weight.device,
                dtype=module.weight.dtype,
            )
            model.set_submodule(name, sparse)
        if problems:
            raise ValueError(
                "hf_prune_sparse checkpoint does not match the model:\n  " + "\n  ".join(problems)
            )
        patterns = {re.escape(SENTINEL_KEY)} | {rf"(^|\.){re.escape(n)}\.weight$" for n in cfg.modules}
        model._keys_to_ignore_on_load_unexpected = (
            set(model._keys_to_ignore_on_load_unexpected or ()) | patterns
        )
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        problems = []
        for name, module in model.named_modules():
            if isinstance(module, SparseLinear):
                try:
                    module.validate()
                except ValueError as exc:
                    problems.append(f"{name}: {exc}")
        if problems:
            raise ValueError(
                "hf_prune_sparse checkpoint has missing, truncated or corrupt compressed tensors:\n  "
                + "\n  ".join(problems)
            )
        set_policy(model, getattr(self.quantization_config, "policy", "auto"))
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """State dict with zero-size ``<name>.weight`` placeholders and the sentinel (see module doc)."""
        state_dict = model.state_dict()
        for name, module in model.named_modules():
            if isinstance(module, SparseLinear):
                state_dict[f"{name}.weight"] = torch.empty(0, dtype=module.weight_values.dtype)
        state_dict[SENTINEL_KEY] = torch.empty(0, dtype=torch.uint8)
        metadata = {"hf_prune_sparse_format": self.quantization_config.sparse_format, "requires": REQUIRES}
        return state_dict, metadata

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        for name, module in list(model.named_modules()):
            if isinstance(module, SparseLinear):
                lin = module.to_linear()
                if dtype is not None:
                    lin = lin.to(dtype)
                model.set_submodule(name, lin)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and quantizer with transformers (safe to call many times), with ``policy`` as a
    loading attribute that a ``quantization_config`` given to ``from_pretrained`` may override.

    Example:
        >>> from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        >>> register(); AUTO_QUANTIZER_MAPPING["hf_prune_sparse"].__name__
        'HfPruneSparseQuantizer'
    """
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not HfPruneSparseConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(HfPruneSparseConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not HfPruneSparseQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(HfPruneSparseQuantizer)
    # transformers copies get_loading_attributes() of a user's config onto a pre-quantized checkpoint's config
    # only for the config types in this tuple (GPTQ, AWQ, ...); it is read at call time, so extending it works.
    types = getattr(quantizers_auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
    if isinstance(types, tuple) and HfPruneSparseConfig not in types:
        quantizers_auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*types, HfPruneSparseConfig)
