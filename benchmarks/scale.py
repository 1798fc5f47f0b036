#!/usr/bin/env python
"""Depth scaling of the block-by-block pipeline: synthetic SmolLM2-width Llama models with 8, 16 and 32 blocks.

    python benchmarks/scale.py            # writes results/scale.json and results/scale.md

Each model (hidden 576, intermediate 1536, 9/3 heads, vocab 49152, random init, bf16) is pruned with SparseGPT
50% unstructured on 32 x 512 random calibration tokens in its own process. If the pipeline holds one block at a
time, time per block is constant (total time linear in depth) and peak RSS minus the model's own bytes is flat.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_prune.report import atomic_write_text

HERE = Path(__file__).resolve().parent
WORK = HERE.parent / ".bench" / "scale"


def main() -> None:
    sys.path.insert(0, str(HERE))
    from oneshot import machine

    WORK.mkdir(parents=True, exist_ok=True)
    calib = torch.randint(0, 49152, (32, 512), generator=torch.Generator().manual_seed(0))
    torch.save(calib, WORK / "calib.pt")
    rows = []
    for depth in (8, 16, 32):
        path = WORK / f"llama-576-L{depth}"
        if not (path / "config.json").exists():
            torch.manual_seed(0)
            cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                              num_hidden_layers=depth, vocab_size=49152, tie_word_embeddings=True)
            LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
        model_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        result = WORK / f"L{depth}.json"
        subprocess.run([sys.executable, str(HERE / "run_hf_prune.py"), "--model", str(path), "--calib",
                        str(WORK / "calib.pt"), "--method", "sparsegpt", "--structure", "unstructured",
                        "--output", str(WORK / f"out-L{depth}"), "--result", str(result)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        data = json.loads(result.read_text())
        row = {"blocks": depth, "model_mb": model_bytes / 2**20, "seconds": data["seconds"],
               "seconds_per_block": data["seconds"] / depth, "peak_rss_mb": data["peak_rss_mb"],
               "peak_rss_above_model_mb": data["peak_rss_mb"] - model_bytes / 2**20}
        rows.append(row)
        print(row, flush=True)
    results = {"machine": machine(), "date": datetime.date.today().isoformat(),
               "command": "python benchmarks/scale.py",
               "setup": "SparseGPT 50% unstructured, 32 x 512 random calibration tokens, bf16, one process per depth",
               "rows": rows}
    atomic_write_text(str(HERE / "results" / "scale.json"), json.dumps(results, indent=2))
    md = [f"Machine: {results['machine']}  ", f"Date: {results['date']}  ", f"Command: `{results['command']}`  ",
          f"Setup: {results['setup']}", "",
          "| blocks | model MB | prune s | s / block | peak RSS MB | peak RSS above model MB |", "|---|---|---|---|---|---|"]
    md += [f"| {r['blocks']} | {r['model_mb']:.0f} | {r['seconds']:.1f} | {r['seconds_per_block']:.2f} | "
           f"{r['peak_rss_mb']:.0f} | {r['peak_rss_above_model_mb']:.0f} |" for r in rows]
    atomic_write_text(str(HERE / "results" / "scale.md"), "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
