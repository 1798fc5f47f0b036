"""Sequential block-by-block executor for one-shot methods.

1. Record what every decoder block receives (hidden states of block 0, and each block's own kwargs:
   attention mask, position embeddings, ... — per block, because models such as Gemma pass different
   masks/rotary tables to sliding and global layers) by running the model once with pass-through stubs
   in place of the blocks: only embeddings and mask construction run.
2. For each block: move it to the compute device, hook its prunable layers, run the calibration batches
   through it to collect statistics (inputs that are shared, like q/k/v's, are accumulated once), prune
   every layer, then re-run the *pruned* block to produce the next block's inputs (the last block only on
   one batch, as a NaN/Inf check: nothing consumes its outputs); move it back.

Only one block (and the calibration activations) ever lives on the compute device, so a model that is
offloaded to CPU or disk with accelerate's ``device_map`` is pruned with one block's worth of device memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .compat import pop_cache_kwargs
from .config import PruningConfig
from .errors import NumericalError
from .methods.base import InputStats, PruningMethod
from .methods.functional import owl_block_sparsities, owl_outlier_ratio, wanda_scores
from .registry import get_method
from .targets import PrunableLayer, _read_param, find_blocks, input_device, iter_prunable

logger = logging.getLogger("hf_prune")


class _Recorded(Exception):
    pass


class _BlockDone(Exception):
    """Raised by the statistics hooks once every target of a block has seen this batch's input: the rest
    of the block (e.g. the last projection) is not needed for statistics and is skipped."""


@dataclass
class LayerResult:
    name: str
    block: int
    shape: tuple[int, int]
    numel: int
    nonzero: int
    target_sparsity: float

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / max(self.numel, 1)


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _is_hooked(block: nn.Module) -> bool:
    return any(getattr(m, "_hf_hook", None) is not None for m in block.modules())


def record_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """Run the model once with pass-through stubs; return block 0's hidden states per batch and every
    block's ``(extra_args, kwargs)`` per batch."""
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    saved = [blk.__dict__.get("forward") for blk in blocks]

    def make_stub(idx: int) -> Callable:
        def stub(*args: Any, **kwargs: Any) -> torch.Tensor:
            h = args[0] if args else kwargs.pop("hidden_states")
            kwargs.pop("hidden_states", None)
            pop_cache_kwargs(kwargs)
            calls[idx].append((tuple(args[1:]), kwargs))
            if idx == 0:
                hidden.append(h.detach())
            if idx == len(blocks) - 1:
                raise _Recorded
            return h

        return stub

    device = input_device(model)
    try:
        for i, blk in enumerate(blocks):
            blk.forward = make_stub(i)
        with torch.no_grad():
            for batch in calib.split(batch_size):
                batch = batch.to(device)
                try:
                    model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
                except _Recorded:
                    pass
    finally:
        for blk, fwd in zip(blocks, saved):
            if fwd is None:
                blk.__dict__.pop("forward", None)
            else:
                blk.forward = fwd
    if any(len(c) != len(hidden) for c in calls):
        raise NumericalError(
            "could not record the inputs of every decoder block (the model's forward skipped some blocks); "
            "one-shot pruning needs every block to run on every calibration batch"
        )
    return hidden, calls


@contextmanager
def on_device(block: nn.Module, device: torch.device):
    """Move a (not accelerate-hooked) block to ``device`` for the duration, then back where it was."""
    if _is_hooked(block):
        yield
        return
    params = list(block.parameters())
    origin = params[0].device if params else device
    if origin != device:
        block.to(device)
    try:
        yield
    finally:
        if origin != device:
            block.to(origin)


