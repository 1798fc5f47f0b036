"""Several processes (``torchrun`` / ``accelerate launch``): who this process is, which calibration batches it
runs, and the collectives the pipelines need. Methods never call ``torch.distributed``; the pipelines call this
module, and every function here is the identity (or a no-op) when ``torch.distributed`` is not initialised or
holds one process.

* `world` / `is_main_process`: rank and size of the default process group.
* `shard_batches`: this rank's contiguous share of the calibration samples, in whole batches, so every batch is
  the one a single-process run forms (statistics then differ from it only in float summation order).
* `all_reduce_stats`: sums a dict of statistics over the processes through their one method
  ``all_reduce(sum_across)`` (`hf_prune.core.stats.Reducible`); `sum_across` is that ``sum_across``.
* `agree`: every rank learns whether any rank failed (so none waits forever in the next collective) and
  every rank raises; `check_same` compares a fingerprint (calibration ids, block weights) across ranks.
* `broadcast_tensor` / `broadcast_object` / `all_gather_objects`: thin wrappers that move tensors to the
  backend's device (gloo: CPU, nccl: CUDA) and back.
* `check_not_sharded`: one-shot pruning reads whole weights; FSDP/tensor-parallel (``DTensor``) parameters or
  FSDP1 flat parameters are refused with what to do instead.

Example (one process: everything is the identity):
    >>> import torch
    >>> from hf_prune.core.distributed import World, shard_batches, sum_across, world
    >>> world()
    World(rank=0, size=1, backend=None)
    >>> shard_batches(torch.arange(10).view(5, 2), batch_size=2).shape
    torch.Size([5, 2])
    >>> shard_batches(torch.arange(10).view(5, 2), batch_size=2, at=World(rank=1, size=2)).tolist()
    [[8, 9]]
    >>> sum_across([torch.ones(2)])[0].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError, HfPruneError, UnsupportedModelError
from .sources import active_mix, batch_tags
from .stats import Reducible

logger = logging.getLogger("hf_prune")

__all__ = [
    "DistributedError", "World", "world", "is_main_process", "shard_batches", "sum_across", "all_reduce_stats",
    "all_gather_objects", "broadcast_object", "broadcast_tensor", "agree", "failing_together", "check_same",
    "fingerprint", "check_not_sharded", "is_dtensor", "dual_batch_tags",
]


class DistributedError(HfPruneError, RuntimeError):
    """Processes of one run disagree (another rank failed, or their inputs differ)."""


@dataclass(frozen=True)
class World:
    """Rank and size of the default process group (``rank=0, size=1`` without one)."""

    rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, shows progress bars and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: collectives are needed."""
        return self.size > 1


def _initialized() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


_warned_uninitialised = False


