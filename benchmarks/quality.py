#!/usr/bin/env python
"""One-shot quality grid on the real SmolLM2-135M: perplexity against sparsity for magnitude, Wanda, SparseGPT, RIA
and ADMM, each uniform and with OWL, at 50/60/70/80% unstructured and at 2:4.

    chrt -r 1 python benchmarks/quality.py            # full grid (~2.5 h on 2 CPU cores), results/quality.{json,md,png}
    chrt -r 1 python benchmarks/quality.py --resume   # keep the rows already in results/quality.json, run the rest
    python benchmarks/quality.py --quick              # 16 x 256 calibration tokens, 8 eval windows, 2 sparsities

Protocol: the one of ``benchmarks/oneshot.py`` (SmolLM2-135M-Instruct in bf16, 128 x 512 calibration tokens of the
gensim Wikipedia sample, seed 0, PPL on the first 64 512-token windows of the held-out 20%; every pruning run is its
own process, ``seconds`` is the prune call alone and ``peak_rss_mb`` the process's peak RSS, model load included).

OWL rows: the self-tuned OWL default searches the per-block sparsities with a proxy (`hf_prune.oneshot.owl`): the
method's own scores for magnitude, Wanda and RIA, which run with ``owl=True``; Wanda's for SparseGPT and ADMM. So
SparseGPT's and ADMM's OWL allocation is exactly the Wanda + OWL run's: their rows pass those per-block sparsities
through ``layer_sparsity`` (the same result as ``owl=True``, without repeating OWL's pass and search), their
``seconds`` are the method's alone and ``owl_seconds`` (the Wanda + OWL row's extra time) says what OWL itself
costs. N:M has no OWL rows: 2:4 fixes every layer's sparsity.

Between rows the script waits while ``.bench/quality.pause`` exists (so the machine can be used between timed runs
without distorting one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from oneshot import HERE, REPO, command_line, evaluate, machine, pyplot, run
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_prune.assets import default_model_dir, default_splits
from hf_prune.core.calibration import build_calibration
from hf_prune.evaluate import tokenize_for_eval
from hf_prune.report import atomic_write_text

METHODS = ("magnitude", "wanda", "sparsegpt", "ria", "admm")
#: methods whose OWL search uses Wanda's scores as proxy: their OWL rows reuse the Wanda + OWL allocation
WANDA_PROXY = ("sparsegpt", "admm")
PAUSE = REPO / ".bench" / "quality.pause"


def key(row: dict) -> tuple:
    return row["method"], row["structure"], row["sparsity"], row["owl"], row.get("variant", "")


#: extreme-sparsity rows (``--extreme``, after the grid): (method, sparsity, OWL, variant label, options)
EXTREME = [
    ("sparsegpt", 0.9, True, "", {}),
    ("admm", 0.9, True, "", {}),
    ("admm", 0.8, True, "3x iterations", {"admm_iterations": 60, "admm_prune_iterations": 45}),
    ("admm", 0.9, True, "3x iterations", {"admm_iterations": 60, "admm_prune_iterations": 45}),
]


def prune_and_eval(method: str, structure: str, sparsity: float, owl: bool, options: dict, ctx: dict) -> dict:
    work: Path = ctx["work"]
    tag = f"{method}-{structure.replace(':', 'of')}-{sparsity}{'-owl' if owl else ''}-{abs(hash(json.dumps(options)))}"
    out, result = work / tag, work / f"{tag}.json"
    cmd = [sys.executable, str(HERE / "run_hf_prune.py"), "--method", method, "--model", str(ctx["model_dir"]),
           "--calib", str(ctx["calib_path"]), "--structure", structure, "--sparsity", str(sparsity),
           "--output", str(out), "--result", str(result), "--options", json.dumps(options)]
    if owl and "layer_sparsity" not in options:
        cmd.append("--owl")
    run(cmd, work / f"{tag}.log")
    data = json.loads(result.read_text())
    ppl = evaluate(out, ctx["eval_ids"], ctx["seqlen"], ctx["windows"])
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    row = {"method": method, "structure": structure, "sparsity": sparsity, "owl": owl, "ppl": ppl,
           "seconds": data["seconds"], "peak_rss_mb": data["peak_rss_mb"],
           "achieved_sparsity": data["achieved_sparsity"], "options": options,
           "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for k in ("block_sparsity", "owl_choice"):
        if data.get(k):
            row[k] = data[k]
    print(f"  {tag}: ppl {ppl:.2f}, {data['seconds']:.1f} s, {data['peak_rss_mb']:.0f} MB", flush=True)
    return row


def block_overrides(block_sparsity: list[float], prefix: str = "model.layers") -> dict[str, float]:
    """``layer_sparsity`` regexes that give every decoder block its OWL sparsity."""
    return {rf"^{prefix}\.{i}\.": s for i, s in enumerate(block_sparsity)}


def find(rows: list[dict], method: str, structure: str, sparsity: float, owl: bool, variant: str = "") -> dict | None:
    return next((r for r in rows if key(r) == (method, structure, sparsity, owl, variant)), None)


def summary(results: dict) -> dict:
    """The issue's checks, as ratios of rows of this file."""
    rows, out = results["rows"], {}
    for structure, sparsity in results["grid"]:
        admm, sgpt = find(rows, "admm", structure, sparsity, False), find(rows, "sparsegpt", structure, sparsity, False)
        label = structure if structure != "unstructured" else f"{sparsity:.0%}"
        if admm and sgpt:
            out[f"admm/sparsegpt {label}"] = {k: admm[k] / sgpt[k] for k in ("ppl", "seconds", "peak_rss_mb")}
        if structure == "unstructured":
            for m in results["methods"]:
                a, b = find(rows, m, structure, sparsity, True), find(rows, m, structure, sparsity, False)
                if a and b:
                    out[f"owl/uniform {m} {label}"] = {"ppl": a["ppl"] / b["ppl"]}
    return out


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}  ",
        f"Date: {results['date']}  ",
        f"Command: `{results['command']}`  ",
        f"Calibration: {results['calibration']}; evaluation: {results['evaluation']}; dense PPL "
        f"{results['dense_ppl']:.2f}.",
        "",
        "Perplexity (lower is better); `+OWL` is the self-tuned OWL default. Seconds are the prune call alone; for "
        "the SparseGPT and ADMM OWL rows they exclude OWL's own pass and search (`owl s`, from the Wanda + OWL run, "
        "whose allocation they reuse).",
        "",
        "| method | structure | sparsity | PPL uniform | PPL +OWL | OWL / uniform | s uniform | s +OWL | owl s | "
        "peak RSS MB | OWL choice |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = results["rows"]
    for structure, sparsity in results["grid"]:
        for m in results["methods"]:
            u, o = find(rows, m, structure, sparsity, False), find(rows, m, structure, sparsity, True)
            if not u and not o:
                continue
            f = lambda r, k, fmt: fmt.format(r[k]) if r and r.get(k) is not None else "–"  # noqa: E731
            choice = {k: (round(v, 4) if isinstance(v, float) else v)
                      for k, v in ((o or {}).get("owl_choice") or {}).items() if k != "candidates"}
            lines.append(
                f"| {m} | {structure} | {sparsity} | {f(u, 'ppl', '{:.2f}')} | {f(o, 'ppl', '{:.2f}')} | "
                f"{o['ppl'] / u['ppl']:.3f} | " if (u and o) else
                f"| {m} | {structure} | {sparsity} | {f(u, 'ppl', '{:.2f}')} | {f(o, 'ppl', '{:.2f}')} | – | ")
            lines[-1] += (f"{f(u, 'seconds', '{:.1f}')} | {f(o, 'seconds', '{:.1f}')} | {f(o, 'owl_seconds', '{:.1f}')} | "
                          f"{f(u, 'peak_rss_mb', '{:.0f}')} | "
                          + (", ".join(f"{k}={v}" for k, v in choice.items()) or "–") + " |")
    extreme = [r for r in rows if r.get("variant") or r["sparsity"] not in {sp for _, sp in results["grid"]}]
    if extreme:
        lines += ["", "Extreme sparsity (`--extreme`; OWL allocation from a Wanda + OWL run at that sparsity):", "",
                  "| method | sparsity | OWL | variant | PPL | s | peak RSS MB |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['sparsity']} | {'yes' if r['owl'] else 'no'} | {r.get('variant') or '–'} | "
                  f"{r['ppl']:.2f} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |" for r in extreme]
    lines += ["", "| check | PPL ratio | time ratio | RSS ratio |", "|---|---|---|---|"]
    for name, r in summary(results).items():
        lines.append(f"| {name} | {r['ppl']:.3f} | {r['seconds']:.3f} | {r['peak_rss_mb']:.3f} |" if "seconds" in r
                     else f"| {name} | {r['ppl']:.3f} | | |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sparsities = sorted({s for st, s in results["grid"] if st == "unstructured"})
    for i, m in enumerate(results["methods"]):
        for owl, style in ((False, "-"), (True, "--")):
            pts = [(s, r["ppl"]) for s in sparsities if (r := find(results["rows"], m, "unstructured", s, owl))]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=f"C{i}", label=f"{m}{' + OWL' if owl else ''}")
    ax.axhline(results["dense_ppl"], color="grey", lw=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("unstructured sparsity")
    ax.set_ylabel("perplexity (Wikipedia, log scale)")
    ax.set_title("SmolLM2-135M one-shot pruning")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sparsities", default="0.5,0.6,0.7,0.8")
    p.add_argument("--no-owl", action="store_true", help="uniform rows only")
    p.add_argument("--only-owl", action="store_true", help="OWL rows only")
    p.add_argument("--extreme", action="store_true", help="after the grid: SparseGPT/ADMM at 90%% and ADMM with 3x "
                   "iterations at 80/90%%, all with OWL")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out; run the missing ones")
    p.add_argument("--out", default=str(HERE / "results" / "quality.json"))
    args = p.parse_args()
    if args.quick:
        args.samples, args.seqlen, args.eval_windows, args.sparsities = 16, 256, 8, "0.5,0.7"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sparsities = [float(s) for s in args.sparsities.split(",")]

    work = REPO / ".bench" / "oneshot"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "smollm2-bf16"
    if not (model_dir / "config.json").exists():
        src = default_model_dir()
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(src).save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib_text, eval_text = default_splits()
    calib = build_calibration([calib_text], tok, args.samples, args.seqlen, seed=0)
    calib_path = work / f"calib-{args.samples}x{args.seqlen}.pt"
    torch.save(calib, calib_path)
    eval_ids = tokenize_for_eval(eval_text, tok)
    ctx = {"work": work, "model_dir": model_dir, "calib_path": calib_path, "eval_ids": eval_ids,
           "seqlen": args.seqlen, "windows": args.eval_windows}
    out = Path(args.out)
    grid = [("unstructured", 0.5), ("2:4", 0.5)] + [("unstructured", s) for s in sparsities if s != 0.5]
    results = json.loads(out.read_text()) if args.resume and out.exists() else None
    if results is None:
        results = {
            "machine": machine(),
            "date": datetime.date.today().isoformat(),
            "command": command_line("benchmarks/quality.py"),
            "calibration": f"{args.samples} x {args.seqlen} tokens, seed 0, first 80% of the gensim Wikipedia sample",
            "evaluation": f"first {args.eval_windows} non-overlapping {args.seqlen}-token windows of the last 20%",
            "precision": "bf16 model and forward passes; pruning math (Hessians, Cholesky, ADMM) in float32",
            "dense_ppl": evaluate(model_dir, eval_ids, args.seqlen, args.eval_windows),
            "rows": [],
        }
    else:
        results.setdefault("resumed", []).append({"machine": machine(), "command": command_line("benchmarks/quality.py"),
                                                  "date": datetime.date.today().isoformat()})
    results["methods"], results["grid"] = methods, grid
    print(f"dense PPL {results['dense_ppl']:.3f}", flush=True)

    def save() -> None:
        results["summary"] = summary(results)
        atomic_write_text(str(out), json.dumps(results, indent=2))
        atomic_write_text(str(out.with_suffix(".md")), markdown(results) + "\n")
        plot(results, out.with_suffix(".png"))

    todo = []
    # Priority order, so that an interrupted run (``--resume`` continues it) has the issue's checks first:
    # SparseGPT vs ADMM (uniform), then Wanda uniform/OWL (OWL's allocation for SparseGPT/ADMM), SparseGPT/ADMM
    # with OWL, then magnitude and RIA.
    owl_grid = [(st, sp) for st, sp in grid if st == "unstructured"]
    if not args.only_owl:
        todo += [(m, st, sp, False) for st, sp in grid for m in ("sparsegpt", "admm")]
    for st, sp in owl_grid:
        if not args.only_owl:
            todo.append(("wanda", st, sp, False))
        if not args.no_owl:
            todo += [("wanda", st, sp, True)] + [(m, st, sp, True) for m in WANDA_PROXY]
    if not args.only_owl:
        todo += [("wanda", "2:4", 0.5, False)]
    for m in [m for m in methods if m not in ("wanda", *WANDA_PROXY)]:
        for st, sp in grid:
            if not args.only_owl:
                todo.append((m, st, sp, False))
            if not args.no_owl and st == "unstructured":
                todo.append((m, st, sp, True))
    todo = [(m, st, sp, owl, "", {}) for m, st, sp, owl in todo]
    if args.extreme:
        for sp in sorted({e[1] for e in EXTREME}):
            todo.append(("wanda", "unstructured", sp, True, "", {}))
        todo += [(m, "unstructured", sp, owl, variant, opts) for m, sp, owl, variant, opts in EXTREME]
    for method, structure, sparsity, owl, variant, extra in todo:
        if method not in methods and not (owl and method == "wanda"):
            continue
        if find(results["rows"], method, structure, sparsity, owl, variant):
            continue
        while PAUSE.exists():
            time.sleep(5)
        options: dict = dict(extra)
        if owl and method in WANDA_PROXY:
            source = find(results["rows"], "wanda", structure, sparsity, True)
            assert source is not None and source.get("block_sparsity"), "the Wanda + OWL row must come first"
            options["layer_sparsity"] = block_overrides(source["block_sparsity"])
        row = prune_and_eval(method, structure, sparsity, owl, options, ctx)
        if variant:
            row["variant"] = variant
        if owl and method not in WANDA_PROXY:
            uniform = find(results["rows"], method, structure, sparsity, False)
            row["owl_seconds"] = row["seconds"] - uniform["seconds"] if uniform else None
        elif owl:
            source = find(results["rows"], "wanda", structure, sparsity, True)
            row["owl_choice"] = source.get("owl_choice")
            row["owl_seconds"] = source.get("owl_seconds")
            row["owl_from"] = "the Wanda + OWL row's block sparsities, through layer_sparsity"
            row["options"] = {**extra, "owl": "layer_sparsity from the Wanda + OWL row"}
        results["rows"] = [r for r in results["rows"] if key(r) != key(row)] + [row]
        save()
    save()
    print(markdown(results))


if __name__ == "__main__":
    main()