class _StatsCollector:
    """Forward hooks that accumulate `InputStats` per group of layers sharing one input tensor."""

    def __init__(
        self, layers: list[PrunableLayer], device: torch.device, norms: bool, hessian: bool, early_stop: bool = False
    ) -> None:
        self.layers = layers
        self.early_stop = early_stop
        self._fired: set[int] = set()
        self._n_modules = len({id(layer.module) for layer in layers})
        self.device = device
        self.norms, self.hessian = norms, hessian
        self.groups: dict[str, list[PrunableLayer]] = {}
        self.stats: dict[str, InputStats] = {}
        self._leader: dict[str, str] = {}
        self._first_batch = True
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles: list[Any] = []

    def _new_stats(self, in_features: int) -> InputStats:
        return InputStats(in_features, self.device, self.norms, self.hessian)

    def _done(self, module: nn.Module) -> None:
        self._fired.add(id(module))
        if self.early_stop and len(self._fired) == self._n_modules:
            raise _BlockDone

    def _linear_hook(self, layer: PrunableLayer) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self._first_batch:
                prev = self._seen.get(id(x))
                if prev is not None and prev[0] is x:
                    key = prev[1]
                    self.groups[key].append(layer)
                    layer.stats_key = key
                    self._done(module)
                    return
                key = layer.name
                self._seen[id(x)] = (x, key)  # keep x alive so its id is not reused in this batch
                self.groups[key] = [layer]
                self._leader[layer.name] = key
                layer.stats_key = key
                self.stats[key] = self._new_stats(x.shape[-1])
            if layer.name in self._leader:
                self.stats[layer.stats_key].add(x.detach())
            self._done(module)

        return hook

    def _experts_hook(self, module: nn.Module, layers: list[PrunableLayer]) -> Callable:
        by_param: dict[str, dict[int, PrunableLayer]] = {}
        for layer in layers:
            by_param.setdefault(layer.param_name, {})[layer.expert] = layer  # type: ignore[index]
            if layer.name not in self.groups:
                self.groups[layer.name] = [layer]
                self._leader[layer.name] = layer.name
                layer.stats_key = layer.name
                self.stats[layer.name] = self._new_stats(layer.shape[1])

        def hook(mod: nn.Module, args: tuple) -> None:
            hidden, top_k_index = args[0], args[1]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            gate_up = by_param.get("gate_up_proj", {})
            down = by_param.get("down_proj", {})
            gate_up_weight = _read_param(mod, "gate_up_proj")  # once per call: offloaded reads load the tensor
            for e in range(gate_up_weight.shape[0]):
                tokens = (top_k_index == e).any(-1).reshape(-1)
                if not bool(tokens.any()):
                    continue
                x = hidden[tokens]
                if e in gate_up:
                    self.stats[gate_up[e].name].add(x)
                if e in down:
                    w = gate_up_weight[e].to(x.device, x.dtype)
                    g, u = nn.functional.linear(x, w).chunk(2, dim=-1)
                    self.stats[down[e].name].add(mod.act_fn(g) * u)
            self._done(mod)

        return hook

    def attach(self) -> None:
        experts: dict[int, tuple[nn.Module, list[PrunableLayer]]] = {}
        for layer in self.layers:
            if layer.kind == "expert":
                experts.setdefault(id(layer.module), (layer.module, []))[1].append(layer)
            else:
                self._handles.append(layer.module.register_forward_pre_hook(self._linear_hook(layer)))
        for module, layers in experts.values():
            self._handles.append(module.register_forward_pre_hook(self._experts_hook(module, layers)))

    def end_batch(self) -> None:
        self._first_batch = False
        self._seen.clear()
        self._fired.clear()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _run_block(
    block: nn.Module, hidden: list[torch.Tensor], calls: list[tuple[tuple, dict]], device: torch.device,
    after_batch: Callable[[], None] | None = None,
) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for h, (args, kwargs) in zip(hidden, calls):
            try:
                outs.append(_first_tensor(block(h.to(device), *_move(args, device), **_move(kwargs, device))))
            except _BlockDone:
                pass
            if after_batch is not None:
                after_batch()
    return outs


def _check_finite(tensors: Iterable[torch.Tensor], where: str) -> None:
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise NumericalError(
                f"NaN/Inf activations {where}. The model produces non-finite values on the calibration data "
                "(often fp16 overflow): load it in bfloat16 or float32, or check the calibration text"
            )


