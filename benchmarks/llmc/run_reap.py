#!/usr/bin/env python
"""Remove routed experts with llm-compressor's REAP (``REAPPruningModifier``) for the side-by-side benchmark.

Runs INSIDE the llm-compressor venv (see setup.sh), driven by subprocess from our benchmark
(``benchmarks/moe.py``); it must not import hf_prune.

    .bench/llmc-venv/bin/python benchmarks/llmc/run_reap.py \\
        --model DIR --calib TOKENS.pt --fraction 0.25 --output OUT_DIR --result RESULT.json

TOKENS.pt is a LongTensor [n_samples, seqlen] of token ids written by the benchmark, so both tools calibrate on
identical tokens (a ``datasets.Dataset`` with ``input_ids``/``attention_mask`` columns, used as is and in order;
see run_llmc.py).

What llm-compressor 0.14 does (``llmcompressor/modifiers/pruning/reap``):

* saliency of expert ``j`` = mean over the tokens routed to ``j`` of ``g_j * ||f_j(x)||_2`` (``g_j`` the router
  weight after the model's top-k normalisation, ``f_j`` the expert output); experts no token chose score 0;
* per layer (uniform): ``int(num_experts * fraction)`` lowest-saliency experts (``torch.topk(largest=False)``)
  are dropped in every MoE layer (per group for group-limited routers); the kept experts keep their order;
* it needs experts in its per-expert-Linear form (``LinearExperts2D``): ``oneshot`` converts transformers v5
  fused experts (``gate_up_proj``/``down_proj`` 3-D parameters, e.g. ``MixtralExperts``) after loading;
* a layer is pruned physically (expert ModuleList sliced, router rows sliced) at the end of its calibration
  epoch; at finalisation the config's expert count is set (``num_local_experts`` for Mixtral).

Calibration pipeline (``--pipeline``):

* ``basic`` (this script's default): whole-model forward passes over the calibration batches (eager attention,
  forced by llm-compressor), then every layer is pruned at once, i.e. all layers are scored on the dense model
  (REAP's definition; what hf_prune does).
* ``sequential`` (oneshot's own choice for REAP): one decoder layer at a time; with ``propagate_error`` (on
  unless ``--no-propagate-error``) each layer is scored on the outputs of the already pruned layers before it.
  CAUTION, llm-compressor 0.14.0.1 + transformers 5.17 on Mixtral: the traced graph rebuilds a MixtralConfig
  literal without ``_attn_implementation``, so ``create_causal_mask`` takes the sdpa shortcut and returns None
  for unpadded batches while calibration forces eager attention, which then applies NO mask: the calibration
  forward is bidirectional (non-causal) and the scores differ from the causal model's (checked on a tiny
  Mixtral: routing counts equal those of eager attention with the mask removed).

The model is then repacked with ``llmcompressor.modeling.moe.linearize.repack_moe`` into the native fused experts
module (so stock transformers, including the main venv's, loads it) and saved with the stock
``PreTrainedModel.save_pretrained`` (no compressed-tensors format; transformers 5.x writes Mixtral in its original
per-expert key layout ``block_sparse_moe.experts.N.w1/w2/w3``, which 5.17 and 5.24 both load). The result JSON has ``seconds`` (wall time of
the ``oneshot`` call only, which includes llm-compressor's own linearisation of the experts), ``peak_rss_mb``,
``kept_experts`` (per decoder-layer index: the original indices kept, in order), ``experts_before`` /
``experts_after`` per layer, versions and context.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_llmc import load_calibration, peak_rss_mb, save_dense  # noqa: E402


def moe_blocks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules holding both an ``experts`` and a router (``gate`` or ``router``): the MoE blocks."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if hasattr(mod, "experts") and (hasattr(mod, "gate") or hasattr(mod, "router"))
    }


def layer_index(name: str) -> int | str:
    m = re.search(r"layers\.(\d+)\.", name + ".")
    return int(m.group(1)) if m else name


def expert_count(block: torch.nn.Module) -> int:
    """Routed experts of a MoE block, from the fused 3-D weights or the per-expert modules."""
    experts = block.experts
    for attr in ("gate_up_proj", "up_proj", "down_proj"):
        p = getattr(experts, attr, None)
        if isinstance(p, torch.nn.Parameter) and p.dim() == 3:
            return int(p.shape[0])
    if isinstance(getattr(experts, "num_experts", None), int):
        return int(experts.num_experts)
    return len(list(experts.children()))


def router_rows(block: torch.nn.Module) -> int:
    router = block.gate if hasattr(block, "gate") else block.router
    return int(router.weight.shape[0])


def placeholder_tokenizer():
    """oneshot insists on a processor when a dataset is given, although pre-tokenized ``input_ids`` are used as
    is; for checkpoints without a tokenizer (tiny test models) a one-token WordLevel tokenizer stands in."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
        unk_token="<unk>",
        pad_token="<unk>",
    )


