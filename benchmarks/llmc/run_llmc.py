#!/usr/bin/env python
"""Prune a model with llm-compressor (or torch's magnitude pruning) for the side-by-side benchmark.

Runs INSIDE the llm-compressor venv (see setup.sh), driven by subprocess from our
benchmark; it must not import hf_prune. ``--method magnitude_torch`` needs only
torch + transformers and runs in either venv.

    .bench/llmc-venv/bin/python benchmarks/llmc/run_llmc.py \\
        --model DIR --calib TOKENS.pt --method {wanda,sparsegpt,magnitude_torch} \\
        --structure {unstructured,2:4} --sparsity 0.5 --output OUT_DIR --result RESULT.json

TOKENS.pt is a LongTensor [n_samples, seqlen] of token ids written by the benchmark,
so both tools calibrate on identical tokens: it becomes a ``datasets.Dataset`` with
``input_ids``/``attention_mask`` columns, which llm-compressor uses as is (no
re-tokenization) and, with ``shuffle_calibration_samples=False``, in order.

The pruned model is saved with the stock ``PreTrainedModel.save_pretrained`` as plain
dense safetensors (no compressed-tensors format, no ``quantization_config``), so the
evaluator loads it with stock transformers. The result JSON has ``seconds`` (wall time
of the pruning call only), ``peak_rss_mb`` (process peak RSS) and
``achieved_sparsity`` (fraction of zeros over the targeted linear weights), plus
context (versions, shapes, per-kind sparsity).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

import torch

TARGET_RE = r".*layers.*proj$"
"""Linears to prune (llm-compressor regex syntax without the ``re:`` prefix): all
attention and MLP projections of the decoder blocks; never lm_head or embeddings."""


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB: VmHWM from /proc/self/status (ru_maxrss survives
    fork+exec on Linux, so a child of a large parent would report the parent's RSS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def target_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linears matching TARGET_RE (same selection as the llm-compressor recipe)."""
    pat = re.compile(TARGET_RE)
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and pat.fullmatch(name) and "lm_head" not in name
    }


def sparsity_report(model: torch.nn.Module) -> dict:
    """Fraction of exact zeros over the targeted weights, overall and per projection kind."""
    zeros = total = 0
    per_kind: dict[str, list[int]] = {}
    for name, mod in target_linears(model).items():
        w = mod.weight.detach()
        z, n = int((w == 0).sum()), w.numel()
        zeros += z
        total += n
        acc = per_kind.setdefault(name.rsplit(".", 1)[-1], [0, 0])
        acc[0] += z
        acc[1] += n
    return {
        "achieved_sparsity": zeros / max(total, 1),
        "target_params": total,
        "target_modules": len(target_linears(model)),
        "sparsity_by_kind": {k: z / n for k, (z, n) in sorted(per_kind.items())},
    }


def check_nm(model: torch.nn.Module, n: int, m: int) -> float:
    """Fraction of groups of m consecutive inputs (per row) that hold at least m-n zeros."""
    ok = groups = 0
    for mod in target_linears(model).values():
        w = mod.weight.detach()
        if w.shape[1] % m:
            continue
        g = (w.reshape(w.shape[0], -1, m) == 0).sum(-1)
        ok += int((g >= m - n).sum())
        groups += g.numel()
    return ok / max(groups, 1)


def load_calibration(path: str):
    ids = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise SystemExit(f"{path}: expected a LongTensor [n_samples, seqlen], got {type(ids)}")
    return ids.long()


def run_llmcompressor(model, tokenizer, ids: torch.Tensor, args) -> float:
    """Run llm-compressor's oneshot with a Wanda/SparseGPT recipe; returns seconds of the call."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    n, seqlen = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    mask_structure = "0:0" if args.structure == "unstructured" else args.structure
    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[args.method]
    modifier = cls(
        sparsity=args.sparsity,
        mask_structure=mask_structure,
        targets=["re:" + TARGET_RE],
        ignore=["re:.*lm_head"],
    )
    t0 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=[modifier],
        num_calibration_samples=n,
        max_seq_length=seqlen,
        batch_size=args.batch_size,
        shuffle_calibration_samples=False,
    )
    return time.perf_counter() - t0


def run_magnitude_torch(model, args) -> float:
    """Per-linear L1 (magnitude) unstructured pruning with torch.nn.utils.prune; made permanent."""
    import torch.nn.utils.prune as prune

    if args.structure != "unstructured":
        raise SystemExit("magnitude_torch supports --structure unstructured only")
    t0 = time.perf_counter()
    with torch.no_grad():
        for mod in target_linears(model).values():
            prune.l1_unstructured(mod, name="weight", amount=args.sparsity)
            prune.remove(mod, "weight")
    return time.perf_counter() - t0


def save_dense(model, tokenizer, output: Path) -> None:
    """Plain dense safetensors via the stock save_pretrained (bypasses llm-compressor's wrapper)."""
    from transformers import PreTrainedModel

    for key in ("quantization_config", "sparsity_config", "compression_config"):
        if hasattr(model.config, key):
            delattr(model.config, key)
    PreTrainedModel.save_pretrained(model, str(output))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(output))
    cfg = json.loads((output / "config.json").read_text())
    leaked = [k for k in ("quantization_config", "sparsity_config") if k in cfg]
    if leaked:
        raise SystemExit(f"{output}/config.json still carries {leaked}; stock transformers could not load it")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--calib", required=True, help="LongTensor [n_samples, seqlen] of token ids (torch.save)")
    p.add_argument("--method", required=True, choices=["wanda", "sparsegpt", "magnitude_torch"])
    p.add_argument("--structure", default="unstructured", choices=["unstructured", "2:4"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--output", required=True, help="directory for the pruned model (dense safetensors)")
    p.add_argument("--result", required=True, help="JSON file for seconds / peak_rss_mb / achieved_sparsity")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument(
        "--batch-size", type=int, default=1, help="oneshot calibration batch size (llm-compressor default 1)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument("--no-save", action="store_true", help="skip saving the pruned model")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.structure == "2:4" and abs(args.sparsity - 0.5) > 1e-9:
        print(
            f"note: 2:4 implies 50% sparsity; --sparsity {args.sparsity} is passed through", file=sys.stderr
        )

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    info: dict = {
        "method": args.method,
        "structure": args.structure,
        "sparsity": args.sparsity,
        "dtype": args.dtype,
        "model": os.path.abspath(args.model),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.method == "magnitude_torch":
        seconds = run_magnitude_torch(model, args)
        info["tool"] = "torch.nn.utils.prune.l1_unstructured"
    else:
        import llmcompressor

        ids = load_calibration(args.calib)
        info.update(
            tool="llmcompressor",
            llmcompressor=llmcompressor.__version__,
            calib_samples=int(ids.shape[0]),
            calib_seqlen=int(ids.shape[1]),
            batch_size=args.batch_size,
        )
        seconds = run_llmcompressor(model, tokenizer, ids, args)

    info.update(sparsity_report(model))
    if args.structure == "2:4":
        info["nm_groups_ok"] = check_nm(model, 2, 4)
    info["seconds"] = seconds
    info["peak_rss_mb"] = peak_rss_mb()  # before saving: saving is not part of the method
    if not args.no_save:
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        save_dense(model, tokenizer, output)
        info["output"] = str(output.resolve())

    result = Path(args.result)
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(info, indent=1) + "\n")
    print(
        json.dumps(
            {k: info[k] for k in ("method", "structure", "seconds", "peak_rss_mb", "achieved_sparsity")}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
