"""Structured surgery on tiny models of every supported architecture, with hand-written random plans.

The central check is "surgery equals masking": the physically shrunk model gives the same logits as the original
model with the removed units' contributions zeroed (MLP channels: output-projection columns; heads: output-
projection input columns; removed sublayers/blocks: their whole output), which proves the slicing is right,
fused layouts included.
"""

from __future__ import annotations

import copy
import random
import re

import pytest
import torch
import transformers as tf
from tiny_models import ARCHITECTURES, build, calib_ids

from hf_prune.core.compat import cache_kwarg, output_cache
from hf_prune.core.model import find_blocks
from hf_prune.errors import ConfigError, UnsupportedModelError
from hf_prune.structure import modeling_hf_prune as shipped
from hf_prune.structure.arch import block_specs, unit_params
from hf_prune.structure.plan import BlockSpec, LayerPlan, StructuredPlan
from hf_prune.structure.surgery import apply_plan

DENSE = [a for a in ARCHITECTURES if a != "qwen3_moe"]
KINDS = ["keep_all", "uniform", "mixed", "flap", "blocks"]
GENERATE = {"mixed", "blocks:llama", "blocks:gemma3"}  # cache checks (each costs a generate() loop)
HIDDEN = 64


def _conv1d(mod: torch.nn.Module) -> bool:
    return isinstance(mod, tf.pytorch_utils.Conv1D)


