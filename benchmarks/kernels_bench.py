"""GPU latency of hf_prune's sparse kernels vs dense cuBLAS and torch's 2:4 semi-structured.

For each weight shape ``[out, in]`` in (4096x4096, 14336x4096, 4096x14336), batch (tokens) 1/4/16,
bf16, and format (2:4; bitmask at 50/70/80 % sparsity) it times

* ``dense_us``: ``F.linear`` with the dense weight (cuBLAS),
* ``sparse_us``: ``SparseLinear.forward`` on its kernel path (``last_path`` recorded),
* ``torch_semi_structured_us``: ``F.linear`` with ``to_sparse_semi_structured`` (2:4 only; null
  when torch refuses the shape/batch),

and the bandwidth fraction ``(compressed weight bytes + activations) / time / peak`` (peak HBM
bandwidth from ``--peak-gbps``, default: H100 SXM 3350 GB/s). Results go to the ``rows`` of
``benchmarks/results/kernels.json``; the ``disk`` rows (from ``disk_size.py``) are kept.

Needs CUDA and Triton; without them it exits with status 2 and writes nothing (no estimates).

Usage:
    python benchmarks/kernels_bench.py [--peak-gbps 3350] [--reps 200] [--quick]

Example:
    >>> import benchmarks.kernels_bench as kb  # doctest: +SKIP
    >>> kb.main(["--quick"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_prune.nn import KernelDispatch, SparseLinear  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
BATCHES = [1, 4, 16]
FORMATS = [("2:4", 0.5), ("bitmask", 0.5), ("bitmask", 0.7), ("bitmask", 0.8)]


def time_us(fn, reps: int) -> float:
    """Median CUDA time of ``fn()`` in microseconds (warm-up, then CUDA events, L2 not flushed)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    times.sort()
    return times[len(times) // 2]


def make_weight(out_f: int, in_f: int, fmt: str, sparsity: float) -> torch.Tensor:
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
    if fmt == "2:4":
        g = w.view(out_f, -1, 4)
        g.scatter_(-1, g.abs().topk(2, -1, largest=False).indices, 0)
    else:
        k = round(in_f * sparsity)
        w.scatter_(1, torch.rand(out_f, in_f, device="cuda").argsort(1)[:, :k], 0)
    return w


def bench_one(out_f: int, in_f: int, tokens: int, fmt: str, sparsity: float, reps: int, peak: float) -> dict:
    w = make_weight(out_f, in_f, fmt, sparsity)
    lin = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
    sl = SparseLinear.from_linear(lin, fmt)
    sl.dispatch = KernelDispatch(max_kernel_batch=max(BATCHES), bitmask_min_sparsity=0.0)
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = F.linear(x, w)
        out = sl(x)
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        dense_us = time_us(lambda: F.linear(x, w), reps)
        sparse_us = time_us(lambda: sl(x), reps)
        semi_us = None
        if fmt == "2:4":
            try:
                from torch.sparse import to_sparse_semi_structured

                ws = to_sparse_semi_structured(w)
                F.linear(x, ws)
                semi_us = time_us(lambda: F.linear(x, ws), reps)
            except Exception as exc:  # noqa: BLE001 - record why, never guess a number
                print(f"  semi-structured unavailable for {out_f}x{in_f} b{tokens}: {exc}")
    moved = sl.compressed_nbytes() + x.numel() * 2 + out_f * tokens * 2
    return {
        "shape": [out_f, in_f],
        "batch": tokens,
        "dtype": "bfloat16",
        "format": fmt,
        "sparsity": sparsity,
        "path": sl.last_path,
        "dense_us": round(dense_us, 2),
        "sparse_us": round(sparse_us, 2),
        "torch_semi_structured_us": None if semi_us is None else round(semi_us, 2),
        "speedup": round(dense_us / sparse_us, 3),
        "bandwidth_fraction": round(moved / (sparse_us * 1e-6) / (peak * 1e9), 3),
        "dense_bandwidth_fraction": round(w.numel() * 2 / (dense_us * 1e-6) / (peak * 1e9), 3),
        "max_rel_err_vs_dense": err,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peak-gbps", type=float, default=3350.0, help="peak HBM bandwidth in GB/s")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="first shape and batch 1 only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_bench.py needs a CUDA GPU; nothing measured, nothing written.", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("kernels_bench.py needs Triton (`pip install triton`); nothing written.", file=sys.stderr)
        return 2
    shapes = SHAPES[:1] if args.quick else SHAPES
    batches = BATCHES[:1] if args.quick else BATCHES
    rows = []
    for out_f, in_f in shapes:
        for tokens in batches:
            for fmt, sparsity in FORMATS:
                row = bench_one(out_f, in_f, tokens, fmt, sparsity, args.reps, args.peak_gbps)
                rows.append(row)
                print(json.dumps(row))
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"disk": []}
    data.update(
        device=torch.cuda.get_device_name(),
        machine=f"{torch.cuda.get_device_name()}, host CPU capability {torch.backends.cpu.get_cpu_capability()}",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command="python benchmarks/kernels_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        rows=rows,
        peak_gbps=args.peak_gbps,
        torch=torch.__version__,
    )
    data.pop("note", None)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
