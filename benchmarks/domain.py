#!/usr/bin/env python
"""Domain-aware pruning on SmolLM2-135M: general vs domain calibration, a 50/50 mixture, and dual importance.

    chrt -r 1 python benchmarks/domain.py            # ~45 min on 2 cores; writes benchmarks/results/domain.{json,md,png}
    python benchmarks/domain.py --quick               # smoke test (few samples, two rows)

Protocol (one process, bf16 model, a fresh copy per row):
* general text: the gensim Wikipedia sample (first 80% for calibration, held-out last 20% for evaluation);
  domain text: this Python's standard library source, split by file (`hf_prune.assets.code_splits`: ~80% of the
  files for calibration, the other files for evaluation; the interpreter version is recorded);
* methods: Wanda and SparseGPT at 50% unstructured and 2:4, FLAP at 20% of the decoder parameters;
* calibration settings, each ``--samples`` windows of ``--seqlen`` tokens in total: ``general`` (all Wikipedia),
  ``domain`` (all code), ``mix`` (named sources, 50/50 samples: ``calibration={"general": ..., "domain": ...}``),
  ``dual`` (the same 50/50 rows, statistics kept per source and combined as general + λ·domain, ``--lambdas``);
  with ``--double`` also ``dual ×2``: twice the samples, so each source has as many as a single-source setting;
* perplexity on the first ``--eval-windows`` 512-token windows of each held-out text;
* the issue's target: a domain-aware setting with domain PPL ≤ 1.02 × the domain-only calibration's and general
  PPL ≤ 1.05 × the general-only calibration's, per method.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
from oneshot import HERE, command_line, machine, pyplot
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_prune
from hf_prune import PruningConfig
from hf_prune.assets import code_splits, default_model_dir, default_splits
from hf_prune.evaluate import tokenize_for_eval
from hf_prune.report import atomic_write_text

ROWS = [("wanda", "unstructured", 0.5), ("wanda", "2:4", None), ("sparsegpt", "unstructured", 0.5),
        ("sparsegpt", "2:4", None), ("flap", "width", 0.2)]
GENERAL_MAX, DOMAIN_MAX = 1.05, 1.02


def main() -> None:  # noqa: C901 - one straight protocol
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[1.0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--resume", action="store_true", help="keep rows already in the results file")
    ap.add_argument("--double", action="store_true", help="add 'dual λ=<first lambda> ×2': twice --samples, so "
                    "that each source gets as many samples as the single-source settings")
    ap.add_argument("--mix-general", type=float, nargs="+", default=[], metavar="W",
                    help="add 'mix W/(1-W)' rows: calibration_weights general=W, domain=1-W")
    ap.add_argument("--only", nargs="+", metavar="METHOD:STRUCTURE", help="run only these rows, e.g. wanda:2:4")
    args = ap.parse_args()
    rows_spec = ROWS
    if args.quick:
        args.samples, args.seqlen, args.eval_windows = 8, 128, 2
        rows_spec = [ROWS[0], ROWS[-1]]
    torch.manual_seed(0)
    torch.set_num_threads(2)
    name = "domain-quick" if args.quick else "domain"
    out_json = HERE / "results" / f"{name}.json"
    model_dir = default_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    wiki_train, wiki_eval = default_splits()
    code_train, code_eval = code_splits()
    evals = {"general": tokenize_for_eval(wiki_eval, tok), "domain": tokenize_for_eval(code_eval, tok)}
    settings: dict[str, dict] = {
        "general": {"calibration": [wiki_train]},
        "domain": {"calibration": [code_train]},
        "mix": {"calibration": {"general": [wiki_train], "domain": [code_train]}},
    }
    for lam in args.lambdas:
        settings[f"dual λ={lam:g}"] = {"calibration": {"general": [wiki_train], "domain": [code_train]},
                                       "domain_weight": lam}
    for w in args.mix_general:
        settings[f"mix {w:g}/{1 - w:g}"] = {"calibration": {"general": [wiki_train], "domain": [code_train]},
                                             "weights": {"general": w, "domain": round(1 - w, 6)}}
    if args.double:
        settings[f"dual λ={args.lambdas[0]:g} ×2"] = {"calibration": {"general": [wiki_train], "domain": [code_train]},
                                                      "domain_weight": args.lambdas[0], "samples": 2 * args.samples}
    if args.only:
        rows_spec = [r for r in rows_spec if f"{r[0]}:{r[1]}" in args.only]

    def ppl(model) -> dict[str, float]:  # type: ignore[no-untyped-def]
        return {k: round(hf_prune.perplexity(model, ids, seqlen=512, max_windows=args.eval_windows, batch_size=4,
                                             show_progress=False).ppl, 3) for k, ids in evals.items()}

    previous = json.loads(out_json.read_text()) if args.resume and out_json.is_file() else {}
    earlier = previous.get("commands") or ([previous["command"]] if "command" in previous else [])
    out: dict = {"machine": machine(), "python": platform.python_version(), "date": datetime.date.today().isoformat(),
                 "commands": [*earlier, command_line("benchmarks/domain.py")],
                 "protocol": {"samples": args.samples, "seqlen": args.seqlen, "eval_windows": args.eval_windows,
                              "eval_tokens": {k: int(v.numel()) for k, v in evals.items()},
                              "calibration_chars": {"general": len(wiki_train), "domain": len(code_train)}},
                 "rows": [{**r, "machine": r.get("machine", previous.get("machine"))}
                          for r in previous.get("rows", [])]}
    done = {(r["method"], r["structure"], r["setting"]) for r in out["rows"]}
    if "dense" in previous:
        out["dense"] = previous["dense"]
    else:
        dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        out["dense"] = ppl(dense)
        del dense
    print("dense", out["dense"], flush=True)
    for method, structure, sparsity in rows_spec:
        for setting, spec in settings.items():
            if (method, structure, setting) in done:
                continue
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
            cfg = PruningConfig(method=method, structure=structure, sparsity=sparsity,
                                num_calibration_samples=spec.get("samples", args.samples), seqlen=args.seqlen,
                                batch_size=4,
                                domain_weight=spec.get("domain_weight"),
                                calibration_weights=spec.get("weights"))
            t0 = time.perf_counter()
            report = hf_prune.prune(model, cfg, calibration=spec["calibration"], tokenizer=tok, show_progress=False,
                                    verbose=False)
            seconds = time.perf_counter() - t0
            row = {"machine": out["machine"], "method": method, "structure": structure, "sparsity": sparsity,
                   "setting": setting,
                   "seconds": round(seconds, 1), **ppl(model), "sources": report.calibration_sources}
            del model
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
            finish(out, out_json, name)
    finish(out, out_json, name)
    print(markdown(out))


def finish(out: dict, out_json: Path, name: str) -> None:
    """Ratios against each method's general-only and domain-only rows, the target check, and the files."""
    by = {(r["method"], r["structure"], r["setting"]): r for r in out["rows"]}
    targets: dict[str, dict] = {}
    for r in out["rows"]:
        g, d = by.get((r["method"], r["structure"], "general")), by.get((r["method"], r["structure"], "domain"))
        r["general_ratio"] = round(r["general"] / g["general"], 4) if g else None
        r["domain_ratio"] = round(r["domain"] / d["domain"], 4) if d else None
        key = f"{r['method']} {r['structure']}"
        if r["setting"] not in ("general", "domain") and r["general_ratio"] and r["domain_ratio"]:
            ok = r["general_ratio"] <= GENERAL_MAX and r["domain_ratio"] <= DOMAIN_MAX
            t = targets.setdefault(key, {"met_by": [], "closest": None})
            if ok:
                t["met_by"].append(r["setting"])
            excess = max(r["general_ratio"] / GENERAL_MAX, r["domain_ratio"] / DOMAIN_MAX)
            if t["closest"] is None or excess < t["closest"][1]:
                t["closest"] = [r["setting"], round(excess, 4)]
    out["targets"] = targets
    atomic_write_text(out_json, json.dumps(out, indent=2))
    atomic_write_text(out_json.with_suffix(".md"), markdown(out))
    plot(out, out_json.with_suffix(".png"))


