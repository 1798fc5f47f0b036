"""Calibration statistics for structured scoring (lifecycle: hooks, devices, blocks; math in `scores`).

* `collect_width_stats` and `collect_depth_stats` run block by block with the one-shot pipeline's machinery
  (`hf_prune.core.blocks.record_block_inputs`, `on_device`, per-block replay of the recorded kwargs): only one
  block and the calibration activations live on the compute device. Statistics are taken on the *dense*
  model in one pass: scoring only plans, nothing is removed until surgery, and global allocation needs the
  scores of every block before it can pick anything (FLAP collects them the same way).
* `sequential_refit` (``reconstruct=True``) runs once the plan is known: a dense and a pruned stream go
  through the model block by block, and each pruned output projection is refit on the inputs the pruned model
  really gives it (see its docstring). Each block's ``[in, in]`` matrices exist only while that block is
  fit. It cannot share the scoring pass: global allocation needs every block's scores before it can choose
  what a block keeps, and Taylor has no activation pass at all.
* `collect_taylor_grads` is *not* block by block: first-order Taylor needs the gradient of the causal-LM
  loss, so the whole model runs forward + backward on every calibration batch (in eval mode). Gradients
  of the scored weights are folded into float32 accumulators by post-accumulate hooks and the ``.grad``
  tensors are freed at once; no other parameter gets a gradient. The model must fit its device(s) for
  training-style forward+backward (a CPU model is moved to ``device`` for the duration).

Several processes (``torchrun`` / ``accelerate launch``): each one runs its share of the calibration batches
(`hf_prune.core.distributed.shard_batches`) and the statistics are summed over the processes before anything
is scored: width moments and refit moments through their ``all_reduce`` (`ReducibleMoments`,
`ReduciblePairedMoments`), depth statistics and Taylor gradient sums through the same sums, last-token states
gathered in sample order. Every process then holds the statistics of the whole calibration set.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_prune.structure.collect import collect_depth_stats
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    ...                                      num_attention_heads=4, vocab_size=100)).eval()
    >>> stats = collect_depth_stats(model, torch.randint(0, 100, (4, 16)), 2, torch.device("cpu"))
    >>> len(stats.block_influence), stats.last_token_states.shape
    (3, torch.Size([4, 4, 32]))
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.blocks import StopBlock, check_finite, on_device, record_block_inputs, run_block
from ..core.distributed import (
    all_gather_objects,
    all_reduce_stats,
    check_same,
    dual_batch_tags,
    failing_together,
    shard_batches,
    sum_across,
    world,
)
from ..core.model import find_blocks, input_device
from ..core.sources import DOMAIN, GENERAL
from ..core.stats import SumAcross, fill_sides, fold_input
from ..errors import NumericalError
from .expert_scores import ExpertStats, token_contribution
from .plan import BlockSpec
from .reconstruct import PairedMoments
from .scores import RunningMoments, angular_distance, combine_moments, span_distances, token_cosine

BlockHook = Callable[[int, nn.Module], list[Any]]
BlockDone = Callable[[int, list[torch.Tensor], list[torch.Tensor]], None]


def _progress(iterable: Iterable, desc: str, total: int, show: bool, unit: str = "block") -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not (show and world().is_main), unit=unit)


class ReducibleMoments(RunningMoments):
    """`RunningMoments` that several processes can combine (`hf_prune.core.stats.Reducible`): counts and sums
    are added, and the squared deviations are merged around the common mean (Chan et al.'s parallel formula),
    so the result is the single-process one up to float order.

    Example:
        >>> a = ReducibleMoments(1); a.add(torch.tensor([[1.0], [3.0]]))
        >>> a.all_reduce(lambda ts: [t * 2 for t in ts])      # as if a second process had seen the same data
        >>> a.n, a.mean.tolist(), a.var.tolist()
        (4, [2.0], [1.0])
    """

    def all_reduce(self, sum_across: SumAcross) -> None:
        n, total = sum_across([torch.tensor([float(self.n)], dtype=torch.float64, device=self.mean.device),
                               self.mean * self.n])
        count = int(n[0])
        mean = total / max(count, 1)
        (m2,) = sum_across([self.m2 + self.n * (self.mean - mean).square()])
        self.n, self.mean, self.m2 = count, mean, m2


class ReduciblePairedMoments(PairedMoments):
    """`PairedMoments` (plain sums) that several processes can add up (`hf_prune.core.stats.Reducible`).

    Example:
        >>> m = ReduciblePairedMoments(2); m.add_pair(torch.ones(3, 2), torch.ones(3, 2))
        >>> m.all_reduce(lambda ts: [t * 2 for t in ts])
        >>> m.n, m.xd.tolist()
        (6, [[6.0, 6.0], [6.0, 6.0]])
    """

    def all_reduce(self, sum_across: SumAcross) -> None:
        n, self.xx, self.x, self.xd, self.d = sum_across(
            [torch.tensor([float(self.n)], dtype=torch.float64, device=self.xx.device), self.xx, self.x, self.xd,
             self.d])
        self.n = int(n[0])


def sweep_blocks(
    model: nn.Module,
    calibration: torch.Tensor,
    batch_size: int,
    device: torch.device,
    before: BlockHook | None = None,
    after: BlockDone | None = None,
    desc: str = "structured: statistics",
    show_progress: bool = False,
    after_batch: Callable[[], None] | None = None,
) -> None:
    """Run the calibration batches through the dense model block by block.

    ``before(i, block)`` may register hooks and returns their handles (removed after the block ran);
    ``after(i, inputs, outputs)`` sees the block's per-batch input and output hidden states; ``after_batch()``
    is called after every batch of every block.

    With several processes each runs its own calibration batches (`hf_prune.core.distributed.shard_batches`);
    the callers sum what the hooks collected afterwards. A failure on one process is raised on all.
    """
    _, blocks = find_blocks(model)
    calibration = shard_batches(calibration, batch_size)
    with failing_together(desc):
        hidden, calls = record_block_inputs(model, blocks, calibration, batch_size)
        hidden = [h.to(device) for h in hidden]
        check_finite(hidden, "entering block 0 (embeddings)")
        for i in _progress(range(len(blocks)), desc, len(blocks), show_progress):
            block = blocks[i]
            with on_device(block, device):
                handles = before(i, block) if before is not None else []
                try:
                    out = run_block(block, hidden, calls[i], device, after_batch)
                finally:
                    for h in handles:
                        h.remove()
            check_finite(out, f"leaving block {i}")
            if after is not None:
                after(i, hidden, out)
            hidden = out


# ----------------------------------------------------------------------------------------- width stats
def collect_width_stats(
    model: nn.Module,
    specs: Sequence[BlockSpec],
    calibration: torch.Tensor,
    batch_size: int,
    device: torch.device,
    show_progress: bool = False,
    desc: str = "structured: input statistics",
) -> dict[str, RunningMoments]:
    """Mean/variance/sum of squares per input channel of every attention and MLP output projection.

    Keyed by the projection's module path (``spec.attention.o`` / ``spec.mlp.output``).
    """
    stats: dict[str, RunningMoments] = {}
    by_block = {s.index: s for s in specs}
    dual = dual_batch_tags(calibration, batch_size)
    tags = None if dual is None else dual[0]
    by_tag: dict[str, dict[str, RunningMoments]] = {t: {} for t in (GENERAL, DOMAIN)}
    batch = [0]

    def hook(path: str) -> Callable:
        def fold(module: nn.Module, args: tuple) -> None:
            store = stats if tags is None else by_tag[tags[batch[0]]]
            fold_input(store, path, args[0], ReducibleMoments)

        return fold

    def before(i: int, block: nn.Module) -> list[Any]:
        batch[0] = 0
        spec = by_block.get(i)
        paths = [] if spec is None else [p for p in (spec.attention and spec.attention.o,
                                                     spec.mlp and spec.mlp.output) if p]
        return [model.get_submodule(p).register_forward_pre_hook(hook(p)) for p in paths]

    def next_batch() -> None:
        batch[0] += 1

    sweep_blocks(model, calibration, batch_size, device, before=before, desc=desc, show_progress=show_progress,
                 after_batch=next_batch)
    if tags is None:
        all_reduce_stats(stats, "structured input statistics")
    else:
        fill_sides(by_tag, lambda like: ReducibleMoments(like.mean.numel(), like.mean.device))
        for side in (GENERAL, DOMAIN):
            all_reduce_stats(by_tag[side], f"structured {side} input statistics")
        stats = {p: combine_moments(by_tag[GENERAL][p], by_tag[DOMAIN][p], dual[1]) for p in by_tag[GENERAL]}
    for path, s in stats.items():
        if not s.is_finite():
            raise NumericalError(f"{path}: NaN/Inf in the calibration statistics of this layer's input")
    return stats


# ---------------------------------------------------------------------------------------- expert stats
def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _ForwardOverride:
    """Routes ``module``'s forward through ``replacement(original, hidden, top_k_index, top_k_weights)`` until
    `remove` (a hook-handle look-alike); arguments are matched to the original forward's first three parameters
    by name, so positional and keyword calls both work."""

    def __init__(self, module: nn.Module, replacement: Callable) -> None:
        import inspect

        self.module = module
        self.had_own = "forward" in module.__dict__
        self.saved = module.__dict__.get("forward")
        original = module.forward
        signature = inspect.signature(original)
        names = list(signature.parameters)[:3]

        def forward(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return replacement(original, *(bound.arguments[name] for name in names))

        module.forward = forward  # type: ignore[method-assign]

    def remove(self) -> None:
        if self.had_own:
            self.module.forward = self.saved  # type: ignore[method-assign]
        else:
            self.module.__dict__.pop("forward", None)


class _ExpertHooks:
    """Hooks of one MoE block that feed its `ExpertStats` (see `collect_expert_stats`)."""

    def __init__(self, block: nn.Module, spec: BlockSpec, stats: ExpertStats) -> None:
        self.stats, self.spec = stats, spec
        self.experts = block.get_submodule(spec.experts.experts.removeprefix(spec.module + "."))
        self.moe = block.get_submodule(spec.experts.module.removeprefix(spec.module + "."))
        self.router = block.get_submodule(spec.experts.router.removeprefix(spec.module + "."))
        self.norm = getattr(block, "post_attention_layernorm", None)  # its input is the residual stream
        self.pending: dict[str, Any] = {}

    def register(self) -> list[Any]:
        handles = [self.router.register_forward_hook(self._router),
                   _ForwardOverride(self.experts, self._experts),
                   self.moe.register_forward_pre_hook(self._moe_in),
                   self.moe.register_forward_hook(self._moe_out)]
        if isinstance(self.norm, nn.Module):
            handles += [self.norm.register_forward_pre_hook(self._norm_in), self.norm.register_forward_hook(self._norm_out)]
        return handles

    def _norm_in(self, module: nn.Module, args: tuple) -> None:
        self.pending["norm_in"] = args[0].detach()

    def _norm_out(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.pending["norm_out"] = _first(out)

    def _moe_in(self, module: nn.Module, args: tuple) -> None:
        # Pre-norm blocks feed the MoE the norm's output: the residual stream is the norm's input. Post-norm
        # blocks (the norm applies to the attention output) feed it the residual stream itself.
        x = self.pending["norm_in"] if args[0] is self.pending.get("norm_out") else args[0]
        self.pending["before"] = x.detach().reshape(-1, x.shape[-1])

    def _router(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.pending["logits"] = _first(out).detach()

    @torch.no_grad()
    def _experts(self, original: Callable, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
                 ) -> torch.Tensor:
        """Replaces the experts forward while statistics are collected: one call of the module's own forward
        computes ``E_e(x)`` for every routed (token, slot) -- each token repeated once per slot, routed to that
        slot's expert at weight 1 -- and the layer's output is their weighted sum, so the experts run once, as in
        a plain forward (up to the order of the weighted sum)."""
        n, k = index.shape
        flat = original(hidden.repeat_interleave(k, dim=0), index.reshape(n * k, 1),
                        torch.ones(n * k, 1, dtype=weights.dtype, device=weights.device))
        y = flat.view(n, k, -1).float()  # converted once: the sum, the norms and the peaks all read it
        out = (y * weights.float().unsqueeze(-1)).sum(1).to(flat.dtype)
        peak = torch.zeros(self.stats.experts, dtype=torch.float32, device=hidden.device)
        peak.scatter_reduce_(0, index.reshape(-1).long(), y.abs().amax(-1).reshape(-1), reduce="amax")
        self.pending.update(index=index.detach(), gates=weights.detach().float(), norms=y.norm(dim=-1),
                            peak=peak, routed=out)
        return out

    @torch.no_grad()
    def _moe_out(self, module: nn.Module, args: tuple, out: Any) -> None:
        p, self.pending = self.pending, {}
        if "index" not in p:
            return
        routed = p["routed"].reshape(-1, p["routed"].shape[-1])
        contribution = None
        if "before" in p and p["before"].shape == routed.shape:
            contribution = token_contribution(p["before"], p["before"].float() + routed.float())
        self.stats.add(p["index"], p["gates"], p["norms"], contribution, p["peak"], p.get("logits"))


def collect_expert_stats(
    model: nn.Module,
    specs: Sequence[BlockSpec],
    calibration: torch.Tensor,
    batch_size: int,
    device: torch.device,
    show_progress: bool = False,
    desc: str = "experts: routing statistics",
) -> dict[int, ExpertStats]:
    """Routing statistics of every MoE block (keyed by block index), block by block on the dense model.

    Per routed (token, slot): the expert, its router weight, ``||E_e(x)||`` (computed by the experts module's own
    forward with that one expert at weight 1, so any layout and activation is exact; the layer's output is then
    the weighted sum of these, so the experts run once per batch, as in a plain forward), the largest ``|E_e(x)|``
    per expert (super-expert guard), the router logits (merge similarity) and EASY-EP's token contribution,
    ``max(0, 1 - cos(h, h + r))`` with ``h`` the residual stream entering the MoE sublayer (the input of
    ``post_attention_layernorm`` when that norm feeds the MoE; the MoE input otherwise, e.g. post-norm blocks) and
    ``r`` the routed experts' combined output (shared experts excluded, as in the EASY-EP authors' code).
    """
    stats = {s.index: ExpertStats(s.experts.num_experts) for s in specs if s.experts is not None}
    by_block = {s.index: s for s in specs}

    def before(i: int, block: nn.Module) -> list[Any]:
        if i not in stats:
            return []
        return _ExpertHooks(block, by_block[i], stats[i]).register()

    sweep_blocks(model, calibration, batch_size, device, before=before, desc=desc, show_progress=show_progress)
    w = world()
    if w.active:
        check_same(sorted(stats), "the MoE blocks")
        for i in sorted(stats):
            stats[i].all_reduce(sum_across, w.rank, w.size)
    return stats


@dataclass
class RefitJob:
    """One output projection to refit: its module path and the original indices of its kept input columns."""

    path: str
    keep: list[int]


#: ``solve(block, job, moments) -> (weight [out, len(keep)], intercept [out])``
RefitSolve = Callable[[int, RefitJob, PairedMoments], tuple[torch.Tensor, torch.Tensor]]


def _replace_output(keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> Callable:
    """A forward hook making a projection compute ``x[..., keep] @ weight^T + bias`` (its refit, pruned self)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return torch.nn.functional.linear(x.index_select(-1, keep.to(x.device)), weight.to(x.device, x.dtype),
                                          bias.to(x.device, x.dtype))

    return hook


