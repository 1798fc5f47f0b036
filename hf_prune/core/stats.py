"""Input statistics of prunable layers, collected by forward pre-hooks while a block runs.

`InputStats` accumulates the per-feature sum of squares (Wanda's norms) and/or the Hessian sum X^T X
(SparseGPT) of one input; `StatsCollector` hooks a block's layers, shares one `InputStats` between layers that
read the same tensor (q/k/v, gate/up), routes tokens of fused MoE experts, and can stop the block early.
`fold_input` / `input_hook` are the lifecycle both share with other families' accumulators (e.g. structured
pruning's float64 moments): one accumulator per key, created from the first input it sees, fed every input.
With several processes each one accumulates its own calibration batches and the statistics are summed over the
processes through one method, ``all_reduce(sum_across)`` (`Reducible`; `hf_prune.core.distributed` calls it).

Example:
    >>> import torch
    >>> from hf_prune.core.stats import InputStats, fold_input
    >>> store = {}
    >>> new = lambda features, device: InputStats(features, device, norms=True, hessian=False)
    >>> fold_input(store, "q_proj", torch.ones(2, 3, 4), new)
    >>> fold_input(store, "q_proj", torch.ones(1, 4), new)
    >>> store["q_proj"].n_tokens, store["q_proj"].sum_sq.tolist()
    (7, [7.0, 7.0, 7.0, 7.0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from .blocks import StopBlock
from .model import PrunableLayer, read_param
from .sources import combine_second_moments

#: ``sum_across(tensors) -> sums``: element-wise sums of ``tensors`` over every process (identity in one process)
SumAcross = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


class Reducible(Protocol):
    """A statistic accumulated per process that the processes can combine into the statistic of all their data.

    ``all_reduce(sum_across)`` replaces the object's state, in place, by the state it would have after seeing
    every process's inputs (up to float summation order). It only combines through ``sum_across``, so it never
    touches ``torch.distributed`` itself and runs unchanged in one process.
    """

    def all_reduce(self, sum_across: SumAcross) -> None: ...


class InputStats:
    """Running statistics of one input: sum of squares per feature and/or the Hessian sum ``sum x x^T``.

    Accumulated in float32 from inputs of any dtype. The Hessian is symmetric, so only its upper block
    triangle is accumulated (``chunks`` column blocks: ~(k+1)/2k of the FLOPs); `full_hessian` mirrors it.
    """

    chunks: int = 4

    def __init__(self, in_features: int, device: torch.device, norms: bool, hessian: bool) -> None:
        self.n_tokens = 0
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device) if norms else None
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        xf = x.to(self.sum_sq.device if self.sum_sq is not None else self.hessian.device, torch.float32)
        self.n_tokens += xf.shape[0]
        if self.sum_sq is not None:
            self.sum_sq += xf.square().sum(0)
        if self.hessian is not None:
            cols = xf.shape[1]
            k = self.chunks if cols >= 64 * self.chunks else 1
            bounds = [cols * i // k for i in range(k + 1)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                self.hessian[a:b, a:].addmm_(xf[:, a:b].t(), xf[:, a:])

    def full_hessian(self) -> torch.Tensor:
        """The symmetric Hessian sum (the accumulated upper triangle mirrored)."""
        assert self.hessian is not None
        return torch.triu(self.hessian) + torch.triu(self.hessian, 1).t()

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.sum_sq, self.hessian) if t is not None)

    def all_reduce(self, sum_across: SumAcross) -> None:
        """Sum token count, ``sum_sq`` and the Hessian over the processes (`Reducible`); both statistics are
        plain sums, so the result is the single-process one up to summation order.

        Example:
            >>> s = InputStats(2, torch.device("cpu"), norms=True, hessian=True)
            >>> s.add(torch.ones(3, 2))
            >>> s.all_reduce(lambda ts: [t * 2 for t in ts])   # as if two processes had seen the same inputs
            >>> s.n_tokens, s.sum_sq.tolist(), s.full_hessian().tolist()
            (6, [6.0, 6.0], [[6.0, 6.0], [6.0, 6.0]])
        """
        device = next((t.device for t in (self.sum_sq, self.hessian) if t is not None), torch.device("cpu"))
        parts = [torch.tensor([self.n_tokens], dtype=torch.int64, device=device)]
        parts += [t for t in (self.sum_sq, self.hessian) if t is not None]
        summed = iter(sum_across(parts))
        self.n_tokens = int(next(summed)[0])
        if self.sum_sq is not None:
            self.sum_sq = next(summed)
        if self.hessian is not None:
            self.hessian = next(summed)


def fill_sides(by_side: dict[str, dict[str, Any]], empty_like: Callable[[Any], Any]) -> None:
    """Add ``empty_like(stat)`` under every key that one side of ``by_side`` lacks and another has."""
    for stats in by_side.values():
        for other in by_side.values():
            for key, stat in other.items():
                if key not in stats:
                    stats[key] = empty_like(stat)


def combine_input_stats(general: dict[str, InputStats], domain: dict[str, InputStats], domain_weight: float
                        ) -> dict[str, InputStats]:
    """Dual importance (`hf_prune.core.sources`): per key, one `InputStats` over both sides' tokens whose
    ``sum_sq`` and Hessian are `combine_second_moments` of the general and the domain statistics, so methods read
    ``general + λ · domain`` (each side normalised to its own scale) as if it were one calibration set.

    Example:
        >>> g = InputStats(2, torch.device("cpu"), norms=True, hessian=False); g.add(torch.tensor([[1.0, 1.0]]))
        >>> d = InputStats(2, torch.device("cpu"), norms=True, hessian=False); d.add(torch.tensor([[2.0, 0.0]]))
        >>> out = combine_input_stats({"q": g}, {"q": d}, 1.0)["q"]
        >>> out.n_tokens, out.sum_sq.tolist()
        (2, [3.0, 1.0])
    """
    if sorted(general) != sorted(domain):
        raise ValueError(f"general and domain statistics of different layers: {sorted(general)} vs {sorted(domain)}")
    out: dict[str, InputStats] = {}
    for key, g in general.items():
        d = domain[key]
        total = g.n_tokens + d.n_tokens
        c = InputStats.__new__(InputStats)
        c.n_tokens = total
        c.sum_sq = None if g.sum_sq is None else combine_second_moments(
            g.sum_sq, g.n_tokens, d.sum_sq, d.n_tokens, domain_weight, total)  # type: ignore[arg-type]
        c.hessian = None if g.hessian is None else torch.triu(combine_second_moments(
            g.full_hessian(), g.n_tokens, d.full_hessian(), d.n_tokens, domain_weight, total))
        out[key] = c
    return out


#: ``factory(in_features, device) -> accumulator`` (anything with ``add(x)``), as `fold_input` calls it.
AccumulatorFactory = Callable[[int, torch.device], Any]


def fold_input(store: dict[str, Any], key: str, x: torch.Tensor, factory: AccumulatorFactory) -> None:
    """Add ``x`` (detached, ``[..., in_features]``) to ``store[key]``, first creating that accumulator as
    ``factory(x.shape[-1], x.device)`` when the key is new."""
    acc = store.get(key)
    if acc is None:
        acc = store[key] = factory(x.shape[-1], x.device)
    acc.add(x.detach())


def input_hook(store: dict[str, Any], key: str, factory: AccumulatorFactory) -> Callable:
    """A forward pre-hook that folds its module's first input into ``store[key]`` (see `fold_input`)."""

    def hook(module: nn.Module, args: tuple) -> None:
        fold_input(store, key, args[0], factory)

    return hook


