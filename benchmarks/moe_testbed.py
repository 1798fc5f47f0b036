#!/usr/bin/env python
"""Build the MoE test bed: SmolLM2-135M MoEfied into a Mixtral with 8 routed experts per layer, cached next to the
converted SmolLM2 (never committed). Writes ``benchmarks/results/moe_testbed.json`` (how it was built, its
perplexity at each stage).

    chrt -r 1 python benchmarks/moe_testbed.py              # build (or reuse) and describe the test bed
    python benchmarks/moe_testbed.py --quick                # a tiny build of 2 layers, to smoke-test the script

Why Mixtral: its attention, norms and rotary embedding are Llama's, so every non-MLP weight of SmolLM2 is copied
unchanged and only the MLPs become MoE layers (Qwen3-MoE and OLMoE add q/k norms, which SmolLM2 has not).

How (MoEfication, Zhang et al. 2022, adapted to SwiGLU):
1. Activations: ``act(gate x) * up x`` of every MLP on ``--cluster-tokens`` calibration tokens (first 80% of the
   gensim Wikipedia sample; the last 20% is held out for perplexity).
2. Clustering: each layer's 1536 channels, described by their |activation| over those tokens (unit-normalised),
   go into ``--experts`` equal clusters by balanced k-means (greedy capacity-limited assignment each round), so
   channels that fire together land in one expert. Expert ``e`` = the gate/up rows and down columns of its
   cluster: the sum of all experts is exactly the dense MLP.
3. Router: a linear softmax classifier of each token's top-k experts by output norm (the oracle choice), fitted
   on the MLP inputs, then scaled down so its logits are flat: the ranking stays and the chosen experts' weights,
   which Mixtral normalises to sum to 1, are nearly equal. Every expert's ``down_proj`` is scaled by ``top_k``, so
   equal weights give the plain sum of the chosen experts (the dense MLP restricted to their channels).
4. Short training (``--train-steps``, routers and experts only, attention/embeddings frozen, LM loss plus
   Mixtral's load-balancing loss) so that experts and router adapt to top-k routing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from oneshot import command_line, machine  # noqa: E402


def testbed_dir(quick: bool = False) -> Path:
    from hf_prune.assets import cache_root

    return cache_root() / ("smollm2-moe-testbed-quick" if quick else "smollm2-moe-testbed")


def balanced_kmeans(points: torch.Tensor, k: int, iters: int, seed: int = 0) -> torch.Tensor:
    """Cluster index of each row of ``points`` (cosine), every cluster exactly ``len(points) // k`` rows."""
    n = points.shape[0]
    cap = n // k
    x = torch.nn.functional.normalize(points, dim=1)
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(n, generator=g)[:k]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = x @ centers.T  # [n, k]
        order = torch.argsort(sim.reshape(-1), descending=True)
        assign.fill_(-1)
        fill = torch.zeros(k, dtype=torch.long)
        for flat in order.tolist():
            row, c = divmod(flat, k)
            if assign[row] < 0 and fill[c] < cap:
                assign[row] = c
                fill[c] += 1
        centers = torch.nn.functional.normalize(torch.stack([x[assign == c].mean(0) for c in range(k)]), dim=1)
    return assign


def fit_router(x: torch.Tensor, norms: torch.Tensor, top_k: int, steps: int, flat: float = 0.25) -> torch.Tensor:
    """Router weight ``[experts, hidden]``: softmax regression of the token's top-k experts (by the norm of their
    output, equal shares) on the MLP input ``x``, fitted with Adam; then scaled so that the logits' standard
    deviation is ``flat``, which keeps the ranking and makes the chosen experts' normalised weights nearly equal
    (their sum then reproduces the dense MLP on those channels)."""
    target = torch.zeros_like(norms)
    target.scatter_(1, norms.topk(top_k, dim=1).indices, 1.0 / top_k)
    x = x.float()
    scale = x.norm(dim=1, keepdim=True).mean()
    w = torch.zeros(norms.shape[1], x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy((x / scale) @ w.T, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    w = w.detach() / scale
    logits = x @ w.T
    return w * (flat / logits.std().clamp_min(1e-6))


def moefy(dense, xs: list[torch.Tensor], hs: list[torch.Tensor], experts: int, top_k: int, router_steps: int,
          iters: int):
    """The Mixtral model (see the module docs) and the per-layer clusters, from each layer's MLP inputs ``xs`` and
    signed intermediate activations ``hs``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    inter = c.intermediate_size // experts
    cfg = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=inter,
        num_hidden_layers=len(dense.model.layers), num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None, router_jitter_noise=0.0,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        attention_dropout=0.0, output_router_logits=False)
    moe = MixtralForCausalLM(cfg).eval()
    missing = moe.load_state_dict({k: v for k, v in dense.state_dict().items() if ".mlp." not in k}, strict=False)
    assert all(".mlp." in k for k in missing.missing_keys), missing.missing_keys
    clusters = []
    for i, (layer, m) in enumerate(zip(dense.model.layers, moe.model.layers, strict=True)):
        h = hs[i]
        assign = balanced_kmeans(h.abs().T, experts, iters, seed=i)
        idx = [torch.nonzero(assign == e).reshape(-1) for e in range(experts)]
        clusters.append([t.tolist() for t in idx])
        gate, up, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        with torch.no_grad():
            for e, rows in enumerate(idx):
                m.mlp.experts.gate_up_proj[e].copy_(torch.cat([gate[rows], up[rows]]))
                m.mlp.experts.down_proj[e].copy_(down[:, rows] * top_k)
            # router: a linear classifier of each token's top-k experts by output norm, then flattened
            norms = torch.stack([(h[:, rows] @ down[:, rows].T).norm(dim=1) for rows in idx], dim=1)
            m.mlp.gate.weight.copy_(fit_router(xs[i], norms, top_k, steps=router_steps))
    return moe, clusters


def mlp_inputs(model, ids: torch.Tensor, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(MLP inputs ``[tokens, hidden]``, signed intermediate activations ``[tokens, intermediate]``) per layer."""
    layers = model.model.layers
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    hs: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.register_forward_pre_hook(
            lambda m, a, i=i: xs[i].append(a[0].detach().reshape(-1, a[0].shape[-1]).float())))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: hs[i].append(a[0].detach().reshape(-1, a[0].shape[-1]).float())))
    with torch.no_grad():
        for chunk in ids.split(batch):
            model(chunk)
    for h in handles:
        h.remove()
    return [torch.cat(x) for x in xs], [torch.cat(h) for h in hs]


