"""Expert-removal methods (`hf_prune.structure.experts`) on six tiny MoE architectures: statistics against a naive
per-token loop, the super-expert guard, allocation, merging, the full `model.prune` path, STUN, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import MOE_ARCHITECTURES, build, build_moe, calib_ids
from transformers import AutoModelForCausalLM

import hf_prune
from hf_prune import PruningConfig
from hf_prune.errors import ConfigError, UnsupportedModelError
from hf_prune.structure.arch import block_specs
from hf_prune.structure.collect import collect_expert_stats
from hf_prune.structure.expert_plan import LayerExperts, allocate_experts, merge_targets, merge_weights
from hf_prune.structure.experts import moe_specs, plan_from_stats

ARCHS = list(MOE_ARCHITECTURES)
SCORES = ["expert-frequency", "ean", "reap", "easy-ep", "random-experts"]


def _naive_stats(model: torch.nn.Module, ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Per MoE block, from a plain forward with hooks that only record, then a loop over tokens and slots that
    asks the experts module for one expert's output on one token at a time."""
    specs = moe_specs(model)
    seen: dict[int, dict] = {s.index: {} for s in specs}
    handles = []
    for s in specs:
        block = model.get_submodule(s.module)
        rec = seen[s.index]
        experts = model.get_submodule(s.experts.experts)

        def on_experts(m, args, out, rec=rec):  # type: ignore[no-untyped-def]
            rec["x"], rec["idx"], rec["w"] = args[0].detach(), args[1].detach(), args[2].detach()
            rec["out"] = out.detach()  # the routed experts' combined output (shared experts excluded)

        def on_norm(m, args, rec=rec):  # type: ignore[no-untyped-def]
            rec["before"] = args[0].detach().reshape(-1, args[0].shape[-1])

        handles += [experts.register_forward_hook(on_experts),
                    block.post_attention_layernorm.register_forward_pre_hook(on_norm)]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    out = {}
    for s in specs:
        rec, n = seen[s.index], s.experts.num_experts
        experts = model.get_submodule(s.experts.experts)
        count, norm, gated, easy, peak = (torch.zeros(n, dtype=torch.float64) for _ in range(5))
        for t in range(rec["idx"].shape[0]):
            before, after = rec["before"][t].double(), rec["before"][t].double() + rec["out"][t].double()
            c = max(0.0, 1 - float(torch.nn.functional.cosine_similarity(before, after, dim=0)))
            for slot in range(rec["idx"].shape[1]):
                e = int(rec["idx"][t, slot])
                with torch.no_grad():
                    y = experts(rec["x"][t:t + 1], torch.tensor([[e]]), torch.ones(1, 1, dtype=rec["w"].dtype))[0]
                g = float(rec["w"][t, slot])
                count[e] += 1
                norm[e] += float(y.norm())
                gated[e] += g * float(y.norm())
                easy[e] += g * float(y.norm()) * c
                peak[e] = max(float(peak[e]), float(y.abs().max()))
        routed = count.clamp_min(1)
        out[s.index] = {"expert-frequency": count, "ean": norm / routed, "reap": gated / routed, "easy-ep": easy,
                        "max_abs": peak}
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_collected_statistics_equal_a_per_token_loop(arch: str) -> None:
    model = build_moe(arch)
    ids = calib_ids(2, 6)
    stats = collect_expert_stats(model, block_specs(model), ids, batch_size=1, device=torch.device("cpu"))
    want = _naive_stats(model, ids)
    assert set(stats) == set(want)
    for i, expected in want.items():
        for kind in ("expert-frequency", "ean", "reap", "easy-ep"):
            torch.testing.assert_close(stats[i].scores(kind), expected[kind], rtol=1e-4, atol=1e-6,
                                       msg=f"{arch} block {i} {kind}")
        torch.testing.assert_close(stats[i].max_abs, expected["max_abs"], rtol=1e-4, atol=1e-6)
        assert float(stats[i].count.sum()) == ids.numel() * moe_specs(model)[0].experts.top_k


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_prune_removes_experts_and_reloads(arch: str, allocation: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = build_moe(arch)
    ids = calib_ids(2, 10)
    cfg = PruningConfig(method="reap", sparsity=0.25, expert_allocation=allocation, num_calibration_samples=8,
                        seqlen=16)
    report = model.prune(cfg, calibration=calib_ids(8, 16), verbose=False, show_progress=False)
    info = report.config["plan_info"]
    assert info["experts_before"] == sum(s.experts.num_experts for s in moe_specs(build_moe(arch)))
    assert info["experts_after"] == sum(s.experts.num_experts for s in moe_specs(model))
    assert 0 < info["experts_before"] - info["experts_after"] <= round(0.25 * info["experts_before"])
    if allocation == "uniform":
        assert len({s.experts.num_experts for s in moe_specs(model)}) == 1 and report.reload_path == "stock"
    assert report.params_after < report.params_before
    assert "experts" in report.table() and "routed experts" in report.table()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "routed experts removed" in card
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("score", SCORES)
def test_every_score_removes_its_lowest_experts(score: str) -> None:
    model = build_moe("qwen3_moe")
    specs = moe_specs(model)
    stats = collect_expert_stats(model, specs, calib_ids(8, 16), 4, torch.device("cpu"))
    cfg = PruningConfig(method=score, sparsity=0.5, super_expert_guard=False, seed=3)
    plan, info = plan_from_stats(model, stats, cfg, "random" if score == "random-experts" else score)
    for s in specs:
        values = stats[s.index].scores("random" if score == "random-experts" else score, seed=3 + s.index)
        kept = plan.layers[s.index].experts_keep
        assert kept == sorted(torch.argsort(values, descending=True)[:4].tolist())


def test_global_allocation_gives_layers_with_similar_experts_fewer_removals() -> None:
    flat = LayerExperts(0, torch.ones(8), top_k=2)
    skewed = LayerExperts(1, torch.tensor([8.0, 6, 4, 2, 0.1, 0.1, 0.1, 0.1]), top_k=2)
    keep = allocate_experts([flat, skewed], 0.25, "global")
    assert keep == {0: list(range(8)), 1: [0, 1, 2, 3]}
    assert allocate_experts([flat, skewed], 0.25, "uniform") == {0: [2, 3, 4, 5, 6, 7], 1: [0, 1, 2, 3, 6, 7]}  # ties: lower index first
    # never below top_k, protected experts stay, groups lose alike
    assert allocate_experts([LayerExperts(0, torch.arange(4.0), top_k=3)], 0.9, "uniform") == {0: [1, 2, 3]}
    assert allocate_experts([LayerExperts(0, torch.arange(4.0), top_k=1, protected=frozenset({0}))], 0.5,
                            "uniform") == {0: [0, 3]}
    grouped = LayerExperts(0, torch.tensor([1.0, 2, 3, 4, 9, 8, 7, 6]), top_k=2, num_group=2, topk_group=1)
    assert allocate_experts([grouped], 0.5, "uniform") == {0: [2, 3, 4, 5]}


def test_allocation_that_cannot_reach_the_target_says_so() -> None:
    tight = LayerExperts(0, torch.arange(4.0), top_k=3)
    roomy = LayerExperts(1, torch.arange(4.0), top_k=1)
    with pytest.warns(UserWarning, match="removes 1 experts instead of 2"):
        assert allocate_experts([tight, roomy], 0.5, "uniform") == {0: [1, 2, 3], 1: [2, 3]}
    # global: a layer at its limit is skipped and the budget goes to the next-lowest experts elsewhere
    low = LayerExperts(0, torch.tensor([0.1, 0.1, 5.0, 5.0]), top_k=3)
    high = LayerExperts(1, torch.tensor([1.0, 2.0, 3.0, 4.0]), top_k=1)
    assert allocate_experts([low, high], 0.25, "global") == {0: [1, 2, 3], 1: [1, 2, 3]}
    with pytest.warns(UserWarning, match="removes 4 experts instead of 6"):
        allocate_experts([low, high], 0.75, "global")


def test_merge_weights_equal_a_frequency_weighted_average() -> None:
    g = torch.Generator().manual_seed(0)
    w = {"gate_up_proj": torch.randn(4, 6, 3, generator=g), "down_proj_bias": torch.randn(4, 3, generator=g)}
    freq = torch.tensor([10.0, 1.0, 4.0, 0.0])
    sim = torch.eye(4)
    sim[1, 2] = sim[2, 1] = 0.9
    sim[3, 0] = sim[0, 3] = 0.5
    targets = merge_targets(sim, [0, 2])
    assert targets == {1: 2, 3: 0}
    merged = merge_weights(w, [0, 2], targets, freq)
    for name, t in w.items():
        torch.testing.assert_close(merged[name][0], (11 * t[0] + 1 * t[3]) / 12)
        torch.testing.assert_close(merged[name][1], (5 * t[2] + 2 * t[1]) / 7)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_merging_changes_the_kept_experts_and_keeps_the_model_valid(arch: str) -> None:
    calib = calib_ids(8, 16)
    dropped, merged = build_moe(arch), build_moe(arch)
    kw = dict(method="reap", sparsity=0.5, num_calibration_samples=8, seqlen=16)
    r1 = dropped.prune(PruningConfig(**kw), calibration=calib, verbose=False, show_progress=False)
    r2 = merged.prune(PruningConfig(**kw, expert_merge=True), calibration=calib, verbose=False, show_progress=False)
    info = r2.config["plan_info"]
    assert info["merged_into"] and r1.config["plan_info"]["experts_keep"] == info["experts_keep"]
    for s in moe_specs(merged):
        pairs = [(getattr(dropped.get_submodule(s.experts.experts), n), getattr(merged.get_submodule(s.experts.experts), n))
                 for n in s.experts.expert_tensors]
        assert all(a.shape == b.shape for a, b in pairs)
        assert not torch.equal(pairs[0][0], pairs[0][1])  # gate_up_proj (biases may start at zero)
    with torch.no_grad():
        assert torch.isfinite(merged(calib_ids(1, 8)).logits).all()


def test_a_planted_super_expert_is_reported_and_kept_only_with_the_guard() -> None:
    base = build_moe("mixtral")
    calib = calib_ids(8, 16)
    specs = moe_specs(base)
    stats = collect_expert_stats(base, specs, calib, 4, torch.device("cpu"))
    last = specs[-1]
    rare = int(torch.argmin(stats[last.index].count + 1e6 * (stats[last.index].count == 0)))  # routed, but least
    with torch.no_grad():
        base.get_submodule(last.experts.experts).down_proj[rare] *= 1000.0
    kw = dict(method="expert-frequency", sparsity=0.5, num_calibration_samples=8, seqlen=16)
    guarded, unguarded = copy.deepcopy(base), copy.deepcopy(base)
    r1 = guarded.prune(PruningConfig(**kw), calibration=calib, verbose=False, show_progress=False)
    r2 = unguarded.prune(PruningConfig(**kw, super_expert_guard=False), calibration=calib, verbose=False,
                         show_progress=False)
    assert r1.config["plan_info"]["super_experts"] == [[last.index, rare]]
    assert rare in r1.config["plan_info"]["experts_keep"][str(last.index)]
    assert rare not in r2.config["plan_info"]["experts_keep"][str(last.index)]
    # an unplanted model flags nothing: the largest expert is not an outlier
    assert build_moe("mixtral").prune(PruningConfig(**kw), calibration=calib, verbose=False, show_progress=False
                                      ).config["plan_info"]["super_experts"] == []


def test_stun_experts_then_wanda_inside_and_reload(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = build_moe("qwen3_moe")
    calib = calib_ids(8, 16)
    model.prune(PruningConfig(method="reap", sparsity=0.25, expert_allocation="global", num_calibration_samples=8,
                              seqlen=16), calibration=calib, verbose=False, show_progress=False)
    report = model.prune(PruningConfig(method="wanda", sparsity=0.5, num_calibration_samples=8, seqlen=16),
                         calibration=calib, verbose=False, show_progress=False)
    experts = [layer for layer in report.layers if "experts" in layer.name]
    assert experts and all(abs(layer.sparsity - 0.5) < 0.02 for layer in experts)
    with torch.no_grad():
        logits = model(calib_ids(1, 8)).logits
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(calib_ids(1, 8)).logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"sparsity": 0.0}, ConfigError, "sparsity"),
    ({"expert_allocation": "layerwise"}, ConfigError, "expert_allocation"),
    ({"super_expert_quantile": 1.5}, ConfigError, "super_expert_quantile"),
])
def test_bad_options_are_refused_by_name(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        PruningConfig(**{"method": "reap", "sparsity": 0.5, **kwargs})


def test_an_option_of_another_family_is_ignored_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="width_units='mlp' is an option of"):
        PruningConfig(method="reap", sparsity=0.5, width_units="mlp")


def test_a_dense_model_is_refused_before_anything_changes() -> None:
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="no routed experts"):
        hf_prune.prune(model, PruningConfig(method="reap", sparsity=0.5), calibration=calib_ids(4, 16),
                       show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