def world() -> World:
    """The current `World` (from ``torch.distributed``'s default group). A launcher's ``WORLD_SIZE > 1`` without an
    initialised group is logged once: each process then works alone on everything."""
    global _warned_uninitialised
    if not _initialized():
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and not _warned_uninitialised:
            _warned_uninitialised = True
            logger.warning(
                "hf_prune: WORLD_SIZE=%s but torch.distributed is not initialised, so every process prunes alone on "
                "all the calibration data. Call torch.distributed.init_process_group() (or accelerate's "
                "PartialState()) first to split the work", os.environ.get("WORLD_SIZE"))
        return World()
    dist = torch.distributed
    return World(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def is_main_process() -> bool:
    """True on rank 0, and in a single process. Call ``save_pretrained`` where this holds.

    Example:
        >>> is_main_process()
        True
    """
    return world().is_main


def shard_batches(calibration: torch.Tensor, batch_size: int, at: World | None = None) -> torch.Tensor:
    """This rank's share of ``calibration`` ``[samples, seqlen]``: a contiguous run of whole batches.

    The ``ceil(samples / batch_size)`` batches a single process would form are dealt out in order, the first
    ``batches % size`` ranks taking one more; so each batch (and each per-batch loss, for Taylor scores) is
    exactly the single-process one. Raises `CalibrationError` when there are fewer batches than processes.

    Example:
        >>> ids = torch.arange(14).view(7, 2)
        >>> [shard_batches(ids, 2, World(r, 2))[:, 0].tolist() for r in (0, 1)]
        [[0, 2, 4, 6], [8, 10, 12]]
    """
    at = world() if at is None else at
    if not at.active:
        return calibration
    n = int(calibration.shape[0])
    batches = math.ceil(n / batch_size) if n else 0
    if batches < at.size:
        raise CalibrationError(
            f"{n} calibration samples in batches of batch_size={batch_size} make {batches} batch(es), fewer than "
            f"the {at.size} processes: every process needs at least one batch. Use num_calibration_samples >= "
            f"{at.size * batch_size}, a smaller batch_size, or fewer processes"
        )
    base, extra = divmod(batches, at.size)
    first = at.rank * base + min(at.rank, extra)
    count = base + (1 if at.rank < extra else 0)
    return calibration[first * batch_size : min((first + count) * batch_size, n)]


def dual_batch_tags(calibration: torch.Tensor, batch_size: int) -> tuple[list[str], float] | None:
    """Under dual importance (`hf_prune.core.sources`): the side (``"general"``/``"domain"``) of each batch this
    process runs of ``calibration`` (its `shard_batches` share), and λ; ``None`` without dual importance."""
    mix = active_mix(calibration)
    if mix is None:
        return None
    rows = shard_batches(torch.arange(calibration.shape[0]).unsqueeze(1), batch_size).squeeze(1)
    return batch_tags(mix, rows, batch_size), float(mix.domain_weight)  # type: ignore[arg-type]


def _backend_device(t: torch.Tensor) -> torch.device:
    """Where the default group's backend wants ``t``: CUDA for nccl, CPU for gloo (a per-device backend such as
    ``cpu:gloo,cuda:nccl``, the default of ``init_process_group()``, which reports itself as "undefined", takes
    tensors where they are)."""
    backend = str(torch.distributed.get_backend())
    if ":" in backend or backend == "undefined":
        return t.device
    if backend == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if backend != "nccl" and t.device.type == "cuda":
        return torch.device("cpu")
    return t.device


def sum_across(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise sums of ``tensors`` over all processes (new tensors on the inputs' devices and dtypes; the
    inputs are returned unchanged in a single process). Every rank must pass tensors of the same shapes, in the
    same order.

    Example:
        >>> [t.tolist() for t in sum_across([torch.tensor([2]), torch.ones(2)])]   # one process
        [[2], [1.0, 1.0]]
    """
    if not world().active:
        return list(tensors)
    out = []
    for t in tensors:
        dev = _backend_device(t)
        buf = t.detach().to(dev, copy=True).contiguous()
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        out.append(buf.to(t.device))
    return out


def all_reduce_stats(stats: Mapping[str, Reducible], what: str = "statistics") -> None:
    """Sum every statistic of ``stats`` over the processes, in place, through its ``all_reduce(sum_across)``.

    The ranks first check that they hold the same keys (a rank with other layers would otherwise sum unrelated
    tensors); keys are reduced in sorted order.

    Example:
        >>> from hf_prune.core.stats import InputStats
        >>> s = InputStats(3, torch.device("cpu"), norms=True, hessian=False)
        >>> s.add(torch.ones(2, 3))
        >>> all_reduce_stats({"q_proj": s})   # one process: unchanged
        >>> s.n_tokens, s.sum_sq.tolist()
        (2, [2.0, 2.0, 2.0])
    """
    if not world().active:
        return
    check_same(sorted(stats), f"the keys of the {what}")
    for key in sorted(stats):
        stats[key].all_reduce(sum_across)


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; ``[obj]`` in a single process).

    Example:
        >>> all_gather_objects({"rows": 4})
        [{'rows': 4}]
    """
    at = world()
    if not at.active:
        return [obj]
    out: list[Any] = [None] * at.size
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process).

    Example:
        >>> broadcast_object([0.5, 0.25])
        [0.5, 0.25]
    """
    if not world().active:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s values of ``t`` on every rank (every rank passes a tensor of the same shape and dtype; the
    result is on ``t``'s device). ``t`` itself in a single process.

    Example:
        >>> broadcast_tensor(torch.arange(3), src=0).tolist()
        [0, 1, 2]
    """
    if not world().active:
        return t
    dev = _backend_device(t)
    buf = t.detach().to(dev, copy=True).contiguous()
    torch.distributed.broadcast(buf, src=src)
    return buf.to(t.device)


def agree(error: BaseException | None, what: str) -> None:
    """Exchange failures: if any rank passes an ``error``, every rank raises (its own error, or a
    `DistributedError` naming the rank that failed and its message). Nothing happens when no rank failed.

    Example:
        >>> agree(None, "pruning block 0")          # nobody failed
        >>> agree(ValueError("bad"), "pruning block 0")
        Traceback (most recent call last):
        ...
        ValueError: bad
    """
    at = world()
    if not at.active:
        if error is not None:
            raise error
        return
    messages = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise DistributedError(f"rank {rank} of {at.size} failed {what}: {message}")


@contextmanager
def failing_together(what: str) -> Iterator[None]:
    """Run the block; then, with several processes, `agree` on whether any rank raised (an ``Exception``) in it,
    so ranks that succeeded raise too instead of waiting in the next collective.

    Example:
        >>> with failing_together("running block 0"):
        ...     x = 1 + 1
        >>> x
        2
    """
    if not world().active:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised by agree() on this rank
        error = exc
    agree(error, what)


def fingerprint(t: torch.Tensor, samples: int = 4096) -> tuple[tuple[int, ...], float, float]:
    """A cheap summary of ``t`` (shape, float64 sum and abs-sum of up to ``samples`` evenly strided entries) for
    comparing tensors across processes.

    Example:
        >>> fingerprint(torch.arange(4.0))
        ((4,), 6.0, 6.0)
    """
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    picked = flat[::step].double()
    return tuple(t.shape), float(picked.sum()), float(picked.abs().sum())


def check_same(value: Any, what: str) -> None:
    """Raise `DistributedError` on every rank if ``value`` (picklable, comparable) differs between ranks.

    Example:
        >>> check_same(fingerprint(torch.ones(3)), "the weights")   # one process: nothing to compare
    """
    at = world()
    if not at.active:
        return
    values = all_gather_objects(value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise DistributedError(
            f"{what} differ between processes (rank 0 vs rank {differ[0]} of {at.size}); every process must load the "
            "same model and build the same calibration data (same source, same seed)"
        )


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor-parallel parameter).

    Example:
        >>> is_dtensor(torch.zeros(1))
        False
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def check_not_sharded(model: nn.Module, what: str = "one-shot pruning") -> None:
    """Refuse a model whose parameters are sharded across processes (FSDP2 / tensor-parallel ``DTensor``,
    FSDP1 ``FlatParameter``) or that is wrapped by DDP/FSDP1: ``what`` reads and writes whole weights.

    Example:
        >>> check_not_sharded(nn.Linear(2, 2))
    """
    wrapper = type(model).__name__
    if wrapper in ("DistributedDataParallel", "FullyShardedDataParallel"):
        raise UnsupportedModelError(
            f"{what} got a {wrapper}-wrapped model; pass the model itself (``wrapped.module``), before wrapping it"
        )
    for name, p in model.named_parameters():
        if is_dtensor(p):
            placements = getattr(p, "placements", "?")
            raise UnsupportedModelError(
                f"{what} needs whole weights on every process, but {name} is a DTensor sharded as {placements} "
                "(FSDP2 fully_shard or a tp_plan/tensor-parallel load). Load the full model on every process "
                "(no tp_plan, no fully_shard), prune, then shard it for training"
            )
        if type(p).__name__ == "FlatParameter" or getattr(p, "_fsdp_flattened", False):
            raise UnsupportedModelError(
                f"{what} cannot read FSDP1 flattened parameters ({name}); prune the model before wrapping it in FSDP"
            )
