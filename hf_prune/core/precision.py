"""The compute dtype that fits the hardware (``--dtype auto``, `auto_dtype`).

bf16 halves memory and, where the hardware has it natively, runs matmuls about twice as fast as float32. Where
it does not (a CPU with AVX2 but neither AVX512_BF16 nor AMX, i.e. most laptops and many cloud CPUs), PyTorch
emulates bf16 and matmuls run several times *slower* than float32. So:

* CUDA: bf16 where the GPU supports it, else float16;
* CPU: bf16 only when the CPU has native bf16 (AMX, or AVX-512 with the AVX512_BF16 extension) *and* PyTorch
  dispatches to AVX-512/AMX kernels (``torch.backends.cpu.get_cpu_capability()``; ``ATEN_CPU_CAPABILITY=avx2``
  lowers it); float32 otherwise.

The pruning math (statistics, Hessians, solves) runs in float32 whatever is chosen here.

Example:
    >>> import torch
    >>> dtype, reason = choose_dtype("cpu")
    >>> dtype in (torch.bfloat16, torch.float32) and reason.startswith("CPU")
    True
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["choose_dtype", "auto_dtype", "cpu_capability", "cpu_has_native_bf16"]


def cpu_capability() -> str:
    """What PyTorch's CPU kernels dispatch to: ``"AVX2"``, ``"AVX512"``, ``"DEFAULT"``, ... (recorded by every
    benchmark in its ``machine`` field).

    Example:
        >>> isinstance(cpu_capability(), str)
        True
    """
    return str(torch.backends.cpu.get_cpu_capability())


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when bf16 matmuls run natively on this CPU (AMX-BF16 or AVX512_BF16, with PyTorch dispatching to
    AVX-512/AMX kernels). Uses torch's own CPU probes where this torch has them, else ``/proc/cpuinfo``.

    Example:
        >>> isinstance(cpu_has_native_bf16(), bool)
        True
    """
    if not cpu_capability().upper().startswith(("AVX512", "AMX")):
        return False  # AVX2/DEFAULT dispatch (or ATEN_CPU_CAPABILITY lowered it): bf16 is emulated
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(p) for p in probes):
        return any(bool(p()) for p in probes)  # type: ignore[misc]
    flags = _cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def choose_dtype(device: str | torch.device | None = None) -> tuple[torch.dtype, str]:
    """The dtype ``--dtype auto`` loads and computes in on ``device`` (default: cuda if available, else cpu), and
    the reason, one line.

    Example:
        >>> choose_dtype("cpu")[0] in (torch.bfloat16, torch.float32)
        True
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"CUDA device {torch.cuda.get_device_name(dev)} supports bf16"
        return torch.float16, "CUDA device without bf16 support: float16"
    if dev.type != "cpu":
        return torch.float32, f"device {dev.type}: float32 (no tuned choice for this device type)"
    cap = cpu_capability()
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    via = f" (ATEN_CPU_CAPABILITY={forced})" if forced else ""
    if cpu_has_native_bf16():
        return torch.bfloat16, f"CPU capability {cap}{via} with native bf16 (AVX512_BF16/AMX): bf16 is ~2x float32"
    return torch.float32, (f"CPU capability {cap}{via} without native bf16: bf16 matmuls would be emulated "
                           "(several times slower), so float32")


def auto_dtype(device: str | torch.device | None = None, *, verbose: bool = True) -> torch.dtype:
    """`choose_dtype`'s dtype, printing the choice and its reason once per process when ``verbose``. Pass it to
    ``from_pretrained``:

    Example:
        >>> import hf_prune
        >>> dtype = hf_prune.auto_dtype(verbose=False)
        >>> # model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        >>> str(dtype) in ("torch.bfloat16", "torch.float32", "torch.float16")
        True
    """
    dtype, reason = choose_dtype(device)
    if verbose:
        _announce(str(dtype).removeprefix("torch."), reason)
    return dtype


@functools.lru_cache(maxsize=8)
def _announce(dtype: str, reason: str) -> None:
    print(f"hf_prune: dtype auto -> {dtype} ({reason})")
