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

Several processes (``torchrun`` / ``accelerate launch``, `hf_prune.core.distributed`): every process holds the
whole model and the same calibration tensor (checked) and runs only its share of the calibration batches
(`shard_batches`). After each block's statistics pass the statistics are summed over the processes
(`all_reduce_stats`), the block's layer groups are dealt out to the processes (largest first, to the least
loaded), each process prunes its groups and broadcasts the new weights, so every process ends with the same
pruned block and feeds its own batches on. The result equals the single-process run up to float summation
order. Any failure on one process is raised on all of them (`failing_together`) instead of leaving the others
waiting. Methods see none of this.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import PruningConfig
from ..core.blocks import (
    check_finite,
    is_hooked,
    loss_from_last_hidden,
    on_device,
    record_block_inputs,
    returns_tuple,
    run_block,
)
from ..core.distributed import (
    all_reduce_stats,
    broadcast_object,
    broadcast_tensor,
    check_not_sharded,
    check_same,
    dual_batch_tags,
    failing_together,
    fingerprint,
    shard_batches,
    world,
)
from ..core.model import PrunableLayer, find_blocks, iter_prunable
from ..core.sources import DOMAIN, GENERAL, first_rows
from ..core.stats import InputStats, StatsCollector, combine_input_stats
from ..errors import NumericalError
from ..registry import get_method
from ..report import LayerRow
from . import owl
from .base import PruningMethod, ScoreMethod
from .functional import wanda_scores

logger = logging.getLogger("hf_prune")


def _group_layers(layers: list[PrunableLayer]) -> dict[str, list[PrunableLayer]]:
    groups: dict[str, list[PrunableLayer]] = {}
    for layer in layers:
        groups.setdefault(layer.stats_key or layer.name, []).append(layer)
    return groups


def assign_groups(costs: list[float], processes: int) -> list[int]:
    """Which process prunes each layer group: largest cost first, to the least loaded process (ties: lowest
    rank). Deterministic, so every process computes the same assignment.

    Example:
        >>> assign_groups([4.0, 1.0, 3.0, 2.0], 2)
        [0, 0, 1, 1]
    """
    load = [0.0] * processes
    owner = [0] * len(costs)
    for g in sorted(range(len(costs)), key=lambda g: (-costs[g], g)):
        rank = min(range(processes), key=lambda r: (load[r], r))
        owner[g] = rank
        load[rank] += costs[g]
    return owner


