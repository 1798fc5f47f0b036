#!/usr/bin/env python
"""Data-parallel one-shot pruning of the real SmolLM2-135M: 1 process against 2 processes (torchrun, gloo, CPU).

    chrt -r 1 python benchmarks/distributed.py          # wanda and sparsegpt, 1 and 2 processes; writes results

Each run is a fresh launch (``torchrun --nproc_per_node N`` for N = 2) that loads SmolLM2 (``--dtype auto``),
prunes it to 50% unstructured with the embedded Wikipedia calibration split (128 x 512 tokens, batch 8) and, on
rank 0, measures held-out perplexity (64 windows of 512 tokens). The pruning wall time is taken between two
barriers around ``hf_prune.prune``. With N processes on this machine's 2 cores each process gets 2/N threads, so
little speed-up is expected here: the point is that the result is the same.

Projected scaling (no multi-device machine was available): the 1-process time splits into the calibration forwards
F (measured as Wanda's time, whose pruning math is negligible) and the pruning math P (SparseGPT's time minus F).
On N devices, F/N (each rank runs 1/N of the batches) + P/min(N, 4) (4 layer groups per block are dealt to ranks) +
the ring all-reduce of the statistics, 2 (N-1)/N x bytes / bandwidth, with bytes counted from the model's shapes
(Wanda: one float32 norm per input feature; SparseGPT: one float32 Hessian per input group) and an assumed link
bandwidth (``--link-gbps``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
METHODS = ("wanda", "sparsegpt")


def worker(method: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_prune
    from hf_prune.assets import default_model_dir, default_splits
    from hf_prune.core.distributed import is_main_process

    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    path = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=hf_prune.auto_dtype(verbose=False))
    tok = AutoTokenizer.from_pretrained(path)
    calib, held = default_splits()
    cfg = hf_prune.PruningConfig(method=method, sparsity=0.5, num_calibration_samples=128, seqlen=512, batch_size=8)
    if n > 1:
        dist.barrier()
    t0 = time.perf_counter()
    report = hf_prune.prune(model, cfg, [calib], tok, verbose=False, show_progress=False)
    if n > 1:
        dist.barrier()
    seconds = time.perf_counter() - t0
    if is_main_process():
        ppl = hf_prune.perplexity(model, held, tok, 512, max_windows=64, show_progress=False).ppl
        Path(out).write_text(json.dumps({
            "method": method, "processes": n, "threads_per_process": torch.get_num_threads(),
            "prune_s": seconds, "ppl": ppl, "achieved_sparsity": report.achieved_sparsity,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}))
    if n > 1:
        dist.destroy_process_group()


def stats_bytes(method: str) -> int:
    """float32 bytes all-reduced per model: Wanda one norm per input feature of each input group, SparseGPT one
    Hessian per input group (q/k/v share one input, gate/up another)."""
    from transformers import AutoConfig

    from hf_prune.assets import default_model_dir

    c = AutoConfig.from_pretrained(default_model_dir())
    inputs = [c.hidden_size, c.hidden_size, c.hidden_size, c.intermediate_size]  # qkv, o, gate/up, down
    per_block = sum(d if method == "wanda" else d * d for d in inputs) * 4
    return per_block * c.num_hidden_layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--link-gbps", type=float, default=50.0, help="assumed all-reduce bandwidth, GB/s, for the "
                   "projection (default 50, a PCIe-4/5 or slow-NVLink class link)")
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.out)
        return
    from oneshot import command_line, machine

    rows: list[dict[str, Any]] = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    for method in METHODS:
        for n in (1, 2):
            out = tmp / f"hf_prune-distributed-{method}-{n}.json"
            cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                    str(29610 + n)] if n > 1 else [sys.executable]) + [__file__, "--worker", method, "--out", str(out)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                           stdout=subprocess.DEVNULL)
            row = json.loads(out.read_text())
            row["launch_s"] = time.perf_counter() - t0
            row["allreduce_mb"] = stats_bytes(method) / 2**20
            rows.append(row)
            print(json.dumps(row), flush=True)
    by = {(r["method"], r["processes"]): r for r in rows}
    forward = by[("wanda", 1)]["prune_s"]
    math = max(by[("sparsegpt", 1)]["prune_s"] - forward, 0.0)
    projection = {}
    for method in METHODS:
        t1 = by[(method, 1)]["prune_s"]
        p_math = math if method == "sparsegpt" else 0.0
        f = t1 - p_math
        for n in (2, 4, 8):
            comm = 2 * (n - 1) / n * stats_bytes(method) / (args.link_gbps * 1e9)
            tn = f / n + p_math / min(n, 4) + comm
            projection[f"{method}@{n}"] = {"seconds": tn, "speedup": t1 / tn, "allreduce_s": comm}
    res = {"machine": machine(), "date": datetime.date.today().isoformat(),
           "command": command_line("benchmarks/distributed.py"), "rows": rows,
           "projection": {"assumptions": f"F = wanda 1-process time ({forward:.0f} s), P = sparsegpt - wanda "
                          f"({math:.0f} s), all-reduce at {args.link_gbps:g} GB/s", "by_method_and_devices": projection}}
    lines = [f"Machine: {res['machine']}  ", f"Date: {res['date']}  ", f"Command: `{res['command']}`  ", "",
             "| method | processes | threads each | prune s | vs 1 process | perplexity | all-reduced MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = by[(r["method"], 1)]
        lines.append(f"| {r['method']} | {r['processes']} | {r['threads_per_process']} | {r['prune_s']:.1f} | "
                     f"{base['prune_s'] / r['prune_s']:.2f}x | {r['ppl']:.3f} | {r['allreduce_mb']:.1f} |")
    lines += ["", f"Projected on N devices ({res['projection']['assumptions']}):", "",
              "| method | N=2 | N=4 | N=8 |", "|---|---:|---:|---:|"]
    for method in METHODS:
        cells = [f"{projection[f'{method}@{n}']['speedup']:.2f}x" for n in (2, 4, 8)]
        lines.append(f"| {method} | {' | '.join(cells)} |")
    from hf_prune.io import atomic_write_text

    atomic_write_text(HERE / "results" / "distributed.json", json.dumps(res, indent=2))
    atomic_write_text(HERE / "results" / "distributed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
