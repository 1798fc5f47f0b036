"""Lifecycle of one structured pruning run: validate, score (the registered method), cut (surgery), report.

`hf_prune.prune` calls `prune_structured` when ``config.method`` is a structured method; users call
``model.prune(...)`` as for one-shot pruning.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> import hf_prune
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> calib = torch.randint(0, 100, (4, 16))
    >>> report = model.prune(hf_prune.PruningConfig(method="flap", sparsity=0.3, num_calibration_samples=4,
    ...                                             seqlen=16), calibration=calib, verbose=False, show_progress=False)
    >>> report.params_after < report.params_before
    True
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..core.distributed import broadcast_object, check_not_sharded
from ..core.memory import PeakMemory
from ..core.model import find_blocks
from ..errors import ConfigError, UnsupportedModelError
from ..registry import get_method
from ..report import BlockRow, StructuredReport
from .arch import block_specs, num_params
from .config_io import is_structured
from .plan import BlockSpec, StructuredPlan
from .surgery import apply_plan


def check_model(model: nn.Module) -> list[BlockSpec]:
    """Everything about the model that must hold before a structured run starts (raises, touches nothing)."""
    check_not_sharded(model, "structured pruning")
    if getattr(model, "hf_device_map", None) and any(d in ("disk", "meta") for d in model.hf_device_map.values()):
        raise UnsupportedModelError(
            "structured pruning physically replaces weights and cannot write into accelerate's disk offload; "
            "load the model without device_map='auto' disk offload (CPU RAM is enough: one block is computed at a "
            "time) or use an unstructured method"
        )
    return block_specs(model)


def block_rows(specs: list[BlockSpec], plan: StructuredPlan, before: list[int], removed: dict[int, int]) -> list[BlockRow]:
    rows = []
    for spec in specs:
        i = spec.index
        lp = plan.layers.get(i)
        row = BlockRow(block=i, params_before=before[i], params_after=before[i] - removed.get(i, 0))
        if i in plan.remove_blocks:
            row.removed = "block"
        elif lp is not None:
            gone = [name for name, flag in (("attention", lp.remove_attention), ("mlp", lp.remove_mlp)) if flag]
            row.removed = "+".join(gone) or None
            if spec.experts is not None and lp.experts_keep is not None:
                row.experts = (spec.experts.num_experts, len(lp.experts_keep))
            if spec.mlp is not None and lp.mlp_keep is not None and not lp.remove_mlp:
                row.mlp = (spec.mlp.intermediate, len(lp.mlp_keep))
            a = spec.attention
            if a is not None and not lp.remove_attention:
                if lp.heads_keep is not None:
                    row.heads = (a.num_heads, len(lp.heads_keep))
                if lp.kv_heads_keep is not None:
                    row.kv_heads = (a.num_kv_heads, len(lp.kv_heads_keep))
        rows.append(row)
    return rows


def prune_structured(
    model: nn.Module, config: Any, calibration: torch.Tensor | None, device: torch.device, show_progress: bool,
) -> StructuredReport:
    """Score with ``config.method``, remove what its plan says, rewrite the config; return the report."""
    specs = check_model(model)
    method = get_method(config.method)(config)
    _, blocks = find_blocks(model)
    before = [num_params(b) for b in blocks]
    params_before = num_params(model)
    with PeakMemory() as mem:
        start = time.perf_counter()
        plan, info = method.plan(model, calibration, config, device, show_progress)
        # Several processes: the statistics were summed over all of them, so the plans agree; every process cuts
        # rank 0's plan all the same, so the models cannot drift apart (a no-op in one process).
        plan, info = broadcast_object((plan, info))
        try:
            removed = apply_plan(model, plan)
        except (ConfigError, UnsupportedModelError):
            raise  # the plan was rejected before anything was cut
        except BaseException:
            model._hf_prune_incomplete = True  # type: ignore[assignment]
            raise
        seconds = time.perf_counter() - start
    return StructuredReport(
        method=config.method,
        structure=config.structure,
        target_fraction=float(config.sparsity),
        blocks=block_rows(specs, plan, before, removed),
        params_before=params_before,
        params_after=num_params(model),
        decoder_params_before=sum(before),
        seconds=seconds,
        peak_rss_mb=mem.peak_rss_mb,
        peak_device_mb=mem.peak_device_mb,
        device=str(device),
        num_calibration_samples=0 if calibration is None else int(calibration.shape[0]),
        seqlen=0 if calibration is None else int(calibration.shape[1]),
        reload_path="hf_prune" if is_structured(model.config) else "stock",
        config={**config.to_dict(), "plan_info": _jsonable(info)},
    )


def _jsonable(value: Any) -> Any:
    """Method info (scores, chosen units) reduced to JSON types; tensors become lists."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
