"""Mask state of a model pruned during training: which weights are masked, and enforcing it.

One boolean mask per prunable *parameter* (``True`` = keep), in the parameter's own layout (GPT-2 `Conv1D`
``[in, out]``, fused MoE experts ``[E, out, in]``); `PrunableLayer` views give the ``[out, in]`` matrix of
each layer/expert. Enforcement, every optimizer step:

* `register_grad_hooks` masks gradients in place as backward accumulates them (not for movement pruning);
  `mask_grads_` zeroes the gradient of masked weights right before ``optimizer.step()`` where no hook did
  (movement pruning) or where a multi-process all-reduce may have run after the hook;
* `apply_` multiplies the weights by their masks after it (exact zeros whatever the optimizer did);
* `mask_optimizer_state_` zeroes optimizer moments (AdamW ``exp_avg``/``exp_avg_sq``, SGD momentum) of
  masked entries whenever a mask changes, so momentum cannot resurrect a pruned weight.

FSDP2 (``fully_shard``): parameters are DTensors sharded on dim 0. Each process then keeps the masks of its own
rows only (`hf_prune.training.sharded`), enforces them on its local shards of the weights, gradients and
optimizer state, and ranks a whole matrix exactly with `sharded.lowest_k`; gradient hooks are not used (FSDP2
writes the sharded ``.grad`` after its reduce-scatter, past any hook), masking happens before
``optimizer.step()``. Checkpoints hold whole tensors (`gather`, `local_part`). Only plain linear layers can be
sharded this way (a GPT-2 ``Conv1D`` is sharded along its input dimension, fused experts by expert).

Example:
    >>> import torch
    >>> from hf_prune.training.state import gradual_nm_mask
    >>> s = torch.tensor([[4., 1., 3., 2., 8., 7., 6., 5.]])
    >>> gradual_nm_mask(s, 2, 4, 0.5).int().tolist()   # half of the N:M cuts made, the lowest scores first
    [[1, 0, 1, 0, 1, 1, 1, 1]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import PruningConfig
from ..core.distributed import is_dtensor
from ..core.masks import check_nm_shape, n_pruned, nm_mask, unstructured_mask
from ..core.model import PrunableLayer, find_blocks, iter_prunable
from ..errors import UnsupportedModelError
from .sharded import RowShard, gather_rows, global_sum, local, local_rows, lowest_k, row_shards


def world_size() -> int:
    """Processes in the initialised ``torch.distributed`` group (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def layer_view(layer: PrunableLayer, tensor: torch.Tensor) -> torch.Tensor:
    """The ``[out, in]`` view of ``layer`` inside a tensor laid out like its parameter."""
    if layer.kind == "conv1d":
        return tensor.t()
    if layer.kind == "expert":
        return tensor[layer.expert]
    return tensor


def gradual_nm_mask(scores: torch.Tensor, n: int, m: int, fraction: float) -> torch.Tensor:
    """An N:M mask reached gradually: of the weights the final N:M mask drops, drop only the ``fraction``
    with the lowest scores (whole matrix). ``fraction >= 1`` is the exact N:M mask."""
    final = nm_mask(scores, n, m)
    if fraction >= 1.0 - 1e-9:
        return final
    if fraction <= 0:
        return torch.ones_like(final)
    dropped = ~final
    k = int(fraction * int(dropped.sum()))
    if k == 0:
        return torch.ones_like(final)
    cand = torch.where(dropped, scores.float(), torch.full_like(scores, float("inf"), dtype=torch.float32))
    order = torch.argsort(cand.flatten(), stable=True)[:k]
    keep = torch.ones(final.numel(), dtype=torch.bool, device=final.device)
    keep[order] = False
    return keep.view_as(final)


def layer_mask(
    scores: torch.Tensor, target: float, final: float, nm: tuple[int, int] | None, group: str = "layer"
) -> torch.Tensor:
    """Keep-mask of one ``[out, in]`` matrix at scheduled sparsity ``target`` (``final`` at the end)."""
    if nm is None:
        return unstructured_mask(scores, target, group)
    return gradual_nm_mask(scores, *nm, fraction=target / final if final > 0 else 1.0)


@dataclass
class MaskedParam:
    """A prunable parameter, its layers (one, or one per fused expert) and its keep-mask (over this process's
    rows when FSDP2 shards the parameter: ``shard`` says which)."""

    name: str
    param: nn.Parameter
    layers: list[PrunableLayer] = field(default_factory=list)
    mask: torch.Tensor | None = None
    shard: RowShard | None = None

    @property
    def values(self) -> torch.Tensor:
        """The parameter's values held by this process (all of ``param.data`` unless sharded), writable in place."""
        return local(self.param.data)

    def views(self, tensor: torch.Tensor) -> Iterator[tuple[PrunableLayer, torch.Tensor]]:
        for layer in self.layers:
            yield layer, layer_view(layer, tensor)


class MaskState:
    """Masks of every prunable parameter of ``model`` selected by ``config.targets`` / ``config.ignore``."""

    def __init__(self, model: nn.Module, config: PruningConfig, weight_masks: bool = True) -> None:
        self.config = config
        if not weight_masks:  # a method that prunes otherwise (loraprune): nothing to mask or enforce here
            self.params: dict[str, MaskedParam] = {}
            self.sharded, self.active = False, False
            return
        try:
            prefix, blocks = find_blocks(model)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"PruningCallback: the model has no prunable modules ({exc})") from None
        names = {id(p): n for n, p in model.named_parameters()}
        self.params = {}
        for i, block in enumerate(blocks):
            for layer in iter_prunable(block, f"{prefix}.{i}", config.targets, config.ignore):
                param = layer.param
                if param.device.type == "meta":
                    raise UnsupportedModelError(
                        f"{layer.name}: offloaded (meta) parameters cannot be pruned during training; load the "
                        "model without a disk/CPU offload device_map"
                    )
                if config.nm is not None:
                    check_nm_shape(layer.shape[1], config.nm[1], layer.name)
                name = names.get(id(param), f"{layer.name}.{layer.param_name}")
                entry = self.params.setdefault(name, MaskedParam(name, param))
                entry.layers.append(layer)
        if not self.params:
            raise UnsupportedModelError(
                f"PruningCallback: no prunable modules in {type(model).__name__} match targets={config.targets} / "
                f"ignore={config.ignore}; loosen the patterns (targets=None selects every linear layer of the decoder "
                "blocks)"
            )
        self.sharded = self._find_shards()
        for entry in self.params.values():
            entry.mask = torch.ones_like(entry.values, dtype=torch.bool)
        self.active = False  # any weight masked here? (enforcement is skipped while nothing is)

    def _find_shards(self) -> bool:
        """Record where FSDP2 put each parameter's rows; False when nothing is sharded."""
        dtensors = {n: e for n, e in self.params.items() if is_dtensor(e.param)}
        if not dtensors:
            return False
        if len(dtensors) != len(self.params):
            plain = next(n for n in self.params if n not in dtensors)
            raise UnsupportedModelError(
                f"PruningCallback: some prunable parameters are sharded DTensors and others ({plain}) are not; shard "
                "every decoder block with fully_shard (or none)"
            )
        odd = [layer for e in dtensors.values() for layer in e.layers if layer.kind != "linear"]
        if odd:
            what = ("a GPT-2 Conv1D, which FSDP2 shards along its input dimension" if odd[0].kind == "conv1d"
                    else "a fused MoE expert tensor, which FSDP2 shards by expert")
            raise UnsupportedModelError(
                f"PruningCallback under FSDP2 supports plain linear layers only; {odd[0].name} is {what}. Exclude "
                "such layers with ignore=[...], or train with DDP"
            )
        for name, shard in row_shards({n: e.param for n, e in dtensors.items()}).items():
            self.params[name].shard = shard
        return True

    # ---------------------------------------------------------------- whole tensors (checkpoints)
    def gather(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The whole tensor of parameter ``name`` from every process's rows (collective under FSDP2)."""
        shard = self.params[name].shard
        return tensor if shard is None else gather_rows(tensor, shard)

    def local_part(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This process's rows of a whole tensor laid out like parameter ``name`` (``tensor`` itself unsharded)."""
        shard = self.params[name].shard
        return tensor if shard is None or tuple(tensor.shape) != shard.shape else local_rows(tensor, shard)

    # ---------------------------------------------------------------- masks
    def masks(self) -> dict[str, torch.Tensor]:
        return {name: e.mask for name, e in self.params.items()}  # type: ignore[misc]

    def compute(self, score_fn: Callable[[MaskedParam, PrunableLayer, torch.Tensor], torch.Tensor],
                target: float) -> dict[str, torch.Tensor]:
        """New masks from per-layer scores: ``score_fn(entry, layer, weight_view) -> [out, in] scores`` (under
        FSDP2 the view and the scores cover this process's rows; the masks are those of the whole matrices)."""
        final = float(self.config.sparsity)  # type: ignore[arg-type]
        if self.sharded:
            return self._compute_sharded(score_fn, target, final)
        out: dict[str, torch.Tensor] = {}
        for name, entry in self.params.items():
            new = torch.empty_like(entry.mask)  # type: ignore[arg-type]
            for layer, view in entry.views(new):
                scores = score_fn(entry, layer, layer_view(layer, entry.param.data))
                view.copy_(layer_mask(scores, target, final, self.config.nm, self.config.magnitude_group))
            out[name] = new
        return out

    def _compute_sharded(self, score_fn: Callable[[MaskedParam, PrunableLayer, torch.Tensor], torch.Tensor],
                         target: float, final: float) -> dict[str, torch.Tensor]:
        """`compute` over row shards: per-row rankings and N:M groups locally, whole-matrix rankings (and the
        gradual N:M cuts, ranked over the whole matrix) through `lowest_k`, all matrices in one bisection."""
        nm, group = self.config.nm, self.config.magnitude_group
        out: dict[str, torch.Tensor] = {}
        ranked: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # name, candidate scores, candidates here
        for name, entry in self.params.items():
            scores = score_fn(entry, entry.layers[0], entry.values).float()
            if nm is None and group == "layer":
                ranked.append((name, scores, torch.tensor(scores.numel())))
            elif nm is None:  # rows are whole on every process
                out[name] = unstructured_mask(scores, target, group)
            else:
                fraction = target / final if final > 0 else 1.0
                keep_nm = nm_mask(scores, *nm) if scores.numel() else torch.ones_like(scores, dtype=torch.bool)
                if fraction >= 1.0 - 1e-9:
                    out[name] = keep_nm
                elif fraction <= 0:
                    out[name] = torch.ones_like(keep_nm)
                else:
                    cand = torch.where(keep_nm, torch.full_like(scores, float("inf")), scores)
                    ranked.append((name, cand, (~keep_nm).sum()))
        if ranked:
            counts = global_sum([int(c) for _, _, c in ranked])
            if nm is None:
                ks = [n_pruned(c, target) if target > 0 else 0 for c in counts]
            else:
                fraction = target / final
                ks = [int(fraction * c) for c in counts]
            for (name, _, _), pruned in zip(ranked, lowest_k([c for _, c, _ in ranked], ks)):
                out[name] = ~pruned
        return out

    def set_masks(self, masks: dict[str, torch.Tensor]) -> list[str]:
        """Install ``masks``; return the names whose mask changed."""
        changed = []
        for name, entry in self.params.items():
            values = entry.values
            new = self.local_part(name, masks[name]).to(device=values.device, dtype=torch.bool)
            if new.shape != values.shape:
                raise ValueError(f"mask for {name} has shape {tuple(new.shape)}, parameter {tuple(values.shape)}")
            if not torch.equal(new, entry.mask):
                changed.append(name)
            entry.mask = new
        self.active = any(not bool(e.mask.all()) for e in self.params.values())  # type: ignore[union-attr]
        return changed

    def masks_from_weights(self) -> dict[str, torch.Tensor]:
        """Masks that keep exactly the non-zero weights (a model pruned beforehand, e.g. by `hf_prune.prune`)."""
        return {name: e.values != 0 for name, e in self.params.items()}

    # ---------------------------------------------------------------- enforcement
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every masked weight."""
        if not self.active:
            return
        for entry in self.params.values():
            entry.values.mul_(entry.mask)

    def register_grad_hooks(self) -> None:
        """Mask each gradient in place once autograd has accumulated it into ``.grad`` (before gradient clipping,
        so the clipped norm only counts live weights). In place and allocation-free: a ``register_hook`` returning
        ``g * mask`` cost 12% of a SmolLM2 training step, this costs about 3%. Not for movement pruning, whose
        scores need the dense gradient."""
        self.remove_grad_hooks()
        if self.sharded:  # FSDP2 sets the sharded .grad after its reduce-scatter: masked before the step instead
            return
        # frozen parameters (the base layers under a LoRA adapter) get no gradient: nothing to mask
        self._hooks = [e.param.register_post_accumulate_grad_hook(lambda p, e=e: self._mask_grad(p, e))
                       for e in self.params.values() if e.param.requires_grad]

    @torch.no_grad()
    def _mask_grad(self, param: torch.Tensor, entry: MaskedParam) -> None:
        if self.active and param.grad is not None:
            param.grad.mul_(entry.mask)

    @property
    def has_grad_hooks(self) -> bool:
        return bool(getattr(self, "_hooks", []))

    def remove_grad_hooks(self) -> None:
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradients of masked weights."""
        if not self.active:
            return
        for entry in self.params.values():
            if entry.param.grad is not None:
                local(entry.param.grad).mul_(entry.mask)

    @torch.no_grad()
    def mask_optimizer_state_(self, optimizer: object | None, names: list[str] | None = None, reset: bool = False) -> None:
        """Zero optimizer state tensors (moments) of masked entries; ``reset=True`` zeroes them entirely."""
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
        state = getattr(opt, "state", None)
        if not state:
            return
        for name in names if names is not None else list(self.params):
            entry = self.params[name]
            for value in state.get(entry.param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == entry.param.shape:
                    if reset:
                        local(value).zero_()
                    else:
                        local(value).mul_(entry.mask)

    def broadcast(self, masks: dict[str, torch.Tensor], src: int = 0) -> dict[str, torch.Tensor]:
        """Rank ``src``'s masks on every rank (unchanged without an initialised multi-process group, and under
        FSDP2, where each process holds the masks of its own rows, computed from a global ranking)."""
        if world_size() < 2 or self.sharded:
            return masks
        out = {}
        for name, mask in masks.items():
            buf = mask.to(torch.uint8).contiguous()
            torch.distributed.broadcast(buf, src)
            out[name] = buf.bool()
        return out

    # ---------------------------------------------------------------- accounting
    def _counts(self, values: list[int]) -> list[int]:
        """Per-process counts summed over the processes under FSDP2 (collective), else as they are."""
        return global_sum(values) if self.sharded else values

    def layer_stats(self) -> list[tuple[str, list[int], int, int]]:
        """``(name, shape, params, non-zero weights)`` per parameter (whole parameters, also under FSDP2)."""
        nonzero = self._counts([int(torch.count_nonzero(e.values)) for e in self.params.values()])
        return [(n, list(e.param.shape), e.param.numel(), nz) for (n, e), nz in zip(self.params.items(), nonzero)]

    def sparsity(self) -> float:
        """Achieved sparsity: fraction of exact zeros over all targeted weights."""
        total = sum(e.param.numel() for e in self.params.values())
        nonzero = sum(self._counts([int(torch.count_nonzero(e.values)) for e in self.params.values()]))
        return 1.0 - nonzero / max(total, 1)

    def mask_sparsity(self) -> float:
        total = sum(e.param.numel() for e in self.params.values())
        kept = sum(self._counts([int(e.mask.sum()) for e in self.params.values()]))  # type: ignore[union-attr]
        return 1.0 - kept / max(total, 1)
