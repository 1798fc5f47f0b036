"""Pure tensor math for compressed sparse weights: bitmask and N:M packing, byte accounting.

No ``nn.Module``, no I/O: every function maps tensors to tensors and is bit-exact in both
directions (a stored zero comes back as ``+0.0``; ``-0.0`` is treated as a zero).

Layouts (all row-major, one row per output feature of a ``[out, in]`` weight):

* **bitmask**: ``bitmask`` uint8 ``[out, ceil(in / 8)]``, bit ``j % 8`` (LSB first) of byte
  ``j // 8`` says whether column ``j`` is kept; ``values`` ``[nnz]`` in the weight's dtype, the
  kept entries in row-major order. Bytes per weight: ``1/8 + density * itemsize``.
* **N:M**: in every group of ``m`` consecutive columns at most ``n`` are non-zero.
  ``values`` ``[out, in * n / m]`` (the ``n`` kept entries of each group, by column order;
  groups with fewer non-zeros keep some zeros) and ``indices`` uint8
  ``[out, ceil(in * n / m / per_byte)]``: the position (``0..m-1``) of each kept entry inside its
  group, ``bits = index_bits(m)`` bits each, LSB first. For 2:4: 2 bits, 4 indices per byte,
  bytes per weight ``n/m * itemsize + n/m * 2/8`` = 1.125 for bf16.

Example:
    >>> import torch
    >>> from hf_prune.nn.packing import pack_nm, unpack_nm, pack_bitmask, unpack_bitmask
    >>> w = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 4.0]])
    >>> values, idx = pack_nm(w, 2, 4)
    >>> values.tolist(), torch.equal(unpack_nm(values, idx, w.shape, 2, 4), w)
    ([[1.5, -2.0, 3.0, 4.0]], True)
    >>> mask, vals = pack_bitmask(w)
    >>> mask.tolist(), torch.equal(unpack_bitmask(mask, vals, w.shape), w)
    ([[154]], True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.masks import is_nm_sparse  # re-exported for packing users; one implementation

__all__ = [
    "SparseFormat",
    "parse_format",
    "index_bits",
    "pack_bitmask",
    "unpack_bitmask",
    "bitmask_row_counts",
    "pack_nm",
    "unpack_nm",
    "unpack_nm_indices",
    "nm_violations",
    "is_nm_sparse",
    "predicted_bytes_per_weight",
    "tensor_nbytes",
]


@dataclass(frozen=True)
class SparseFormat:
    """A parsed compressed format: ``kind`` is ``"bitmask"`` or ``"nm"`` (then ``n``/``m`` are set).

    Example:
        >>> parse_format("2:4")
        SparseFormat(kind='nm', n=2, m=4)
        >>> str(parse_format("2:4")), str(parse_format("bitmask"))
        ('2:4', 'bitmask')
    """

    kind: str
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return "bitmask" if self.kind == "bitmask" else f"{self.n}:{self.m}"


def parse_format(fmt: str | SparseFormat) -> SparseFormat:
    """Parse ``"bitmask"`` or ``"N:M"`` (``1 <= N < M <= 256``); raise ``ValueError`` otherwise.

    Example:
        >>> parse_format("bitmask").kind
        'bitmask'
    """
    if isinstance(fmt, SparseFormat):
        return fmt
    if not isinstance(fmt, str):
        raise ValueError(f"sparse_format must be a string like 'bitmask' or '2:4', got {fmt!r}")
    s = fmt.strip().lower()
    if s == "bitmask":
        return SparseFormat("bitmask")
    parts = s.split(":")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 1 <= n < m <= 256:
            return SparseFormat("nm", n, m)
    raise ValueError(
        f"Unknown sparse_format {fmt!r}: expected 'bitmask' (any sparsity) or 'N:M' with 1 <= N < M <= 256, "
        "e.g. '2:4'. The dense format with zeros needs no sparse_format."
    )


def index_bits(m: int) -> int:
    """Bits stored per N:M index: ``ceil(log2(m))`` rounded up to 1, 2, 4 or 8 (so indices never
    straddle a byte).

    Example:
        >>> [index_bits(m) for m in (2, 4, 8, 16, 32)]
        [1, 2, 4, 4, 8]
    """
    need = max(1, math.ceil(math.log2(m)))
    for b in (1, 2, 4, 8):
        if need <= b:
            return b
    raise ValueError(f"M={m} too large for N:M packing (max 256)")


def _check_2d(weight: torch.Tensor, what: str) -> None:
    if weight.dim() != 2:
        raise ValueError(
            f"{what} expects a 2-D [out_features, in_features] weight, got shape {tuple(weight.shape)}"
        )


# ----------------------------------------------------------------------------------------- bitmask


def _pack_bits(bits: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack the last dim of an integer tensor of ``nbits``-bit fields into uint8, LSB first."""
    per = 8 // nbits
    cols = bits.shape[-1]
    pad = (-cols) % per
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.to(torch.int32).reshape(*bits.shape[:-1], -1, per)
    shifts = torch.arange(per, device=bits.device, dtype=torch.int32) * nbits
    return (bits << shifts).sum(-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, nbits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: uint8 ``[..., bytes]`` -> int64 ``[..., cols]``."""
    per = 8 // nbits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * nbits
    fields = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << nbits) - 1)
    return fields.reshape(*packed.shape[:-1], -1)[..., :cols].to(torch.int64)


def pack_bitmask(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2-D weight to ``(bitmask uint8 [out, ceil(in/8)], values [nnz])``.

    Example:
        >>> m, v = pack_bitmask(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        >>> m.flatten().tolist(), v.tolist()
        ([1, 2], [1.0, 2.0])
    """
    _check_2d(weight, "pack_bitmask")
    mask = weight != 0
    return _pack_bits(mask, 1), weight[mask].contiguous()


def bitmask_row_counts(bitmask: torch.Tensor) -> torch.Tensor:
    """Number of kept entries per row (popcount of each row of the packed bitmask), int64 ``[out]``.

    Example:
        >>> bitmask_row_counts(torch.tensor([[255, 1]], dtype=torch.uint8)).tolist()
        [9]
    """
    return _unpack_bits(bitmask, 1, bitmask.shape[-1] * 8).sum(-1)


def unpack_bitmask(
    bitmask: torch.Tensor, values: torch.Tensor, shape: tuple[int, int] | torch.Size
) -> torch.Tensor:
    """Rebuild the dense ``[out, in]`` weight (dtype of ``values``) from a bitmask and values.

    Raises ``ValueError`` when the pieces do not fit together (wrong bitmask shape, bits set in the
    padding, or a ``values`` length different from the number of set bits): corrupt data never
    decodes silently.

    Example:
        >>> unpack_bitmask(torch.tensor([[2]], dtype=torch.uint8), torch.tensor([5.0]), (1, 3)).tolist()
        [[0.0, 5.0, 0.0]]
    """
    out_f, in_f = int(shape[0]), int(shape[1])
    want = (out_f, (in_f + 7) // 8)
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != want:
        raise ValueError(
            f"bitmask must be uint8 of shape {want} for a [{out_f}, {in_f}] weight, "
            f"got {bitmask.dtype} {tuple(bitmask.shape)} (corrupt checkpoint or mismatched shape metadata)"
        )
    if values.dim() != 1:
        raise ValueError(f"bitmask values must be 1-D, got shape {tuple(values.shape)}")
    bits = _unpack_bits(bitmask, 1, want[1] * 8)
    if in_f % 8 and bool(bits[:, in_f:].any()):
        raise ValueError("bitmask has bits set beyond in_features (corrupt checkpoint)")
    mask = bits[:, :in_f].bool()
    nnz = int(mask.sum())
    if nnz != values.numel():
        raise ValueError(
            f"bitmask marks {nnz} kept weights but {values.numel()} values are stored "
            "(corrupt or truncated compressed tensor)"
        )
    dense = torch.zeros(out_f, in_f, dtype=values.dtype, device=values.device)
    dense[mask] = values
    return dense


# --------------------------------------------------------------------------------------------- N:M


def _check_nm(in_features: int, n: int, m: int) -> None:
    if not 1 <= n < m <= 256:
        raise ValueError(f"N:M needs 1 <= N < M <= 256, got {n}:{m}")
    if in_features % m:
        raise ValueError(f"{n}:{m} packing needs in_features divisible by {m}, got {in_features}")


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of ``m`` columns holding more than ``n`` non-zeros (0 means N:M-compliant).

    Example:
        >>> nm_violations(torch.ones(2, 8), 2, 4)
        4
    """
    _check_2d(weight, "nm_violations")
    _check_nm(weight.shape[1], n, m)
    counts = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
    return int((counts > n).sum())


def pack_nm(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress an N:M-sparse 2-D weight to ``(values [out, in*n/m], indices uint8 packed)``.

    Raises ``ValueError`` naming the number of offending groups when the weight is not N:M.

    Example:
        >>> v, i = pack_nm(torch.tensor([[0.0, 7.0, 0.0, 0.0]]), 2, 4)
        >>> v.tolist(), unpack_nm_indices(i, 2, 4, 2).tolist()
        ([[0.0, 7.0]], [[0, 1]])
    """
    _check_2d(weight, "pack_nm")
    _check_nm(weight.shape[1], n, m)
    bad = nm_violations(weight, n, m)
    if bad:
        groups = weight.numel() // m
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} is not {n}:{m} sparse: {bad} of {groups} groups of {m} "
            f"have more than {n} non-zeros. Prune with structure='{n}:{m}' first, or save with "
            "sparse_format='bitmask' (any sparsity)."
        )
    out_f = weight.shape[0]
    groups = weight.reshape(out_f, -1, m)
    pos = torch.arange(m, device=weight.device)
    # kept slots: non-zeros first, then the lowest-numbered zeros; then sorted by column
    key = (groups == 0).to(torch.int64) * m + pos
    idx = key.topk(n, dim=-1, largest=False).indices.sort(dim=-1).values
    values = groups.gather(-1, idx).reshape(out_f, -1).contiguous()
    return values, _pack_bits(idx.reshape(out_f, -1), index_bits(m))


