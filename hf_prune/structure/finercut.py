"""FinerCut (Zhang et al., 2024): remove attention and MLP *sublayers*, one at a time, greedily.

Every attention sublayer and every MLP sublayer is a candidate. Each step tries removing each remaining
candidate (on top of those already removed) and keeps the one whose removal changes the model's output
least, until the parameter budget is reached.

* Removal for scoring is done without surgery: a forward hook makes the sublayer return zeros, so the
  block's residual branch adds nothing (exactly what removing the sublayer does).
* Output change = mean over calibration tokens of ``1 - cos(h, h_dense)`` on the hidden state leaving the
  last decoder block (before the final norm). Chosen over a KL on logits because it needs no vocabulary
  projection (cheaper by ``vocab / hidden`` per token), works for every architecture without locating the
  final norm, and ranks candidates by the same signal the logits are computed from.
* The hidden state at every block boundary of the current (partially removed) model is cached, so trying
  a candidate in block ``i`` only re-runs blocks ``i..L-1``.
* The whole model runs on the compute device (it is moved there for the duration if it is on the CPU and
  not dispatched by accelerate); only a few calibration tokens are used (see `FinerCut.max_tokens`).

Example:
    >>> from hf_prune.structure.finercut import zero_output
    >>> import torch
    >>> zero_output(torch.ones(2)), zero_output((torch.ones(2), None))[0]
    (tensor([0., 0.]), tensor([0., 0.]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.blocks import on_device, record_block_inputs, run_block
from ..core.model import find_blocks
from .plan import BlockSpec
from .scores import token_cosine

Candidate = tuple[int, str]  # (block index, "attention" | "mlp")


def zero_output(out: Any) -> Any:
    """The module output with its hidden-state tensor replaced by zeros (tuples keep their other entries)."""
    if isinstance(out, torch.Tensor):
        return torch.zeros_like(out)
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return (torch.zeros_like(out[0]),) + tuple(out[1:])
    raise TypeError(f"cannot zero a sublayer output of type {type(out).__name__}")


def output_distance(h: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Mean over tokens of ``1 - cos(h, ref)``."""
    total, count = 0.0, 0
    for a, b in zip(h, ref):
        cos = token_cosine(a, b)
        total += float((1.0 - cos).double().sum())
        count += cos.numel()
    return total / max(count, 1)


def greedy_sublayers(
    model: nn.Module,
    specs: Sequence[BlockSpec],
    costs: dict[Candidate, int],
    calibration: torch.Tensor,
    batch_size: int,
    device: torch.device,
    target: float,
    show_progress: bool = False,
) -> list[dict]:
    """Greedy FinerCut; returns the removals in order: ``{"block", "sublayer", "params", "distance"}``.

    ``costs`` gives the parameters of each candidate sublayer. A candidate is only tried if taking it
    brings the removed parameter count closer to ``target``.
    """
    from tqdm.auto import tqdm

    _, blocks = find_blocks(model)
    modules: dict[Candidate, nn.Module] = {}
    for spec in specs:
        if spec.attention is not None:
            modules[(spec.index, "attention")] = model.get_submodule(spec.attention.module)
        if spec.mlp is not None:
            modules[(spec.index, "mlp")] = model.get_submodule(spec.mlp.module)
    zeroed: set[Candidate] = set()

    def make_hook(cand: Candidate):
        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            return zero_output(out) if cand in zeroed else None

        return hook

    handles = [m.register_forward_hook(make_hook(c)) for c, m in modules.items()]
    order: list[dict] = []
    try:
        with on_device(model, device):
            hidden, calls = record_block_inputs(model, blocks, calibration, batch_size)
            states: list[list[torch.Tensor]] = [[h.to(device) for h in hidden]]
            for b, block in enumerate(blocks):
                states.append(run_block(block, states[b], calls[b], device))
            dense = states[-1]

            def run_from(start: int, first: list[torch.Tensor]) -> list[list[torch.Tensor]]:
                out = [first]
                for b in range(start, len(blocks)):
                    out.append(run_block(blocks[b], out[-1], calls[b], device))
                return out

            removed = 0
            bar = tqdm(total=int(target), desc="finercut: removing sublayers", unit="param",
                       disable=not show_progress)
            while removed < target:
                tried = [c for c in modules if c not in zeroed and removed + costs[c] - target < target - removed]
                if not tried:
                    break
                best: tuple[float, Candidate] | None = None
                for cand in sorted(tried):
                    zeroed.add(cand)
                    try:
                        final = run_from(cand[0], states[cand[0]])[-1]
                    finally:
                        zeroed.discard(cand)
                    dist = output_distance(final, dense)
                    if best is None or dist < best[0]:
                        best = (dist, cand)
                assert best is not None
                dist, cand = best
                zeroed.add(cand)
                states[cand[0]:] = run_from(cand[0], states[cand[0]])
                removed += costs[cand]
                bar.update(costs[cand])
                order.append({"block": cand[0], "sublayer": cand[1], "params": costs[cand], "distance": dist})
            bar.close()
    finally:
        for h in handles:
            h.remove()
    return order
