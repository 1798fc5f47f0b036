"""Run decoder blocks one at a time: record what every block receives, run a block on the compute device
(moving it there and back unless accelerate's hooks own its placement), stop a block early once statistics are
complete, and check activations for NaN/Inf. Every family that sweeps blocks (one-shot, structured statistics,
FinerCut, reconstruction) uses these.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_prune.core.blocks import record_block_inputs, run_block
    >>> from hf_prune.core.model import find_blocks
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> _, blocks = find_blocks(model)
    >>> hidden, calls = record_block_inputs(model, blocks, torch.randint(0, 100, (4, 8)), batch_size=2)
    >>> [h.shape for h in run_block(blocks[0], hidden, calls[0], torch.device("cpu"))]
    [torch.Size([2, 8, 32]), torch.Size([2, 8, 32])]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import NumericalError
from .compat import pop_cache_kwargs
from .model import input_device


class _Recorded(Exception):
    pass


class StopBlock(Exception):
    """Raised by the statistics hooks once every target of a block has seen this batch's input: the rest
    of the block (e.g. the last projection) is not needed for statistics and is skipped."""


def move_to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(move_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def is_hooked(block: nn.Module) -> bool:
    return any(getattr(m, "_hf_hook", None) is not None for m in block.modules())


@contextmanager
def stubbed_blocks(blocks: nn.ModuleList, stubs: list[Callable]) -> Iterator[None]:
    """Replace each block's ``forward`` by its stub for the duration; the originals come back even on errors."""
    saved = [blk.__dict__.get("forward") for blk in blocks]
    try:
        for blk, stub in zip(blocks, stubs):
            blk.forward = stub
        yield
    finally:
        for blk, fwd in zip(blocks, saved):
            if fwd is None:
                blk.__dict__.pop("forward", None)
            else:
                blk.forward = fwd


def record_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """Run the model once with pass-through stubs; return block 0's hidden states per batch and every
    block's ``(extra_args, kwargs)`` per batch."""
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
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
    with stubbed_blocks(blocks, [make_stub(i) for i in range(len(blocks))]), torch.no_grad():
        for batch in calib.split(batch_size):
            batch = batch.to(device)
            try:
                model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
            except _Recorded:
                pass
    if any(len(c) != len(hidden) for c in calls):
        raise NumericalError(
            "could not record the inputs of every decoder block (the model's forward skipped some blocks); "
            "one-shot pruning needs every block to run on every calibration batch"
        )
    return hidden, calls


@contextmanager
def on_device(block: nn.Module, device: torch.device):
    """Move a (not accelerate-hooked) block to ``device`` for the duration, then back where it was."""
    if is_hooked(block):
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


def run_block(
    block: nn.Module, hidden: list[torch.Tensor], calls: list[tuple[tuple, dict]], device: torch.device,
    after_batch: Callable[[], None] | None = None,
) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for h, (args, kwargs) in zip(hidden, calls):
            try:
                outs.append(first_tensor(block(h.to(device), *move_to(args, device), **move_to(kwargs, device))))
            except StopBlock:
                pass
            if after_batch is not None:
                after_batch()
    return outs


def check_finite(tensors: Iterable[torch.Tensor], where: str) -> None:
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise NumericalError(
                f"NaN/Inf activations {where}. The model produces non-finite values on the calibration data "
                "(often fp16 overflow): load it in bfloat16 or float32, or check the calibration text"
            )


def returns_tuple(block: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict], device: torch.device) -> bool:
    """Whether ``block`` returns a tuple (older decoder layers: ``(hidden, ...)``, read as ``outputs[0]`` by their
    model) rather than the hidden states themselves; runs it once on the first sample."""
    args, kwargs = call
    with torch.no_grad():
        out = block(hidden[:1].to(device), *move_to(args, device), **move_to(kwargs, device))
    return isinstance(out, (tuple, list))


def loss_from_last_hidden(
    model: nn.Module, blocks: nn.ModuleList, last_hidden: list[torch.Tensor], input_ids: list[torch.Tensor],
    tuple_output: bool = False,
) -> float:
    """The model's mean next-token loss when its last decoder block outputs ``last_hidden`` (one tensor per batch
    of ``input_ids``): every block is replaced by a stub (block 0's returns the given states, the others pass them
    on), so only embeddings, the final norm and the head run, one sample at a time (the logits of a large vocabulary
    are the biggest tensor). ``tuple_output``: the blocks return tuples (`returns_tuple`), so the stubs do too.
    Works for any model whose forward takes ``labels``.

    Example (with the real blocks' outputs this is the ordinary loss):
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from hf_prune.core.model import find_blocks
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
        >>> _, blocks = find_blocks(model); ids = torch.randint(0, 100, (2, 8))
        >>> hidden, calls = record_block_inputs(model, blocks, ids, batch_size=2)
        >>> for i, blk in enumerate(blocks): hidden = run_block(blk, hidden, calls[i], torch.device("cpu"))
        >>> abs(loss_from_last_hidden(model, blocks, hidden, [ids]) - model(ids, labels=ids).loss.item()) < 1e-4
        True
    """
    current: list[torch.Tensor] = []

    def stub(*args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        out = current[0].to(h.device, h.dtype)
        return (out,) if tuple_output else out

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if tuple_output else h

    device = input_device(model)
    total, count = 0.0, 0
    with stubbed_blocks(blocks, [stub] + [passthrough] * (len(blocks) - 1)), torch.no_grad():
        for batch_h, batch_ids in zip(last_hidden, input_ids):
            for h, ids in zip(batch_h.split(1), batch_ids.split(1)):
                current[:] = [h]
                ids = ids.to(device)
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
                n = ids.numel() - ids.shape[0]
                total += float(out.loss) * n
                count += n
    return total / max(count, 1)
