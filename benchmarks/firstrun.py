#!/usr/bin/env python
"""The README's main job, timed as a new user runs it, once per kind of CPU this machine can present.

    chrt -r 1 python benchmarks/firstrun.py                # every mode; writes results/firstrun.{json,md}
    python benchmarks/firstrun.py --modes native           # only this CPU as it is

The job is the README's command after installation (``hf-prune prune smollm2 --method sparsegpt --sparsity 0.5
--structure 2:4 ... --eval --eval-dense``, default ``--dtype auto``), run as a fresh process. Measured: wall time of
the whole process (imports, load, dense evaluation, pruning, save, pruned evaluation), the dtype ``auto`` chose,
dense and pruned perplexity, and the process's peak RSS (``wait4`` rusage of that child alone). A bf16/float32
``F.linear`` probe (4096x576 by 1536x576) in the same mode shows why the dtype was chosen.

Modes:
* ``native``: the CPU as it is (``torch.backends.cpu.get_cpu_capability()`` is recorded);
* ``avx2-emulated``: the same CPU restricted to AVX2 (``ATEN_CPU_CAPABILITY=avx2`` for PyTorch's kernels,
  ``DNNL_MAX_CPU_ISA=AVX2`` for oneDNN, ``MKL_ENABLE_INSTRUCTIONS=AVX2`` for MKL), so that bf16 has no native
  instructions, as on an AVX2-only laptop or cloud CPU. This is an emulation on a faster core, not a real AVX2
  machine; the matmul probe shows how close it comes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODES: dict[str, dict[str, str]] = {
    "native": {},
    "avx2-emulated": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
JOB = ["prune", "smollm2", "--method", "sparsegpt", "--sparsity", "0.5", "--structure", "2:4", "--overwrite",
       "--eval", "--eval-dense"]

PROBE = """
import time, torch, torch.nn.functional as F
x, w = torch.randn(4096, 576), torch.randn(1536, 576)
out = {"capability": str(torch.backends.cpu.get_cpu_capability())}
for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
    a, b = x.to(dt), w.to(dt)
    for _ in range(2):
        F.linear(a, b)
    t = time.perf_counter()
    for _ in range(5):
        F.linear(a, b)
    out[name + "_gflops"] = 2 * 4096 * 576 * 1536 * 5 / (time.perf_counter() - t) / 1e9
print(__import__("json").dumps(out))
"""


def run_mode(mode: str, hf_prune_bin: str) -> dict[str, Any]:
    env = {**os.environ, **MODES[mode]}
    probe = json.loads(subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, capture_output=True,
                                      text=True).stdout.splitlines()[-1])
    out_dir = tempfile.mkdtemp(prefix="firstrun-")
    log = Path(out_dir + ".log")
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen([hf_prune_bin, *JOB, "--output", out_dir], env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    shutil.rmtree(out_dir, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: the main job failed (exit {proc.returncode}):\n{text[-3000:]}")

    def grab(pattern: str) -> str | None:
        m = re.search(pattern, text)
        return m.group(1) if m else None

    return {
        "mode": mode, "env": MODES[mode], "cpu_capability": probe["capability"], "wall_s": wall,
        "dtype_chosen": grab(r"dtype auto -> (\w+)"), "dtype_reason": grab(r"dtype auto -> \w+ \((.*)\)"),
        "dense_ppl": float(grab(r"dense perplexity: ([\d.]+)") or "nan"),
        "pruned_ppl": float(grab(r"pruned perplexity: ([\d.]+)") or "nan"),
        "peak_rss_mb": usage.ru_maxrss / 1024, "matmul_probe": probe,
        "command": "hf-prune " + " ".join(JOB) + " --output DIR",
    }


def table(res: dict[str, Any]) -> str:
    lines = [f"Machine: {res['machine']}  ", f"Date: {res['date']}  ", f"Command: `{res['command']}`  ",
             f"Job: `{res['rows'][0]['command']}` (the README's main job), one fresh process per mode.", "",
             "| mode | CPU capability | dtype (auto) | wall time | dense PPL | pruned PPL | peak RSS | "
             "fp32 / bf16 matmul GFLOP/s |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        p = r["matmul_probe"]
        lines.append(f"| {r['mode']} | {r['cpu_capability']} | {r['dtype_chosen']} | {r['wall_s'] / 60:.1f} min "
                     f"({r['wall_s']:.0f} s) | {r['dense_ppl']:.3f} | {r['pruned_ppl']:.3f} | "
                     f"{r['peak_rss_mb'] / 1024:.2f} GiB | {p['float32_gflops']:.0f} / {p['bfloat16_gflops']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    args = p.parse_args()
    from oneshot import command_line, machine

    hf_prune_bin = shutil.which("hf-prune") or str(Path(sys.executable).parent / "hf-prune")
    rows = []
    for mode in args.modes:
        row = run_mode(mode, hf_prune_bin)
        print(json.dumps(row), flush=True)
        rows.append(row)
    res = {"machine": machine(), "date": datetime.date.today().isoformat(),
           "command": command_line("benchmarks/firstrun.py"), "rows": rows}
    from hf_prune.io import atomic_write_text

    atomic_write_text(HERE / "results" / "firstrun.json", json.dumps(res, indent=2))
    atomic_write_text(HERE / "results" / "firstrun.md", table(res) + "\n")
    print(table(res))


if __name__ == "__main__":
    main()