def _inputs_at(module: nn.Module, block: nn.Module, hidden: list[torch.Tensor], calls: list, device: torch.device
               ) -> list[torch.Tensor]:
    """Per batch, the input ``module`` receives when ``block`` runs on ``hidden``; the rest of the block's
    forward is skipped."""
    store: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple) -> None:
        store.append(args[0].detach())
        raise StopBlock

    handle = module.register_forward_pre_hook(hook)
    try:
        run_block(block, hidden, calls, device)
    finally:
        handle.remove()
    return store


def sequential_refit(
    model: nn.Module,
    jobs: dict[int, list[RefitJob]],
    calibration: torch.Tensor,
    batch_size: int,
    device: torch.device,
    solve: RefitSolve,
    show_progress: bool = False,
    desc: str = "structured: reconstruction",
) -> None:
    """Refit output projections *sequentially*: each pruned layer is fit on the inputs it will really see.

    Two streams of hidden states go through the model block by block: the dense model's and the pruned
    model's, in which every earlier projection already computes its refit on its kept columns (forward hooks;
    the weights themselves are not touched, surgery applies the plan later). For each job of a block, in order
    (attention output before MLP output), the dense input ``x`` and the pruned-stream input ``x~`` of the
    projection are paired token by token into `PairedMoments`, and ``solve`` fits the kept columns (and an
    intercept) so that ``W' x~_K + b`` reproduces the dense ``W x``; the error the pruning made upstream is
    corrected rather than carried on. Partial forwards stop at the captured projection.

    Costs: per pruned block, about two partial plus two full forwards per stream (the dense refit pass needs
    one), and the pruned stream's hidden states next to the dense ones on ``device``.
    """
    _, blocks = find_blocks(model)
    calibration = shard_batches(calibration, batch_size)
    with failing_together("recording the inputs of the decoder blocks"):
        dense, calls = record_block_inputs(model, blocks, calibration, batch_size)
        dense = [h.to(device) for h in dense]
        check_finite(dense, "entering block 0 (embeddings)")
    pruned: list[torch.Tensor] | None = None  # None while no block has been pruned: the streams are equal
    for i in _progress(range(len(blocks)), desc, len(blocks), show_progress):
        block = blocks[i]
        fitted: list[Any] = []
        with on_device(block, device):
            try:
                for job in jobs.get(i, []):
                    module = model.get_submodule(job.path)
                    x_dense = _inputs_at(module, block, dense, calls[i], device)
                    x_pruned = _inputs_at(module, block, dense if pruned is None else pruned, calls[i], device)
                    moments = ReduciblePairedMoments(x_dense[0].shape[-1], device=device)
                    for xp, xd in zip(x_pruned, x_dense):
                        moments.add_pair(xp, xd)
                    del x_dense, x_pruned
                    all_reduce_stats({job.path: moments}, f"refit moments of {job.path}")
                    weight, bias = solve(i, job, moments)  # refit_projection rejects NaN/Inf moments
                    del moments
                    base = getattr(module, "bias", None)
                    total = bias.to(device) + (base.detach().float() if base is not None else 0.0)
                    keep = torch.as_tensor(job.keep, dtype=torch.long, device=device)
                    fitted.append(module.register_forward_hook(_replace_output(keep, weight.to(device), total)))
                out_dense = run_block(block, dense, calls[i], device)
                out_pruned = None if pruned is None and not fitted else run_block(
                    block, dense if pruned is None else pruned, calls[i], device)
            finally:
                for h in fitted:
                    h.remove()
        check_finite(out_dense, f"leaving block {i}")
        if out_pruned is not None:
            check_finite(out_pruned, f"leaving block {i} (pruned)")
        dense, pruned = out_dense, out_pruned


