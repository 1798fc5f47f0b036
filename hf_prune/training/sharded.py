"""Masks of parameters that FSDP2 (``fully_shard``) shards across processes: pure tensor math plus sums over the
processes (through `hf_prune.core.distributed.sum_across`, so every function here also runs in one process).

FSDP2 shards each parameter on dim 0 (``Shard(0)``): process ``r`` holds a contiguous run of the rows of a
``[out, in]`` weight. Masks, movement scores and frozen values are kept the same way, as local tensors beside
the local shard of the parameter, so masking, gradient masking and optimizer-state zeroing are local
element-wise products. What needs the whole matrix:

* a per-matrix ranking ("the ``k`` lowest scores of the layer"): `lowest_k` finds the exact ``k``-th value by a
  bisection over the float32 bit patterns, with one ``sum_across`` of per-layer counts per step (32 steps for all
  layers together, never the matrix itself), then breaks ties by global position (rank order, then row-major),
  exactly as the unsharded `hf_prune.core.masks.unstructured_mask` / `hf_prune.training.state.gradual_nm_mask`;
* per-row rankings and N:M groups run along the input dimension, inside one row, so they stay local;
* checkpoints: whole tensors, gathered with `gather_rows` and cut back with `local_rows`, so a checkpoint does
  not depend on the number of processes.

Example (one process: the sharded ranking is the unsharded one):
    >>> import torch
    >>> from hf_prune.core.masks import unstructured_mask
    >>> from hf_prune.training.sharded import lowest_k
    >>> s = torch.tensor([[3., 1., 2.], [1., 5., 0.]])
    >>> (~lowest_k([s], [3])[0]).int().tolist()
    [[1, 0, 1], [0, 1, 0]]
    >>> torch.equal(~lowest_k([s], [3])[0], unstructured_mask(s, 0.5, group="layer"))
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.distributed import is_dtensor, sum_across, world
from ..errors import UnsupportedModelError

_LOW, _HIGH = -(1 << 31) - 1, (1 << 31)  # every order key of a float32 lies strictly between


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys with the order of the float32 values of ``x`` (-0.0 and 0.0 get the same key; no NaN).

    Example:
        >>> order_keys(torch.tensor([-2.0, -0.0, 0.0, 1.5, float("inf")])).argsort(stable=True).tolist()
        [0, 1, 2, 3, 4]
    """
    bits = (x.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into 0.0
    return torch.where(bits >= 0, bits, -(bits + (1 << 31)) - 1)


def lowest_k(scores: Sequence[torch.Tensor], ks: Sequence[int]) -> list[torch.Tensor]:
    """For each local shard ``scores[j]`` of a matrix sharded by rows over the processes: ``True`` where the entry
    is among the ``ks[j]`` lowest of the *whole* matrix (ties: lower global position first). One process: the
    ``k`` lowest of the tensor. Every process must call it with the same number of tensors and the same ``ks``.

    Example:
        >>> [m.int().tolist() for m in lowest_k([torch.tensor([2., 1., 1.]), torch.tensor([[5., 4.]])], [2, 1])]
        [[0, 1, 1], [[0, 1]]]
    """
    keys = [order_keys(s).reshape(-1) for s in scores]
    n = len(keys)
    device = keys[0].device if keys else torch.device("cpu")
    k = torch.tensor(list(ks), dtype=torch.int64, device=device)
    lo = torch.full((n,), _LOW, dtype=torch.int64, device=device)  # count(key <= lo) < k
    hi = torch.full((n,), _HIGH, dtype=torch.int64, device=device)  # count(key <= hi) >= k
    while n and bool((hi - lo > 1).any()):
        mid = lo + (hi - lo) // 2
        local = torch.stack([(key <= m).sum() for key, m in zip(keys, mid.tolist())])
        (count,) = sum_across([local])
        enough = count >= k
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid)
    kth = hi.tolist()
    less = [key < t for key, t in zip(keys, kth)]
    equal = [key == t for key, t in zip(keys, kth)]
    at = world()
    counts = torch.zeros(2, at.size, n, dtype=torch.int64, device=device)
    for j in range(n):
        counts[0, at.rank, j] = less[j].sum()
        counts[1, at.rank, j] = equal[j].sum()
    (counts,) = sum_across([counts])
    out = []
    for j, score in enumerate(scores):
        need = int(k[j]) - int(counts[0, :, j].sum()) - int(counts[1, : at.rank, j].sum())
        pruned = less[j] | (equal[j] & (equal[j].cumsum(0) <= need))
        out.append(pruned.view(score.shape))
    return out