def machine_lines(out: dict) -> list[str]:
    """One machine, or each machine with the settings that ran on it (rows carry their machine)."""
    machines = list(dict.fromkeys(r.get("machine") or out["machine"] for r in out["rows"])) or [out["machine"]]
    if len(machines) == 1:
        return [f"Machine: {machines[0]}, Python {out['python']}  "]
    lines = []
    for m in machines:
        runs = sorted({f"{r['method']} {r['structure']} {r['setting']}" for r in out["rows"]
                       if (r.get("machine") or out["machine"]) == m})
        which = "all other rows" if m == machines[0] else ", ".join(runs)
        lines.append(f"Machine ({which}): {m}  ")
    return lines + [f"Python {out['python']}  "]


def markdown(out: dict) -> str:
    p = out["protocol"]
    lines = [f"# Domain-aware pruning on SmolLM2-135M ({out['date']})", "",
             *machine_lines(out),
             "Commands (later ones add or redo rows, `--resume`): " + ", ".join(f"`{c}`" for c in out["commands"])
             + "  ",
             f"Calibration: {p['samples']} × {p['seqlen']} tokens per setting (mix and dual: half from each source). "
             f"Evaluation: the first {p['eval_windows']} 512-token windows of held-out Wikipedia (general) and of "
             "held-out standard-library files (domain).  ",
             f"Dense: general {out['dense']['general']}, domain {out['dense']['domain']}.", "",
             "Ratios are against the same method's general-only (general PPL) and domain-only (domain PPL) "
             f"calibration; the target is general ≤ {GENERAL_MAX} and domain ≤ {DOMAIN_MAX}.", "",
             "| method | structure | calibration | general PPL | domain PPL | general ratio | domain ratio | s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        lines.append(f"| {r['method']} | {r['structure']} | {r['setting']} | {r['general']} | {r['domain']} | "
                     f"{r['general_ratio']} | {r['domain_ratio']} | {r['seconds']} |")
    lines += ["", "| method | target met by | closest (max of ratio / limit) |", "|---|---|---|"]
    for key, t in out.get("targets", {}).items():
        lines.append(f"| {key} | {', '.join(t['met_by']) or 'none'} | {t['closest'][0]} ({t['closest'][1]}) |")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    markers = {"general": "o", "domain": "s", "mix": "^"}
    methods = sorted({f"{r['method']} {r['structure']}" for r in out["rows"]})
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for r in out["rows"]:
        if r["general_ratio"] is None or r["domain_ratio"] is None:
            continue
        key = f"{r['method']} {r['structure']}"
        ax.scatter(r["general_ratio"], r["domain_ratio"], color=colors[key], marker=markers.get(r["setting"], "*"),
                   s=60 if r["setting"] in markers else 120)
    for key, c in colors.items():
        ax.scatter([], [], color=c, label=key)
    for setting, m in {**markers, "dual": "*"}.items():
        ax.scatter([], [], color="gray", marker=m, label=setting)
    ax.axvline(GENERAL_MAX, color="gray", lw=0.8, ls="--")
    ax.axhline(DOMAIN_MAX, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("general PPL / general-only calibration's")
    ax.set_ylabel("domain PPL / domain-only calibration's")
    ax.set_title("SmolLM2-135M, general vs domain calibration\n(target: below and left of the dashed lines)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
