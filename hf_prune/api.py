"""`prune(model, config, calibration)`: the one-shot entry point, also available as ``model.prune(...)``.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> import hf_prune
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> calib = torch.randint(0, 100, (4, 16))
    >>> report = model.prune(hf_prune.PruningConfig(method="wanda", sparsity=0.5, structure="2:4"),
    ...                      calibration=calib, show_progress=False, verbose=False)
    >>> round(report.achieved_sparsity, 2)
    0.5
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import PruningConfig
from .core.calibration import build_calibration
from .core.masks import check_nm_shape
from .core.memory import PeakMemory
from .core.sources import CalibrationMix, build_mixture, check_source_config, dual_batch_size, use_mix
from .errors import CalibrationError, ConfigError, IncompletePruningError, UnsupportedModelError
from .oneshot.pipeline import SequentialPruner
from .report import LayerRow, PruningReport, Report, StructuredReport, attach_report

logger = logging.getLogger("hf_prune")


def _resolve_config(config: PruningConfig | Mapping[str, Any] | None, overrides: dict[str, Any]) -> PruningConfig:
    if config is None:
        return PruningConfig.from_dict(overrides)
    if isinstance(config, Mapping):
        return PruningConfig.from_dict({**config, **overrides})
    if not isinstance(config, PruningConfig):
        raise ConfigError(f"config must be a PruningConfig or a dict, got {type(config).__name__}")
    if overrides:
        return PruningConfig.from_dict({**config.to_dict(), **overrides})
    return config


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for d in (getattr(model, "hf_device_map", None) or {}).values():
        if isinstance(d, int):
            return torch.device(f"cuda:{d}")
        if isinstance(d, str) and d not in ("cpu", "disk", "meta"):
            return torch.device(d)
    for p in model.parameters():
        if p.device.type not in ("meta", "cpu"):
            return p.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _aggregate(results: list[LayerRow]) -> list[LayerRow]:
    """One report row per weight tensor (the pipeline reports each expert of a fused MoE tensor separately;
    they are summed here into one ``[E, out, in]`` row)."""
    rows: dict[str, LayerRow] = {}
    for r in results:
        name, expert = r.name.split("[")[0], "[" in r.name
        row = rows.get(name)
        if row is None:
            shape = [1, *r.shape] if expert else list(r.shape)
            rows[name] = LayerRow(name, r.block, shape, r.params, r.nonzero, r.target_sparsity)
        else:
            row.params += r.params
            row.nonzero += r.nonzero
            row.shape[0] += 1
    return list(rows.values())


def _check_prunable(model: Any) -> None:
    """A transformers model that no failed run has left half-pruned (every method checks this first)."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if getattr(model, "_hf_prune_incomplete", False):
        raise IncompletePruningError(
            "this model was left partially pruned by a failed run (restore_on_error=False, or a structured cut that "
            "failed half-way); reload it and prune again"
        )


def validate(model: nn.Module, config: PruningConfig) -> SequentialPruner:
    """Check that ``config`` fits ``model`` without modifying anything; return the prepared pruner."""
    _check_prunable(model)
    pruner = SequentialPruner(model, config, torch.device("cpu"), show_progress=False)
    layers = [layer for block in pruner.layers for layer in block]
    if not layers:
        raise UnsupportedModelError(
            f"no prunable layers in {type(model).__name__} match targets={config.targets} / ignore={config.ignore}; "
            "loosen the patterns (targets=None selects every linear layer in the decoder blocks)"
        )
    if config.nm is not None:
        for layer in layers:
            check_nm_shape(layer.shape[1], config.nm[1], layer.name)
    return pruner


def prune(
    model: nn.Module,
    config: PruningConfig | Mapping[str, Any] | None = None,
    calibration: Any = None,
    tokenizer: Any = None,
    *,
    device: str | torch.device | None = None,
    show_progress: bool = True,
    verbose: bool = True,
    **config_kwargs: Any,
) -> Report:
    """Prune ``model`` in place, block by block, and return its report: a `PruningReport` (zeroing methods) or a
    `StructuredReport` (structured methods), both `hf_prune.report.Report`.

    Args:
        model: a transformers model (any device placement, including accelerate ``device_map`` offload).
        config: a `PruningConfig` or a dict of its fields; keyword arguments override fields.
        calibration: text file path, list of strings, `datasets.Dataset`, `DataLoader` or LongTensor
            ``[samples, seqlen]``; required by calibration-based methods (wanda, sparsegpt, owl=True, and every
            structured method).
        tokenizer: needed when ``calibration`` is text.
        device: where each block is computed (default: the model's accelerator, else CUDA if available, else CPU).
        show_progress: tqdm bars per block.
        verbose: print the report table at the end.

    Everything is validated before the model is touched. If a block fails (NaN activations, Cholesky
    failure), the weights already pruned are restored (``restore_on_error=True``, the default).

    Structured methods (``flap``, ``wanda-sp``, ``taylor``, ``block-influence``, ``angular``, ``finercut``)
    physically remove channels, heads, sublayers or blocks and return a
    `hf_prune.report.StructuredReport`; ``sparsity`` is then the fraction of decoder parameters removed. The
    expert methods (``reap``, ``ean``, ``easy-ep``, ``expert-frequency``, ``random-experts``) remove whole routed
    experts of MoE models; ``sparsity`` is then the fraction of routed experts removed.
    """
    cfg = _resolve_config(config, config_kwargs)
    if cfg.structured_kind is not None:
        return _prune_structured(model, cfg, calibration, tokenizer, device, show_progress, verbose)
    pruner = validate(model, cfg)
    calib = mix = None
    if pruner.needs_calibration:
        calib, mix = _calibration_tokens(model, cfg, calibration, tokenizer)
        cfg = _dual_config(cfg, mix)
        pruner.config = pruner.method.config = cfg
    pruner.device = _resolve_device(model, device)
    pruner.show_progress = show_progress
    was_training = model.training
    model.eval()
    with PeakMemory() as mem:
        start = time.perf_counter()
        try:
            with use_mix(mix):
                results = pruner.run(calib)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
    report = PruningReport(
        method=cfg.method,
        structure=cfg.structure,
        target_sparsity=float(cfg.sparsity),  # type: ignore[arg-type]
        layers=_aggregate(results),
        total_params=sum(p.numel() for p in model.parameters()),
        seconds=seconds,
        peak_rss_mb=mem.peak_rss_mb,
        peak_device_mb=mem.peak_device_mb,
        device=str(pruner.device),
        num_calibration_samples=0 if calib is None else int(calib.shape[0]),
        seqlen=0 if calib is None else int(calib.shape[1]),
        block_sparsity=pruner.block_sparsity if cfg.owl else None,
        owl_choice=pruner.owl_choice if cfg.owl else None,
        skipped=pruner.skipped,
        config=cfg.to_dict(),
        calibration_sources=None if mix is None else mix.summary(),
    )
    attach_report(model, cfg, report)
    if verbose:
        print(report)
    return report


