"""Structured scoring methods (hf_prune.structure.methods) on tiny models: budgets, GQA, determinism, and the
signal each method is built on (gradients, identity blocks, zeroed sublayers); plan -> surgery -> model runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from tiny_models import VOCAB, build, calib_ids

from hf_prune.core.model import find_blocks
from hf_prune.errors import ConfigError
from hf_prune.registry import available_methods, get_method
from hf_prune.structure.arch import block_specs
from hf_prune.structure.methods import unit_costs
from hf_prune.structure.surgery import apply_plan

CPU = torch.device("cpu")
WIDTH = ["flap", "wanda-sp", "taylor"]


def _cfg(method: str, sparsity: float = 0.2, **kw) -> SimpleNamespace:
    base = dict(method=method, sparsity=sparsity, width_units="both", allocation="global", gqa_mode="query",
                bias_compensation=True, round_to=1, angular_last_token=True, batch_size=4, seed=0)
    base.update(kw)
    return SimpleNamespace(**base)


def _plan(model: torch.nn.Module, cfg: SimpleNamespace, calib: torch.Tensor | None = None):
    calib = calib_ids(8, 32) if calib is None else calib
    return get_method(cfg.method)(cfg).plan(model, calib, cfg, CPU, False)


def _block_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for b in find_blocks(model)[1] for p in b.parameters())


def _deep_llama(layers: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()


def _signature(plan) -> dict:
    return {i: (lp.mlp_keep, lp.heads_keep, lp.kv_heads_keep) for i, lp in plan.layers.items()}


def _max_unit(model: torch.nn.Module) -> int:
    most = 0
    for spec in block_specs(model):
        c = unit_costs(model, spec)
        most = max(most, c.mlp_channel, c.kv_group if spec.attention and spec.attention.num_heads ==
                   spec.attention.num_kv_heads else c.query_head * spec.attention.num_kv_heads)
    return most


def test_registered() -> None:
    names = available_methods()
    for name in WIDTH + ["block-influence", "angular", "finercut"]:
        assert name in names
    assert {get_method(n).structured for n in WIDTH} == {"width"}
    assert get_method("angular").structured == "depth" and get_method("finercut").structured == "sublayer"


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "phi3"])
@pytest.mark.parametrize("method", WIDTH)
def test_width_budget_gqa_and_surgery(arch: str, method: str) -> None:
    model = build(arch)
    total = _block_params(model)
    plan, info = _plan(model, _cfg(method))
    assert abs(info["removed_params"] - 0.2 * total) <= _max_unit(model) / 2 + 1
    specs = {s.index: s for s in block_specs(model)}
    for i, lp in plan.layers.items():
        a = specs[i].attention
        if lp.heads_keep is not None:
            q = a.num_heads // a.num_kv_heads
            groups = [h // q for h in lp.heads_keep]
            assert len({groups.count(g) for g in set(groups)}) == 1, "GQA must stay uniform"
        if method != "taylor" and lp.mlp_keep is not None:
            assert lp.mlp_bias is not None and lp.mlp_bias.shape == (64,)  # hidden size
        if method != "taylor" and lp.heads_keep is not None:
            assert lp.attn_bias is not None and lp.attn_bias.shape == (64,)
    x = calib_ids(2, 16, seed=5)
    removed = apply_plan(model, plan)
    assert model(x).logits.shape == (2, 16, VOCAB)
    after = _block_params(model)
    # FLAP biases added to bias-free projections count as parameters (hidden size each)
    assert abs((total - after) - info["removed_params"]) <= 2 * 64 * len(plan.layers)
    assert sum(removed.values()) == total - after


def test_gqa_group_mode_removes_whole_kv_groups() -> None:
    model = build("llama")
    plan, _ = _plan(model, _cfg("flap", 0.1, width_units="heads", gqa_mode="group"))
    assert any(lp.kv_heads_keep is not None for lp in plan.layers.values())
    for lp in plan.layers.values():
        if lp.kv_heads_keep is not None:
            assert lp.heads_keep == [g * 2 + j for g in lp.kv_heads_keep for j in range(2)]
    apply_plan(model, plan)
    model(calib_ids(1, 8))


def test_global_and_uniform_differ_and_uniform_is_uniform() -> None:
    model = build("llama")
    glob, _ = _plan(model, _cfg("flap", 0.3))
    uni, _ = _plan(model, _cfg("flap", 0.3, allocation="uniform"))
    assert _signature(glob) != _signature(uni)
    assert len({len(lp.mlp_keep) for lp in uni.layers.values()}) == 1
    assert len({len(lp.heads_keep) for lp in uni.layers.values()}) == 1


def test_deterministic() -> None:
    model = build("qwen3")
    for method in ("flap", "taylor"):
        a, _ = _plan(model, _cfg(method))
        b, _ = _plan(model, _cfg(method))
        assert _signature(a) == _signature(b)


def test_taylor_uses_gradients_and_cleans_up() -> None:
    model = build("llama")
    flags = [p.requires_grad for p in model.parameters()]
    cfg = _cfg("taylor", 0.3, width_units="mlp", allocation="uniform")
    a, _ = _plan(model, cfg, calib_ids(8, 32, seed=0))
    # same weights, different text -> different gradients -> different choice of channels
    b, _ = _plan(model, cfg, torch.full((8, 32), 7) + torch.arange(32) % 3)
    assert {i: lp.mlp_keep for i, lp in a.layers.items()} != {i: lp.mlp_keep for i, lp in b.layers.items()}
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    vec, _ = _plan(model, _cfg("taylor", 0.3, width_units="mlp", allocation="uniform", taylor_variant="vector"))
    assert {i: lp.mlp_keep for i, lp in vec.layers.items()} != {i: lp.mlp_keep for i, lp in a.layers.items()}


def _zero_block(model: torch.nn.Module, i: int) -> None:
    layer = model.model.layers[i]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_block_influence_picks_identity_block() -> None:
    model = _deep_llama()
    _zero_block(model, 3)
    plan, info = _plan(model, _cfg("block-influence", 1 / 6))
    assert plan.remove_blocks == [3]
    assert info["block_influence"][3] == pytest.approx(0.0, abs=1e-6)
    apply_plan(model, plan)
    assert len(model.model.layers) == 5
    model(calib_ids(1, 8))


@pytest.mark.parametrize("last_token", [True, False])
def test_angular_picks_identity_span(last_token: bool) -> None:
    model = _deep_llama()
    _zero_block(model, 2)
    _zero_block(model, 3)
    plan, info = _plan(model, _cfg("angular", 2 / 6, angular_last_token=last_token))
    assert plan.remove_blocks == [2, 3] and info["span"] == 2
    assert info["distances"][2] == pytest.approx(0.0, abs=1e-3)


def test_finercut_removes_zeroed_sublayer_first() -> None:
    model = _deep_llama(4)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.zero_()
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    plan, info = _plan(model, _cfg("finercut", 0.3, finercut_tokens=128))
    first = {(s["block"], s["sublayer"]) for s in info["order"][:2]}
    assert first == {(2, "mlp"), (1, "attention")}
    assert info["order"][0]["distance"] == pytest.approx(0.0, abs=1e-6)
    total = _block_params(model)
    assert abs(info["removed_params"] - 0.3 * total) <= max(s["params"] for s in info["order"]) / 2
    apply_plan(model, plan)
    model(calib_ids(1, 8))


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_depth_and_sublayer_other_architectures(arch: str) -> None:
    for method in ("block-influence", "angular", "finercut"):
        model = build(arch)
        plan, info = _plan(model, _cfg(method, 0.4))
        assert info["removed_params"] > 0
        if arch == "gpt2" and plan.remove_blocks and getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
            continue
        apply_plan(model, plan)
        model(calib_ids(1, 8))


def test_bias_compensation_matches_formula() -> None:
    model = build("llama")
    plan, _ = _plan(model, _cfg("flap", 0.3, width_units="mlp"))
    off, _ = _plan(model, _cfg("flap", 0.3, width_units="mlp", bias_compensation=False))
    i, lp = next(iter(plan.layers.items()))
    assert off.layers[i].mlp_bias is None and lp.mlp_bias.shape == (64,)
    assert bool(lp.mlp_bias.abs().sum() > 0)


def test_errors_are_clear() -> None:
    model = build("llama")
    with pytest.raises(ConfigError, match="sparsity"):
        _plan(model, _cfg("flap", 0.0))
    with pytest.raises(ConfigError, match="gqa_mode"):
        _plan(model, _cfg("flap", gqa_mode="kv"))
    with pytest.raises(ConfigError, match="sparsity is too high"):
        _plan(model, _cfg("flap", 0.7, width_units="heads"))
    from hf_prune.errors import CalibrationError

    with pytest.raises(CalibrationError, match="calibration"):
        get_method("flap")(_cfg("flap")).plan(model, None, _cfg("flap"), CPU, False)


def test_pruning_config_drives_the_plan() -> None:
    from hf_prune import PruningConfig

    cfg = PruningConfig(method="wanda-sp", sparsity=0.2, allocation="uniform", round_to=8, batch_size=4)
    model = build("llama")
    plan, info = get_method(cfg.method)(cfg).plan(model, calib_ids(4, 32), cfg, CPU, False)
    assert {len(lp.mlp_keep) % 8 for lp in plan.layers.values()} == {0}
    assert info["sparsity"] == pytest.approx(0.2, abs=0.05)
