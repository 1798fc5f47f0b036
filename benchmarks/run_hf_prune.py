#!/usr/bin/env python
"""Prune a model with hf_prune in a fresh process (the counterpart of llmc/run_llmc.py).

    python benchmarks/run_hf_prune.py --model DIR --calib TOKENS.pt --method {magnitude,wanda,sparsegpt} \\
        --structure {unstructured,2:4} --sparsity 0.5 [--owl] --output OUT_DIR --result RESULT.json

Loads the model in bf16 (as run_llmc.py does), prunes with the calibration tokens in TOKENS.pt (a LongTensor
[n_samples, seqlen] shared with llm-compressor), saves a plain checkpoint and writes ``seconds`` (the prune call
only), ``peak_rss_mb`` (process peak RSS before saving, ru_maxrss, model load included, as for llm-compressor) and
``achieved_sparsity``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

import hf_prune
from hf_prune.core.memory import lifetime_peak_rss_mb


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--structure", default="unstructured")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--owl", action="store_true")
    p.add_argument("--options", default="{}", help="JSON dict of extra PruningConfig options (method options, "
                   "layer_sparsity, owl_lambda, ...)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", required=True)
    p.add_argument("--result", required=True)
    args = p.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    calib = torch.load(args.calib)
    config = hf_prune.PruningConfig(
        method=args.method, sparsity=None if args.structure != "unstructured" else args.sparsity,
        structure=args.structure, owl=args.owl, num_calibration_samples=int(calib.shape[0]),
        seqlen=int(calib.shape[1]), batch_size=args.batch_size, **json.loads(args.options),
    )
    start = time.perf_counter()
    report = model.prune(config, calibration=calib, show_progress=False, verbose=False)
    seconds = time.perf_counter() - start
    peak_rss_mb = lifetime_peak_rss_mb()  # before saving, as run_llmc.py measures it
    model.save_pretrained(args.output)
    result = {
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb,
        "peak_rss_mb_during_prune": report.peak_rss_mb,
        "achieved_sparsity": report.achieved_sparsity,
        "block_sparsity": report.block_sparsity,
        "owl_choice": getattr(report, "owl_choice", None),
        "torch_threads": torch.get_num_threads(),
    }
    with open(args.result, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
