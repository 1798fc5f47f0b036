"""Structured scoring math (hf_prune.structure.scores / allocate) against naive references."""

from __future__ import annotations

import math

import pytest
import torch

from hf_prune.errors import ConfigError
from hf_prune.structure import scores as S
from hf_prune.structure.allocate import WidthScores, allocate_width, choose_blocks, span_length


def _x(tokens: int = 50, features: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, features, generator=g) * torch.linspace(0.1, 3, features) + 2.0


def test_running_moments_match_batch_statistics() -> None:
    x = _x()
    stats = S.RunningMoments(x.shape[1])
    for chunk in x.split([7, 1, 20, 22]):
        stats.add(chunk)
    assert stats.n == 50
    torch.testing.assert_close(stats.mean.float(), x.mean(0))
    torch.testing.assert_close(stats.var, x.var(0, unbiased=False))
    torch.testing.assert_close(stats.sum_sq, (x * x).sum(0))


def test_running_moments_accept_3d_and_low_precision() -> None:
    x = _x().view(5, 10, 12)
    stats = S.RunningMoments(12)
    stats.add(x.bfloat16())
    ref = x.bfloat16().float().reshape(-1, 12)
    torch.testing.assert_close(stats.var, ref.var(0, unbiased=False), rtol=1e-4, atol=1e-5)


def test_fluctuation_scores_naive() -> None:
    x, w = _x(), torch.randn(7, 12)
    stats = S.RunningMoments(12)
    stats.add(x)
    got = S.fluctuation_scores(w, stats.var)
    ref = torch.tensor([x[:, j].var(unbiased=False) * sum(w[i, j] ** 2 for i in range(7)) for j in range(12)])
    torch.testing.assert_close(got, ref)


def test_wanda_sp_scores_naive() -> None:
    x, w = _x(), torch.randn(7, 12)
    got = S.wanda_sp_scores(w, (x * x).sum(0))
    ref = torch.tensor([sum(abs(w[i, j]) * x[:, j].norm() for i in range(7)) / 7 for j in range(12)])
    torch.testing.assert_close(got, ref)


def test_group_sum_and_head_channels() -> None:
    s = torch.arange(12.0)
    torch.testing.assert_close(S.group_sum(s, 4), torch.tensor([6.0, 22.0, 38.0]))
    assert S.head_channels([0, 2], 3).tolist() == [0, 1, 2, 6, 7, 8]
    with pytest.raises(ValueError):
        S.group_sum(s, 5)


def test_standardize() -> None:
    s = torch.tensor([1.0, 5.0, 2.0, 8.0])
    z = S.standardize(s)
    torch.testing.assert_close(z, (s - s.mean()) / s.std())
    assert S.standardize(torch.ones(3)).tolist() == [0.0, 0.0, 0.0]
    assert S.standardize(torch.tensor([4.0])).tolist() == [0.0]


def test_bias_compensation_keeps_expected_output() -> None:
    x, w = _x(), torch.randn(7, 12)
    pruned = [1, 4, 5]
    b = S.bias_compensation(w, x.mean(0), pruned)
    keep = [j for j in range(12) if j not in pruned]
    # dense mean output == pruned mean output + compensation
    torch.testing.assert_close((x @ w.t()).mean(0), (x[:, keep] @ w[:, keep].t()).mean(0) + b, rtol=1e-4, atol=1e-4)


def test_unit_terms_and_taylor_importance() -> None:
    prod = torch.randn(6, 4)
    rows = torch.tensor([[0, 1], [2, 3], [4, 5]])
    signed, absolute = S.unit_terms(prod, rows, 0)
    torch.testing.assert_close(signed, torch.stack([prod[0:2].sum(), prod[2:4].sum(), prod[4:6].sum()]))
    torch.testing.assert_close(absolute, torch.stack([prod[0:2].abs().sum(), prod[2:4].abs().sum(),
                                                      prod[4:6].abs().sum()]))
    cols = torch.tensor([[0, 3], [1, 2]])
    signed, absolute = S.unit_terms(prod, cols, 1)
    torch.testing.assert_close(signed, torch.stack([prod[:, [0, 3]].sum(), prod[:, [1, 2]].sum()]))
    bias = torch.randn(6)
    signed, _ = S.unit_terms(bias, rows, 0)
    torch.testing.assert_close(signed, bias.view(3, 2).sum(1))
    torch.testing.assert_close(S.taylor_importance(torch.tensor([-2.0]), torch.tensor([3.0]), "vector"),
                               torch.tensor([2.0]))
    torch.testing.assert_close(S.taylor_importance(torch.tensor([-2.0]), torch.tensor([3.0]), "element"),
                               torch.tensor([3.0]))
    with pytest.raises(ValueError, match="variant"):
        S.taylor_importance(torch.zeros(1), torch.zeros(1), "hessian")


def test_block_influence_and_angular() -> None:
    a, b = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    cos = S.token_cosine(a, b)
    ref = torch.tensor([float(a.reshape(-1, 8)[t] @ b.reshape(-1, 8)[t]
                              / (a.reshape(-1, 8)[t].norm() * b.reshape(-1, 8)[t].norm())) for t in range(15)])
    torch.testing.assert_close(cos, ref)
    assert S.block_influence(float(cos.sum()), 15) == pytest.approx(1 - float(ref.mean()))
    assert S.block_influence(15.0, 15) == 0.0
    torch.testing.assert_close(S.angular_distance(torch.tensor([1.0, 0.0, -1.0, 1.0 + 1e-6])),
                               torch.tensor([0.0, 0.5, 1.0, 0.0]))


