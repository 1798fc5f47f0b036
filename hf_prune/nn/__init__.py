"""Sparse modules: :class:`SparseLinear` (compressed bitmask / N:M weights, kernel dispatch).

Example:
    >>> from hf_prune.nn import SparseLinear, DispatchPolicy
    >>> SparseLinear(8, 4, sparse_format="2:4").format.n
    2
"""

from .kernels_loader import kernels_available, load_kernels
from .sparse_linear import DEFAULT_POLICY, PATHS, DispatchPolicy, SparseLinear

__all__ = ["SparseLinear", "DispatchPolicy", "DEFAULT_POLICY", "PATHS", "load_kernels", "kernels_available"]
