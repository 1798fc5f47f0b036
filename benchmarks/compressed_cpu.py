#!/usr/bin/env python
"""Compressed checkpoints on CPU: what each load policy (``speed``, ``memory``, ``kernel``) costs against the dense
model, on the real SmolLM2-135M.

    chrt -r 1 python benchmarks/compressed_cpu.py                 # prepare, memory, speed; writes the results
    python benchmarks/compressed_cpu.py --phase prepare           # only build the checkpoints (cached)

Checkpoints (float32, in ``~/.cache/hf_prune/bench_compressed``): SmolLM2 pruned by magnitude (the speed and
memory of a compressed layer depend on its zeros, not on how they were chosen) to 2:4 (saved in the ``2:4`` and
the ``bitmask`` format) and to 50%, 80% and 90% unstructured (``bitmask``), plus the dense model.

Protocol:
* disk bytes: the safetensors files of each checkpoint;
* load time and resident memory: one fresh subprocess per (checkpoint, policy), run one after another: RSS
  before ``from_pretrained``, after it, and the process's peak RSS (``ru_maxrss``) over the load plus one
  512-token prefill and 16 decode steps;
* latency: per checkpoint, the dense model and the three policies loaded in one process and timed in interleaved
  rounds (``benchmarks/speed.py``'s ``measure_interleaved``: every round times each model once, order rotated,
  ratios taken within a round): 1-token decode latency (bare decode loop with the KV cache after a 32-token
  prompt) and 512-token prefill throughput;
* speed check (``--phase speedcheck``): the ``speed`` policy's promise (within 5% of dense) needs finer
  resolution than the policy comparison, so the dense model and the ``speed`` load of every checkpoint are timed
  together in one interleaved group with more rounds (``--check-rounds``) and longer decodes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CACHE = Path(os.environ.get("HF_PRUNE_BENCH_CACHE", Path.home() / ".cache" / "hf_prune" / "bench_compressed"))
POLICIES = ("speed", "memory", "kernel")
#: name -> (pruning structure / sparsity, saved format)
CHECKPOINTS = {
    "2:4 / 2:4 format": ("2:4", 0.5, "2:4"),
    "2:4 / bitmask": ("2:4", 0.5, "bitmask"),
    "50% / bitmask": ("unstructured", 0.5, "bitmask"),
    "80% / bitmask": ("unstructured", 0.8, "bitmask"),
    "90% / bitmask": ("unstructured", 0.9, "bitmask"),
}


def folder(name: str) -> Path:
    return CACHE / name.replace(" / ", "_").replace(":", "of").replace("%", "pct").replace(" ", "")


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def prepare() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_prune
    from hf_prune.assets import default_model_dir

    src = default_model_dir()
    dense_dir = CACHE / "dense"
    if not (dense_dir / "config.json").exists():
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(dense_dir)
        AutoTokenizer.from_pretrained(src).save_pretrained(dense_dir)
    for name, (structure, sparsity, fmt) in CHECKPOINTS.items():
        out = folder(name)
        if (out / "config.json").exists():
            continue
        model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
        model.prune(hf_prune.PruningConfig(method="magnitude", sparsity=sparsity, structure=structure),
                    verbose=False, show_progress=False)
        model.save_pretrained(out, sparse_format=fmt)
        print(f"prepared {name}: {disk_bytes(out) / 2**20:.1f} MiB on disk", flush=True)


def measure_one(path: str, policy: str | None) -> dict[str, Any]:
    """In a fresh process: load time, RSS after load, peak RSS over load + one prefill + 16 decode steps."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    import hf_prune  # noqa: F401  (registers the compressed format)
    from hf_prune.formats import HfPruneSparseConfig
    from hf_prune.nn import SparseLinear

    proc = psutil.Process()
    before = proc.memory_info().rss
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if policy is not None:
        kwargs["quantization_config"] = HfPruneSparseConfig(policy=policy)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    load_s = time.perf_counter() - t0
    after_load = proc.memory_info().rss
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    policies: dict[str, int] = {}
    for m in layers:
        policies[m.policy] = policies.get(m.policy, 0) + 1
    ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model(ids[:, :32], use_cache=True)
        cache = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(16):
            out = model(tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        model(ids)
    return {
        "load_s": load_s, "rss_before_mb": before / 2**20, "rss_after_load_mb": after_load / 2**20,
        "model_rss_mb": (after_load - before) / 2**20, "rss_after_run_mb": proc.memory_info().rss / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "weights_held_mb": sum(m.held_nbytes() for m in layers) / 2**20, "layer_policies": policies,
    }


def memory_phase() -> dict[str, Any]:
    rows: dict[str, Any] = {}
    jobs = [("dense", CACHE / "dense", None)] + [(n, folder(n), p) for n in CHECKPOINTS for p in POLICIES]
    for name, path, policy in jobs:
        cmd = [sys.executable, __file__, "--measure-one", str(path)] + (["--policy", policy] if policy else [])
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        res["disk_mb"] = disk_bytes(path) / 2**20
        rows.setdefault(name, {})[policy or "dense"] = res
        print(f"{name:18s} {policy or 'dense':7s} load {res['load_s']:5.2f} s  model RSS {res['model_rss_mb']:7.1f} "
              f"MiB  peak {res['peak_rss_mb']:7.1f} MiB  disk {res['disk_mb']:6.1f} MiB  {res['layer_policies']}",
              flush=True)
    return rows


def speed_phase(rounds: int, decode_tokens: int) -> dict[str, Any]:
    import torch
    from speed import measure_interleaved
    from transformers import AutoModelForCausalLM

    import hf_prune  # noqa: F401
    from hf_prune.formats import HfPruneSparseConfig

    out: dict[str, Any] = {}
    dense = AutoModelForCausalLM.from_pretrained(CACHE / "dense", dtype=torch.float32).eval()
    for name in CHECKPOINTS:
        models = {"dense": dense}
        for policy in POLICIES:
            models[policy] = AutoModelForCausalLM.from_pretrained(
                folder(name), dtype=torch.float32, quantization_config=HfPruneSparseConfig(policy=policy)).eval()
        res = measure_interleaved(models, "dense", rounds=rounds, prefill_tokens=512, decode_tokens=decode_tokens,
                                  decode_prompt_tokens=32, show_progress=False)
        out[name] = res
        line = "  ".join(f"{p} decode {res[p]['decode_loop_tok_s_x']:.2f}x prefill {res[p]['prefill_tok_s_x']:.2f}x"
                         for p in POLICIES)
        print(f"{name:18s} dense decode {1000 / res['dense']['decode_loop_tok_s']:.1f} ms/token  {line}", flush=True)
        del models
    return out


def speedcheck_phase(rounds: int, decode_tokens: int) -> dict[str, Any]:
    import torch
    from speed import measure_interleaved
    from transformers import AutoModelForCausalLM

    import hf_prune  # noqa: F401
    from hf_prune.formats import HfPruneSparseConfig

    models = {"dense": AutoModelForCausalLM.from_pretrained(CACHE / "dense", dtype=torch.float32).eval()}
    for name in CHECKPOINTS:
        models[name] = AutoModelForCausalLM.from_pretrained(
            folder(name), dtype=torch.float32, quantization_config=HfPruneSparseConfig(policy="speed")).eval()
    res = measure_interleaved(models, "dense", rounds=rounds, prefill_tokens=512, decode_tokens=decode_tokens,
                              decode_prompt_tokens=32, show_progress=False)
    for name in CHECKPOINTS:
        print(f"speed check {name:18s} decode {1 / res[name]['decode_loop_tok_s_x']:.3f}x  prefill "
              f"{1 / res[name]['prefill_tok_s_x']:.3f}x (time ratios against dense)", flush=True)
    return res


def table(results: dict[str, Any]) -> str:
    mem, spd = results["memory"], results["speed"]
    d = mem["dense"]["dense"]
    lines = [f"Machine: {results['machine']}  ", f"Date: {results['date']}  ", f"Command: `{results['command']}`  ",
             "dtype float32; latency ratios are medians of per-round ratios against dense in the same round.", "",
             "| checkpoint | policy | disk MiB | load s | RSS after run MiB | peak RSS MiB | weights held MiB | "
             "decode ms/token | decode vs dense | prefill tok/s | prefill vs dense |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    dense_dec = [spd[n]["dense"] for n in spd]
    med_ms = sorted(1000 / r["decode_loop_tok_s"] for r in dense_dec)[len(dense_dec) // 2]
    med_pf = sorted(r["prefill_tok_s"] for r in dense_dec)[len(dense_dec) // 2]
    lines.append(f"| dense | - | {d['disk_mb']:.0f} | {d['load_s']:.2f} | {d['rss_after_run_mb']:.0f} | "
                 f"{d['peak_rss_mb']:.0f} | - | {med_ms:.1f} | 1.00x | {med_pf:.0f} | 1.00x |")
    for name in CHECKPOINTS:
        for p in POLICIES:
            m, s = mem[name][p], spd[name][p]
            pol = p if set(m["layer_policies"]) == {p} else f"{p} ({', '.join(f'{k} {v}' for k, v in m['layer_policies'].items())} layers)"
            lines.append(
                f"| {name} | {pol} | {m['disk_mb']:.0f} | {m['load_s']:.2f} | {m['rss_after_run_mb']:.0f} | "
                f"{m['peak_rss_mb']:.0f} | {m['weights_held_mb']:.0f} | {1000 / s['decode_loop_tok_s']:.1f} | "
                f"{1 / s['decode_loop_tok_s_x']:.2f}x | {s['prefill_tok_s']:.0f} | {1 / s['prefill_tok_s_x']:.2f}x |")
    lines += ["", "`vs dense` columns are time ratios (latency / dense latency; prefill time / dense prefill time): "
              "below 1.00x is faster than dense. RSS after run: the process after load, one 512-token prefill and "
              "16 decode steps (the dense checkpoint's weights are memory-mapped and only count once touched, so "
              "RSS right after its load says little); peak RSS: the process's maximum (load transients included)."]
    chk = results.get("speedcheck")
    if chk:
        s = chk["results"]
        lines += ["", f"Speed check (`{chk['command']}`, {chk['rounds']} interleaved rounds, {chk['decode_tokens']}-token "
                  "decodes; dense and every `speed` load in one group):", "",
                  "| checkpoint (policy speed) | decode ms/token | decode vs dense | prefill tok/s | prefill vs dense |",
                  "|---|---:|---:|---:|---:|",
                  f"| dense | {1000 / s['dense']['decode_loop_tok_s']:.1f} | 1.00x | {s['dense']['prefill_tok_s']:.0f} | 1.00x |"]
        for name in CHECKPOINTS:
            r = s[name]
            lines.append(f"| {name} | {1000 / r['decode_loop_tok_s']:.1f} | {1 / r['decode_loop_tok_s_x']:.3f}x | "
                         f"{r['prefill_tok_s']:.0f} | {1 / r['prefill_tok_s_x']:.3f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("all", "prepare", "memory", "speed", "speedcheck"), default="all")
    p.add_argument("--check-rounds", type=int, default=11)
    p.add_argument("--check-decode-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--measure-one", help=argparse.SUPPRESS)
    p.add_argument("--policy", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure_one:
        print(json.dumps(measure_one(args.measure_one, args.policy)))
        return
    prepare()
    if args.phase == "prepare":
        return
    import torch
    from oneshot import command_line, machine

    torch.set_num_threads(os.cpu_count() or 1)
    results_path = HERE / "results" / "compressed_cpu.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update({"machine": machine(), "date": datetime.date.today().isoformat(), "dtype": "float32",
                    "pruning": "magnitude", "checkpoints": {n: list(v) for n, v in CHECKPOINTS.items()}})
    if args.phase in ("all", "memory", "speed"):
        results.setdefault("commands", {})[args.phase] = command_line("benchmarks/compressed_cpu.py")
        results["command"] = " ; ".join(results["commands"].values())
    if args.phase in ("all", "memory"):
        results["memory"] = memory_phase()
    if args.phase in ("all", "speed"):
        results["speed"] = speed_phase(args.rounds, args.decode_tokens)
    if args.phase in ("all", "speedcheck"):
        results["speedcheck"] = {"command": command_line("benchmarks/compressed_cpu.py"), "rounds": args.check_rounds,
                                 "decode_tokens": args.check_decode_tokens,
                                 "date": datetime.date.today().isoformat(),
                                 "results": speedcheck_phase(args.check_rounds, args.check_decode_tokens)}
    from hf_prune.io import atomic_write_text

    atomic_write_text(results_path, json.dumps(results, indent=2))
    if "memory" in results and "speed" in results:
        atomic_write_text(HERE / "results" / "compressed_cpu.md", table(results) + "\n")
        print(table(results))


if __name__ == "__main__":
    main()