def test_span_distances_naive_and_best_span() -> None:
    states = torch.randn(4, 6, 8)  # 4 samples, 5 blocks
    states[:, 3] = states[:, 1] * 2.0  # blocks 1 and 2 together act as a scaling: distance 0 for l=1, n=2
    d = S.span_distances(states, 2)
    cos = torch.nn.functional.cosine_similarity

    def naive(start: int) -> float:
        angles = [math.acos(max(-1.0, min(1.0, float(cos(states[s, start], states[s, start + 2], dim=0)))))
                  for s in range(4)]
        return sum(angles) / 4 / math.pi

    ref = torch.tensor([naive(start) for start in range(4)])
    torch.testing.assert_close(d, ref, rtol=1e-4, atol=1e-4)
    assert S.best_span(d) == 1
    with pytest.raises(ValueError):
        S.span_distances(states, 6)


# ---------------------------------------------------------------------------------------------- allocate
def _layers(n_layers: int = 3, inter: int = 16, heads: int = 8, kv: int = 2, seed: int = 0) -> list[WidthScores]:
    g = torch.Generator().manual_seed(seed)
    return [WidthScores(i, mlp=torch.rand(inter, generator=g) * (i + 1), heads=torch.rand(heads, generator=g),
                        num_kv_heads=kv, mlp_cost=3, head_cost=10, group_cost=4 * 10 + 2 * 5)
            for i in range(n_layers)]


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("gqa_mode", ["query", "group"])
@pytest.mark.parametrize("units", ["mlp", "heads", "both"])
def test_allocation_meets_budget_and_gqa(allocation: str, gqa_mode: str, units: str) -> None:
    layers = _layers()
    total = sum(16 * 3 + 8 * 10 for _ in layers)
    target = 0.3 * total
    plans, info = allocate_width(layers, target, allocation, gqa_mode, units)
    unit = {"mlp": 3, "heads": 10 * 2 if gqa_mode == "query" else 50, "both": 50 if gqa_mode == "group" else 20}[units]
    slack = unit / 2 if allocation == "global" else unit * len(layers) / 2
    assert abs(info["removed_params"] - target) <= slack + 1e-6
    removed = 0
    for layer in layers:
        p = plans.get(layer.index)
        if p is None:
            continue
        if p.mlp_keep is not None:
            assert units != "heads" and len(p.mlp_keep) >= 1 and p.mlp_keep == sorted(set(p.mlp_keep))
            removed += (16 - len(p.mlp_keep)) * 3
        if p.heads_keep is not None:
            assert units != "mlp"
            groups = [h // 4 for h in p.heads_keep]
            counts = {g: groups.count(g) for g in set(groups)}
            assert len(set(counts.values())) == 1  # every kept kv group keeps the same number of query heads
            if gqa_mode == "group":
                assert p.kv_heads_keep == sorted(counts) and all(c == 4 for c in counts.values())
                removed += (2 - len(p.kv_heads_keep)) * 50
            else:
                assert p.kv_heads_keep is None and set(counts) == {0, 1}
                removed += (8 - len(p.heads_keep)) * 10
    assert removed == info["removed_params"]
    if allocation == "uniform" and units != "mlp":
        kept = {len(p.heads_keep) for p in plans.values() if p.heads_keep is not None}
        assert len(kept) <= 1


def test_uniform_and_global_differ_and_lowest_go() -> None:
    layers = _layers()
    target = 0.25 * 3 * 16 * 3
    uni, _ = allocate_width(layers, target, "uniform", units="mlp")
    glo, _ = allocate_width(layers, target, "global", units="mlp", standardized=False)
    assert {len(p.mlp_keep) for p in uni.values()} == {12}
    assert [len(p.mlp_keep) for p in glo.values()] != [12, 12, 12]  # layer 0 has the smallest raw scores
    for layer in layers:  # within a layer, removed channels are the lowest scored
        keep = uni[layer.index].mlp_keep
        dropped = [j for j in range(16) if j not in keep]
        assert layer.mlp[dropped].max() <= layer.mlp[keep].min()


def test_global_keeps_minimum_and_errors_clearly() -> None:
    layers = [WidthScores(0, mlp=torch.tensor([1.0, 2.0, 3.0, 4.0]), mlp_cost=1),
              WidthScores(1, mlp=torch.tensor([100.0, 200.0, 300.0, 400.0]), mlp_cost=1)]
    plans, info = allocate_width(layers, 5, "global", units="mlp", standardized=False)
    assert plans[0].mlp_keep == [3] and plans[1].mlp_keep == [2, 3]
    with pytest.raises(ConfigError, match="sparsity is too high"):
        allocate_width(layers, 8, "global", units="mlp")
    with pytest.raises(ConfigError, match="allocation"):
        allocate_width(layers, 1, "layerwise")


def test_round_to() -> None:
    layers = [WidthScores(i, mlp=torch.rand(64), mlp_cost=1) for i in range(2)]
    plans, _ = allocate_width(layers, 0.3 * 128, "global", units="mlp", round_to=8)
    assert all(len(p.mlp_keep) % 8 == 0 for p in plans.values())


def test_multi_head_attention_query_mode_removes_groups() -> None:
    layers = [WidthScores(0, heads=torch.tensor([3.0, 1.0, 2.0, 4.0]), num_kv_heads=4, head_cost=10,
                          group_cost=20)]
    plans, _ = allocate_width(layers, 40, "global", "query", "heads")
    assert plans[0].heads_keep == [0, 3] and plans[0].kv_heads_keep == [0, 3]


def test_depth_choices() -> None:
    assert choose_blocks([0.5, 0.1, 0.3, 0.9], [10] * 4, 18) == [1, 2]
    assert choose_blocks([0.5, 0.1], [10] * 2, 4) == []
    assert span_length([10] * 5, 26) == 3
    with pytest.raises(ConfigError, match="sparsity is too high"):
        choose_blocks([0.1, 0.2], [10, 10], 19)
