"""hf_prune.nn.SparseLinear: reference forward, conversions, state dicts, dispatch and fallback."""

from __future__ import annotations

import logging
import os

import pytest
import torch

import hf_prune.nn.kernels_loader as kl
from hf_prune.nn import KernelDispatch, SparseLinear

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = ["2:4", "1:4", "2:8", "bitmask"]
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def sparse_linear_pair(
    fmt: str, in_f: int = 32, out_f: int = 24, bias: bool = True, dtype=torch.float32, sparsity: float = 0.6
) -> tuple[torch.nn.Linear, SparseLinear]:
    lin = torch.nn.Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        w = lin.weight
        if fmt == "bitmask":
            w[torch.rand(w.shape) < sparsity] = 0
        else:
            n, m = map(int, fmt.split(":"))
            g = w.view(out_f, -1, m)
            g.scatter_(-1, g.float().abs().topk(m - n, -1, largest=False).indices, 0)
    return lin, SparseLinear.from_linear(lin, fmt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_forward_matches_linear(dtype, fmt, bias):
    lin, sl = sparse_linear_pair(fmt, bias=bias, dtype=dtype)
    x = torch.randn(2, 5, 32).to(dtype)  # 3-D input like a transformer's hidden states
    y = sl(x)
    assert sl.last_path == "reference" and y.shape == (2, 5, 24) and y.dtype == dtype
    assert torch.equal(y, lin(x))  # same dense weight, same F.linear -> identical
    back = sl.to_linear()
    assert isinstance(back, torch.nn.Linear) and back.weight.dtype == dtype
    assert torch.equal(back.weight.view(_INT[dtype]), lin.weight.detach().view(_INT[dtype]))
    if bias:
        assert torch.equal(back.bias, lin.bias)


def test_state_dict_into_fresh_module_and_dtype_cast():
    lin, sl = sparse_linear_pair("bitmask")
    fresh = SparseLinear(32, 24, sparse_format="bitmask")
    fresh.load_state_dict(sl.state_dict())
    assert torch.equal(fresh.dense_weight(), lin.weight.detach())
    half = fresh.to(torch.bfloat16)
    assert half.weight_values.dtype == torch.bfloat16 and half.weight_bitmask.dtype == torch.uint8
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert torch.equal(
        half(x), torch.nn.functional.linear(x, lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16())
    )


def test_accounting_and_repr():
    _, sl = sparse_linear_pair("2:4", in_f=64, out_f=16, dtype=torch.bfloat16)
    assert sl.sparsity == 0.5
    assert sl.compressed_nbytes() == 64 * 16 * 1.125
    assert "format=2:4" in repr(sl)
    _, bm = sparse_linear_pair("bitmask", in_f=64, out_f=16)
    assert bm.sparsity == pytest.approx(1 - bm.weight_values.numel() / (64 * 16))


def test_errors():
    lin = torch.nn.Linear(16, 4)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        SparseLinear.from_linear(lin, "2:4")
    with pytest.raises(ValueError, match="divisible by 4"):
        SparseLinear(10, 4, sparse_format="2:4")
    with pytest.raises(ValueError, match="sparse_format"):
        SparseLinear(16, 4, sparse_format="3:3")
    _, sl = sparse_linear_pair("bitmask")
    with pytest.raises(ValueError, match="values are stored"):
        sl.load_compressed(weight_bitmask=sl.weight_bitmask, weight_values=sl.weight_values[:-1])
    with pytest.raises(ValueError, match="expected tensors"):
        sl.load_compressed(weight_values=sl.weight_values)
    empty = SparseLinear(16, 4, sparse_format="bitmask")
    with pytest.raises(ValueError, match="bitmask must be uint8 of shape"):
        empty.validate()


def test_from_linear_recompresses_and_shares_bias():
    lin, sl = sparse_linear_pair("2:4")
    again = SparseLinear.from_linear(sl, "bitmask")  # a SparseLinear in, another format out
    assert str(again.format) == "bitmask" and torch.equal(again.dense_weight(), lin.weight.detach())
    assert torch.equal(again.bias, lin.bias) and again.bias is not sl.bias
    shared = SparseLinear.from_linear(lin, "2:4", share_bias=True)
    assert shared.bias is lin.bias


def test_each_layer_has_its_own_dispatch_knobs():
    _, a = sparse_linear_pair("2:4")
    _, b = sparse_linear_pair("2:4")
    assert a.dispatch is not b.dispatch and a.dispatch == KernelDispatch()
    a.dispatch.max_kernel_batch = 1
    assert b.dispatch == KernelDispatch() and a.policy == b.policy == "memory"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policies_give_the_same_outputs_and_hold_what_they_say(fmt, dtype):
    lin, sl = sparse_linear_pair(fmt, dtype=dtype, sparsity=0.9)
    x = torch.randn(2, 5, 32, dtype=dtype)
    want = lin(x)
    saved = {k: v.clone() for k, v in sl.state_dict().items()}
    compressed = sl.compressed_nbytes()

    assert sl.apply_policy("speed") == "speed" and sl.policy == "speed" and "policy=speed" in repr(sl)
    assert torch.equal(sl(x), want) and sl.last_path == "decompressed"
    assert all(getattr(sl, n).numel() == 0 for n in sl.compressed_names)  # compressed copy freed
    assert sl.held_nbytes() == lin.weight.numel() * lin.weight.element_size()
    # saving re-compresses: the same buffers as before, byte for byte
    again = sl.state_dict()
    assert set(again) == set(saved) and all(torch.equal(again[k], saved[k]) for k in saved)
    assert sl.compressed_nbytes() == compressed and sl.sparsity == pytest.approx(
        SparseLinear.from_linear(lin, fmt).sparsity)

    assert sl.apply_policy("memory") == "memory" and sl.weight is None
    assert torch.equal(sl(x), want) and sl.last_path == "reference"
    assert sl.held_nbytes() == compressed < lin.weight.numel() * lin.weight.element_size()

    got = sl.apply_policy("kernel")  # CPU: CSR only where it measured faster than dense, else speed
    assert got in ("kernel", "speed") and sl.policy == got
    if dtype == torch.bfloat16:
        assert got == "speed"  # no native bf16 CSR product on CPU
    torch.testing.assert_close(sl(x), want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(sl.state_dict()[k], saved[k]) for k in saved)
    assert sl.apply_policy("auto") == "speed"  # CPU


def test_cpu_kernel_policy_uses_csr_where_it_wins(monkeypatch):
    from hf_prune.nn import cpu_sparse

    lin, sl = sparse_linear_pair("bitmask", sparsity=0.95)
    monkeypatch.setattr(cpu_sparse, "faster_than_dense", lambda w, c, tokens, **k: (tokens == 1, 0.5))
    assert sl.apply_policy("kernel") == "kernel"
    assert sl.weight_csr is not None and sl.weight is not None  # dense kept for prefill, where CSR lost
    x1, x64 = torch.randn(1, 32), torch.randn(64, 32)
    torch.testing.assert_close(sl(x1), lin(x1), rtol=1e-5, atol=1e-5)
    assert sl.last_path == "cpu_csr"
    assert torch.equal(sl(x64), lin(x64)) and sl.last_path == "decompressed"
    monkeypatch.setattr(cpu_sparse, "faster_than_dense", lambda w, c, tokens, **k: (True, 0.5))
    sl.apply_policy("memory")
    assert sl.apply_policy("kernel") == "kernel" and sl.weight is None  # CSR wins everywhere: no dense copy
    torch.testing.assert_close(sl(x64), lin(x64), rtol=1e-5, atol=1e-5)
    assert sl.last_path == "cpu_csr" and sl.held_nbytes() < lin.weight.numel() * 4
    monkeypatch.setattr(cpu_sparse, "faster_than_dense", lambda w, c, tokens, **k: (False, 1.5))
    assert sl.apply_policy("kernel") == "speed" and sl.weight_csr is None


def test_kernel_fits_the_format_per_device(monkeypatch):
    """Which layers ``kernel`` can serve: CUDA has Triton kernels for N:M and for bitmask at >= 50% sparsity (only
    with Triton installed); CPU has the CSR product for float32. Everything else falls back to ``speed``."""
    import hf_prune.nn.sparse_linear as sl_mod

    monkeypatch.setattr(sl_mod, "kernels_available", lambda: True)
    assert sparse_linear_pair("2:4")[1].kernel_available("cuda")
    assert sparse_linear_pair("bitmask", sparsity=0.7)[1].kernel_available("cuda")
    assert not sparse_linear_pair("bitmask", sparsity=0.2)[1].kernel_available("cuda")
    assert sparse_linear_pair("bitmask", sparsity=0.7)[1].kernel_available("cpu")
    assert not sparse_linear_pair("bitmask", dtype=torch.bfloat16)[1].kernel_available("cpu")
    monkeypatch.setattr(sl_mod, "kernels_available", lambda: False)  # no Triton: no CUDA kernel at all
    assert not sparse_linear_pair("2:4")[1].kernel_available("cuda")


def test_csr_linear_matches_the_dense_reference():
    from hf_prune.nn import cpu_sparse

    torch.manual_seed(0)
    for out_f, in_f, tokens in [(24, 32, 1), (64, 48, 7), (5, 130, 300)]:
        w = torch.randn(out_f, in_f)
        w[torch.rand_like(w) < 0.85] = 0
        b = torch.randn(out_f)
        x = torch.randn(tokens, in_f)
        csr = cpu_sparse.to_csr(w)
        assert csr.crow_indices().dtype == torch.int32 and csr.values().numel() == int((w != 0).sum())
        torch.testing.assert_close(cpu_sparse.csr_linear(x, csr, b), cpu_sparse.reference_linear(x, w, b),
                                   rtol=1e-5, atol=1e-5)


def test_policy_survives_load_state_dict_and_rejects_unknown_names():
    lin, sl = sparse_linear_pair("2:4")
    sl.apply_policy("speed")
    other = sparse_linear_pair("2:4")[1]
    sl.load_state_dict(other.state_dict())  # new weights: the held dense copy is rebuilt from them
    x = torch.randn(3, 32)
    assert sl.policy == "speed" and torch.equal(sl(x), other(x))
    with pytest.raises(ValueError, match=r"policy='fast'.*'speed'"):
        sl.apply_policy("fast")


# ---------------------------------------------------------------------------------- dispatch


@pytest.fixture
def cpu_kernels(monkeypatch):
    """Pretend the CPU is a kernel device (Triton interpreter) with a fake kernel package."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []

    class FakeKernels:
        @staticmethod
        def nm_linear(x, values, indices, n, m, out_f, in_f, bias):
            calls.append("nm")
            return torch.zeros(x.shape[0], out_f, dtype=x.dtype)

        @staticmethod
        def bitmask_tile_offsets(bitmask):
            return torch.zeros(1)

        @staticmethod
        def bitmask_linear(x, bitmask, values, tiles, out_f, in_f, bias):
            calls.append("bitmask")
            return torch.zeros(x.shape[0], out_f, dtype=x.dtype)

    monkeypatch.setattr("hf_prune.nn.sparse_linear.load_kernels", lambda: FakeKernels)
    return calls


@pytest.mark.parametrize(
    "fmt,sparsity,tokens,expected",
    [
        ("2:4", 0.5, 1, "triton_nm"),
        ("2:4", 0.5, 16, "triton_nm"),
        ("2:8", 0.75, 4, "triton_nm"),
        ("2:4", 0.5, 17, "dense"),  # large batch; semi-structured needs CUDA
        ("bitmask", 0.7, 8, "triton_bitmask"),
        ("bitmask", 0.2, 8, "dense"),  # below the bitmask kernel's useful sparsity
        ("bitmask", 0.7, 64, "dense"),
    ],
)
def test_dispatch_table(cpu_kernels, fmt, sparsity, tokens, expected):
    _, sl = sparse_linear_pair(fmt, sparsity=sparsity)
    sl.dispatch = KernelDispatch(allow_cpu_kernels=True)
    x = torch.randn(tokens, 32)
    sl(x)
    assert sl.last_path == expected
    assert cpu_kernels == ([] if expected == "dense" else [expected.split("_")[1]])


def test_dispatch_defaults_to_reference_on_cpu(cpu_kernels):
    _, sl = sparse_linear_pair("2:4")
    sl(torch.randn(1, 32))  # default policy: CPU -> reference even with the interpreter on
    assert sl.last_path == "reference" and cpu_kernels == []
    sl.dispatch = KernelDispatch(allow_cpu_kernels=True)
    sl(torch.randn(1, 32, dtype=torch.float64))  # a dtype without kernels
    assert sl.last_path == "reference"


def test_kernel_failure_falls_back_to_reference(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def broken():
        raise ImportError("hf_prune's sparse GPU kernels need Triton: `pip install triton`")

    monkeypatch.setattr("hf_prune.nn.sparse_linear.load_kernels", broken)
    lin, sl = sparse_linear_pair("2:4")
    sl.dispatch = KernelDispatch(allow_cpu_kernels=True)
    x = torch.randn(2, 32)
    with caplog.at_level(logging.DEBUG, logger="hf_prune.nn"):
        y = sl(x)
        y2 = sl(x)  # the failed path is remembered: no second warning
    assert sl.last_path == "reference" and torch.equal(y, lin(x)) and torch.equal(y2, y)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pip install triton" in warnings[0].getMessage()
    assert any("-> reference" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


def test_kernels_loader_names_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a)
    )
    monkeypatch.setattr(kl, "_cache", {})
    with pytest.raises(ImportError, match="pip install triton"):
        kl.load_kernels()
    assert kl.kernels_available() is False


def test_kernels_loader_finds_local_package(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(kl, "_cache", {})
    paths = kl.kernel_search_paths()
    assert any((p / "hf_prune_kernels" / "__init__.py").is_file() for p in paths)
    monkeypatch.setenv("HF_PRUNE_KERNELS_PATH", os.fspath(paths[-1] / "hf_prune_kernels"))
    assert kl.kernel_search_paths()[0] == paths[-1]
    mod = kl.load_kernels()
    assert callable(mod.nm_linear) and callable(mod.bitmask_linear) and kl.kernels_available()
