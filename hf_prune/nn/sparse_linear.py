"""``SparseLinear``: a linear layer that owns compressed sparse weights (bitmask or N:M).

What the layer holds at run time is its **policy**, chosen once per layer (`apply_policy`; at load through
``quantization_config=HfPruneSparseConfig(policy=...)``, see `hf_prune.formats`):

* ``"speed"``: the weight decompressed once into a dense tensor (exact zeros kept); forward is ``F.linear``,
  as fast as the dense model. The compressed buffers are dropped and rebuilt from the dense weight when the
  model is saved, so saving again re-compresses. The default on CPU and wherever no sparse kernel beats dense.
* ``"memory"``: only the compressed buffers; every forward decompresses the weight (the pure-torch reference
  below) or, on CUDA, runs a sparse kernel. Least memory; on CPU several times slower than dense.
* ``"kernel"``: sparse kernels where they are faster: the CUDA/Triton paths below; on CPU a CSR product
  (`hf_prune.nn.cpu_sparse`) for the layers and token counts where timing it against dense on the layer itself
  shows that it wins; every other layer behaves as ``"speed"``.
* ``"auto"``: ``"kernel"`` on CUDA with the kernels available, else ``"speed"``.

A freshly constructed module (as built before a checkpoint loads) is in ``"memory"``.

The pure-torch reference forward decompresses the weight and calls ``F.linear``; it is the ground
truth the kernels are tested against. With compressed storage on CUDA, ``forward`` dispatches by
batch size, dtype and format (see :class:`KernelDispatch`) to

* ``"triton_nm"``: N:M (2:4) decompress-in-register skinny GEMM (batch <= 16),
* ``"triton_bitmask"``: tiled-bitmask unstructured skinny GEMM (batch <= 16, sparsity >= 50 %),
* ``"semi_structured"``: ``torch.sparse.to_sparse_semi_structured`` for 2:4 at large batch,
* ``"dense"``: decompress + cuBLAS for everything else,

and falls back to ``"reference"`` whenever a kernel is unavailable or raises. Held dense weights run as
``"decompressed"``, the CPU CSR product as ``"cpu_csr"``. The path taken by the last call is in
``module.last_path`` and logged at DEBUG level (logger ``hf_prune.nn``).

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
    >>> sl.apply_policy("speed"); torch.allclose(sl(x), lin(x)), sl.last_path
    'speed'
    (True, 'decompressed')
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_sparse
from .kernels_loader import kernels_available, load_kernels
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

__all__ = ["SparseLinear", "KernelDispatch", "PATHS", "POLICIES", "check_policy"]

logger = logging.getLogger("hf_prune.nn")

PATHS = ("reference", "dense", "decompressed", "cpu_csr", "triton_nm", "triton_bitmask", "semi_structured")
#: what a compressed layer holds and runs at inference (module docstring)
POLICIES = ("auto", "speed", "memory", "kernel")


def check_policy(policy: object) -> str:
    """Return ``policy`` if it is one of `POLICIES`, else raise ``ValueError`` naming the allowed values.

    Example:
        >>> check_policy("speed")
        'speed'
    """
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(
            f"policy={policy!r} is not a compressed-layer policy; use one of {POLICIES}: 'speed' decompresses "
            "once at load (dense speed and memory), 'memory' keeps the weights compressed and decompresses per "
            "call (least memory, slower), 'kernel' uses sparse kernels where they beat dense, 'auto' = 'kernel' "
            "on CUDA with kernels, else 'speed'"
        )
    return policy
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass
class KernelDispatch:
    """Knobs of :meth:`SparseLinear.forward`'s kernel choice (each layer holds its own, ``module.dispatch``).

    Attributes:
        max_kernel_batch: rows (tokens) up to which the skinny Triton kernels are used.
        bitmask_min_sparsity: below this the bitmask kernel is not worth it; use dense.
        use_semi_structured: allow ``to_sparse_semi_structured`` for 2:4 at large batch.
        allow_cpu_kernels: run Triton kernels on CPU tensors (only meaningful with
            ``TRITON_INTERPRET=1``; for tests).
        force: force one path from :data:`PATHS` (still falls back to reference on failure).
        max_cpu_decode_tokens: under ``policy="kernel"`` on CPU, inputs of at most this many rows count as
            decode (the CSR product is timed at 1 row), larger ones as prefill (timed at ``cpu_prefill_tokens``).

    Example:
        >>> KernelDispatch(max_kernel_batch=8).max_kernel_batch
        8
    """

    max_kernel_batch: int = 16
    bitmask_min_sparsity: float = 0.5
    use_semi_structured: bool = True
    allow_cpu_kernels: bool = False
    force: str | None = None
    max_cpu_decode_tokens: int = 8
    cpu_prefill_tokens: int = 256


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
    weight: torch.Tensor | None
    weight_csr: torch.Tensor | None

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
        # Run-time forms of the weight, never saved (the state dict always holds the compressed buffers):
        self.register_buffer("weight", None, persistent=False)  # dense, decompressed once ("speed"/"kernel")
        self.register_buffer("weight_csr", None, persistent=False)  # CSR for the CPU kernel ("kernel")
        self.policy = "memory"
        self.dispatch = KernelDispatch()
        self.last_path = None
        self._compressed_dropped = False  # compressed buffers freed; rebuilt from `weight` when saving
        self._speed = False  # "speed" with a held dense weight: forward is F.linear and nothing else
        self._nnz: int | None = None
        self._csr_decode = self._csr_prefill = False
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
        """Set the compressed buffers (exact names from :attr:`compressed_names`) and validate; the layer keeps
        its policy (run-time forms are rebuilt from the new weights)."""
        unknown = set(tensors) - set(self.compressed_names)
        if unknown or set(tensors) != set(self.compressed_names):
            raise ValueError(f"expected tensors {self.compressed_names}, got {sorted(tensors)}")
        for name, t in tensors.items():
            setattr(self, name, t)
        self._after_new_compressed()

    def _after_new_compressed(self) -> None:
        self._aux.clear()
        self._speed = False
        self._compressed_dropped = False
        self.weight = self.weight_csr = None
        self.validate()
        if self.policy != "memory":
            self.apply_policy(self.policy)

    def compressed_tensors(self) -> dict[str, torch.Tensor]:
        """The compressed buffers as saved: the held ones, or rebuilt from the dense weight when the policy
        dropped them (same zeros, so a saved model re-compresses)."""
        if self._compressed_dropped:
            return self.compress_weight(self.dense_weight(), self.format)
        return {n: getattr(self, n) for n in self.compressed_names}

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._compressed_dropped:
            for name, t in self.compressed_tensors().items():
                destination[prefix + name] = t

    # ------------------------------------------------------------------------------- policies
    def apply_policy(self, policy: str, tuning: dict | None = None) -> str:
        """Hold the weight as ``policy`` says (module docstring) and return the policy in effect: ``"kernel"``
        falls back to ``"speed"`` for a layer where no kernel applies or none beats dense (`kernel_available`).
        ``tuning``: a dict shared by the layers of one model, so that the CPU timing runs once per distinct
        (shape, density, dtype) instead of once per layer.

        Example:
            >>> lin = torch.nn.Linear(8, 4); sl = SparseLinear.from_linear(lin, "bitmask")
            >>> sl.apply_policy("speed"), sl.weight is not None, sl.weight_values.numel()
            ('speed', True, 0)
            >>> sl.apply_policy("memory"), sl.weight is None, sl.weight_values.numel()
            ('memory', True, 32)
        """
        policy = check_policy(policy)
        device = self._storage_device()
        if policy == "auto":
            policy = "kernel" if device.type == "cuda" and kernels_available() else "speed"
        if policy == "kernel" and not self._choose_kernels(device, {} if tuning is None else tuning):
            policy = "speed"
        if policy == "memory":
            self._restore_compressed()
            self.weight = self.weight_csr = None
        elif policy == "speed":
            self._hold_dense()
            self.weight_csr = None
            self._drop_compressed()
        self.policy = policy
        self._speed = policy == "speed" and self.weight is not None and self.weight_csr is None
        self._aux.clear()
        return policy

    def _storage_device(self) -> torch.device:
        held = self.weight if self.weight is not None else self.weight_csr
        return held.device if held is not None else self.weight_values.device

    def _hold_dense(self) -> None:
        if self.weight is None:
            self.weight = self.dense_weight().detach().clone()

    def _drop_compressed(self) -> None:
        if self._compressed_dropped:
            return
        self._nnz = self._stored_nnz()
        for name in self.compressed_names:
            t = getattr(self, name)
            setattr(self, name, t.new_empty(0))
        self._compressed_dropped = True

    def _restore_compressed(self) -> None:
        if self._compressed_dropped:
            for name, t in self.compressed_tensors().items():
                setattr(self, name, t)
            self._compressed_dropped = False

    def _stored_nnz(self) -> int:
        if self._compressed_dropped:
            return int(self._nnz or 0)
        return int(self.weight_values.numel())

    def kernel_available(self, device: torch.device | str) -> bool:
        """Whether a sparse kernel exists for this layer's format on ``device`` (CUDA: the Triton kernels for
        N:M with M <= 16 and bitmask at >= ``dispatch.bitmask_min_sparsity``; CPU: the CSR product for float32
        weights). Whether it *wins* is decided by `apply_policy`."""
        device = torch.device(device)
        if device.type == "cuda":
            if not kernels_available():
                return False
            if self.format.kind == "nm":
                return index_bits(self.format.m) <= 8
            return self.sparsity >= self.dispatch.bitmask_min_sparsity
        if device.type == "cpu":
            return self.weight_values.dtype in cpu_sparse.CSR_DTYPES
        return False

    def _choose_kernels(self, device: torch.device, tuning: dict) -> bool:
        """Set up ``"kernel"`` storage; False when no kernel applies or (CPU) none beats dense on this layer."""
        if not self.kernel_available(device):
            return False
        if device.type == "cuda":
            self._restore_compressed()
            self.weight = self.weight_csr = None
            return True
        dense = self.dense_weight().detach()
        csr = cpu_sparse.to_csr(dense)
        d = self.dispatch
        key = (tuple(dense.shape), round(csr.values().numel() / max(dense.numel(), 1), 2), dense.dtype,
               d.cpu_prefill_tokens, torch.get_num_threads())
        if key not in tuning:
            tuning[key] = (cpu_sparse.faster_than_dense(dense, csr, tokens=1)[0],
                           cpu_sparse.faster_than_dense(dense, csr, tokens=d.cpu_prefill_tokens, reps=5)[0])
        self._csr_decode, self._csr_prefill = tuning[key]
        if not (self._csr_decode or self._csr_prefill):
            return False
        self.weight_csr = csr
        # keep a dense copy only for the token counts where the CSR product does not win
        self.weight = None if (self._csr_decode and self._csr_prefill) else dense.clone()
        self._drop_compressed()
        return True

    def held_nbytes(self) -> int:
        """Bytes of the weight as this layer holds it now (compressed buffers, dense copy, CSR; bias excluded)."""
        n = 0 if self._compressed_dropped else tensor_nbytes(*(getattr(self, x) for x in self.compressed_names))
        if self.weight is not None:
            n += self.weight.numel() * self.weight.element_size()
        if self.weight_csr is not None:
            n += cpu_sparse.csr_nbytes(self.weight_csr)
        return n

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
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if all(prefix + n in state_dict for n in self.compressed_names):
            self._compressed_dropped = False
            self.weight = self.weight_csr = None
            self._speed = False
            self._aux.clear()
            if self.policy != "memory":  # rebuild the run-time form of the new weights
                self.apply_policy(self.policy)

    def dense_weight(self) -> torch.Tensor:
        """Decompress to the dense ``[out, in]`` weight (dtype of the stored values). Pure torch."""
        if self.weight is not None:
            return self.weight
        if self._compressed_dropped and self.weight_csr is not None:
            return self.weight_csr.to_dense()
        shape = (self.out_features, self.in_features)
        if self.format.kind == "bitmask":
            return unpack_bitmask(self.weight_bitmask, self.weight_values, shape)
        return unpack_nm(self.weight_values, self.weight_indices, shape, self.format.n, self.format.m)

    def validate(self) -> None:
        """Raise ``ValueError`` if the buffers are missing, truncated or do not match the shape."""
        if self._compressed_dropped:
            if tuple(self.dense_weight().shape) != (self.out_features, self.in_features):
                raise ValueError(f"held weight has shape {tuple(self.dense_weight().shape)}, expected "
                                 f"{(self.out_features, self.in_features)}")
            return
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
            return 1.0 - self._stored_nnz() / total if total else 0.0
        return 1.0 - self.format.n / self.format.m

    def compressed_nbytes(self) -> int:
        """Bytes of the compressed weight buffers as saved (bias excluded), whatever the policy holds."""
        return tensor_nbytes(*self.compressed_tensors().values())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.format}, sparsity={self.sparsity:.3f}, policy={self.policy}"
        )

    # -------------------------------------------------------------------------------- forward
    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Ground truth: decompress, then ``F.linear`` in ``x``'s dtype."""
        w = self.dense_weight().to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)

    def choose_path(self, x2d: torch.Tensor) -> str:
        """Pick the forward path for a ``[tokens, in]`` input (see module docstring)."""
        if self.weight_csr is not None and x2d.device.type == "cpu" and x2d.dtype == self.weight_csr.dtype:
            small = x2d.shape[0] <= self.dispatch.max_cpu_decode_tokens
            if self._csr_decode if small else self._csr_prefill:
                return "cpu_csr"
        if self.weight is not None:
            return "decompressed"
        if self._compressed_dropped:
            return "reference"  # CSR held but not usable for this input: densify it for the call
        p = self.dispatch
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
        if self._speed:  # the dense model's forward and nothing else (plain attribute reads, no setattr hooks)
            w = self.weight
            self.__dict__["last_path"] = "decompressed"
            if w.dtype == x.dtype:
                return F.linear(x, w, self.bias)
            return F.linear(x, w.to(x.dtype), self._bias_for(x))
        x2d = x.reshape(-1, self.in_features)
        path = self.choose_path(x2d)
        if path in self._failed_paths:
            path = "reference"
        if path in ("decompressed", "cpu_csr"):
            self._record(path, x2d)
            if path == "cpu_csr":
                y2d = cpu_sparse.csr_linear(x2d, self.weight_csr, self._bias_for(x2d))
                return y2d.reshape(*x.shape[:-1], self.out_features)
            w = self.weight
            return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), self._bias_for(x))
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

    def _bias_for(self, x: torch.Tensor) -> torch.Tensor | None:
        b = self.bias
        return b if b is None or b.dtype == x.dtype else b.to(x.dtype)

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
