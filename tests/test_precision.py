"""``--dtype auto``: bf16 only where the hardware runs it natively, float32 on AVX2-only CPUs."""

from __future__ import annotations

import pytest
import torch

import hf_prune
from hf_prune.cli import build_parser
from hf_prune.core import precision


@pytest.mark.parametrize(
    ("capability", "avx512_bf16", "amx", "expected"),
    [
        ("AVX2", True, True, torch.float32),  # dispatch lowered to AVX2: bf16 kernels are emulated
        ("DEFAULT", False, False, torch.float32),
        ("AVX512", False, False, torch.float32),  # AVX-512 without the BF16 extension
        ("AVX512", True, False, torch.bfloat16),
        ("AVX512", False, True, torch.bfloat16),  # AMX
    ],
)
def test_cpu_choice_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, capability: str, avx512_bf16: bool,
                                        amx: bool, expected: torch.dtype) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    dtype, reason = precision.choose_dtype("cpu")
    assert dtype == expected
    assert capability in reason and ("without native bf16" in reason) == (expected == torch.float32)


def test_cpu_flags_fallback_when_torch_has_no_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert precision.choose_dtype("cpu")[0] == torch.float32
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert precision.choose_dtype("cpu")[0] == torch.bfloat16


def test_auto_dtype_prints_the_choice_once(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    precision._announce.cache_clear()
    assert hf_prune.auto_dtype("cpu") == torch.float32
    assert hf_prune.auto_dtype("cpu") == torch.float32
    out = capsys.readouterr().out
    assert out.count("dtype auto -> float32") == 1 and "AVX2" in out


def test_cli_defaults_to_auto() -> None:
    args = build_parser().parse_args(["prune", "smollm2", "--output", "o"])
    assert args.dtype == "auto"
    assert build_parser().parse_args(["eval", "smollm2"]).dtype == "auto"
