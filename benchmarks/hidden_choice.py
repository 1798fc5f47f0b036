#!/usr/bin/env python
"""Which 25% of SmolLM2-135M's hidden dimensions to cut, without any training (the starting point of pruning-aware
tuning), and whether a rotation of the residual stream helps. Writes ``benchmarks/results/hidden_choice.{json,md}``.

    python benchmarks/hidden_choice.py            # about 3 minutes on 2 cores

Every row keeps 432 of 576 dimensions (`hf_prune.structure.hidden.cut_hidden_`, identity maps) and reports bf16
perplexity on the first 16 held-out 512-token windows. Statistics come from 128 training windows of 128 tokens:

* ``energy``: ``E[h_j²]`` of the residual stream ``h`` at every hidden RMSNorm's input, each site normalised to mean 1;
* ``normalised energy``: ``E[n_j²]`` of the RMSNorm's normalised input ``n``;
* ``wanda-like``: ``E[(n_j w_j)²] · Σ_readers ‖W[:, j]‖²`` (what the readers lose);
* ``gate fisher``: ``Σ_sequences (dL/dg_j)²`` of one gate ``g`` on every writer's output (embeddings, o_proj,
  down_proj), one backward per sequence;
* ``energy + compensation``: the energy choice with each reader group's dropped input dimensions predicted from
  the kept ones by ridge least squares on the dense model's inputs, folded into the readers (what
  ``pat_compensate`` does at the freeze, here with the dense model's statistics);
* ``rotation (untied)``: the norms' weights folded into the readers, the residual stream rotated by the
  eigenvectors of ``Σ hᵀh`` over every norm input (one basis for all layers, SliceGPT-style), the top 432 kept.
  The final norm's weights must then be folded into lm_head, so the tied embeddings become two matrices
  (+21 M parameters);
* ``rotation (tied, diagonal approximation)``: the same with the embeddings kept tied, the final norm's weights
  replaced by the best diagonal ``diag(Qᵀ diag(w) Q)``, an approximation.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from driver import header, save, start  # noqa: E402
from loraprune import data  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=128, help="training windows of 128 tokens for the statistics")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--out", default=str(HERE / "results" / "hidden_choice.json"))
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    import hf_prune
    from hf_prune.assets import default_model_dir
    from hf_prune.structure.hidden import cut_hidden_

    torch.manual_seed(0)
    _, _, train, eval_ids, _ = data(SimpleNamespace(seqlen=128))
    base = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    d, k = base.config.hidden_size, 432
    layers = base.model.layers

    def ppl(m) -> float:
        m = copy.deepcopy(m).to(torch.bfloat16)
        return hf_prune.perplexity(m, eval_ids, seqlen=512, batch_size=8, max_windows=args.eval_windows,
                                   show_progress=False).ppl

    def readers_of(m):
        out = []
        for layer in m.model.layers:
            a, f = layer.self_attn, layer.mlp
            out += [(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]),
                    (layer.post_attention_layernorm, [f.gate_proj, f.up_proj])]
        return out

    sites = readers_of(base)
    norms = [n for n, _ in sites] + [base.model.norm]
    scores = {k_: torch.zeros(d, dtype=torch.float64) for k_ in ("energy", "normalised energy", "wanda-like",
                                                                 "gate fisher")}
    cov = torch.zeros(d, d, dtype=torch.float64)
    grams = {id(n): torch.zeros(d, d, dtype=torch.float64) for n, _ in sites}
    colnorm = {id(n): sum(r.weight.detach().double().pow(2).sum(0) for r in rs) for n, rs in sites}
    colnorm[id(base.model.norm)] = base.lm_head.weight.detach().double().pow(2).sum(0)

    def pre(mod, a):
        x = a[0].detach().reshape(-1, d).double()
        e = x.pow(2).mean(0)
        scores["energy"] += e / e.mean()
        cov.add_(x.t() @ x)
        n = x / x.pow(2).mean(-1, keepdim=True).add(mod.variance_epsilon).sqrt()
        scores["normalised energy"] += n.pow(2).sum(0)
        scores["wanda-like"] += (n * mod.weight.detach().double()).pow(2).sum(0) * colnorm[id(mod)]

    def post(mod, a, out):
        if id(mod) in grams:
            u = out.detach().reshape(-1, d).double()
            grams[id(mod)].add_(u.t() @ u)

    hooks = [n.register_forward_pre_hook(pre) for n in norms] + [n.register_forward_hook(post) for n, _ in sites]
    batches = train[: args.windows]
    with torch.no_grad():
        for b in batches.split(8):
            base(b)
    for h in hooks:
        h.remove()
    gate = torch.ones(d, requires_grad=True)
    writers = [base.model.embed_tokens] + [m for layer in layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    hooks = [m.register_forward_hook(lambda mod, a, out: out * gate) for m in writers]
    for b in batches.split(1):
        (g,) = torch.autograd.grad(base(b, labels=b).loss, gate)
        scores["gate fisher"] += g.double().pow(2)
    for h in hooks:
        h.remove()

    rows = []

    def add(name: str, model, note: str = "") -> None:
        rows.append({"choice": name, "ppl": ppl(model), "params": sum(p.numel() for p in model.parameters()),
                     "note": note})
        print(rows[-1], flush=True)

    rows.append({"choice": "dense", "ppl": ppl(base), "params": sum(p.numel() for p in base.parameters()), "note": ""})
    for name, s in scores.items():
        m = copy.deepcopy(base)
        cut_hidden_(m, s.argsort(descending=True)[:k], {}, None)
        add(name, m)
    # energy + compensation
    keep = scores["energy"].argsort(descending=True)[:k].sort().values
    drop = torch.tensor(sorted(set(range(d)) - set(keep.tolist())))
    mask = torch.zeros(d)
    mask[keep] = 1
    from hf_prune.training.hsm import fill_map, fold_fill

    m = copy.deepcopy(base)
    for (n, _), (_, rs) in zip(sites, readers_of(m), strict=True):
        fm = fill_map(grams[id(n)], mask).float()
        for r in rs:
            r.weight.data = fold_fill(r.weight.data, keep, drop, fm)
    cut_hidden_(m, keep, {}, None)
    add("energy + compensation", m)
    # rotation
    evals, evecs = torch.linalg.eigh(cov)
    q = evecs[:, evals.argsort(descending=True)].float()
    folded = copy.deepcopy(base)
    w_final = folded.model.norm.weight.detach().clone()
    for n, rs in readers_of(folded):
        for r in rs:
            r.weight.data = r.weight.data * n.weight.data[None, :]
        n.weight.data.fill_(1.0)

    def rotate(m, untie: bool):
        for layer in m.model.layers:
            for r in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                      layer.mlp.up_proj):
                r.weight.data = r.weight.data @ q
            for w in (layer.self_attn.o_proj, layer.mlp.down_proj):
                w.weight.data = q.t() @ w.weight.data
        emb = m.model.embed_tokens.weight.data.clone()
        if untie:
            m.lm_head.weight = torch.nn.Parameter(emb * w_final[None, :] @ q)
            m.config.tie_word_embeddings = False
            m.model.norm.weight.data.fill_(1.0)
        else:
            m.model.norm.weight.data = (q.pow(2) * w_final[:, None]).sum(0)
        m.model.embed_tokens.weight.data = emb @ q

    for untie, name in ((True, "rotation (untied)"), (False, "rotation (tied, diagonal approximation)")):
        m = copy.deepcopy(folded)
        rotate(m, untie)
        cut_hidden_(m, torch.arange(k), {}, None)
        add(name, m, "embeddings untied: +vocab x 432 parameters" if untie else "approximate before the cut")
    results = start("benchmarks/hidden_choice.py", f"432 of 576 hidden dims kept, no training; statistics on "
                    f"{args.windows} x 128 training tokens; bf16 PPL on {args.eval_windows} x 512 held-out windows",
                    Path(args.out), False, final_norm_weight_range=[float(w_final.min()), float(w_final.max())])
    results["rows"] = rows

    def markdown(res: dict) -> str:
        lines = [*header(res), "", f"SmolLM2's final norm weights range from {res['final_norm_weight_range'][0]:.2f} "
                 f"to {res['final_norm_weight_range'][1]:.2f}.", "", "| choice | PPL | params | note |",
                 "|---|---|---|---|"]
        lines += [f"| {r['choice']} | {r['ppl']:.1f} | {r['params']:,} | {r['note']} |" for r in res["rows"]]
        return "\n".join(lines)

    save(results, Path(args.out), markdown)
    print(markdown(results))


if __name__ == "__main__":
    main()
