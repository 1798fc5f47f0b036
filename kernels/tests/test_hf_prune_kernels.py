"""Standalone kernel tests (kernel-builder layout): no hf_prune import, pure-torch references.

Run: ``TRITON_INTERPRET=1 pytest kernels/tests`` on CPU, or plain ``pytest kernels/tests`` on a GPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "torch-ext"))

import hf_prune_kernels as K  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def pack_bits(fields: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    fields = torch.nn.functional.pad(fields, (0, (-fields.shape[1]) % per)).reshape(fields.shape[0], -1, per)
    return (fields.to(torch.int32) << (torch.arange(per, dtype=torch.int32) * bits)).sum(-1).to(torch.uint8)


@pytest.mark.parametrize("n,m,tokens", [(2, 4, 1), (2, 4, 16), (1, 4, 3), (2, 8, 5)])
def test_nm_linear(n, m, tokens):
    out_f, in_f = 48, 8 * m
    w = torch.randn(out_f, in_f)
    grp = w.view(out_f, -1, m)
    idx = grp.abs().topk(n, -1).indices.sort(-1).values
    dense = torch.zeros_like(grp).scatter_(-1, idx, grp.gather(-1, idx)).reshape(out_f, in_f)
    values = grp.gather(-1, idx).reshape(out_f, -1)
    packed = pack_bits(idx.reshape(out_f, -1), K.index_bits(m))
    x = torch.randn(tokens, in_f)
    y = K.nm_linear(x.to(DEV), values.to(DEV), packed.to(DEV), n, m, out_f, in_f)
    torch.testing.assert_close(y.cpu(), x @ dense.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("in_f,tokens,sparsity", [(64, 1, 0.5), (100, 7, 0.8), (136, 16, 0.6)])
def test_bitmask_linear(in_f, tokens, sparsity):
    out_f = 40
    w = torch.randn(out_f, in_f)
    w[torch.rand_like(w) < sparsity] = 0
    mask = w != 0
    bitmask = pack_bits(mask.to(torch.int32), 1)
    x = torch.randn(tokens, in_f)
    tiles = K.bitmask_tile_offsets(bitmask)
    y = K.bitmask_linear(x.to(DEV), bitmask.to(DEV), w[mask].to(DEV), tiles.to(DEV), out_f, in_f)
    torch.testing.assert_close(y.cpu(), x @ w.T, rtol=1e-4, atol=1e-4)