def run_reap(model, tokenizer, ids: torch.Tensor, args, report_path: str) -> float:
    """llm-compressor's oneshot with a REAPPruningModifier recipe; returns seconds of the call."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier

    n, seqlen = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    modifier = REAPPruningModifier(sparsity=args.fraction, report_path=report_path)
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
        # REAP only needs the routed tokens; True (oneshot's default) runs every expert on every token
        moe_calibrate_all_experts=args.calibrate_all_experts,
        pipeline=args.pipeline,
        propagate_error=args.propagate_error,
    )
    return time.perf_counter() - t0


@torch.no_grad()
def repack(model) -> float:
    """Fold llm-compressor's per-expert Linears back into the model's fused experts modules (the layout stock
    transformers v5 defines and loads), checking every copied weight; returns seconds."""
    from llmcompressor.modeling.moe.linearize import get_linearized_moes, repack_moe

    linear = dict(get_linearized_moes(model))
    t0 = time.perf_counter()
    repack_moe(model)
    seconds = time.perf_counter() - t0
    for name, lin in linear.items():
        fused = model.get_submodule(name)
        if get_linearized_moes(fused):
            raise SystemExit(f"{name}: still in llm-compressor's per-expert form after repack_moe")
        n = lin.num_experts
        for attr in ("gate_up_proj", "up_proj", "down_proj"):
            p = getattr(fused, attr, None)
            if isinstance(p, torch.nn.Parameter) and p.shape[0] != n:
                raise SystemExit(f"{name}.{attr}: {p.shape[0]} experts after repack, expected {n}")
        # repack_moe builds a fresh module and copies expert by expert: check it reproduces every expert
        if getattr(lin, "has_gate", False) and not getattr(lin, "is_transposed", False):
            for i in range(n):
                gate, up, down = lin[i].gate_proj.weight, lin[i].up_proj.weight, lin[i].down_proj.weight
                if not (
                    torch.equal(fused.gate_up_proj[i], torch.cat([gate, up]))
                    and torch.equal(fused.down_proj[i], down)
                ):
                    raise SystemExit(f"{name}: repacked expert {i} differs from the pruned expert")
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory (MoE, e.g. Mixtral)")
    p.add_argument("--calib", required=True, help="LongTensor [n_samples, seqlen] of token ids (torch.save)")
    p.add_argument(
        "--fraction", type=float, default=0.25, help="fraction of routed experts removed per layer"
    )
    p.add_argument("--output", required=True, help="directory for the pruned model (stock safetensors)")
    p.add_argument("--result", required=True, help="JSON file for seconds / peak_rss_mb / kept experts")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument(
        "--batch-size", type=int, default=1, help="oneshot calibration batch size (llm-compressor default 1)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument(
        "--pipeline",
        default="basic",
        choices=["basic", "sequential"],
        help="oneshot calibration pipeline: basic = dense whole-model passes, all layers scored on the dense model "
        "(default); sequential = llm-compressor's layer-by-layer default for REAP (see the module docstring: "
        "non-causal calibration on Mixtral with llm-compressor 0.14.0.1)",
    )
    p.add_argument(
        "--no-propagate-error",
        dest="propagate_error",
        action="store_false",
        help="sequential pipeline only: score every layer on the dense model's activations (default, as in "
        "llm-compressor: layers after a pruned one are calibrated on the pruned model's activations)",
    )
    p.add_argument(
        "--calibrate-all-experts",
        action="store_true",
        help="oneshot's moe_calibrate_all_experts (every expert sees every token; same scores, slower)",
    )
    p.add_argument("--no-save", action="store_true", help="skip saving the pruned model")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0.0 < args.fraction < 1.0:
        raise SystemExit(f"--fraction {args.fraction}: give a number in (0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import llmcompressor
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.eval()
    try:
        tokenizer, tokenizer_kind = AutoTokenizer.from_pretrained(args.model), "checkpoint"
    except Exception:  # noqa: BLE001 - any failure: the checkpoint has no usable tokenizer
        tokenizer, tokenizer_kind = placeholder_tokenizer(), "placeholder (checkpoint has none; not saved)"

    blocks = moe_blocks(model)
    if not blocks:
        raise SystemExit(f"{args.model}: no MoE blocks (a module with 'experts' and a 'gate'/'router')")
    before = {layer_index(n): expert_count(b) for n, b in blocks.items()}
    ids = load_calibration(args.calib)

    info: dict = {
        "method": "reap",
        "tool": "llmcompressor.modifiers.pruning.reap.REAPPruningModifier",
        "fraction": args.fraction,
        "dtype": args.dtype,
        "model": os.path.abspath(args.model),
        "model_type": model.config.model_type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llmcompressor": llmcompressor.__version__,
        "threads": torch.get_num_threads(),
        "calib_samples": int(ids.shape[0]),
        "calib_seqlen": int(ids.shape[1]),
        "batch_size": args.batch_size,
        "pipeline": args.pipeline,
        "propagate_error": args.propagate_error if args.pipeline == "sequential" else None,
        "moe_calibrate_all_experts": args.calibrate_all_experts,
        "tokenizer": tokenizer_kind,
        "experts_before": before,
    }

    with tempfile.TemporaryDirectory() as tmp:
        report_path = str(Path(tmp) / "retained.json")
        seconds = run_reap(model, tokenizer, ids, args, report_path)
        info["seconds"] = seconds
        info["peak_rss_mb"] = peak_rss_mb()  # before repacking/saving: not part of the method
        retained = json.loads(Path(report_path).read_text()) if Path(report_path).is_file() else {}
    kept = sorted((layer_index(n), r) for n, r in retained.items())
    info["kept_experts"] = {str(i): r for i, r in kept}

    info["repack_seconds"] = repack(model)
    blocks = moe_blocks(model)
    after = {layer_index(n): expert_count(b) for n, b in blocks.items()}
    routers = {layer_index(n): router_rows(b) for n, b in blocks.items()}
    info["experts_after"] = after
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    key = next(
        (
            k
            for k in ("num_local_experts", "num_experts", "moe_num_experts", "n_routed_experts")
            if hasattr(cfg, k)
        ),
        None,
    )
    info["config_num_experts"] = getattr(cfg, key) if key else None
    bad = {
        i: (after[i], routers[i])
        for i in after
        if after[i] != routers[i] or after[i] != info["config_num_experts"]
    }
    if bad:
        raise SystemExit(
            f"inconsistent expert counts (experts, router rows) per layer {bad} vs config {key}="
            f"{info['config_num_experts']}: stock transformers could not load the result"
        )

    if not args.no_save:
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        save_dense(model, tokenizer if tokenizer_kind == "checkpoint" else None, output)
        info["output"] = str(output.resolve())

    result = Path(args.result)
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({k: info[k] for k in ("method", "fraction", "seconds", "peak_rss_mb", "experts_after")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
