#!/usr/bin/env python
"""How much of an hf_prune vs llm-compressor perplexity gap is calibration noise? Re-run rows of the one-shot
benchmark with other calibration seeds (same protocol as oneshot.py) and report the per-seed PPL ratios.

    python benchmarks/seed_noise.py --rows wanda:2:4 sparsegpt:unstructured --seeds 1 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_prune.assets import default_splits
from hf_prune.core.calibration import build_calibration
from hf_prune.evaluate import tokenize_for_eval
from hf_prune.report import atomic_write_text

HERE = Path(__file__).resolve().parent


def main() -> None:
    sys.path.insert(0, str(HERE))
    from oneshot import REPO, machine, prune_and_eval

    p = argparse.ArgumentParser()
    p.add_argument("--rows", nargs="+", default=["wanda:2:4", "sparsegpt:unstructured"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    args = p.parse_args()
    work = REPO / ".bench" / "oneshot"
    model_dir = work / "smollm2-bf16"  # created by oneshot.py
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib_text, eval_text = default_splits()
    eval_ids = tokenize_for_eval(eval_text, tok)
    out = {"machine": machine(), "date": datetime.date.today().isoformat(),
           "command": "python benchmarks/seed_noise.py " + " ".join(sys.argv[1:]), "rows": []}
    for seed in args.seeds:
        calib_path = work / f"calib-seed{seed}.pt"
        torch.save(build_calibration([calib_text], tok, args.samples, args.seqlen, seed=seed), calib_path)
        ctx = {"work": work, "model_dir": model_dir, "calib_path": calib_path, "eval_ids": eval_ids,
               "seqlen": args.seqlen, "windows": args.eval_windows}
        for spec in args.rows:
            method, structure = spec.split(":", 1)
            ours = prune_and_eval("hf_prune", method, structure, 0.5, False, ctx)
            theirs = prune_and_eval("baseline", method, structure, 0.5, False, ctx)
            out["rows"].append({"seed": seed, "method": method, "structure": structure, "hf_prune_ppl": ours["ppl"],
                                "llmcompressor_ppl": theirs["ppl"], "ppl_ratio": ours["ppl"] / theirs["ppl"]})
            atomic_write_text(str(HERE / "results" / "seed_noise.json"), json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
