"""Triton sparse kernels vs SparseLinear's reference forward.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below before
the kernel package is imported; small shapes so this takes seconds). ``gpu``-marked tests run the
real kernels and the dispatch at realistic shapes; they are skipped without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the @triton.jit decorations

pytest.importorskip("triton")

from hf_prune.nn import KernelDispatch, SparseLinear, load_kernels  # noqa: E402

K = load_kernels()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make(
    fmt: str,
    out_f: int,
    in_f: int,
    dtype: torch.dtype,
    sparsity: float = 0.5,
    bias: bool = False,
    seed: int = 0,
    device: str = DEV,
) -> SparseLinear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        w = lin.weight
        w.copy_(torch.randn(w.shape, generator=g))
        if fmt == "bitmask":  # exactly `sparsity` per row, at random positions
            k = round(in_f * sparsity)
            w.scatter_(1, torch.rand(w.shape, generator=g).argsort(dim=1)[:, :k], 0)
        else:
            n, m = map(int, fmt.split(":"))
            grp = w.view(out_f, -1, m)
            grp.scatter_(-1, grp.abs().topk(m - n, -1, largest=False).indices, 0)
    return SparseLinear.from_linear(lin.to(dtype), fmt).to(device)


def close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = ref.float().abs().max().clamp_min(1.0)
    err = (y.float() - ref.float()).abs().max() / scale
    assert err <= TOL[dtype], f"max rel err {err:.3g}"


# Random shapes/dtypes/sparsities, small enough for the interpreter.
CASES = [
    # fmt, out, in, tokens, dtype, sparsity, bias
    ("2:4", 24, 64, 1, torch.float32, 0.5, False),
    ("2:4", 70, 136, 5, torch.bfloat16, 0.5, True),
    ("2:4", 33, 200, 16, torch.float16, 0.5, False),
    ("1:4", 40, 96, 3, torch.bfloat16, 0.75, False),
    ("2:8", 16, 80, 7, torch.float32, 0.75, True),
    ("4:8", 65, 64, 2, torch.float16, 0.5, False),
    ("bitmask", 24, 64, 1, torch.float32, 0.5, False),
    ("bitmask", 70, 100, 4, torch.bfloat16, 0.7, True),
    ("bitmask", 33, 130, 16, torch.float16, 0.8, False),
    ("bitmask", 64, 72, 9, torch.bfloat16, 0.6, False),
]


@pytest.mark.parametrize("fmt,out_f,in_f,tokens,dtype,sparsity,bias", CASES)
def test_kernel_matches_reference(fmt, out_f, in_f, tokens, dtype, sparsity, bias):
    sl = make(fmt, out_f, in_f, dtype, sparsity, bias, seed=out_f + in_f)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens)).to(dtype).to(DEV)
    b = sl.bias.detach() if bias else None
    if fmt == "bitmask":
        tiles = K.bitmask_tile_offsets(sl.weight_bitmask)
        y = K.bitmask_linear(x, sl.weight_bitmask, sl.weight_values, tiles, out_f, in_f, b)
    else:
        n, m = sl.format.n, sl.format.m
        y = K.nm_linear(x, sl.weight_values, sl.weight_indices, n, m, out_f, in_f, b)
    assert y.shape == (tokens, out_f) and y.dtype == dtype
    close(y, sl.reference_forward(x), dtype)


def test_tile_offsets():
    bitmask = torch.tensor([[255] * 8 + [1], [3] * 9], dtype=torch.uint8)
    assert K.bitmask_tile_offsets(bitmask).tolist() == [[0, 64], [65, 81]]
    assert K.bitmask_tile_offsets(bitmask, block_k=8)[1].tolist() == [65 + 2 * i for i in range(9)]


def test_kernel_input_validation():
    sl = make("2:4", 8, 16, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="expected x of shape"):
        K.nm_linear(torch.randn(2, 12), sl.weight_values, sl.weight_indices, 2, 4, 8, 16)
    with pytest.raises(ValueError, match="values must be"):
        K.nm_linear(torch.randn(2, 16), sl.weight_values[:, :-1], sl.weight_indices, 2, 4, 8, 16)
    bm = make("bitmask", 8, 16, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="tile_offsets must be"):
        K.bitmask_linear(torch.randn(1, 16), bm.weight_bitmask, bm.weight_values, torch.zeros(8, 3), 8, 16)


@pytest.mark.skipif(not INTERP and not torch.cuda.is_available(), reason="needs CUDA or TRITON_INTERPRET=1")
def test_sparse_linear_dispatch_runs_real_kernels_in_interpreter():
    sl = make("2:4", 32, 64, torch.bfloat16, device=DEV)
    sl.dispatch = KernelDispatch(allow_cpu_kernels=True)
    x = torch.randn(2, 3, 64).to(torch.bfloat16).to(DEV)
    y = sl(x)
    assert sl.last_path == "triton_nm" and y.shape == (2, 3, 32)
    close(y, sl.reference_forward(x), torch.bfloat16)
    bm = make("bitmask", 32, 64, torch.float32, sparsity=0.7, device=DEV)
    bm.dispatch = KernelDispatch(allow_cpu_kernels=True)
    x = torch.randn(4, 64, device=DEV)
    close(bm(x), bm.reference_forward(x), torch.float32)
    assert bm.last_path == "triton_bitmask"


# ------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("tokens", [1, 4, 16])
@pytest.mark.parametrize("fmt,sparsity", [("2:4", 0.5), ("bitmask", 0.5), ("bitmask", 0.7), ("bitmask", 0.8)])
def test_gpu_kernels_realistic(shape, tokens, fmt, sparsity):
    out_f, in_f = shape
    sl = make(fmt, out_f, in_f, torch.bfloat16, sparsity, device="cuda")
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
    y = sl(x)
    assert sl.last_path == ("triton_nm" if fmt == "2:4" else "triton_bitmask")
    close(y, sl.reference_forward(x), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_dispatch_large_batch(dtype):
    sl = make("2:4", 1024, 1024, dtype, device="cuda")
    x = torch.randn(256, 1024, device="cuda", dtype=dtype)
    y = sl(x)
    expected = "semi_structured" if dtype != torch.float32 else "dense"
    # semi-structured can be unsupported on a given GPU: then the module falls back to reference
    assert sl.last_path in (expected, "reference")
    close(y, sl.reference_forward(x), dtype)
