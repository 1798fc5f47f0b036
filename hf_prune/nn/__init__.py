"""Sparse modules: :class:`SparseLinear` (compressed bitmask / N:M weights, kernel dispatch) and the pure
tensor math of its layouts (:mod:`hf_prune.nn.packing`). Imports nothing from :mod:`hf_prune.formats`,
which builds the ``from_pretrained`` integration on top of this package.

Example:
    >>> from hf_prune.nn import SparseLinear, DispatchPolicy
    >>> SparseLinear(8, 4, sparse_format="2:4").format.n
    2
"""

from .kernels_loader import kernels_available, load_kernels
from .sparse_linear import DEFAULT_POLICY, PATHS, DispatchPolicy, SparseLinear

__all__ = ["SparseLinear", "DispatchPolicy", "DEFAULT_POLICY", "PATHS", "load_kernels", "kernels_available"]