def train(model, ids: torch.Tensor, steps: int, lr: float, batch: int, log: list) -> float:
    """LM + load-balancing loss on routers and experts only; returns seconds."""
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp." in name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10))
                                              * 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159)).item()))
    model.train()
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    from tqdm.auto import tqdm

    for step in tqdm(range(steps), desc="test bed training", unit="step"):
        rows = torch.randint(0, ids.shape[0], (batch,), generator=g)
        x = ids[rows]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=x, labels=x, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(float(out.loss), 4), "aux": round(float(out.aux_loss), 4)})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--cluster-tokens", type=int, default=8192, help="tokens whose activations are clustered")
    ap.add_argument("--kmeans-iters", type=int, default=8)
    ap.add_argument("--router-steps", type=int, default=300, help="Adam steps of each router's classifier fit")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--train-seqlen", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.cluster_tokens, args.train_steps, args.eval_windows, args.kmeans_iters = 1024, 3, 4, 2
    torch.manual_seed(0)
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_prune
    from hf_prune.assets import default_model_dir, default_splits
    from hf_prune.evaluate import tokenize_for_eval

    out = testbed_dir(args.quick)
    result_path = HERE / "results" / ("moe_testbed-quick.json" if args.quick else "moe_testbed.json")
    if out.is_dir() and not args.rebuild and result_path.is_file():
        print(f"test bed cached at {out}; --rebuild to build it again")
        return
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    train_text, eval_text = default_splits()
    train_ids, eval_ids = tokenize_for_eval(train_text, tok), tokenize_for_eval(eval_text, tok)
    dense = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    if args.quick:
        dense.model.layers = dense.model.layers[:2]
        dense.config.num_hidden_layers = 2

    def ppl(model) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return round(hf_prune.perplexity(model, eval_ids, seqlen=512, max_windows=args.eval_windows,
                                             batch_size=4, show_progress=False).ppl, 3)

    record: dict = {"machine": machine(), "date": datetime.date.today().isoformat(),
                    "command": command_line("benchmarks/moe_testbed.py"), "args": vars(args)}
    start = time.perf_counter()
    record["dense_ppl"] = ppl(dense)
    print("dense", record["dense_ppl"])
    seq = 512
    n = args.cluster_tokens // seq
    calib = train_ids[: n * seq].view(n, seq)
    xs, hs = mlp_inputs(dense, calib, 4)
    moe, clusters = moefy(dense, xs, hs, args.experts, args.top_k, args.router_steps, args.kmeans_iters)
    del xs, hs
    record["moefied_ppl"] = ppl(moe)
    print("moefied", record["moefied_ppl"])
    windows = train_ids[n * seq:]
    m = windows.numel() // args.train_seqlen
    train_windows = windows[: m * args.train_seqlen].view(m, args.train_seqlen)
    log: list = []
    record["train_seconds"] = round(train(moe, train_windows, args.train_steps, args.lr, args.train_batch, log), 1)
    record["train_log"] = log
    record["trained_ppl"] = ppl(moe)
    print("trained", record["trained_ppl"])
    record["build_seconds"] = round(time.perf_counter() - start, 1)
    record["params"] = sum(p.numel() for p in moe.parameters())
    record["clusters_layer0_sizes"] = [len(c) for c in clusters[0]]
    moe.config.output_router_logits = False
    moe.save_pretrained(out)
    tok.save_pretrained(out)
    result_path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "train_log"}, indent=1))


if __name__ == "__main__":
    main()
