"""``SparseLinear``: a linear layer that owns compressed sparse weights (bitmask or N:M).

The pure-torch reference forward decompresses the weight and calls ``F.linear``; it is the CPU
path and the ground truth the kernels are tested against. On CUDA, ``forward`` dispatches by
batch size, dtype and format (see :class:`DispatchPolicy`) to

* ``"triton_nm"``: N:M (2:4) decompress-in-register skinny GEMM (batch <= 16),
* ``"triton_bitmask"``: tiled-bitmask unstructured skinny GEMM (batch <= 16, sparsity >= 50 %),
* ``"semi_structured"``: ``torch.sparse.to_sparse_semi_structured`` for 2:4 at large batch,
* ``"dense"``: decompress + cuBLAS for everything else,

and falls back to ``"reference"`` whenever a kernel is unavailable or raises. The path taken by
the last call is in ``module.last_path`` and logged at DEBUG level (logger ``hf_prune.nn``).

Example:
    >>> import torch
    >>> from hf_prune.nn import SparseLinear
    >>> lin = torch.nn.Linear(8, 4, bias=False)
    >>> with torch.no_grad():
    ...     lin.weight[:, ::2] = 0  # 2:4-compliant
    >>> sl = SparseLinear.from_linear(lin, "2:4")
    >>> x = torch.randn(3, 8)
    >>> torch.allclose(sl(x), lin(x)), sl.last_path
    (True, 'reference')
    >>> torch.equal(sl.to_linear().weight, lin.weight)
    True
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from .kernels_loader import load_kernels
from .packing import (
    SparseFormat,
    index_bits,
    pack_bitmask,
    pack_nm,
    parse_format,
    tensor_nbytes,
    unpack_bitmask,
    unpack_nm,
)

__all__ = ["SparseLinear", "DispatchPolicy", "DEFAULT_POLICY", "PATHS"]

logger = logging.getLogger("hf_prune.nn")

PATHS = ("reference", "dense", "triton_nm", "triton_bitmask", "semi_structured")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass
class DispatchPolicy:
    """Knobs of :meth:`SparseLinear.forward`'s kernel choice.

    Attributes:
        max_kernel_batch: rows (tokens) up to which the skinny Triton kernels are used.
        bitmask_min_sparsity: below this the bitmask kernel is not worth it; use dense.
        use_semi_structured: allow ``to_sparse_semi_structured`` for 2:4 at large batch.
        allow_cpu_kernels: run Triton kernels on CPU tensors (only meaningful with
            ``TRITON_INTERPRET=1``; for tests).
        force: force one path from :data:`PATHS` (still falls back to reference on failure).

    Example:
        >>> DispatchPolicy(max_kernel_batch=8).max_kernel_batch
        8
    """

    max_kernel_batch: int = 16
    bitmask_min_sparsity: float = 0.5
    use_semi_structured: bool = True
    allow_cpu_kernels: bool = False
    force: str | None = None


DEFAULT_POLICY = DispatchPolicy()
"""Module-level defaults: every new `SparseLinear` gets its own copy (as ``module.policy``), so changing one
layer's policy never changes another's. Changing ``DEFAULT_POLICY`` affects the layers built afterwards."""


class SparseLinear(nn.Module):
    """Linear layer with a compressed sparse weight; drop-in for ``nn.Linear`` at inference.

    Buffers (persistent, saved in the state dict):
      * bitmask: ``weight_bitmask`` uint8 ``[out, ceil(in/8)]``, ``weight_values`` ``[nnz]``;
      * N:M: ``weight_values`` ``[out, in*n/m]``, ``weight_indices`` uint8 (packed indices).
    A freshly constructed module has zero-size buffers ("not loaded"); :meth:`from_linear` or a
    state-dict load fills them and :meth:`validate` checks they fit together.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(16, 3)
        >>> with torch.no_grad():
        ...     lin.weight[lin.weight.abs() < 0.1] = 0
        >>> sl = SparseLinear.from_linear(lin, "bitmask")
        >>> sl  # doctest: +ELLIPSIS
        SparseLinear(in_features=16, out_features=3, bias=True, format=bitmask, ...)
        >>> torch.equal(sl.dense_weight(), lin.weight.detach())
        True
    """

    last_path: str | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        sparse_format: str | SparseFormat = "2:4",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.format = parse_format(sparse_format)
        dtype = dtype or torch.get_default_dtype()
        empty_u8 = torch.empty(0, dtype=torch.uint8, device=device)
        self.register_buffer("weight_values", torch.empty(0, dtype=dtype, device=device))
        if self.format.kind == "bitmask":
            self.register_buffer("weight_bitmask", empty_u8)
        else:
            if self.in_features % self.format.m:
                raise ValueError(
                    f"{self.format} needs in_features divisible by {self.format.m}, got {in_features}"
                )
            self.register_buffer("weight_indices", empty_u8)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.policy = dataclasses.replace(DEFAULT_POLICY)  # own copy: per-layer changes stay per layer
        self.last_path = None
        self._failed_paths: set[str] = set()
        self._aux: dict = {}

    # ------------------------------------------------------------------ construction / conversion
    @classmethod
    def from_linear(
        cls, linear: nn.Linear | SparseLinear, sparse_format: str | SparseFormat, *, share_bias: bool = False
    ) -> SparseLinear:
        """Compress an ``nn.Linear`` (its zeros define the mask), or re-compress a `SparseLinear` into
        ``sparse_format``; raises ``ValueError`` if the weight does not satisfy an N:M format.

        The bias is copied, or with ``share_bias=True`` the new module holds the same bias parameter (no
        copy; for a short-lived view such as a compressed save).

        Example:
            >>> SparseLinear.from_linear(torch.nn.Linear(4, 2, bias=False), "bitmask").sparsity
            0.0
            >>> lin = torch.nn.Linear(8, 2)
            >>> SparseLinear.from_linear(lin, "bitmask", share_bias=True).bias is lin.bias
            True
        """
        w = linear.dense_weight() if isinstance(linear, SparseLinear) else linear.weight.detach()
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            sparse_format=sparse_format,
            device=w.device,
            dtype=w.dtype,
        )
        mod.load_compressed(**cls.compress_weight(w, mod.format))
        if linear.bias is not None:
            if share_bias:
                mod.bias = linear.bias
            else:
                mod.bias.data.copy_(linear.bias.detach())
        return mod

    @staticmethod
    def compress_weight(weight: torch.Tensor, sparse_format: str | SparseFormat) -> dict[str, torch.Tensor]:
        """Return the buffer dict (names as in the state dict) for a dense 2-D weight.

        Example:
            >>> sorted(SparseLinear.compress_weight(torch.zeros(2, 8), "bitmask"))
            ['weight_bitmask', 'weight_values']
        """
        fmt = parse_format(sparse_format)
        if fmt.kind == "bitmask":
            bitmask, values = pack_bitmask(weight)
            return {"weight_bitmask": bitmask, "weight_values": values}
        values, indices = pack_nm(weight, fmt.n, fmt.m)
        return {"weight_values": values, "weight_indices": indices}

    @property
    def compressed_names(self) -> tuple[str, ...]:
        """Names of the compressed buffers of this format."""
        return (
            ("weight_bitmask", "weight_values")
            if self.format.kind == "bitmask"
            else (
                "weight_values",
                "weight_indices",
            )
        )

    def load_compressed(self, **tensors: torch.Tensor) -> None:
        """Set the compressed buffers (exact names from :attr:`compressed_names`) and validate."""
        unknown = set(tensors) - set(self.compressed_names)
        if unknown or set(tensors) != set(self.compressed_names):
            raise ValueError(f"expected tensors {self.compressed_names}, got {sorted(tensors)}")
        for name, t in tensors.items():
            setattr(self, name, t)
        self._aux.clear()
        self.validate()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Compressed buffers are data-sized (nnz): adopt the incoming tensors instead of copying into
        # the existing ones, so ``load_state_dict`` works on a freshly constructed module.
        for name in self.compressed_names:
            key = prefix + name
            if key in state_dict:
                cur = getattr(self, name)
                new = state_dict[key]
                device = cur.device if cur.device.type != "meta" else new.device
                dtype = cur.dtype if name == "weight_values" else new.dtype
                setattr(self, name, new.detach().to(device=device, dtype=dtype).clone())
        self._aux.clear()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def dense_weight(self) -> torch.Tensor:
        """Decompress to the dense ``[out, in]`` weight (dtype of the stored values). Pure torch."""
        shape = (self.out_features, self.in_features)
        if self.format.kind == "bitmask":
            return unpack_bitmask(self.weight_bitmask, self.weight_values, shape)
        return unpack_nm(self.weight_values, self.weight_indices, shape, self.format.n, self.format.m)

    def validate(self) -> None:
        """Raise ``ValueError`` if the buffers are missing, truncated or do not match the shape."""
        if any(getattr(self, n).device.type == "meta" for n in self.compressed_names):
            raise ValueError("compressed tensors were never loaded (still on the meta device)")
        self.dense_weight()  # unpack_* check shapes, counts and index ranges

    def to_linear(self) -> nn.Linear:
        """Return an equivalent dense ``nn.Linear`` (exact zeros where pruned).

        Example:
            >>> SparseLinear.from_linear(torch.nn.Linear(8, 2), "bitmask").to_linear().weight.shape
            torch.Size([2, 8])
        """
        w = self.dense_weight()
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ----------------------------------------------------------------------------- accounting
    @property
    def sparsity(self) -> float:
        """Fraction of zero weights (bitmask: exact; N:M: nominal ``1 - n/m``)."""
        total = self.out_features * self.in_features
        if self.format.kind == "bitmask":
            return 1.0 - self.weight_values.numel() / total if total else 0.0
        return 1.0 - self.format.n / self.format.m

    def compressed_nbytes(self) -> int:
        """Bytes of the compressed weight buffers (bias excluded)."""
        return tensor_nbytes(*(getattr(self, n) for n in self.compressed_names))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.format}, sparsity={self.sparsity:.3f}"
        )

    # -------------------------------------------------------------------------------- forward
    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Ground truth: decompress, then ``F.linear`` in ``x``'s dtype."""
        w = self.dense_weight().to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)

    def choose_path(self, x2d: torch.Tensor) -> str:
        """Pick the forward path for a ``[tokens, in]`` input (see module docstring)."""
        p = self.policy
        on_cpu_interp = (
            x2d.device.type == "cpu" and p.allow_cpu_kernels and os.environ.get("TRITON_INTERPRET") == "1"
        )
        if not (x2d.is_cuda or on_cpu_interp) or x2d.dtype not in _KERNEL_DTYPES:
            return "reference"
        if p.force is not None:
            return p.force
        tokens = x2d.shape[0]
        if tokens <= p.max_kernel_batch:
            if self.format.kind == "nm" and index_bits(self.format.m) <= 8:
                return "triton_nm"
            if self.format.kind == "bitmask" and self.sparsity >= p.bitmask_min_sparsity:
                return "triton_bitmask"
            return "dense"
        if (
            p.use_semi_structured
            and x2d.is_cuda
            and (self.format.n, self.format.m) == (2, 4)
            and x2d.dtype in (torch.float16, torch.bfloat16)
        ):
            return "semi_structured"
        return "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        path = self.choose_path(x2d)
        if path in self._failed_paths:
            path = "reference"
        if path not in ("reference", "dense"):
            try:
                y2d = self._kernel_forward(path, x2d)
            except Exception as exc:  # noqa: BLE001 - any kernel failure falls back to the reference
                logger.warning(
                    "SparseLinear: path %s failed (%s: %s); using reference", path, type(exc).__name__, exc
                )
                self._failed_paths.add(path)
                path = "reference"
            else:
                self._record(path, x2d)
                return y2d.reshape(*x.shape[:-1], self.out_features)
        self._record(path, x2d)
        return self.reference_forward(x)

    def _record(self, path: str, x2d: torch.Tensor) -> None:
        self.last_path = path
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "SparseLinear[%dx%d %s] tokens=%d dtype=%s device=%s -> %s",
                self.out_features,
                self.in_features,
                self.format,
                x2d.shape[0],
                x2d.dtype,
                x2d.device,
                path,
            )

    def _kernel_forward(self, path: str, x2d: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x2d.dtype) if self.bias is not None else None
        if path == "semi_structured":
            key = ("semi", x2d.device, x2d.dtype)
            if key not in self._aux:
                from torch.sparse import to_sparse_semi_structured

                self._aux[key] = to_sparse_semi_structured(self.dense_weight().to(x2d.dtype))
            return F.linear(x2d, self._aux[key], bias)
        k = load_kernels()
        values = self.weight_values.to(x2d.dtype)
        if path == "triton_nm":
            return k.nm_linear(
                x2d,
                values,
                self.weight_indices,
                self.format.n,
                self.format.m,
                self.out_features,
                self.in_features,
                bias,
            )
        if path == "triton_bitmask":
            key = (
                "tiles",
                self.weight_bitmask.device,
                self.weight_bitmask.data_ptr(),
                self.weight_bitmask._version,
            )
            if key not in self._aux:
                self._aux = {k_: v for k_, v in self._aux.items() if k_[0] != "tiles"}
                self._aux[key] = k.bitmask_tile_offsets(self.weight_bitmask)
            return k.bitmask_linear(
                x2d, self.weight_bitmask, values, self._aux[key], self.out_features, self.in_features, bias
            )
        raise ValueError(f"unknown SparseLinear path {path!r}; expected one of {PATHS}")