def _heads_plan(spec: BlockSpec, rng: random.Random, n_kv: int | None = None) -> tuple[list[int], list[int]]:
    a = spec.attention
    group = a.num_heads // a.num_kv_heads
    kv = sorted(rng.sample(range(a.num_kv_heads), n_kv or max(1, a.num_kv_heads // 2)))
    if group == 1:
        return kv, kv
    per = rng.randint(1, group)
    heads = sorted(h for k in kv for h in rng.sample(range(k * group, (k + 1) * group), per))
    return heads, kv


def make_plan(model: torch.nn.Module, kind: str, seed: int = 0) -> StructuredPlan:
    """Random hand-written plans; ``kind`` picks what is cut (uniform kinds give the same shapes per layer)."""
    rng = random.Random(seed)
    specs = block_specs(model)
    gen = torch.Generator().manual_seed(seed)
    layers: dict[int, LayerPlan] = {}
    if kind == "keep_all":
        for s in specs:
            layers[s.index] = LayerPlan(
                mlp_keep=list(range(s.mlp.intermediate)) if s.mlp else None,
                heads_keep=list(range(s.attention.num_heads)), kv_heads_keep=list(range(s.attention.num_kv_heads)))
        return StructuredPlan(layers=layers)
    if kind == "blocks":
        return StructuredPlan(remove_blocks=[rng.randrange(len(specs))])
    for s in specs:
        lp = LayerPlan()
        if kind in ("uniform", "mixed", "flap") and s.mlp is not None:
            n = s.mlp.intermediate // 2 if kind == "uniform" else rng.randint(1, s.mlp.intermediate - 1)
            lp.mlp_keep = sorted(rng.sample(range(s.mlp.intermediate), n))
        if kind in ("uniform", "mixed", "flap"):
            n_kv = max(1, s.attention.num_kv_heads // 2) if kind == "uniform" else None
            if kind == "uniform":  # same counts everywhere (random indices)
                group = s.attention.num_heads // s.attention.num_kv_heads
                kv = sorted(rng.sample(range(s.attention.num_kv_heads), n_kv))
                lp.kv_heads_keep = kv
                lp.heads_keep = sorted(h for k in kv for h in range(k * group, k * group + max(1, group // 2)))
            else:
                lp.heads_keep, lp.kv_heads_keep = _heads_plan(s, rng)
        if kind == "flap":
            lp.attn_bias = torch.randn(HIDDEN, generator=gen) * 0.1
            lp.mlp_bias = torch.randn(HIDDEN, generator=gen) * 0.1 if s.mlp is not None else None
        layers[s.index] = lp
    if kind in ("mixed", "flap"):  # last block: attention removed, first block's MLP removed where it has one
        last = specs[-1].index
        layers[last] = LayerPlan(remove_attention=True, mlp_bias=layers[last].mlp_bias,
                                 attn_bias=layers[last].attn_bias, mlp_keep=layers[last].mlp_keep)
        if specs[0].mlp is not None and len(specs) > 1:
            layers[0].mlp_keep, layers[0].remove_mlp = None, True
    return StructuredPlan(layers=layers)


def _zero_in(mod: torch.nn.Module, cols: list[int]) -> None:
    w = mod.weight.data
    if _conv1d(mod):
        w[cols, :] = 0
    else:
        w[:, cols] = 0


def _add_output(mod: torch.nn.Module, value: torch.Tensor) -> None:
    mod.register_forward_hook(lambda _m, _i, out: out + value.to(out.dtype))


def masked_reference(model: torch.nn.Module, plan: StructuredPlan) -> torch.nn.Module:
    """The original model with every removed unit's contribution zeroed (and FLAP biases added by hooks)."""
    ref = copy.deepcopy(model)
    get = ref.get_submodule
    _, blocks = find_blocks(ref)
    for s in block_specs(ref):
        lp = plan.layers.get(s.index, LayerPlan())
        if s.index in plan.remove_blocks:  # the block is skipped
            blocks[s.index].forward = lambda hidden_states, *args, **kwargs: hidden_states
            continue
        a, m = s.attention, s.mlp
        if a is not None:
            o = get(a.o)
            if lp.remove_attention:
                _zero_in(o, list(range(a.num_heads * a.head_dim)))
                if o.bias is not None and lp.attn_bias is None:
                    o.bias.data.zero_()
            elif lp.heads_keep is not None:
                gone = [h for h in range(a.num_heads) if h not in lp.heads_keep]
                _zero_in(o, [h * a.head_dim + j for h in gone for j in range(a.head_dim)])
            if lp.attn_bias is not None:
                _add_output(o, lp.attn_bias)
        if m is not None:
            out = get(m.output)
            keep = [] if lp.remove_mlp else lp.mlp_keep
            if keep is not None:
                _zero_in(out, [c for c in range(m.intermediate) if c not in keep])
                if lp.remove_mlp and out.bias is not None and lp.mlp_bias is None:
                    out.bias.data.zero_()
            if lp.mlp_bias is not None:
                _add_output(out, lp.mlp_bias)
    return ref


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def check_generate(model: torch.nn.Module, prompt: torch.Tensor, steps: int = 3) -> None:
    """Greedy ``generate()`` with the KV cache sees the no-cache logits at every step (compared as logits, so a
    near-tie in a random tiny model cannot flip the check) and picks their argmax.

    Prompt + steps stay within the tiny models' sliding window (8): beyond it, transformers 5.23's Gemma2 cached
    and uncached logits already differ on the unpruned model."""
    out = model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                         output_scores=True, return_dict_in_generate=True)
    seq, n = out.sequences, prompt.shape[1]
    assert seq.shape[1] == n + steps
    for t, cached in enumerate(out.logits):
        full = model(seq[:, : n + t], use_cache=False).logits[:, -1]
        torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
        assert torch.equal(seq[:, n + t], out.scores[t].argmax(-1))  # scores: after min_new_tokens' EOS ban


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", DENSE)
def test_surgery_equals_masking(arch: str, kind: str) -> None:
    model = build(arch)
    ids = calib_ids(2, 12)
    plan = make_plan(model, kind, seed=hash((arch, kind)) % 1000)
    with torch.no_grad():
        expected = masked_reference(model, plan)(ids).logits
    before = _n_params(model)
    removed = apply_plan(model, plan)
    assert sum(removed.values()) == before - _n_params(model)
    if kind != "keep_all":
        assert _n_params(model) < before
    with torch.no_grad():
        got = model(ids).logits
    if kind == "keep_all":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if kind in GENERATE or f"{kind}:{arch}" in GENERATE:  # the KV cache stays right after surgery
        check_generate(model, ids[:1, :3])


@pytest.mark.parametrize("kind", ["uniform", "mixed", "blocks"])
def test_qwen3_moe_attention_and_depth(kind: str) -> None:
    model = build("qwen3_moe")
    assert all(s.mlp is None for s in block_specs(model))
    ids = calib_ids(2, 10)
    plan = make_plan(model, kind, seed=3)
    with torch.no_grad():
        expected = masked_reference(model, plan)(ids).logits
    before = _n_params(model)
    removed = apply_plan(model, plan)
    assert sum(removed.values()) == before - _n_params(model) > 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    if kind == "mixed":
        check_generate(model, ids[:1, :3])


def test_qwen3_moe_block_removal_keeps_moe_placement() -> None:
    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, head_dim=16,
        decoder_sparse_step=2, mlp_only_layers=[]))
    kinds = [type(b.mlp).__name__ for b in model.model.layers]
    apply_plan(model, StructuredPlan(remove_blocks=[0]))
    rebuilt = tf.Qwen3MoeForCausalLM(model.config)
    assert [type(b.mlp).__name__ for b in rebuilt.model.layers] == kinds[1:]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_after_surgery(arch: str) -> None:
    model = build(arch).train()
    apply_plan(model, make_plan(model, "mixed", seed=1))
    ids = calib_ids(2, 12, seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_unit_params_match_surgery() -> None:
    model = build("llama")
    spec = block_specs(model)[0]
    units = unit_params(model, spec)
    before = _n_params(model)
    removed = apply_plan(model, StructuredPlan(layers={0: LayerPlan(mlp_keep=list(range(100)))}))
    assert removed[0] == before - _n_params(model) == 28 * units["mlp_channel"]
    model = build("llama")
    kv_heads = apply_plan(model, StructuredPlan(layers={0: LayerPlan(heads_keep=[0, 1], kv_heads_keep=[0])}))
    assert kv_heads[0] == 2 * units["query_head"] + units["kv_head"]


def test_meta_model_surgery() -> None:
    with torch.device("meta"):
        model = ARCHITECTURES["llama"]()
    apply_plan(model, make_plan(model, "mixed", seed=0))
    assert all(p.device.type == "meta" for p in model.parameters())


BAD_PLANS = {
    "all heads": (StructuredPlan(layers={0: LayerPlan(heads_keep=[])}), "remove_attention"),
    "all channels": (StructuredPlan(layers={0: LayerPlan(mlp_keep=[])}), "remove_mlp"),
    "all blocks": (StructuredPlan(remove_blocks=[0, 1]), "keep at least one"),
    "orphan head": (StructuredPlan(layers={0: LayerPlan(heads_keep=[0, 3], kv_heads_keep=[0])}), "kv heads"),
    "unequal groups": (StructuredPlan(layers={1: LayerPlan(heads_keep=[0, 1, 2])}), "same number"),
    "head range": (StructuredPlan(layers={0: LayerPlan(heads_keep=[0, 9])}), "allowed 0..3"),
    "channel range": (StructuredPlan(layers={1: LayerPlan(mlp_keep=[0, 128])}), "allowed 0..127"),
    "block range": (StructuredPlan(layers={5: LayerPlan(mlp_keep=[0])}), "blocks 0..1"),
    "bias shape": (StructuredPlan(layers={0: LayerPlan(mlp_keep=[0], mlp_bias=torch.zeros(3))}), "shape [64]"),
}


@pytest.mark.parametrize("name", list(BAD_PLANS))
def test_invalid_plan_changes_nothing(name: str) -> None:
    plan, message = BAD_PLANS[name]
    model = build("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # a valid first layer plus the invalid part: validation must run before any mutation
    plan.layers.setdefault(1 if 0 in plan.layers else 0, LayerPlan(mlp_keep=[0, 1]))
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_plan(model, plan)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert model.config.intermediate_size == 128 and len(model.model.layers) == 2


def test_mha_requires_equal_head_and_kv_sets() -> None:
    model = build("gpt2")
    with pytest.raises(ConfigError, match="layer 0: kept query heads per kv head differ"):
        apply_plan(model, StructuredPlan(layers={0: LayerPlan(heads_keep=[0, 1], kv_heads_keep=[0, 1, 2])}))


def test_unsupported_architecture_names_the_model() -> None:
    model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM.*Supported: Llama"):
        block_specs(model)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "opt", "gpt_neox"])
def test_removed_attention_keeps_cache_length(arch: str) -> None:
    model = build(arch).eval()
    apply_plan(model, StructuredPlan(layers={0: LayerPlan(remove_attention=True)}))
    assert any(isinstance(m, shipped.ZeroAttention) for m in model.modules())
    ids = calib_ids(1, 8)
    with torch.no_grad():
        out = model(ids[:, :7], use_cache=True)
        cache = output_cache(out)
        assert cache.get_seq_length() == 7  # layer 0's placeholder advanced with the cache under any kwarg name
        step = model(ids[:, 7:], use_cache=True, **{cache_kwarg(model): cache})
        full = model(ids, use_cache=False)
    assert output_cache(step).get_seq_length() == 8
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-5)