def _require_calibration(cfg: PruningConfig, calibration: Any) -> None:
    if calibration is None:
        raise CalibrationError(
            f"method={cfg.method!r}{' with owl=True' if cfg.owl else ''} needs calibration data: pass "
            "calibration= a text file, a list of strings (with tokenizer=), a datasets.Dataset, a DataLoader or a "
            "LongTensor [samples, seqlen]; or use method='magnitude', which needs none"
        )


def _calibration_tokens(model: nn.Module, cfg: PruningConfig, calibration: Any, tokenizer: Any
                        ) -> tuple[torch.Tensor, CalibrationMix | None]:
    """Calibration data of any accepted kind as a LongTensor [samples, seqlen], checked against the vocabulary;
    with named sources (a dict) also the `CalibrationMix` that says which rows came from which source."""
    _require_calibration(cfg, calibration)
    named = isinstance(calibration, Mapping)
    if not named:  # build_mixture checks named sources itself
        check_source_config(None, cfg.calibration_weights, cfg.domain_weight, cfg.domain_source)
    sources = list(calibration.values()) if named else [calibration]
    if tokenizer is None and any(_is_text(s) for s in sources):
        tokenizer = _guess_tokenizer(model)
    mix = None
    if named:
        mix = build_mixture(calibration, tokenizer, cfg.num_calibration_samples, cfg.seqlen, cfg.seed,
                            cfg.calibration_weights, cfg.domain_source, cfg.domain_weight)
        calib = mix.tokens
    else:
        calib = build_calibration(calibration, tokenizer, cfg.num_calibration_samples, cfg.seqlen, cfg.seed)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(calib.max()) >= vocab:
        raise CalibrationError(
            f"calibration token id {int(calib.max())} is outside the model's vocabulary (vocab_size={vocab}); "
            "was it tokenized with another tokenizer?"
        )
    return calib, mix


def _dual_config(cfg: PruningConfig, mix: CalibrationMix | None) -> PruningConfig:
    """Under dual importance, a batch size whose batches never mix general and domain rows (with a warning when
    it had to shrink)."""
    if mix is None or not mix.dual:
        return cfg
    size = dual_batch_size(mix, cfg.batch_size)
    if size == cfg.batch_size:
        return cfg
    warnings.warn(f"domain_weight: batch_size {cfg.batch_size} -> {size}, so that no calibration batch mixes the "
                  f"{mix.general_rows()} general rows with the domain rows (choose num_calibration_samples and "
                  "calibration_weights so that the general share is a multiple of batch_size to keep it)",
                  UserWarning, stacklevel=3)
    return cfg.replace(batch_size=size)


def _prune_structured(model: nn.Module, cfg: PruningConfig, calibration: Any, tokenizer: Any,
                      device: str | torch.device | None, show_progress: bool, verbose: bool) -> StructuredReport:
    """`prune` for structured methods: same validation order (model, then data), then `prune_structured`."""
    from .structure.runner import check_model, prune_structured

    _check_prunable(model)
    check_model(model)
    calib, mix = _calibration_tokens(model, cfg, calibration, tokenizer)
    cfg = _dual_config(cfg, mix)
    was_training = model.training
    model.eval()
    try:
        with use_mix(mix):
            report = prune_structured(model, cfg, calib, _resolve_device(model, device), show_progress)
    finally:
        model.train(was_training)
    report.calibration_sources = None if mix is None else mix.summary()
    attach_report(model, cfg, report)
    if verbose:
        print(report)
    return report


def _is_text(calibration: Any) -> bool:
    if isinstance(calibration, str):
        return True
    if isinstance(calibration, (list, tuple)) and calibration and isinstance(calibration[0], str):
        return True
    return hasattr(calibration, "column_names") and "input_ids" not in (calibration.column_names or [])


def _guess_tokenizer(model: nn.Module) -> Any:
    path = getattr(getattr(model, "config", None), "_name_or_path", "")
    if path:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
            logger.info("using the tokenizer saved with the model at %s", path)
            return tok
        except Exception:  # noqa: BLE001 - any failure means "no tokenizer found"
            pass
    return None
