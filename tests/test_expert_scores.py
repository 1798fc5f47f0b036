"""Expert-pruning scores (`hf_prune.structure.expert_scores`) against a naive per-token loop."""

from __future__ import annotations

import pytest
import torch

from hf_prune.structure.expert_scores import ExpertStats, super_experts, token_contribution


def _naive(topk, gates, norms, contrib, experts):
    out = {k: [0.0] * experts for k in ("count", "norm", "gated", "easy")}
    for t in range(topk.shape[0]):
        for s in range(topk.shape[1]):
            e = int(topk[t, s])
            out["count"][e] += 1
            out["norm"][e] += float(norms[t, s])
            out["gated"][e] += float(gates[t, s] * norms[t, s])
            out["easy"][e] += float(gates[t, s] * norms[t, s] * contrib[t])
    n = [max(c, 1) for c in out["count"]]
    return {"expert-frequency": out["count"], "ean": [a / b for a, b in zip(out["norm"], n)],
            "reap": [a / b for a, b in zip(out["gated"], n)], "easy-ep": out["easy"]}


@pytest.mark.parametrize("experts, k", [(4, 1), (8, 2), (16, 4)])
def test_scores_equal_a_per_token_loop_over_batches(experts: int, k: int) -> None:
    g = torch.Generator().manual_seed(experts)
    stats = ExpertStats(experts)
    all_parts = []
    for _ in range(3):  # batch by batch
        tokens = 17
        topk = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
        gates = torch.rand(tokens, k, generator=g).softmax(-1)
        norms = torch.rand(tokens, k, generator=g) * 5
        contrib = torch.rand(tokens, generator=g)
        stats.add(topk, gates, norms, contrib)
        all_parts.append((topk, gates, norms, contrib))
    cat = [torch.cat([p[i] for p in all_parts]).double() for i in range(4)]
    want = _naive(*cat, experts)
    for kind, values in want.items():
        assert torch.allclose(stats.scores(kind), torch.tensor(values, dtype=torch.float64), rtol=1e-9), kind
    assert torch.equal(stats.scores("random", seed=3), stats.scores("random", seed=3))
    assert not torch.equal(stats.scores("random", seed=3), stats.scores("random", seed=4))


def test_unrouted_experts_score_zero_and_bad_input_is_refused() -> None:
    stats = ExpertStats(4)
    stats.add(torch.tensor([[0], [0]]), torch.ones(2, 1), torch.ones(2, 1))
    for kind in ("expert-frequency", "ean", "reap", "easy-ep"):
        assert stats.scores(kind)[1:].eq(0).all()
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        stats.add(torch.tensor([[4]]), torch.ones(1, 1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="tokens, k"):
        stats.add(torch.tensor([[0, 1]]), torch.ones(1, 1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="allowed"):
        stats.scores("nope")


def test_token_contribution() -> None:
    h = torch.randn(2, 3, 8)
    assert torch.allclose(token_contribution(h, h), torch.zeros(6), atol=1e-6)
    assert torch.allclose(token_contribution(h, -h), torch.full((6,), 2.0), atol=1e-6)


def test_a_planted_super_expert_is_found() -> None:
    g = torch.Generator().manual_seed(0)
    maxima = {layer: torch.rand(64, generator=g) for layer in range(4)}
    maxima[2][17] = 500.0  # a massive-activation expert
    assert super_experts(maxima) == [(2, 17)]
    assert super_experts({}) == []
