#!/usr/bin/env python
"""bf16 vs fp32 on this CPU: raw matmul throughput and a SmolLM2 forward pass (8 x 512 tokens).

    python benchmarks/precision.py       # writes results/precision.json

Why it matters: hf_prune runs forward passes (calibration, evaluation) in the model's dtype and keeps its
pruning math (Hessians, Cholesky, norms) in float32. Whether bf16 forwards pay off depends on the CPU
(AMX on recent Intel parts makes bf16 ~10x faster than fp32; without AMX the gain is much smaller).
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hf_prune.assets import default_model_dir
from hf_prune.report import atomic_write_text

HERE = Path(__file__).resolve().parent


def timed(fn, repeat: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    sys.path.insert(0, str(HERE))
    from oneshot import machine

    rows = []
    for n, k in ((8192, 576), (8192, 1536)):
        a32 = torch.randn(n, k)
        w32 = torch.randn(k, k)
        for dtype in (torch.float32, torch.bfloat16):
            a, w = a32.to(dtype), w32.to(dtype)
            sec = timed(lambda a=a, w=w: a @ w)
            rows.append({"op": f"matmul [{n}x{k}] @ [{k}x{k}]", "dtype": str(dtype).replace("torch.", ""),
                         "seconds": sec, "gflops": 2 * n * k * k / sec / 1e9})
    ids = torch.randint(0, 49152, (8, 512), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=dtype).eval()
        with torch.no_grad():
            sec = timed(lambda m=model: m(ids, use_cache=False), repeat=2)
        rows.append({"op": "SmolLM2-135M forward, 8 x 512 tokens", "dtype": str(dtype).replace("torch.", ""),
                     "seconds": sec, "gflops": None})
        del model
    speedup = {r["op"]: None for r in rows}
    for op in speedup:
        f32 = next(r["seconds"] for r in rows if r["op"] == op and r["dtype"] == "float32")
        b16 = next(r["seconds"] for r in rows if r["op"] == op and r["dtype"] == "bfloat16")
        speedup[op] = f32 / b16
    results = {"machine": machine(), "date": datetime.date.today().isoformat(),
               "command": "python benchmarks/precision.py", "rows": rows, "bf16_speedup_over_fp32": speedup,
               "policy": "forward passes in the model dtype (bf16 in the benchmarks); pruning math in float32"}
    atomic_write_text(str(HERE / "results" / "precision.json"), json.dumps(results, indent=2))
    print(json.dumps(speedup, indent=2))


if __name__ == "__main__":
    main()
