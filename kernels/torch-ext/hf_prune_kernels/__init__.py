"""hf_prune sparse kernels (Triton): N:M and tiled-bitmask skinny GEMMs for decode.

Kernel-builder layout (``kernels/build.toml``); pure Triton, so the package also imports
straight from ``kernels/torch-ext`` (what ``hf_prune.nn.kernels_loader`` does). On CPU the kernels
run under ``TRITON_INTERPRET=1`` (slow, for tests only).

Example (GPU, or CPU with TRITON_INTERPRET=1):
    >>> import torch, hf_prune_kernels as K  # doctest: +SKIP
    >>> y = K.nm_linear(x, values, indices, 2, 4, out_f, in_f)  # doctest: +SKIP
"""

from .bitmask import BITMASK_BLOCK_K, bitmask_linear, bitmask_tile_offsets
from .nm import index_bits, nm_linear

__all__ = ["nm_linear", "bitmask_linear", "bitmask_tile_offsets", "index_bits", "BITMASK_BLOCK_K"]
__version__ = "0.1.0"
