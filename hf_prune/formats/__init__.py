"""Compressed sparse checkpoints (bitmask, N:M) loadable through ``from_pretrained``.

Importing this package registers the ``hf_prune_sparse`` quantization method with
transformers (see :func:`register`, idempotent). The packing math and the layer live in
:mod:`hf_prune.nn` (``hf_prune.nn.packing``, ``hf_prune.nn.SparseLinear``); this package builds on them
and re-exports the packing functions.

Example:
    >>> import hf_prune.formats as f
    >>> f.register()
    >>> f.predicted_bytes_per_weight("2:4", 2)
    1.125
"""

from ..nn.packing import (
    SparseFormat,
    is_nm_sparse,
    pack_bitmask,
    pack_nm,
    parse_format,
    predicted_bytes_per_weight,
    unpack_bitmask,
    unpack_nm,
)
from .quantizer import QUANT_METHOD, HfPruneSparseConfig, HfPruneSparseQuantizer, register
from .save import save_sparse_pretrained, select_modules

register()

__all__ = [
    "SparseFormat",
    "parse_format",
    "pack_bitmask",
    "unpack_bitmask",
    "pack_nm",
    "unpack_nm",
    "is_nm_sparse",
    "predicted_bytes_per_weight",
    "QUANT_METHOD",
    "HfPruneSparseConfig",
    "HfPruneSparseQuantizer",
    "register",
    "save_sparse_pretrained",
    "select_modules",
]
