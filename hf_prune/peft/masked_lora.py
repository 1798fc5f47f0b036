"""Masked LoRA: a peft method whose update never touches the zeros of a pruned base (PERP's "MaskLoRA").

Each targeted layer computes ``y = base(x) + scale * dropout(x) @ ((B @ A) ⊙ M)ᵀ`` with ``M = (W != 0)`` the
non-zero pattern of the frozen base weight ``W``, and merging adds the same ``scale * (B @ A) ⊙ M`` to ``W``.
Training, inference and the merged model therefore agree, and the merged model has exactly the base's zeros
(2:4 stays 2:4). ``A`` starts Kaiming-uniform and ``B`` at zero, as in LoRA, and ``scale = lora_alpha / r``.

Memory: ``M`` is derived from ``W`` on the fly in every forward, so nothing is stored with the model or the
adapter. The price is the dense product: each forward materialises a weight-sized ``(B @ A) ⊙ M`` per layer
(autograd keeps it and the bool mask until the backward pass), where plain LoRA only needs ``x @ Aᵀ``. Because
the mask is read from the base weight, that weight must be in memory: accelerate CPU/disk offload of targeted
layers and DeepSpeed ZeRO-3 partitioning are not supported.

Targets: ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored ``[in, out]``; detected per layer, so
``fan_in_fan_out`` need not be set), chosen by ``target_modules`` as in LoRA (names, a regex, or
``"all-linear"``). Fused MoE experts (transformers v5 ``experts.gate_up_proj`` / ``experts.down_proj``) are 3-D
``nn.Parameter`` tensors, not modules; peft reaches them only through LoRA's ``target_parameters`` (a
parametrization of the whole expert stack), so masked LoRA does not target them. Use a plain
``LoraConfig(target_parameters=...)`` there and merge with `hf_prune.peft.merge_and_unload`, which masks the
merge of expert tensors too (training then sees the dense update; only the merge is masked).

Base/adapter consistency: when an adapter is created, the zero pattern of every targeted layer is recorded in
``MaskedLoraConfig.mask_fingerprints`` (saved in ``adapter_config.json``). Loading the adapter onto a base with
a different zero pattern raises `MaskMismatchError` before the model is touched; a base without any zeros in
the targeted layers only warns (the adapter then behaves like plain LoRA).

Example:
    >>> import torch
    >>> from peft import get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> import hf_prune
    >>> from hf_prune.peft import MaskedLoraConfig
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> _ = model.prune(hf_prune.PruningConfig(method="magnitude", structure="2:4"), verbose=False,
    ...                 show_progress=False)
    >>> peft_model = get_peft_model(model, MaskedLoraConfig(r=4, target_modules="all-linear",
    ...                                                     init_lora_weights=False))
    >>> merged = peft_model.merge_and_unload()
    >>> from hf_prune.core.masks import is_nm_sparse
    >>> is_nm_sparse(merged.model.layers[0].mlp.down_proj.weight, 2, 4)
    True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from torch.nn import functional as F

from ..core.model import is_conv1d
from ..errors import ConfigError, HfPruneError, UnsupportedModelError
from .masking import add_masked_, fingerprint, masked_update
from .peft_type import peft_type_member

#: the method's name for `peft.utils.register_peft_method` (``PeftType.MASKED_LORA``)
NAME = "masked_lora"
#: peft's unique per-method prefix; every adapter parameter name contains it (``masked_lora_A``, ...)
PREFIX = "masked_lora_"


class MaskMismatchError(HfPruneError, ValueError):
    """A masked LoRA adapter is loaded onto a base whose zero pattern differs from the one it was trained on."""


@dataclass
class MaskedLoraConfig(PeftConfig):
    """Configuration of a masked LoRA adapter; the fields mirror `peft.LoraConfig`'s basic ones.

    Args:
        r: rank of the update ``B @ A``.
        lora_alpha: the update is scaled by ``lora_alpha / r``.
        lora_dropout: dropout on the adapter's input, as in LoRA.
        target_modules: module names (suffix match), a regex (full match), or ``"all-linear"`` (every
            ``nn.Linear``/``Conv1D`` except the output head). ``None``: peft's LoRA defaults for the model type.
        exclude_modules: names or a regex of modules to leave alone.
        fan_in_fan_out: accepted for `peft.LoraConfig` compatibility and ignored: the layout is read from each
            layer (``Conv1D`` stores ``[in, out]``).
        bias: only ``"none"`` (biases are never trained by the adapter).
        init_lora_weights: ``True``: ``B = 0`` so the adapter starts as a no-op (LoRA's default); ``False``: ``B``
            Kaiming-uniform too (for tests).
        layers_to_transform: only these block indices (with ``layers_pattern``), as in LoRA.
        layers_pattern: name of the block list (e.g. ``"layers"``, ``"h"``) for ``layers_to_transform``.
        modules_to_save: extra modules trained in full and saved with the adapter, as in LoRA.
        mask_fingerprints: filled in when the adapter is created: ``{module name: {"nonzeros", "numel",
            "sha256"}}`` of each target's base weight. Checked when the adapter is loaded; leave it empty.
    """

    r: int = field(default=8, metadata={"help": "rank of the update B @ A"})
    lora_alpha: int = field(default=8, metadata={"help": "the update is scaled by lora_alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "module names, a regex, or 'all-linear' (nn.Linear and Conv1D layers)"})
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "module names or a regex of modules not to adapt"})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "ignored (LoraConfig compatibility): Conv1D layers are detected"})
    bias: str = field(default="none", metadata={"help": "only 'none'"})
    init_lora_weights: bool = field(default=True, metadata={"help": "True: B = 0 (no-op start), as in LoRA"})
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "only these block indices"})
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "name of the block list used by layers_to_transform"})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "modules trained in full and saved with the adapter"})
    mask_fingerprints: dict = field(
        default_factory=dict,
        metadata={"help": "zero-pattern fingerprint of each target's base weight, recorded at creation"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type_member(NAME.upper())
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"MaskedLoraConfig.r must be a positive integer (the rank), got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"MaskedLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise ConfigError(f"MaskedLoraConfig.bias={self.bias!r} is not supported: only 'none'. To train "
                              "biases, name their modules in modules_to_save.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("MaskedLoraConfig.layers_to_transform cannot be combined with a regex "
                              "target_modules; pass target_modules as a list of names")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("MaskedLoraConfig.layers_pattern needs layers_to_transform (the block indices)")
        if self.mask_fingerprints is None:
            self.mask_fingerprints = {}


class MaskedLoraLayer(BaseTunerLayer):
    """Adapter state of one masked LoRA layer: ``masked_lora_A[name]`` ``[r, in]``, ``masked_lora_B[name]``
    ``[out, r]`` and a scale per adapter, around a frozen ``nn.Linear`` or ``Conv1D`` base layer."""

    adapter_layer_names = ("masked_lora_A", "masked_lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "masked_lora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.masked_lora_dropout = nn.ModuleDict({})
        self.masked_lora_A = nn.ParameterDict({})
        self.masked_lora_B = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if is_conv1d(base):  # GPT-2 style: weight [in, out]
            self.in_features, self.out_features = base.weight.shape
            self.fan_in_fan_out = True
        elif isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.fan_in_fan_out = False
        else:
            raise UnsupportedModelError(
                f"masked LoRA adapts nn.Linear and transformers Conv1D layers, got {type(base).__name__}; "
                "remove it from target_modules (or use target_modules='all-linear')")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: MaskedLoraConfig) -> None:
        """Create the adapter ``adapter_name`` on this layer (LoRA's initialisation) and activate it."""
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.masked_lora_dropout.update(nn.ModuleDict({adapter_name: dropout}))
        self.masked_lora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.masked_lora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        nn.init.kaiming_uniform_(self.masked_lora_A[adapter_name], a=math.sqrt(5))
        if config.init_lora_weights:
            nn.init.zeros_(self.masked_lora_B[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.masked_lora_B[adapter_name], a=math.sqrt(5))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def base_weight_out_in(self) -> torch.Tensor:
        """The frozen base weight as ``[out, in]`` (a transposed view for ``Conv1D``)."""
        weight = self.get_base_layer().weight
        return weight.t() if self.fan_in_fan_out else weight

    def masked_delta(self, adapter_name: str) -> torch.Tensor:
        """``(B @ A) ⊙ (W != 0)`` as ``[out, in]``, unscaled, in the adapter's dtype (differentiable)."""
        a, b = self.masked_lora_A[adapter_name], self.masked_lora_B[adapter_name]
        return masked_update(self.base_weight_out_in(), b @ a)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The merged update ``scale * (B @ A) ⊙ (W != 0)`` in the base weight's own layout."""
        delta = self.masked_delta(adapter_name) * self.scaling[adapter_name]
        return delta.t() if self.fan_in_fan_out else delta


class MaskedLoraLinear(nn.Module, MaskedLoraLayer):
    """A masked LoRA layer around an ``nn.Linear`` or ``Conv1D``; the base layer stays untouched until merged."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MaskedLoraConfig, r: int,
                 lora_alpha: float, **kwargs: Any) -> None:
        super().__init__()
        MaskedLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the masked update of the active (or named) adapters to the base weight; its zeros stay zeros.
        ``safe_merge`` checks the result for NaN/Inf before writing it."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.masked_lora_A:
                continue
            weight = self.get_base_layer().weight
            with torch.no_grad():
                delta = self.get_delta_weight(name)
                if safe_merge:
                    merged = add_masked_(weight.detach().clone(), delta)
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaN/Inf in the merged weights: adapter {name!r} seems to be broken; "
                                         "nothing was merged into this layer")
                    weight.copy_(merged)
                else:
                    add_masked_(weight, delta)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's masked update again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.masked_lora_A:
                with torch.no_grad():
                    add_masked_(self.get_base_layer().weight, -self.get_delta_weight(name))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.masked_lora_A:
                continue
            a = self.masked_lora_A[name]
            x_in = self.masked_lora_dropout[name](self._cast_input_dtype(x, a.dtype))
            result = result + F.linear(x_in, self.masked_delta(name)) * self.scaling[name]
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "masked_lora." + super().__repr__()


def _base_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def check_fingerprints(model: nn.Module, fingerprints: dict[str, dict]) -> None:
    """Raise `MaskMismatchError` if a layer named in ``fingerprints`` now has a different zero pattern."""
    bad = []
    for name, expected in fingerprints.items():
        try:
            weight = _base_of(model.get_submodule(name)).weight
        except AttributeError:
            continue  # not in this model: peft's own target matching reports it
        if weight.device.type == "meta":
            continue
        found = fingerprint(weight)
        if found["sha256"] != expected.get("sha256") or found["numel"] != expected.get("numel"):
            bad.append(f"{name}: adapter trained on {expected.get('nonzeros')} non-zeros of "
                       f"{expected.get('numel')}, this base has {found['nonzeros']} of {found['numel']}"
                       + (" (same count, different positions)" if found["nonzeros"] == expected.get("nonzeros")
                          else ""))
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more layers" if len(bad) > 3 else "")
        raise MaskMismatchError(
            f"this masked LoRA adapter was trained on a base with a different zero pattern in {len(bad)} of "
            f"{len(fingerprints)} layers ({shown}). Its update is only defined on the original non-zeros: load it "
            "onto the same pruned checkpoint it was trained on. To apply it anyway (masking with this base's "
            "zeros), load its config, clear the record and pass it in: cfg = PeftConfig.from_pretrained(path); "
            "cfg.mask_fingerprints = {}; PeftModel.from_pretrained(base, path, config=cfg).")


class MaskedLoraModel(BaseTuner):
    """peft's tuner for `MaskedLoraConfig` (registered as ``PeftType.MASKED_LORA``): wraps each target in a
    `MaskedLoraLinear`, records the targets' zero patterns and checks them when an adapter is loaded."""

    prefix: str = PREFIX
    tuner_layer_cls = MaskedLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        check_fingerprints(model, config.mask_fingerprints)  # before any module is replaced
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        dense = [fp for fp in config.mask_fingerprints.values() if fp["nonzeros"] == fp["numel"]]
        if dense:
            warnings.warn(
                f"masked LoRA adapter {adapter_name!r}: {len(dense)} of {len(config.mask_fingerprints)} target "
                "layers have no zeros in their base weight, so nothing is masked there and the adapter acts like "
                "plain LoRA on them. Prune the model first (model.prune(...)) if that is not intended.",
                UserWarning, stacklevel=2)

    def _create_and_replace(self, peft_config: MaskedLoraConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **optional_kwargs: Any) -> None:
        if isinstance(target, MaskedLoraLayer):
            target.update_layer(adapter_name, peft_config.r, peft_config.lora_alpha, peft_config)
        else:
            new_module = MaskedLoraLinear(target, adapter_name, peft_config, peft_config.r, peft_config.lora_alpha)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)  # an added adapter is not trainable until activated
            self._replace_module(parent, target_name, new_module, target)
        weight = _base_of(target).weight
        if current_key not in peft_config.mask_fingerprints and weight.device.type != "meta":
            peft_config.mask_fingerprints[current_key] = fingerprint(weight)


def register() -> None:
    """Register masked LoRA with peft (``peft.utils.register_peft_method``); safe to call again."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.utils import register_peft_method

    peft_type = peft_type_member(NAME.upper())
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is MaskedLoraConfig:
        return
    if registered is not None:
        if (registered.__module__, registered.__qualname__) != (__name__, MaskedLoraConfig.__qualname__):
            raise RuntimeError(f"peft already has a method called {NAME!r}, registered by {registered.__module__}")
        for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING,
                        PEFT_TYPE_TO_MIXED_MODEL_MAPPING):
            mapping.pop(peft_type, None)  # this module was reloaded: replace the stale classes
    register_peft_method(name=NAME, config_cls=MaskedLoraConfig, model_cls=MaskedLoraModel, prefix=PREFIX)
