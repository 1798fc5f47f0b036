#!/usr/bin/env python
"""Routed-expert removal on the MoE test bed (SmolLM2-135M MoEfied into a Mixtral with 8 experts per layer, top-4;
built by ``benchmarks/moe_testbed.py``). Writes ``benchmarks/results/moe.{json,md,png}``.

    chrt -r 1 python benchmarks/moe_testbed.py     # once: builds and caches the test bed (~20 min)
    chrt -r 1 python benchmarks/moe.py             # this benchmark
    python benchmarks/moe.py --quick               # smoke test on the quick test bed

Protocol (one process; the model is bf16 throughout):
* routing statistics are collected once (`hf_prune.structure.collect.collect_expert_stats`, ``--calib-samples``
  windows of ``--seqlen`` tokens from the first 80% of the gensim Wikipedia sample) and every plan is made from
  them (`hf_prune.structure.experts.plan_from_stats`), applied to a fresh copy of the test bed and evaluated on
  the first ``--eval-windows`` 512-token windows of the last 20%;
* grid: every score x every fraction of experts removed, uniform allocation, super-expert guard on; the same
  with the guard off (evaluated only where the plan differs); dropping vs merging (``expert_merge=True``) for
  REAP and frequency; global allocation for REAP;
* size and speed: parameters, parameter bytes, and greedy decode tokens/s (batch 1, ``--decode-tokens`` new
  tokens after a 32-token prompt) of the test bed and REAP at 25% and 50%, in ``--decode-rounds`` interleaved
  rounds (median);
* STUN: REAP 25% then Wanda 50% inside (every linear layer of the blocks, experts included), against Wanda alone
  at the sparsity that leaves the same number of non-zero parameters;
* llm-compressor 0.14's REAP (``benchmarks/llmc/run_reap.py`` in its own venv, ``benchmarks/llmc/setup.sh``) on
  the same calibration tokens at the same fractions, when that venv exists: perplexity and wall time against
  hf_prune's ``model.prune(method="reap")`` (statistics + plan + surgery) timed the same way, and the floor of
  any such tool: one plain forward through the decoder blocks (``model.model``, no LM head, no statistics) over
  the same calibration batches, timed on the same copy just before hf_prune's run.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from moe_testbed import testbed_dir  # noqa: E402
from oneshot import command_line, machine, pyplot  # noqa: E402

LLMC_PY = REPO / ".bench" / "llmc-venv" / "bin" / "python"
SCORES = ("expert-frequency", "ean", "reap", "easy-ep", "random")
METHOD = {"random": "random-experts"}


def prunable_params(model) -> int:
    """Parameters of the matrices a one-shot method prunes with the default targets/ignore."""
    from hf_prune.config import DEFAULT_IGNORE
    from hf_prune.core.model import find_blocks, iter_prunable

    prefix, blocks = find_blocks(model)
    return sum(layer.shape[0] * layer.shape[1] for i, b in enumerate(blocks)
               for layer in iter_prunable(b, f"{prefix}.{i}", None, list(DEFAULT_IGNORE)))


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:  # noqa: C901 (a benchmark script: one straight protocol)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-rounds", type=int, default=3)
    ap.add_argument("--skip-llmc", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only-llmc", action="store_true", help="rerun only the llm-compressor comparison and update "
                    "the existing results (the rest of the file is kept, its command line noted)")
    args = ap.parse_args()
    if args.quick:
        args.calib_samples, args.eval_windows, args.decode_tokens, args.decode_rounds = 4, 2, 8, 1
        args.fractions = [0.25, 0.5]
    torch.manual_seed(0)
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_prune
    from hf_prune import PruningConfig
    from hf_prune.assets import default_splits
    from hf_prune.core.calibration import build_calibration
    from hf_prune.evaluate import tokenize_for_eval
    from hf_prune.structure.collect import collect_expert_stats
    from hf_prune.structure.experts import moe_specs, plan_from_stats
    from hf_prune.structure.surgery import apply_plan

    bed = testbed_dir(args.quick)
    if not (bed / "config.json").is_file():
        raise SystemExit(f"no test bed at {bed}: run `python benchmarks/moe_testbed.py{' --quick' if args.quick else ''}`")
    tok = AutoTokenizer.from_pretrained(bed)
    train_text, eval_text = default_splits()
    eval_ids = tokenize_for_eval(eval_text, tok)
    calib = build_calibration([train_text], tok, args.calib_samples, args.seqlen, 0)
    base = AutoModelForCausalLM.from_pretrained(bed, dtype=torch.bfloat16).eval()

    def ppl(model) -> float:
        return round(hf_prune.perplexity(model, eval_ids, seqlen=512, max_windows=args.eval_windows, batch_size=4,
                                         show_progress=False).ppl, 3)

    result_name = "moe-quick" if args.quick else "moe"
    if args.only_llmc:
        out = json.loads((HERE / "results" / f"{result_name}.json").read_text())
        out["llmc"] = llmc_rows(args, bed, calib, ppl)
        out["llmc_command"] = command_line("benchmarks/moe.py") + f" ({datetime.date.today().isoformat()})"
        write(out, result_name)
        return
    out: dict = {"machine": machine(), "date": datetime.date.today().isoformat(),
                 "command": command_line("benchmarks/moe.py"), "args": vars(args), "testbed": str(bed)}
    tb = HERE / "results" / ("moe_testbed-quick.json" if args.quick else "moe_testbed.json")
    if tb.is_file():
        info = json.loads(tb.read_text())
        out["testbed_build"] = {k: info.get(k) for k in ("dense_ppl", "moefied_ppl", "trained_ppl", "args")}
    out["base_ppl"] = ppl(base)
    print("test bed", out["base_ppl"], flush=True)
    specs = moe_specs(base)
    start = time.perf_counter()
    stats = collect_expert_stats(base, specs, calib, 4, torch.device("cpu"), show_progress=True)
    out["stats_seconds"] = round(time.perf_counter() - start, 1)

    def config(score: str, fraction: float, **kw) -> PruningConfig:
        return PruningConfig(method=METHOD.get(score, score), sparsity=fraction, **kw)

    def evaluate_plan(plan) -> tuple[float, int]:
        model = copy.deepcopy(base)
        apply_plan(model, plan)
        params = sum(p.numel() for p in model.parameters())
        value = ppl(model)
        del model
        return value, params

    rows: list[dict] = []

    def add(score: str, fraction: float, **kw) -> dict:
        plan, info = plan_from_stats(base, stats, config(score, fraction, **kw), score)
        keep = info["experts_keep"]
        twin = next((r for r in rows if r["keep"] == keep and r["merge"] == info["merge"]), None)
        if twin is not None:
            value, params = twin["ppl"], twin["params"]
        else:
            value, params = evaluate_plan(plan)
        row = {"score": score, "fraction": fraction, "guard": info["super_expert_guard"], "merge": info["merge"],
               "allocation": info["allocation"], "ppl": value, "ppl_ratio": round(value / out["base_ppl"], 4),
               "params": params, "experts_after": info["experts_after"], "super_experts": info["super_experts"],
               "same_plan_as": None if twin is None else {k: twin[k] for k in ("score", "guard", "merge")},
               "keep": keep}
        rows.append(row)
        print(f"{score:17s} {fraction:.3f} guard={row['guard']!s:5} merge={row['merge']!s:5} "
              f"{row['allocation']:7s} ppl {value:9.3f}{' (same plan)' if twin else ''}", flush=True)
        return row

    for fraction in args.fractions:
        for score in SCORES:
            add(score, fraction)
            add(score, fraction, super_expert_guard=False)
        for score in ("reap", "expert-frequency"):
            add(score, fraction, expert_merge=True)
        add("reap", fraction, expert_allocation="global")
    out["rows"] = rows
    out["base_params"] = sum(p.numel() for p in base.parameters())

    # ------------------------------------------------------------------ size and decode speed
    prompt = calib[:1, :32]
    models = {"test bed": base}
    for fraction in (0.25, 0.5):
        m = copy.deepcopy(base)
        apply_plan(m, plan_from_stats(base, stats, config("reap", fraction), "reap")[0])
        models[f"reap {fraction:.0%}"] = m
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.decode_rounds):
        for name, m in models.items():
            with torch.no_grad():
                t0 = time.perf_counter()
                gen = m.generate(prompt, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
                times[name].append((gen.shape[1] - prompt.shape[1]) / (time.perf_counter() - t0))
    base_tps = statistics.median(times["test bed"])
    out["size_speed"] = [{
        "model": name, "params": sum(p.numel() for p in m.parameters()),
        "param_bytes": sum(p.numel() * p.element_size() for p in m.parameters()),
        "decode_tok_s": round(statistics.median(times[name]), 2),
        "decode_ratio": round(statistics.median(times[name]) / base_tps, 3),
        "params_ratio": round(sum(p.numel() for p in m.parameters()) / out["base_params"], 4)}
        for name, m in models.items()]
    del models
    print(json.dumps(out["size_speed"], indent=1), flush=True)

    # ------------------------------------------------------------------ STUN
    def prunable(report) -> tuple[int, int]:
        return sum(r.params for r in report.layers), sum(r.nonzero for r in report.layers)

    stun = copy.deepcopy(base)
    apply_plan(stun, plan_from_stats(base, stats, config("reap", 0.25), "reap")[0])
    r = hf_prune.prune(stun, PruningConfig(method="wanda", sparsity=0.5, num_calibration_samples=args.calib_samples,
                                           seqlen=args.seqlen), calibration=calib, show_progress=False)
    p_stun, nz_stun = prunable(r)
    rest_stun = sum(p.numel() for p in stun.parameters()) - p_stun
    stun_ppl = ppl(stun)
    del stun
    wanda = copy.deepcopy(base)
    p_full = prunable_params(wanda)
    rest_full = out["base_params"] - p_full
    s = 1 - (nz_stun + rest_stun - rest_full) / p_full
    r2 = hf_prune.prune(wanda, PruningConfig(method="wanda", sparsity=round(s, 6),
                                             num_calibration_samples=args.calib_samples, seqlen=args.seqlen),
                        calibration=calib, show_progress=False)
    p_w, nz_w = prunable(r2)
    out["stun"] = {"stun_ppl": stun_ppl, "stun_nonzero": nz_stun + rest_stun, "wanda_sparsity": round(s, 4),
                   "wanda_ppl": ppl(wanda), "wanda_nonzero": nz_w + out["base_params"] - p_w,
                   "prunable_params_full": p_full, "prunable_params_after_experts": p_stun}
    out["stun"]["ppl_ratio"] = round(out["stun"]["stun_ppl"] / out["stun"]["wanda_ppl"], 4)
    del wanda
    print(json.dumps(out["stun"], indent=1), flush=True)

    out["llmc"] = llmc_rows(args, bed, calib, ppl)
    out["peak_rss_mb"] = round(peak_rss_mb())
    write(out, result_name)


def write(out: dict, name: str) -> None:
    from hf_prune.report import atomic_write_text

    atomic_write_text(HERE / "results" / f"{name}.json", json.dumps(out, indent=1) + "\n")
    atomic_write_text(HERE / "results" / f"{name}.md", markdown(out))
    plot(out, HERE / "results" / f"{name}.png")
    print(markdown(out))


def llmc_rows(args, bed: Path, calib: torch.Tensor, ppl) -> list[dict] | str:  # type: ignore[no-untyped-def]
    """llm-compressor's REAP against hf_prune's ``model.prune(method="reap")`` at every fraction, alternating."""
    from transformers import AutoModelForCausalLM

    from hf_prune import PruningConfig

    if args.skip_llmc or not LLMC_PY.is_file():
        return "not run: " + ("--skip-llmc" if args.skip_llmc else f"no venv at {LLMC_PY} (bash benchmarks/llmc/setup.sh)")
    llmc: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(calib, Path(tmp) / "calib.pt")
        for fraction in args.fractions:
            m = AutoModelForCausalLM.from_pretrained(bed, dtype=torch.bfloat16).eval()
            t0 = time.perf_counter()
            with torch.no_grad():  # the floor: REAP needs every routed expert output, i.e. at least this forward
                for batch in calib.split(4):
                    m.model(batch, use_cache=False)
            floor_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            m.prune(PruningConfig(method="reap", sparsity=fraction, num_calibration_samples=args.calib_samples,
                                  seqlen=args.seqlen, batch_size=4), calibration=calib, show_progress=False,
                    verbose=False)
            ours_s = time.perf_counter() - t0
            ours_ppl = ppl(m)
            del m
            res, dest = Path(tmp) / f"r{fraction}.json", Path(tmp) / f"m{fraction}"
            proc = subprocess.run([str(LLMC_PY), str(HERE / "llmc" / "run_reap.py"), "--model", str(bed),
                                   "--calib", str(Path(tmp) / "calib.pt"), "--fraction", str(fraction),
                                   "--output", str(dest), "--result", str(res), "--batch-size", "4"],
                                  capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode:
                llmc.append({"fraction": fraction, "error": proc.stderr[-2000:]})
                continue
            theirs = json.loads(res.read_text())
            theirs_ppl = ppl(AutoModelForCausalLM.from_pretrained(dest, dtype=torch.bfloat16).eval())
            llmc.append({"fraction": fraction, "hf_prune_ppl": ours_ppl, "hf_prune_seconds": round(ours_s, 1),
                         "llmc_ppl": theirs_ppl, "llmc_seconds": round(theirs["seconds"], 1) if theirs.get("seconds")
                         else None, "ppl_ratio": round(ours_ppl / theirs_ppl, 4),
                         "time_ratio": round(ours_s / theirs["seconds"], 3) if theirs.get("seconds") else None,
                         "forward_floor_seconds": round(floor_s, 1),
                         "floor_ratio": round(floor_s / theirs["seconds"], 3) if theirs.get("seconds") else None,
                         "llmc": {k: v for k, v in theirs.items() if k != "seconds"}})
            print(json.dumps(llmc[-1])[:400], flush=True)
    return llmc


def markdown(out: dict) -> str:
    lines = [f"# Routed-expert removal on the MoE test bed ({out['date']})", "",
             f"Machine: {out['machine']}", "", f"Command: `{out['command']}`", ""]
    tb = out.get("testbed_build") or {}
    build = tb.get("args") or {}
    lines += [f"Test bed: SmolLM2-135M MoEfied into Mixtral, {build.get('experts', '?')} experts x "
              f"{1536 // int(build.get('experts', 8))} channels per layer, top-{build.get('top_k', '?')} "
              f"(dense SmolLM2 PPL {tb.get('dense_ppl')}, MoEfied {tb.get('moefied_ppl')}, after training "
              f"{tb.get('trained_ppl')}); PPL here {out['base_ppl']} on {out['args']['eval_windows']} windows. "
              f"Statistics: {out['args']['calib_samples']} x {out['args']['seqlen']} tokens, "
              f"{out['stats_seconds']} s.", ""]
    fractions = sorted({r["fraction"] for r in out["rows"]})
    head = "| score | " + " | ".join(f"{f:.1%} removed" for f in fractions) + " |"
    sep = "|---|" + "---:|" * len(fractions)

    def table(title: str, pick) -> None:  # type: ignore[no-untyped-def]
        lines.extend([f"### {title}", "", head, sep])
        labels = []
        for r in out["rows"]:
            label = pick(r)
            if label and label not in labels:
                labels.append(label)
        for label in labels:
            cells = []
            for f in fractions:
                hit = next((r for r in out["rows"] if pick(r) == label and r["fraction"] == f), None)
                cells.append("–" if hit is None else f"{hit['ppl']:.2f} ({hit['ppl_ratio']:.2f}x)")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")

    table("Perplexity (x test bed), uniform allocation, guard on, experts dropped",
          lambda r: r["score"] if r["guard"] and not r["merge"] and r["allocation"] == "uniform" else None)
    table("Guard off (same plan = same number)",
          lambda r: r["score"] if not r["guard"] and not r["merge"] else None)
    table("Merging instead of dropping (guard on)",
          lambda r: f"{r['score']} merged" if r["merge"] else None)
    table("Global allocation (per-layer counts)",
          lambda r: f"{r['score']} global" if r["allocation"] == "global" else None)
    supers = {json.dumps(r["super_experts"]) for r in out["rows"]}
    lines += [f"Super experts found (layer, expert): {', '.join(supers)}", ""]
    lines += ["### Size and decode speed (batch 1, greedy, interleaved rounds, median)", "",
              "| model | params | x params | param MB | decode tok/s | x speed |", "|---|---:|---:|---:|---:|---:|"]
    for r in out["size_speed"]:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['params_ratio']:.3f} | {r['param_bytes'] / 2**20:.0f} | "
                     f"{r['decode_tok_s']} | {r['decode_ratio']:.3f} |")
    s = out["stun"]
    lines += ["", "### STUN: REAP 25% then Wanda 50% against Wanda alone at the same non-zero count", "",
              "| | PPL | non-zero params |", "|---|---:|---:|",
              f"| REAP 25% + Wanda 50% | {s['stun_ppl']} | {s['stun_nonzero']:,} |",
              f"| Wanda {s['wanda_sparsity']:.1%} | {s['wanda_ppl']} | {s['wanda_nonzero']:,} |",
              f"| ratio | {s['ppl_ratio']} | |", ""]
    lines += ["### llm-compressor REAP, same calibration tokens", ""]
    if out.get("llmc_command"):
        lines += [f"Rerun alone: `{out['llmc_command']}`", ""]
    if isinstance(out["llmc"], str):
        lines.append(out["llmc"])
    else:
        lines += ["Floor: one plain forward through the decoder blocks over the same batches (no statistics, no LM "
                  "head); no REAP implementation can take less.", "",
                  "| removed | hf_prune PPL | llm-compressor PPL | PPL ratio | hf_prune s | llm-compressor s | time ratio "
                  "| floor s | floor ratio |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in out["llmc"]:
            if "error" in r:
                lines.append(f"| {r['fraction']:.1%} | error: {r['error'][-200:]!r} | | | | | | | |")
            else:
                lines.append(f"| {r['fraction']:.1%} | {r['hf_prune_ppl']} | {r['llmc_ppl']} | {r['ppl_ratio']} | "
                             f"{r['hf_prune_seconds']} | {r['llmc_seconds']} | {r['time_ratio']} | "
                             f"{r.get('forward_floor_seconds', '')} | {r.get('floor_ratio', '')} |")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for score in SCORES:
        for merge in (False, True):
            pts = sorted((r["fraction"], r["ppl"]) for r in out["rows"] if r["score"] == score and r["guard"]
                         and r["merge"] == merge and r["allocation"] == "uniform")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if merge else "-", marker="o",
                        label=f"{score}{' merged' if merge else ''}")
    ax.axhline(out["base_ppl"], color="gray", lw=0.8, label="test bed")
    ax.set_xlabel("fraction of routed experts removed")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Expert removal on the SmolLM2 MoE test bed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
