"""One policy for every compressed layer of a model (`set_policy`): what they hold and run at inference, applied
at load by the ``hf_prune_sparse`` quantizer and callable afterwards. The choice and its cost are reported in
one message.

Example:
    >>> import torch
    >>> from hf_prune.nn import SparseLinear
    >>> from hf_prune.nn.policy import set_policy
    >>> model = torch.nn.Sequential(SparseLinear.from_linear(torch.nn.Linear(8, 4), "bitmask"))
    >>> set_policy(model, "memory", verbose=False).effective
    {'memory': 1}
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import sys

from torch import nn

from .sparse_linear import SparseLinear, check_policy

__all__ = ["set_policy", "PolicySummary"]

logger = logging.getLogger("hf_prune.nn")

_WHAT = {
    "speed": "decompressed once into dense weights: dense speed and dense memory; saving again re-compresses",
    "memory": "kept compressed: least memory, but every forward decompresses each weight "
              "(on CPU several times slower than dense)",
    "kernel": "sparse kernels where they beat dense",
}


@dataclasses.dataclass
class PolicySummary:
    """What `set_policy` did: the policy asked for, how many layers ended in each policy (``"kernel"`` falls back
    to ``"speed"`` per layer where no kernel applies or none beats dense), and the bytes the layers' weights take
    now against the dense weights they stand for."""

    requested: str
    effective: dict[str, int]
    held_bytes: int
    dense_bytes: int
    sparse_format: str

    def message(self) -> str:
        """The load message: one line per policy in effect, with its cost."""
        n = sum(self.effective.values())
        parts = [f"hf_prune: {n} compressed layers ({self.sparse_format}) run with policy={self.requested!r}"]
        for policy, count in sorted(self.effective.items()):
            parts.append(f"  {count} layer(s) {policy}: {_WHAT[policy]}")
        if self.requested == "kernel" and self.effective.get("speed"):
            parts.append(f"  ({self.effective['speed']} layer(s) fell back to 'speed': no kernel for this format "
                         "on this device, or the kernel measured slower than dense there)")
        parts.append(f"  weights held: {self.held_bytes / 2**20:.1f} MiB (dense: {self.dense_bytes / 2**20:.1f} MiB)."
                     " Other choices: from_pretrained(..., quantization_config=HfPruneSparseConfig(policy="
                     "'speed'|'memory'|'kernel')) or hf_prune.nn.set_policy(model, ...)")
        return "\n".join(parts)


def _release_freed_memory() -> None:
    """Hand the buffers a policy change freed back to the OS. glibc keeps freed heap memory for reuse, so without
    this a model whose layers were decompressed (or converted to CSR) keeps the resident size of every transient
    copy; measured on SmolLM2 at 90% with ``kernel``: 744 MiB resident after load, 357 MiB after the trim."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl or another libc: nothing to trim
            pass


def set_policy(model: nn.Module, policy: str, *, verbose: bool = True) -> PolicySummary:
    """Apply ``policy`` (``"auto"``, ``"speed"``, ``"memory"`` or ``"kernel"``; see `hf_prune.nn.sparse_linear`)
    to every `SparseLinear` in ``model`` and return what took effect. With ``verbose`` the summary is logged once
    (logger ``hf_prune.nn``, at WARNING so that it shows by default, like transformers' own load messages)."""
    check_policy(policy)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    effective: dict[str, int] = {}
    held = dense = 0
    formats = set()
    tuning: dict = {}  # CPU kernel timings, shared by layers of the same shape and density
    for layer in layers:
        got = layer.apply_policy(policy, tuning)
        effective[got] = effective.get(got, 0) + 1
        held += layer.held_nbytes()
        dense += layer.out_features * layer.in_features * layer.weight_values.element_size()
        formats.add(str(layer.format))
    _release_freed_memory()
    summary = PolicySummary(policy, effective, held, dense, ", ".join(sorted(formats)) or "none")
    if verbose and layers:
        logger.warning(summary.message())
    return summary
