"""Write compressed sparse checkpoints (bitmask / N:M) that ``from_pretrained`` reloads as
:class:`hf_prune.nn.SparseLinear` layers when hf_prune is imported.

The write goes through hf_prune's one checkpoint path (:func:`hf_prune.io.save_checkpoint`): everything
goes to one temporary sibling directory first; only a complete checkpoint replaces ``out_dir``. Files
already in ``out_dir`` that the new checkpoint does not rewrite (tokenizer, README, ...) are kept; stale
weight files are moved aside and deleted only after the new checkpoint is in place. This module only
supplies the compressed view of the model that is saved (:func:`select_modules`, the layers built with
:meth:`hf_prune.nn.SparseLinear.from_linear`).

Example:
    >>> import tempfile, torch, hf_prune.formats
    >>> from transformers import LlamaConfig, LlamaForCausalLM, AutoModelForCausalLM
    >>> cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    >>> model = LlamaForCausalLM(cfg)
    >>> with torch.no_grad():
    ...     for mod in model.model.layers.modules():
    ...         if isinstance(mod, torch.nn.Linear):
    ...             mod.weight[:, 1::2] = 0
    >>> d = tempfile.mkdtemp()
    >>> report = hf_prune.formats.save_sparse_pretrained(model, d, "2:4")
    >>> type(AutoModelForCausalLM.from_pretrained(d).model.layers[0].mlp.up_proj).__name__
    'SparseLinear'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..core.distributed import is_main_process, world
from ..io.save import save_checkpoint
from ..nn.packing import SparseFormat, is_nm_sparse, parse_format
from ..nn.sparse_linear import SparseLinear
from .quantizer import HfPruneSparseConfig, HfPruneSparseQuantizer, register

__all__ = ["save_sparse_pretrained", "select_modules"]

logger = logging.getLogger("hf_prune.formats")


def _excluded_module_ids(model: nn.Module) -> set[int]:
    """Output/input embeddings and modules whose weight is shared with another module (tied)."""
    ids: set[int] = set()
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        fn = getattr(model, getter, None)
        mod = fn() if callable(fn) else None
        if mod is not None:
            ids.add(id(mod))
    owners: dict[int, list[nn.Module]] = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(mod)
    for mods in owners.values():
        if len(mods) > 1:
            ids.update(id(m) for m in mods)
    return ids


def _compressible(weight: torch.Tensor, fmt: SparseFormat) -> bool:
    """Bitmask: only when it saves bytes. N:M: only when the weight satisfies N:M."""
    if fmt.kind == "bitmask":
        zeros = float((weight == 0).float().mean())
        return zeros > 1.0 / (8 * weight.element_size())
    return is_nm_sparse(weight, fmt.n, fmt.m)


def select_modules(
    model: nn.Module, sparse_format: str | SparseFormat, modules: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Return ``{name: dense weight}`` of the linears to compress.

    Default: every ``nn.Linear`` / ``SparseLinear`` except embeddings, ``lm_head`` and tied
    weights. Fully dense layers stay dense. With an N:M format, a *pruned* layer (has zeros)
    that is not N:M raises ``ValueError``; with ``modules=`` every listed module must comply.

    Example:
        >>> lin = nn.Sequential(nn.Linear(8, 8))
        >>> with torch.no_grad():
        ...     lin[0].weight[:, :4] = 0
        >>> list(select_modules(lin, "bitmask"))
        ['0']
    """
    fmt = parse_format(sparse_format)
    excluded = _excluded_module_ids(model)
    named = dict(model.named_modules())
    if modules is not None:
        missing = [
            n for n in modules if n not in named or not isinstance(named[n], (nn.Linear, SparseLinear))
        ]
        if missing:
            raise ValueError(f"modules not found or not nn.Linear: {missing}")
        candidates = {n: named[n] for n in modules}
    else:
        candidates = {
            n: m
            for n, m in named.items()
            if isinstance(m, (nn.Linear, SparseLinear)) and id(m) not in excluded
        }
    chosen: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for name, mod in candidates.items():
        w = mod.dense_weight() if isinstance(mod, SparseLinear) else mod.weight.detach()
        if w.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (offloaded?); load it fully before saving")
        if _compressible(w, fmt):
            chosen[name] = w
        elif fmt.kind == "nm" and (modules is not None or bool((w == 0).any())):
            bad.append(f"{name} (sparsity {float((w == 0).float().mean()):.3f})")
        else:
            logger.info("%s stays dense in the %s checkpoint (not sparse enough to gain)", name, fmt)
    if bad:
        raise ValueError(
            f"sparse_format='{fmt}' asked, but these layers are not {fmt} sparse: {', '.join(bad[:8])}"
            f"{' ...' if len(bad) > 8 else ''}. Prune with structure='{fmt}', or use sparse_format='bitmask'."
        )
    if not chosen:
        raise ValueError(f"no linear layer is sparse enough for sparse_format='{fmt}'; nothing to compress")
    return chosen


