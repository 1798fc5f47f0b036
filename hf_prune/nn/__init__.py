"""Sparse modules: :class:`SparseLinear` (compressed bitmask / N:M weights, a per-layer policy for what it holds at
inference, kernel dispatch), `set_policy` for a whole model, the CPU CSR forward (:mod:`hf_prune.nn.cpu_sparse`)
and the pure tensor math of the layouts (:mod:`hf_prune.nn.packing`). Imports nothing from
:mod:`hf_prune.formats`, which builds the ``from_pretrained`` integration on top of this package.

Example:
    >>> from hf_prune.nn import SparseLinear, KernelDispatch
    >>> SparseLinear(8, 4, sparse_format="2:4").format.n
    2
"""

from .kernels_loader import kernels_available, load_kernels
from .policy import PolicySummary, set_policy
from .sparse_linear import PATHS, POLICIES, KernelDispatch, SparseLinear, check_policy

__all__ = ["SparseLinear", "KernelDispatch", "PATHS", "POLICIES", "check_policy", "set_policy", "PolicySummary",
           "load_kernels", "kernels_available"]
