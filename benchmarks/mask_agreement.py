#!/usr/bin/env python
"""Per-layer agreement of the zero patterns of two pruned checkpoints (e.g. hf_prune vs llm-compressor).

    M=~/.cache/hf_prune/smollm2-135m-instruct
    .bench/llmc-venv/bin/python benchmarks/llmc/run_llmc.py --model $M --calib .bench/oneshot/calib.pt \\
        --method wanda --structure 2:4 --output /tmp/llmc-w24 --result /tmp/llmc-w24.json
    python benchmarks/run_hf_prune.py --model $M --calib .bench/oneshot/calib.pt --method wanda --structure 2:4 \\
        --output /tmp/hf-w24 --result /tmp/hf-w24.json
    python benchmarks/mask_agreement.py /tmp/hf-w24 /tmp/llmc-w24

Prints, for every 2-D weight both checkpoints hold under the same name and shape, the fraction of entries whose
zero / non-zero status agrees, then the mean per block.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    if not out:
        raise SystemExit(f"{folder}: no *.safetensors files")
    return out


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], pattern: str = r".*proj\.weight$"
              ) -> dict[str, float]:
    """Name -> fraction of entries where ``(a == 0) == (b == 0)``, for matching 2-D weights named like ``pattern``."""
    pat = re.compile(pattern)
    return {k: float(((a[k] == 0) == (b[k] == 0)).float().mean())
            for k in sorted(a) if pat.fullmatch(k) and k in b and a[k].dim() == 2 and a[k].shape == b[k].shape}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--pattern", default=r".*proj\.weight$", help="regex of the weight names to compare")
    args = p.parse_args()
    agree = agreement(load_weights(args.first), load_weights(args.second), args.pattern)
    if not agree:
        raise SystemExit("no weights in common")
    blocks: dict[int, list[float]] = {}
    for name, frac in agree.items():
        print(f"{name:50s} {frac:.5f}")
        m = re.search(r"\.(\d+)\.", name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(frac)
    print("\nblock  mean agreement")
    for i in sorted(blocks):
        print(f"{i:5d}  {sum(blocks[i]) / len(blocks[i]):.5f}")
    print(f"\nall {len(agree)} weights: {sum(agree.values()) / len(agree):.5f}")


if __name__ == "__main__":
    main()