# ----------------------------------------------------------------------------------------- depth stats
@dataclass
class DepthStats:
    """Block Influence per block and last-token hidden states at every block boundary.

    ``last_token_states`` is ``[samples, blocks + 1, hidden]`` (float32, CPU): boundary ``l`` is the input of
    block ``l``, the last one the output of the last block. ``span_all_tokens`` (only when requested with a
    span length ``n``) holds the angular distance between boundaries ``l`` and ``l + n`` averaged over all
    tokens.
    """

    block_influence: list[float]
    last_token_states: torch.Tensor
    span: int | None = None
    span_all_tokens: torch.Tensor | None = None
    tokens: int = 0

    def span_distances(self, n: int, last_token: bool = True) -> torch.Tensor:
        """Angular distance of removing blocks ``l..l+n-1`` for every start ``l``."""
        if last_token:
            return span_distances(self.last_token_states, n)
        if self.span != n or self.span_all_tokens is None:
            raise ValueError(f"all-token distances were collected for span {self.span}, not {n}")
        return self.span_all_tokens


@dataclass
class _DepthAccumulator:
    n_blocks: int
    span: int | None
    cos_sum: list[float] = field(default_factory=list)
    count: list[int] = field(default_factory=list)
    last: list[list[torch.Tensor]] = field(default_factory=list)  # per boundary, per batch [b, hidden]
    ring: deque = field(default_factory=deque)  # (boundary, per-batch hidden on CPU) for all-token spans
    span_sum: list[float] = field(default_factory=list)
    span_count: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cos_sum = [0.0] * self.n_blocks
        self.count = [0] * self.n_blocks
        self.last = [[] for _ in range(self.n_blocks + 1)]
        if self.span:
            self.span_sum = [0.0] * (self.n_blocks + 1 - self.span)
            self.span_count = [0] * (self.n_blocks + 1 - self.span)

    def boundary(self, b: int, hidden: list[torch.Tensor]) -> None:
        self.last[b] = [h[:, -1, :].float().cpu() for h in hidden]
        if not self.span:
            return
        if b >= self.span:
            start, old = self.ring[0]
            assert start == b - self.span
            for h_old, h_new in zip(old, hidden):
                d = angular_distance(token_cosine(h_old, h_new.cpu()))
                self.span_sum[start] += float(d.double().sum())
                self.span_count[start] += d.numel()
            self.ring.popleft()
        if b + self.span <= self.n_blocks:
            self.ring.append((b, [h.detach().cpu() for h in hidden]))

    def after(self, i: int, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        if i == 0:
            self.boundary(0, inputs)
        for a, b in zip(inputs, outputs):
            cos = token_cosine(a, b)
            self.cos_sum[i] += float(cos.double().sum())
            self.count[i] += cos.numel()
        self.boundary(i + 1, outputs)

    def all_reduce(self, sum_across: SumAcross) -> None:
        """Sum the per-block sums and counts over the processes; every process then holds every process's
        last-token states, in rank order (= sample order, as `shard_batches` deals contiguous batches)."""
        if not world().active:
            return
        parts = (self.cos_sum, self.count, self.span_sum, self.span_count)
        (summed,) = sum_across([torch.tensor([float(v) for p in parts for v in p], dtype=torch.float64)])
        cos_sum, count, span_sum, span_count = summed.split([len(p) for p in parts])
        self.cos_sum, self.span_sum = cos_sum.tolist(), span_sum.tolist()
        self.count, self.span_count = [int(c) for c in count.tolist()], [int(c) for c in span_count.tolist()]
        gathered = all_gather_objects(self.last)
        self.last = [[t for rank in gathered for t in rank[b]] for b in range(self.n_blocks + 1)]


def collect_depth_stats(
    model: nn.Module,
    calibration: torch.Tensor,
    batch_size: int,
    device: torch.device,
    show_progress: bool = False,
    all_token_span: int | None = None,
) -> DepthStats:
    """One dense block-by-block pass: Block Influence of every block and last-token boundary states.

    ``all_token_span=n`` also averages the angular distance of every span of ``n`` blocks over *all* tokens;
    this keeps up to ``n`` boundaries' hidden states on the CPU (``n`` times the calibration activations).
    """
    _, blocks = find_blocks(model)
    acc = _DepthAccumulator(len(blocks), all_token_span)
    sweep_blocks(model, calibration, batch_size, device, after=acc.after, desc="structured: block similarity",
                 show_progress=show_progress)
    acc.all_reduce(sum_across)
    bi = [1.0 - s / max(c, 1) for s, c in zip(acc.cos_sum, acc.count)]
    states = torch.stack([torch.cat(per_batch, 0) for per_batch in acc.last], dim=1)
    span_all = None
    if all_token_span:
        span_all = torch.tensor([s / max(c, 1) for s, c in zip(acc.span_sum, acc.span_count)])
    return DepthStats(bi, states, all_token_span, span_all, tokens=sum(acc.count[:1]))


# ------------------------------------------------------------------------------------------ taylor
def collect_taylor_grads(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    calibration: torch.Tensor,
    batch_size: int,
    device: torch.device,
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Sum over calibration batches of ``d loss / d p`` (float32) for each named parameter in ``params``.

    The loss is the causal-LM loss (labels = inputs) of each batch. Only ``params`` require grad during the
    run (the original ``requires_grad`` flags are restored); each ``.grad`` is folded into its float32
    accumulator as soon as autograd has produced it and then released.
    """
    grads: dict[str, torch.Tensor] = {}
    flags = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(p): name for name, p in params.items()}
    handles = []
    calibration = shard_batches(calibration, batch_size)

    def make_hook(name: str) -> Callable:
        def hook(p: torch.Tensor) -> None:
            if name in grads:
                grads[name] += p.grad.float()
            else:
                grads[name] = p.grad.float().clone()
            p.grad = None

        return hook

    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        for name, p in params.items():
            handles.append(p.register_post_accumulate_grad_hook(make_hook(name)))
        with failing_together("taylor: gradients"), on_device(model, device), torch.enable_grad():
            dev = input_device(model)
            batches = calibration.split(batch_size)
            for batch in _progress(batches, "taylor: gradients", len(batches), show_progress, unit="batch"):
                batch = batch.to(dev)
                out = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch, use_cache=False)
                if not bool(torch.isfinite(out.loss)):
                    raise NumericalError("taylor: the calibration loss is NaN/Inf; load the model in bfloat16/"
                                         "float32 or check the calibration data")
                out.loss.backward()
                del out
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    if world().active:  # sums of per-batch gradients: add up every process's batches
        check_same(sorted(grads), "the parameters that received a Taylor gradient")
        names = sorted(grads)
        grads = dict(zip(names, sum_across([grads[n] for n in names])))
    missing = [name for name in params if name not in grads]
    if missing:
        raise NumericalError(f"taylor: no gradient reached {missing[:3]} (is the parameter used by the forward?)")
    return grads