class StatsCollector:
    """Forward hooks that accumulate `InputStats` per group of layers sharing one input tensor."""

    def __init__(
        self, layers: list[PrunableLayer], device: torch.device, norms: bool, hessian: bool, early_stop: bool = False,
        tags: Sequence[str] | None = None,
    ) -> None:
        """``tags``: one label per calibration batch (in run order); each label's batches then accumulate into
        their own statistics, ``by_tag[label]`` (dual importance: ``"general"`` and ``"domain"``)."""
        self.layers = layers
        self.early_stop = early_stop
        self._fired: set[int] = set()
        self._n_modules = len({id(layer.module) for layer in layers})
        self.device = device
        self.norms, self.hessian = norms, hessian
        self.groups: dict[str, list[PrunableLayer]] = {}
        self.tags = list(tags) if tags else None
        self._batch = 0
        # every side exists even when this process runs none of its batches (several processes: the sides are
        # summed over them, so each must hold the same keys; see `fill_sides`)
        self.by_tag: dict[str, dict[str, InputStats]] = {t: {} for t in ("general", "domain", *(self.tags or ()))}
        self.stats: dict[str, InputStats] = self.by_tag[self.tags[0]] if self.tags else {}
        self._leader: dict[str, str] = {}
        self._first_batch = True
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles: list[Any] = []

    def _new_stats(self, in_features: int, device: torch.device | None = None) -> InputStats:
        """A fresh `InputStats` on the collector's device (``device``, the input's, is not used)."""
        return InputStats(in_features, self.device, self.norms, self.hessian)

    def _done(self, module: nn.Module) -> None:
        self._fired.add(id(module))
        if self.early_stop and len(self._fired) == self._n_modules:
            raise StopBlock

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
            if layer.name in self._leader:
                fold_input(self.stats, layer.stats_key, x, self._new_stats)
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
                for stats in (self.by_tag.values() if self.tags else [self.stats]):
                    stats[layer.name] = self._new_stats(layer.shape[1])

        def hook(mod: nn.Module, args: tuple) -> None:
            hidden, top_k_index = args[0], args[1]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            gate_up = by_param.get("gate_up_proj", {})
            down = by_param.get("down_proj", {})
            gate_up_weight = read_param(mod, "gate_up_proj")  # once per call: offloaded reads load the tensor
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
        self._batch += 1
        if self.tags and self._batch < len(self.tags):
            self.stats = self.by_tag[self.tags[self._batch]]
        self._first_batch = False
        self._seen.clear()
        self._fired.clear()

    def fill_sides(self) -> None:
        """Give every side an (empty) statistic for each key another side has, so that the sides can be summed
        over processes and combined even where a side saw no tokens of a layer (or no batch at all here)."""
        fill_sides(self.by_tag, lambda like: InputStats(
            (like.sum_sq if like.sum_sq is not None else like.hessian).shape[0],  # type: ignore[union-attr]
            (like.sum_sq if like.sum_sq is not None else like.hessian).device,  # type: ignore[union-attr]
            like.sum_sq is not None, like.hessian is not None))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