def global_sum(values: Sequence[int]) -> list[int]:
    """Integer sums over the processes (the values themselves in one process).

    Example:
        >>> global_sum([3, 4])
        [3, 4]
    """
    if not world().active:
        return list(values)
    (summed,) = sum_across([torch.tensor(list(values), dtype=torch.int64)])
    return [int(v) for v in summed.tolist()]


def local(t: Any) -> torch.Tensor:
    """This process's shard of a ``DTensor`` (or of its ``.grad`` / optimizer state); a plain tensor as is.

    Example:
        >>> local(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class RowShard:
    """Rows ``start .. start + rows`` of a parameter of global shape ``shape`` live on this process.

    Example:
        >>> RowShard(0, 4, (4, 8)).whole, RowShard(2, 2, (4, 8)).whole
        (True, False)
    """

    start: int
    rows: int
    shape: tuple[int, ...]

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.rows == self.shape[0]


def row_shards(params: dict[str, Any]) -> dict[str, RowShard]:
    """Where each parameter's rows are, for parameters that are DTensors sharded on dim 0 of a 1-D mesh
    (FSDP2's ``fully_shard``). Raises `UnsupportedModelError` for any other sharding. Collective: every process
    calls it with the same names.

    Example:
        >>> row_shards({})
        {}
    """
    from torch.distributed.tensor import Shard

    names = list(params)
    rows = []
    for name in names:
        p = params[name]
        placements = tuple(p.placements)
        if p.device_mesh.ndim != 1 or placements != (Shard(0),):
            raise UnsupportedModelError(
                f"{name} is a DTensor sharded as {placements} on a {p.device_mesh.ndim}-D mesh; PruningCallback reads "
                "FSDP2 parameters sharded on dim 0 of a 1-D mesh (fully_shard's default). Tensor parallelism, HSDP "
                "and custom shard placements are not supported"
            )
        rows.append(local(p).shape[0])
    at = world()
    table = torch.zeros(at.size, len(names), dtype=torch.int64)
    table[at.rank] = torch.tensor(rows, dtype=torch.int64)
    (table,) = sum_across([table])
    starts = table[: at.rank].sum(0).tolist() if at.rank else [0] * len(names)
    out = {}
    for j, name in enumerate(names):
        shape = tuple(params[name].shape)
        if int(table[:, j].sum()) != shape[0]:
            raise UnsupportedModelError(f"{name}: its shards hold {int(table[:, j].sum())} rows of {shape[0]}; "
                                        "the processes do not shard it as FSDP2 does")
        out[name] = RowShard(int(starts[j]), rows[j], shape)
    return out


def gather_rows(t: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """The whole tensor from every process's rows (collective; ``t`` itself when it is whole already).

    Example:
        >>> gather_rows(torch.ones(2, 3), RowShard(0, 2, (2, 3))).shape
        torch.Size([2, 3])
    """
    if shard.whole:
        return t
    full = torch.zeros(shard.shape, dtype=torch.float64 if t.dtype.is_floating_point else torch.int64,
                       device=t.device)
    full[shard.start : shard.start + shard.rows] = t
    (full,) = sum_across([full])  # every other row is 0 on this process: the sum is exact
    return full.to(t.dtype)


def local_rows(full: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """This process's rows of a whole tensor.

    Example:
        >>> local_rows(torch.arange(6).view(3, 2), RowShard(1, 2, (3, 2))).tolist()
        [[2, 3], [4, 5]]
    """
    if tuple(full.shape) != shard.shape:
        raise ValueError(f"expected a whole tensor of shape {shard.shape}, got {tuple(full.shape)}")
    return full[shard.start : shard.start + shard.rows]