@contextmanager
def _compressed_view(model: nn.Module, layers: dict[str, SparseLinear], qc: HfPruneSparseConfig) -> Iterator[None]:
    """Swap ``layers`` into ``model`` and attach the sparse ``quantization_config`` / quantizer for the
    duration of the block; afterwards the model is exactly as it was (modules and config restored)."""
    originals: dict[str, nn.Module] = {}
    had_qc = "quantization_config" in model.config.__dict__
    old_qc = model.config.__dict__.get("quantization_config")
    had_q = "hf_quantizer" in model.__dict__
    old_q = model.__dict__.get("hf_quantizer")
    try:
        for name, layer in layers.items():
            originals[name] = model.get_submodule(name)
            model.set_submodule(name, layer)
        model.config.quantization_config = qc
        model.hf_quantizer = HfPruneSparseQuantizer(qc, pre_quantized=True)
        yield
    finally:
        for name, mod in originals.items():
            model.set_submodule(name, mod)
        if had_qc:
            model.config.quantization_config = old_qc
        elif "quantization_config" in model.config.__dict__:
            del model.config.quantization_config
        if had_q:
            model.hf_quantizer = old_q
        elif "hf_quantizer" in model.__dict__:
            del model.hf_quantizer


def _save_pretrained(model: nn.Module, folder: str, **save_kwargs: Any) -> None:
    # The model's own save_pretrained: with hf_prune installed it adds the pruning report and the
    # structured-pruning files, writing into this save's temporary folder (no second one).
    model.save_pretrained(folder, **save_kwargs)


def save_sparse_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    sparse_format: str,
    modules: list[str] | None = None,
    **save_kwargs: Any,
) -> dict[str, Any]:
    """Save ``model`` with compressed sparse linears (``"bitmask"`` or ``"N:M"``, e.g. ``"2:4"``).

    The model is left exactly as it was (modules and config are restored). Extra keyword
    arguments go to ``model.save_pretrained`` (e.g. ``max_shard_size``). Returns a report:
    ``{"format", "modules", "compressed_bytes", "dense_bytes"}`` (weights of the compressed
    layers only).

    Example:
        >>> # see the module docstring for a full round trip
        >>> save_sparse_pretrained.__name__
        'save_sparse_pretrained'
    """
    register()
    if not is_main_process():  # data-parallel pruning: every rank holds the same model; rank 0 writes it
        logger.info("hf_prune: rank %d skips save_sparse_pretrained(%s); rank 0 writes it", world().rank, out_dir)
        return {"format": str(parse_format(sparse_format)), "modules": {}, "compressed_bytes": 0,
                "dense_bytes": 0, "skipped": "not the main process"}
    if save_kwargs.get("push_to_hub"):
        raise ValueError("save_sparse_pretrained writes locally; push the folder with push_to_hub afterwards")
    for k in ("state_dict", "sparse_format"):
        if k in save_kwargs:
            raise ValueError(f"save_sparse_pretrained does not accept {k}=")
    existing = getattr(model, "hf_quantizer", None)
    if existing is not None and not isinstance(existing, HfPruneSparseQuantizer):
        raise ValueError(
            f"model is quantized with {existing.quantization_config.quant_method}; "
            "sparse compression needs a float model"
        )
    fmt = parse_format(sparse_format)
    chosen = select_modules(model, fmt, modules)

    layers = {
        name: SparseLinear.from_linear(model.get_submodule(name), fmt, share_bias=True) for name in chosen
    }
    report: dict[str, Any] = {"format": str(fmt), "modules": {}, "compressed_bytes": 0, "dense_bytes": 0}
    for name, w in chosen.items():
        dense_b = w.numel() * w.element_size()
        nbytes = layers[name].compressed_nbytes()
        report["modules"][name] = {"shape": list(w.shape), "bytes": nbytes, "dense_bytes": dense_b}
        report["compressed_bytes"] += nbytes
        report["dense_bytes"] += dense_b
    qc = HfPruneSparseConfig(
        sparse_format=str(fmt), modules={n: [int(w.shape[0]), int(w.shape[1])] for n, w in chosen.items()}
    )
    save_checkpoint(_save_pretrained, model, out_dir, prepare=_compressed_view(model, layers, qc), **save_kwargs)
    return report