def unpack_nm_indices(indices: torch.Tensor, n: int, m: int, kept_per_row: int) -> torch.Tensor:
    """Unpack N:M indices to int64 ``[out, kept_per_row]`` (values in ``0..m-1``)."""
    return _unpack_bits(indices, index_bits(m), kept_per_row)


def unpack_nm(
    values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int] | torch.Size, n: int, m: int
) -> torch.Tensor:
    """Rebuild the dense ``[out, in]`` weight from N:M ``values`` and packed ``indices``.

    Raises ``ValueError`` on wrong shapes/dtypes, out-of-range indices or indices that are not
    strictly increasing inside a group (what a corrupt or mis-described tensor looks like).

    Example:
        >>> v, i = pack_nm(torch.tensor([[1.0, 0, 0, 2]]), 2, 4)
        >>> unpack_nm(v, i, (1, 4), 2, 4).tolist()
        [[1.0, 0.0, 0.0, 2.0]]
    """
    out_f, in_f = int(shape[0]), int(shape[1])
    _check_nm(in_f, n, m)
    kept = in_f // m * n
    per = 8 // index_bits(m)
    want_v, want_i = (out_f, kept), (out_f, (kept + per - 1) // per)
    if tuple(values.shape) != want_v:
        raise ValueError(
            f"{n}:{m} values must have shape {want_v} for a [{out_f}, {in_f}] weight, got "
            f"{tuple(values.shape)} (corrupt checkpoint or mismatched shape metadata)"
        )
    if indices.dtype != torch.uint8 or tuple(indices.shape) != want_i:
        raise ValueError(
            f"{n}:{m} indices must be uint8 of shape {want_i}, got {indices.dtype} {tuple(indices.shape)} "
            "(corrupt checkpoint or mismatched shape metadata)"
        )
    idx = unpack_nm_indices(indices, n, m, kept).reshape(out_f, -1, n)
    if bool((idx >= m).any()) or (n > 1 and bool((idx[..., 1:] <= idx[..., :-1]).any())):
        raise ValueError(
            f"{n}:{m} indices out of range or not increasing within a group (corrupt checkpoint)"
        )
    dense = torch.zeros(out_f, in_f // m, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx, values.reshape(out_f, -1, n))
    return dense.reshape(out_f, in_f)


# ------------------------------------------------------------------------------------- accounting


def predicted_bytes_per_weight(fmt: str | SparseFormat, itemsize: int, density: float | None = None) -> float:
    """Bytes per weight of a compressed format (ignoring file headers).

    ``density`` (fraction kept) is needed for bitmask; N:M stores ``n/m`` of the weights.

    Example:
        >>> predicted_bytes_per_weight("2:4", 2), predicted_bytes_per_weight("bitmask", 2, 0.5)
        (1.125, 1.125)
    """
    f = parse_format(fmt)
    if f.kind == "bitmask":
        if density is None:
            raise ValueError("bitmask bytes per weight depend on density; pass density=")
        return 1 / 8 + density * itemsize
    frac = f.n / f.m
    return frac * itemsize + frac * index_bits(f.m) / 8


def tensor_nbytes(*tensors: torch.Tensor | None) -> int:
    """Sum of ``numel * element_size`` over tensors (``None`` skipped).

    Example:
        >>> tensor_nbytes(torch.zeros(4, dtype=torch.bfloat16), None)
        8
    """
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