def _group_layers(layers: list[PrunableLayer]) -> dict[str, list[PrunableLayer]]:
    groups: dict[str, list[PrunableLayer]] = {}
    for layer in layers:
        groups.setdefault(layer.stats_key or layer.name, []).append(layer)
    return groups


class SequentialPruner:
    """Runs a `PruningMethod` over a model block by block. Use through `hf_prune.prune`."""

    def __init__(
        self, model: nn.Module, config: PruningConfig, device: torch.device, show_progress: bool = True
    ) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.show_progress = show_progress
        self.method: PruningMethod = get_method(config.method)(config)
        self.prefix, self.blocks = find_blocks(model)
        self.skipped: list[str] = []
        self.layers = [
            list(iter_prunable(b, f"{self.prefix}.{i}", config.targets, config.ignore, self.skipped))
            for i, b in enumerate(self.blocks)
        ]
        self.backups: dict[str, PrunableLayer] = {}  # layer name -> layer, originals on disk
        self._backup_dir: str | None = None
        self.committed = 0
        self.block_sparsity: list[float] = [float(config.sparsity)] * len(self.blocks)  # type: ignore[arg-type]
        self.damping_used: dict[str, float] = {}

    @property
    def needs_calibration(self) -> bool:
        return self.method.needs_calibration or self.config.owl

    def _progress(self, iterable: Iterable, desc: str, total: int) -> Iterable:
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, disable=not self.show_progress, unit="block")

    def target_sparsity(self, layer: PrunableLayer, block_idx: int) -> float:
        override = self.config.layer_override(layer.report_name)
        return self.block_sparsity[block_idx] if override is None else override

    # ---------------------------------------------------------------- main entry
    def run(self, calib: torch.Tensor | None) -> list[LayerResult]:
        hidden: list[torch.Tensor] = []
        calls: list[list[tuple[tuple, dict]]] = []
        if self.needs_calibration:
            assert calib is not None
            hidden, calls = record_block_inputs(self.model, self.blocks, calib, self.config.batch_size)
            hidden = [h.to(self.device) for h in hidden]
            _check_finite(hidden, "entering block 0 (embeddings)")
            if self.config.owl:
                self._owl(hidden, calls)
        results: list[LayerResult] = []
        try:
            bar = self._progress(range(len(self.blocks)), f"{self.config.method}: pruning", len(self.blocks))
            for i in bar:
                hidden = self._prune_block(i, hidden, calls[i] if calls else [], results)
        except BaseException:
            self._restore()
            raise
        finally:
            if self._backup_dir is not None:
                shutil.rmtree(self._backup_dir, ignore_errors=True)
                self._backup_dir = None
        return results

    def _owl(self, hidden: list[torch.Tensor], calls: list) -> None:
        ratios = []
        h = [t.clone() for t in hidden]
        for i in self._progress(range(len(self.blocks)), "OWL: outlier ratios", len(self.blocks)):
            block, layers = self.blocks[i], self.layers[i]
            with on_device(block, self.device):
                collector = _StatsCollector(layers, self.device, norms=True, hessian=False)
                collector.attach()
                try:
                    h = _run_block(block, h, calls[i], self.device, collector.end_batch)
                finally:
                    collector.detach()
                scores = []
                for layer in layers:
                    stats = collector.stats[layer.stats_key]
                    w = layer.read_weight().to(self.device, torch.float32)
                    scores.append(wanda_scores(w, stats.sum_sq).flatten())
                ratios.append(owl_outlier_ratio(scores, self.config.owl_threshold))
        self.block_sparsity = owl_block_sparsities(ratios, float(self.config.sparsity), self.config.owl_lambda)
        self.owl_ratios = ratios
        logger.info("OWL block sparsities: %s", [round(s, 3) for s in self.block_sparsity])

    def _prune_block(
        self, i: int, hidden: list[torch.Tensor], calls: list[tuple[tuple, dict]], results: list[LayerResult]
    ) -> list[torch.Tensor]:
        block, layers = self.blocks[i], self.layers[i]
        method = self.method
        with on_device(block, self.device):
            stats: dict[str, InputStats] = {}
            if method.needs_calibration and layers:
                collector = _StatsCollector(layers, self.device, method.needs_norms, method.needs_hessian,
                                            early_stop=not _is_hooked(block))
                collector.attach()
                try:
                    _run_block(block, hidden, calls, self.device, collector.end_batch)
                finally:
                    collector.detach()
                stats = collector.stats
            new_weights = self._compute(i, layers, stats)
            self._commit(layers, new_weights)
            for layer in layers:
                w = new_weights[layer.name]
                results.append(
                    LayerResult(layer.name, i, tuple(w.shape), w.numel(), int((w != 0).sum()), self.target_sparsity(layer, i))
                )
            del new_weights, stats
            if hidden:
                # The last block's outputs feed nothing here, so one batch suffices to check them for NaN/Inf.
                last = i == len(self.blocks) - 1
                hidden = _run_block(block, hidden[:1] if last else hidden, calls[:1] if last else calls, self.device)
                _check_finite(hidden, f"leaving block {i} ({self.prefix}.{i}) after pruning")
        return hidden

    def _compute(self, i: int, layers: list[PrunableLayer], stats: dict[str, InputStats]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        fallback = None
        for key, group in _group_layers(layers).items():
            weights = [layer.read_weight().to(self.device, torch.float32) for layer in group]
            sparsities = [self.target_sparsity(layer, i) for layer in group]
            names = [layer.name for layer in group]
            method: PruningMethod = self.method
            group_stats = stats.get(key)
            if method.needs_calibration:
                if group_stats is None or group_stats.n_tokens == 0:
                    # e.g. an MoE expert that no calibration token was routed to
                    if fallback is None:
                        fallback = get_method("magnitude")(self.config)
                    warnings.warn(
                        f"{', '.join(names)}: received no calibration tokens; pruned by magnitude instead of "
                        f"{self.config.method}. Use more calibration samples to cover it.",
                        stacklevel=2,
                    )
                    method = fallback
                elif not group_stats.is_finite():
                    raise NumericalError(
                        f"{', '.join(names)}: NaN/Inf in the calibration statistics of this layer's input; load the "
                        "model in bfloat16/float32 or check the calibration data"
                    )
            pruned = method.prune_group(weights, group_stats, sparsities, names)
            for layer, w in zip(group, pruned):
                if not bool(torch.isfinite(w).all()):
                    raise NumericalError(f"{layer.name}: pruning produced NaN/Inf weights")
                out[layer.name] = w
        return out

    def _commit(self, layers: list[PrunableLayer], new_weights: dict[str, torch.Tensor]) -> None:
        if self.config.restore_on_error and layers:
            # Originals go to a temporary safetensors file per block, so host memory stays flat with depth.
            if self._backup_dir is None:
                self._backup_dir = tempfile.mkdtemp(prefix="hf_prune-backup-")
            originals = {layer.name: layer.read_weight().detach().to("cpu", copy=True).contiguous() for layer in layers}
            save_file(originals, os.path.join(self._backup_dir, f"block-{len(self.backups)}.safetensors"))
            del originals
            for layer in layers:
                self.backups[layer.name] = layer
        for layer in layers:
            layer.write_weight(new_weights[layer.name])
            self.committed += 1

    def _restore(self) -> None:
        if not self.backups:
            if self.committed:
                self.model._hf_prune_incomplete = True  # type: ignore[assignment]
            return
        assert self._backup_dir is not None
        for fname in os.listdir(self._backup_dir):
            for name, original in load_file(os.path.join(self._backup_dir, fname)).items():
                self.backups[name].write_weight(original)
        logger.warning("pruning failed; restored the original weights of %d layers", len(self.backups))
        self.backups.clear()