def calibration_digest(calib: torch.Tensor) -> str:
    """A hash of a token-id tensor (shape and values), to check that every process built the same one.

    Example:
        >>> calibration_digest(torch.zeros(2, 3, dtype=torch.long)) == calibration_digest(torch.zeros(2, 3).long())
        True
    """
    import hashlib

    data = calib.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return f"{tuple(calib.shape)}:{hashlib.sha256(data).hexdigest()}"


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
        check_not_sharded(model)
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
        self.owl_choice: dict | None = None  # what OWL chose (hyper-parameters, search losses)
        self.tags: list[str] | None = None  # dual importance: "general"/"domain" per calibration batch
        self.domain_weight = 0.0

    @property
    def needs_calibration(self) -> bool:
        return self.method.needs_calibration or self.config.owl

    def _progress(self, iterable: Iterable, desc: str, total: int) -> Iterable:
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, disable=not (self.show_progress and world().is_main), unit="block")

    def target_sparsity(self, layer: PrunableLayer, block_idx: int) -> float:
        override = self.config.layer_override(layer.report_name)
        return self.block_sparsity[block_idx] if override is None else override

    # ---------------------------------------------------------------- main entry
    def run(self, calib: torch.Tensor | None) -> list[LayerRow]:
        hidden: list[torch.Tensor] = []
        calls: list[list[tuple[tuple, dict]]] = []
        if self.needs_calibration:
            assert calib is not None
            everything, calib = calib, self._own_batches(calib)
            dual = dual_batch_tags(everything, self.config.batch_size)
            if dual is not None:
                self.tags, self.domain_weight = dual
            with failing_together("recording the inputs of the decoder blocks"):
                hidden, calls = record_block_inputs(self.model, self.blocks, calib, self.config.batch_size)
                hidden = [h.to(self.device) for h in hidden]
                check_finite(hidden, "entering block 0 (embeddings)")
            if self.config.owl:
                self._owl(hidden, calls, everything)
        results: list[LayerRow] = []
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

    def _own_batches(self, calib: torch.Tensor) -> torch.Tensor:
        """This process's share of the calibration batches (all of them in a single process)."""
        at = world()
        if not at.active:
            return calib
        check_same(calibration_digest(calib), "the calibration token ids")
        mine = shard_batches(calib, self.config.batch_size, at)
        logger.info("hf_prune: process %d of %d runs %d of the %d calibration samples", at.rank, at.size,
                    mine.shape[0], calib.shape[0])
        return mine

    def _collect(self, i: int, block: nn.Module, layers: list[PrunableLayer], hidden: list[torch.Tensor],
                 calls: list[tuple[tuple, dict]], norms: bool, hessian: bool, early_stop: bool
                 ) -> tuple[dict[str, InputStats], list[torch.Tensor]]:
        """Statistics of block ``i``'s layer inputs over the calibration batches of every process, and this
        process's block outputs (none with ``early_stop``)."""
        tags = self.tags[: len(hidden)] if self.tags else None
        collector = StatsCollector(layers, self.device, norms, hessian, early_stop=early_stop, tags=tags)
        with failing_together(f"running block {i} ({self.prefix}.{i}) on its calibration batches"):
            collector.attach()
            try:
                outputs = run_block(block, hidden, calls, self.device, collector.end_batch)
            finally:
                collector.detach()
        if world().active:
            check_same([fingerprint(layer.read_weight()) for layer in layers], f"the weights of block {i}")
        if tags is None:
            all_reduce_stats(collector.stats, f"statistics of block {i}")
            return collector.stats, outputs
        collector.fill_sides()
        for side in (GENERAL, DOMAIN):
            all_reduce_stats(collector.by_tag[side], f"{side} statistics of block {i}")
        return combine_input_stats(collector.by_tag[GENERAL], collector.by_tag[DOMAIN], self.domain_weight), outputs

    def _owl(self, hidden: list[torch.Tensor], calls: list, calib: torch.Tensor) -> None:
        """OWL's per-block sparsities (`hf_prune.oneshot.owl`): one dense sweep for the outlier ratios (and, with
        ``'auto'`` hyper-parameters, the Wanda statistics of the search), then the search if any is ``'auto'``."""
        cfg = self.config
        auto = cfg.owl_lambda == "auto" or cfg.owl_threshold == "auto"
        thresholds = owl.SEARCH_THRESHOLDS if cfg.owl_threshold == "auto" else (float(cfg.owl_threshold),)
        ratios: dict[float, list[float]] = {m: [] for m in thresholds}
        norms: list[dict[str, InputStats]] = []
        h = [t.clone() for t in hidden]
        for i in self._progress(range(len(self.blocks)), "OWL: outlier ratios", len(self.blocks)):
            block, layers = self.blocks[i], self.layers[i]
            with on_device(block, self.device):
                collected, h = self._collect(i, block, layers, h, calls[i], norms=True, hessian=False, early_stop=False)
                scores = []
                for layer in layers:
                    stats = collected[layer.stats_key]
                    w = layer.read_weight().to(self.device, torch.float32)
                    scores.append(wanda_scores(w, stats.sum_sq).flatten())
                for m in thresholds:
                    ratios[m].append(owl.owl_outlier_ratio(scores, m))
                if auto:
                    norms.append({layer.name: collected[layer.stats_key] for layer in layers})
            del scores
        del h
        sparsity = float(cfg.sparsity)  # type: ignore[arg-type]
        if not auto:
            choice = {"kind": "owl", "threshold": thresholds[0], "lambda": float(cfg.owl_lambda)}
            block_sparsity = owl.owl_block_sparsities(ratios[thresholds[0]], sparsity, float(cfg.owl_lambda))
        else:
            if cfg.owl_lambda == "auto":
                cands = owl.candidates(ratios, sparsity)
            else:  # only the threshold is searched, at the given lambda
                cands = owl.candidates(ratios, sparsity, lambdas=(float(cfg.owl_lambda),), ramps=())
            choice, block_sparsity = None, None
            # the search runs on the main process (its choice is broadcast); every process waits inside
            # failing_together, so an error there is raised everywhere instead of leaving the others waiting
            with failing_together("the OWL search"):
                if world().is_main:
                    choice, block_sparsity = self._owl_choose(cands, calib, norms)
            choice, block_sparsity = broadcast_object((choice, block_sparsity))
        self.block_sparsity = broadcast_object(block_sparsity)  # equal on every process already; rank 0's, to be sure
        self.owl_choice = choice
        logger.info("OWL %s, block sparsities: %s", choice, [round(s, 3) for s in self.block_sparsity])

    def _owl_choose(self, cands: list[owl.Candidate], calib: torch.Tensor, norms: list[dict[str, InputStats]]
                    ) -> tuple[dict, list[float]]:
        """The search's winner as ``(choice, block sparsities)``; uniform (with a warning) if the search fails."""
        if len(cands) == 1:  # nothing to compare (one block, or every allocation equal)
            return {**cands[0].label, "candidates": 1}, cands[0].block_sparsity
        try:
            best = self._owl_search(cands, calib, norms)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            warnings.warn(f"OWL: the allocation search failed ({type(exc).__name__}: {exc}); using uniform "
                          "sparsity. Pass owl_lambda and owl_threshold as numbers for the paper's fixed formula.",
                          stacklevel=3)
            uniform = cands[0]
            return {**uniform.label, "search_failed": f"{type(exc).__name__}: {exc}"}, uniform.block_sparsity
        uniform = next(c for c in cands if c.label["kind"] == "uniform")
        finite = lambda v: v if v is not None and math.isfinite(v) else None  # noqa: E731 - JSON has no NaN
        extra: dict = {}
        min_gain = float(self.config.owl_min_gain)
        if best is not uniform and math.isfinite(uniform.loss) and uniform.loss - best.loss < min_gain * abs(uniform.loss):
            # too small a gain to trust: the proxy has no weight update and few samples
            extra = {"kept_uniform": f"best {best.label} gained {(uniform.loss - best.loss) / abs(uniform.loss):.2%} "
                                     f"< owl_min_gain={min_gain:g}"}
            best = uniform
        return ({**best.label, "proxy": self._owl_proxy()[0], "search_loss": finite(best.loss),
                 "uniform_loss": finite(uniform.loss), "candidates": len(cands), **extra}, best.block_sparsity)

    def _owl_proxy(self) -> tuple[str, ScoreMethod | None]:
        """The criterion the OWL search prunes its candidates with: the method itself if it only ranks weights
        (magnitude, Wanda, RIA), else Wanda (SparseGPT, ADMM: their masks are close to Wanda's, their weight update
        too slow to repeat per candidate)."""
        if isinstance(self.method, ScoreMethod):
            return self.config.method, self.method
        return "wanda", None

    def _owl_search(self, cands: list[owl.Candidate], calib: torch.Tensor, norms: list[dict[str, InputStats]]
                    ) -> owl.Candidate:
        """Runs every candidate allocation on the first ``owl_search_samples`` calibration samples (of all
        processes' data: the choice does not depend on how it is sharded) with Wanda masks from the dense statistics
        (weights restored after each block) and sets each one's next-token loss; returns the best (uniform on
        ties)."""
        search = first_rows(calib, int(self.config.owl_search_samples))
        hidden, calls = record_block_inputs(self.model, self.blocks, search, self.config.batch_size)
        ids = list(search.split(self.config.batch_size))
        n_batches = len(ids)
        _, proxy = self._owl_proxy()
        states = [[t.to(self.device) for t in hidden] for _ in cands]
        tuple_output = False
        bar = self._progress(range(len(self.blocks)), f"OWL: searching {len(cands)} allocations", len(self.blocks))
        for i in bar:
            block, layers = self.blocks[i], self.layers[i]
            with on_device(block, self.device):
                if i == 0:
                    tuple_output = returns_tuple(block, states[0][0], calls[0][0], self.device)
                originals = [layer.read_weight().detach().clone() for layer in layers]
                try:
                    for c, cand in enumerate(cands):
                        for layer, w in zip(layers, originals):
                            override = self.config.layer_override(layer.report_name)
                            target = cand.block_sparsity[i] if override is None else override
                            scores = self._proxy_scores(w.to(self.device, torch.float32), norms[i][layer.name], proxy)
                            keep = owl.keep_mask(scores, target).view(w.shape)
                            del scores
                            layer.write_weight(w * keep.to(w.dtype))
                        states[c] = run_block(block, states[c], calls[i][:n_batches], self.device)
                finally:
                    for layer, w in zip(layers, originals):
                        layer.write_weight(w)
                del originals
        for cand, state in zip(cands, states):
            cand.loss = loss_from_last_hidden(self.model, self.blocks, state, ids, tuple_output=tuple_output)
        return min(cands, key=lambda c: (c.loss if math.isfinite(c.loss) else math.inf, c.label["kind"] != "uniform"))

    @staticmethod
    def _proxy_scores(weight: torch.Tensor, stats: InputStats, proxy: ScoreMethod | None) -> torch.Tensor:
        """The proxy's scores of one matrix, ``[rows, cols]``, or ``[1, rows * cols]`` where it compares per layer."""
        if proxy is None:
            return wanda_scores(weight, stats.sum_sq)
        scores = proxy.scores(weight, stats)
        return scores.reshape(1, -1) if proxy.compare_group() == "layer" else scores

    def _prune_block(
        self, i: int, hidden: list[torch.Tensor], calls: list[tuple[tuple, dict]], results: list[LayerRow]
    ) -> list[torch.Tensor]:
        block, layers = self.blocks[i], self.layers[i]
        method = self.method
        with on_device(block, self.device):
            stats: dict[str, InputStats] = {}
            if method.needs_calibration and layers:
                stats, _ = self._collect(i, block, layers, hidden, calls, method.needs_norms, method.needs_hessian,
                                         early_stop=not is_hooked(block))
            new_weights = self._compute(i, layers, stats)
            self._commit(layers, new_weights)
            for layer in layers:
                w = new_weights[layer.name]
                results.append(
                    LayerRow(layer.name, i, list(w.shape), w.numel(), int((w != 0).sum()), self.target_sparsity(layer, i))
                )
            del new_weights, stats
            if hidden:
                # The last block's outputs feed nothing here, so one batch suffices to check them for NaN/Inf.
                last = i == len(self.blocks) - 1
                with failing_together(f"running block {i} ({self.prefix}.{i}) after pruning"):
                    hidden = run_block(block, hidden[:1] if last else hidden, calls[:1] if last else calls, self.device)
                    check_finite(hidden, f"leaving block {i} ({self.prefix}.{i}) after pruning")
        return hidden

    def _compute(self, i: int, layers: list[PrunableLayer], stats: dict[str, InputStats]) -> dict[str, torch.Tensor]:
        """New float32 weights of every layer of block ``i``. With several processes each layer group is pruned by
        one process (`assign_groups`) and its result broadcast to the others."""
        groups = list(_group_layers(layers).values())
        at = world()
        if not at.active:
            return self._compute_groups(i, groups, stats)
        owners = assign_groups([sum(a * b * b for a, b in (layer.shape for layer in g)) for g in groups], at.size)
        with failing_together(f"pruning block {i} ({self.prefix}.{i})"):
            out = self._compute_groups(i, [g for g, o in zip(groups, owners) if o == at.rank], stats)
        for group, owner in zip(groups, owners):
            for layer in group:
                mine = out.get(layer.name) if owner == at.rank else None
                buf = mine if mine is not None else torch.empty(layer.shape, dtype=torch.float32, device=self.device)
                out[layer.name] = broadcast_tensor(buf, owner)
        return out

    def _compute_groups(self, i: int, groups: list[list[PrunableLayer]], stats: dict[str, InputStats]
                        ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        fallback = None
        for group in groups:
            key = group[0].stats_key or group[0].name
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
