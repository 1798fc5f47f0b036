"""Which rows and columns of which projections make up each removable width unit (LLM-Pruner's dependency groups).

* MLP channel ``j``: row ``j`` of every input projection (gate/up/fc, both halves of a fused gate_up) and column
  ``j`` of the output projection;
* query head ``h``: its ``head_dim`` rows of q (or of the fused qkv) and its ``head_dim`` columns of the output
  projection; key/value head ``k``: its rows of k and v.

Scoring code sums per-element importances over these groups through a `GroupTerms` object (Taylor's ``w * g``,
LoRAPrune's LoRA-estimated ``|G ⊙ W|``); `projection_cuts` gives the rows and columns each projection keeps after a
cut, for whatever must be sliced along with the weights (e.g. LoRA adapters). Pure index math.

Example:
    >>> unit_rows(0, 2, 3).tolist()                 # units of 3 rows each
    [[0, 1, 2], [3, 4, 5]]
    >>> unit_rows(1, 2, 1, stride=3).tolist()       # the second row of each 3-row unit
    [[1], [4]]
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..errors import ConfigError
from . import modeling_hf_prune as shipped
from .plan import AttentionSpec, BlockSpec, LayerPlan, MlpSpec


class GroupTerms(Protocol):
    """Per-unit sums of an element-wise importance over one projection's weight."""

    def terms(self, path: str, index: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(signed sum, absolute sum)`` per unit of the importance of module ``path`` (``[out, in]`` orientation);
        ``index`` is ``[units, k]``, positions along ``dim`` (0: rows, 1: columns)."""
        ...


def unit_rows(start: int, units: int, size: int, stride: int | None = None) -> torch.Tensor:
    """``[units, size]`` row indices: unit u owns ``start + u*stride .. + size`` (stride defaults to size)."""
    stride = size if stride is None else stride
    return start + torch.arange(units).view(-1, 1) * stride + torch.arange(size).view(1, -1)


def mlp_group_terms(t: GroupTerms, m: MlpSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(signed, absolute)`` per MLP channel, summed over its input rows and output column."""
    n = m.intermediate
    rows = torch.arange(n).view(-1, 1)
    parts = [t.terms(p, rows, 0) for p in m.inputs]
    if m.fused_gate_up:
        parts.append(t.terms(m.fused_gate_up, torch.cat([rows, rows + n], 1), 0))
    parts.append(t.terms(m.output, rows, 1))
    return sum(p[0] for p in parts), sum(p[1] for p in parts)  # type: ignore[return-value]


def attention_group_terms(
    t: GroupTerms, a: AttentionSpec
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((signed, absolute) per query head: q rows + o columns, (signed, absolute) per kv head: k + v rows)``."""
    h, kv, d = a.num_heads, a.num_kv_heads, a.head_dim
    o = t.terms(a.o, unit_rows(0, h, d), 1)
    if a.qkv is None:
        q = t.terms(a.q, unit_rows(0, h, d), 0)  # type: ignore[arg-type]
        k = t.terms(a.k, unit_rows(0, kv, d), 0)  # type: ignore[arg-type]
        v = t.terms(a.v, unit_rows(0, kv, d), 0)  # type: ignore[arg-type]
    elif a.qkv_layout == "interleaved":
        if kv != h:
            raise ConfigError(f"{a.module}: interleaved qkv with grouped kv heads is not supported")
        q = t.terms(a.qkv, unit_rows(0, h, d, 3 * d), 0)
        k = t.terms(a.qkv, unit_rows(d, h, d, 3 * d), 0)
        v = t.terms(a.qkv, unit_rows(2 * d, h, d, 3 * d), 0)
    else:
        q = t.terms(a.qkv, unit_rows(0, h, d), 0)
        k = t.terms(a.qkv, unit_rows(h * d, kv, d), 0)
        v = t.terms(a.qkv, unit_rows((h + kv) * d, kv, d), 0)
    return (q[0] + o[0], q[1] + o[1]), (k[0] + v[0], k[1] + v[1])


def projection_cuts(spec: BlockSpec, cut: LayerPlan) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """``{module path: (kept output rows or None, kept input columns or None)}`` of every projection a resolved
    cut (`hf_prune.structure.surgery.resolve_plan`: both head lists filled) slices, in ``[out, in]`` orientation.
    Removed sublayers are not listed (their projections are gone)."""
    out: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    a = spec.attention
    if a is not None and not cut.remove_attention and cut.heads_keep is not None:
        heads, kv = list(cut.heads_keep), list(cut.kv_heads_keep or [])
        q = shipped.head_rows(heads, a.head_dim)
        if a.qkv is None:
            kv_rows = shipped.head_rows(kv, a.head_dim)
            out.update({a.q: (q, None), a.k: (kv_rows, None), a.v: (kv_rows, None)})  # type: ignore[dict-item]
        else:
            layout = {"head_dim": a.head_dim, "num_heads": a.num_heads, "num_kv_heads": a.num_kv_heads,
                      "qkv_layout": a.qkv_layout}
            out[a.qkv] = (shipped.qkv_rows(layout, heads, kv), None)
        out[a.o] = (None, q)
    m = spec.mlp
    if m is not None and not cut.remove_mlp and cut.mlp_keep is not None:
        idx = torch.tensor(cut.mlp_keep, dtype=torch.long)
        for name in m.inputs:
            out[name] = (idx, None)
        if m.fused_gate_up:
            out[m.fused_gate_up] = (torch.cat([idx, idx + m.intermediate]), None)
        out[m.output] = (None, idx)
    return out
