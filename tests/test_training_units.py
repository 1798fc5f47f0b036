"""Pure parts of pruning during training: schedules, gradual N:M masks, movement scores, lottery math,
config validation of the training fields, the registry's training-only methods. No Trainer here."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from tiny_models import build

import hf_prune
from hf_prune import ConfigError, PruningConfig, available_methods
from hf_prune.core.masks import is_nm_sparse, nm_mask
from hf_prune.registry import is_training_only
from hf_prune.training.lottery import RewindSnapshot, rewound
from hf_prune.training.movement import score_step, soft_mask, soft_threshold
from hf_prune.training.schedules import (
    check_schedule,
    is_update_step,
    lottery_round_steps,
    lottery_sparsity,
    quantized_step,
    target_sparsity,
)
from hf_prune.training.state import gradual_nm_mask, layer_mask

# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        ("constant", 99, 0.0),  # before start: nothing pruned
        ("constant", 100, 0.8),
        ("constant", 5000, 0.8),
        ("linear", 100, 0.1),  # initial sparsity at the start
        ("linear", 1050, 0.1 + 0.7 * 0.5),
        ("linear", 1074, 0.1 + 0.7 * 0.5),  # quantised to the update grid (update_every=50)
        ("linear", 2000, 0.8),
        ("cubic", 100, 0.1),
        ("cubic", 575, 0.8 + (0.1 - 0.8) * (1 - 450 / 1900) ** 3),  # 575 -> update step 550
        ("cubic", 1999, 0.8 + (0.1 - 0.8) * (1 - 1850 / 1900) ** 3),
        ("cubic", 2000, 0.8),
        ("cubic", 10**6, 0.8),
    ],
)
def test_schedule_values(schedule: str, step: int, expected: float) -> None:
    got = target_sparsity(step, 0.8, start=100, end=2000, schedule=schedule, initial=0.1, update_every=50)
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cubic"])
def test_schedules_are_monotone_and_piecewise_constant(schedule: str) -> None:
    values = [target_sparsity(t, 0.9, start=10, end=110, schedule=schedule, update_every=10) for t in range(0, 130)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    for t in range(10, 110):  # changes only on the update grid
        if (t - 10) % 10:
            assert values[t] == values[t - 1]
    assert values[9] == 0.0 and values[110] == pytest.approx(0.9)


def test_cubic_prunes_faster_early_than_linear() -> None:
    kw = dict(start=0, end=100, update_every=1)
    assert target_sparsity(25, 0.8, schedule="cubic", **kw) > target_sparsity(25, 0.8, schedule="linear", **kw)


def test_update_steps() -> None:
    steps = [t for t in range(0, 40) if is_update_step(t, 5, 23, 6)]
    assert steps == [5, 11, 17, 23]  # 23 = end_step is always an update
    assert [t for t in range(20, 40) if is_update_step(t, 5, 23, 6, after_end=True)] == [23, 29, 35]
    assert quantized_step(16, 5, 6) == 11 and quantized_step(3, 5, 6) == 3


@pytest.mark.parametrize(
    "args, match",
    [
        (("cubic", 100, 100, 10), "end before it starts"),
        (("cubic", 100, 50, 10), "end before it starts"),
        (("cosine", 0, 10, 1), "allowed"),
        (("linear", 0, 10, 0), "update_every"),
        (("linear", -1, 10, 1), "start_step"),
    ],
)
def test_bad_schedules(args: tuple, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_schedule(*args)


def test_lottery_rounds() -> None:
    assert lottery_round_steps(0, 9, 3) == [3, 6, 9]
    assert [round(lottery_sparsity(r, 3, 0.875), 6) for r in range(4)] == [0.0, 0.5, 0.75, 0.875]
    with pytest.raises(ConfigError, match="does not fit"):
        lottery_round_steps(0, 2, 3)


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "gmp", "start_step": 100, "end_step": 50}, "end before it starts"),
        ({"method": "gmp", "sparsity": 1.0}, r"sparsity=1.0 must be a number in \[0, 1\)"),
        ({"method": "gmp", "sparsity": -0.2}, "sparsity"),
        ({"method": "gmp", "schedule": "exp"}, "schedule='exp' is unknown"),
        ({"method": "gmp", "update_every": 0}, "update_every"),
        ({"method": "gmp", "initial_sparsity": 0.6, "sparsity": 0.5}, "initial_sparsity=0.6 is above"),
        ({"method": "soft_movement", "movement_threshold": 1.5}, "movement_threshold"),
        ({"method": "movement", "movement_lr": -1}, "movement_lr"),
        ({"method": "lottery", "lottery_rounds": 0}, "lottery_rounds"),
        ({"method": "lottery", "lottery_rewind_step": 5, "start_step": 2}, "lottery_rewind_step=5 must be <="),
    ],
)
def test_training_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PruningConfig(**kwargs)


def test_training_config_round_trip_and_defaults_unchanged() -> None:
    cfg = PruningConfig(method="gmp", sparsity=0.8, schedule="cubic", start_step=100, end_step=2000, update_every=50)
    assert PruningConfig.from_json(cfg.to_json()) == cfg
    default = PruningConfig()
    assert (default.method, default.sparsity, default.structure) == ("wanda", 0.5, "unstructured")


def test_registry_marks_training_only_methods() -> None:
    assert {"gmp", "movement", "soft_movement", "lottery"} <= set(available_methods())
    assert set(available_methods(training=True)) == {"gmp", "movement", "soft_movement", "lottery", "loraprune", "pat"}
    assert {"magnitude", "wanda", "sparsegpt"} <= set(available_methods(training=False))
    assert is_training_only("lottery") and not is_training_only("sparsegpt")


@pytest.mark.parametrize("method", ["gmp", "movement", "soft_movement", "lottery", "loraprune"])
def test_one_shot_prune_refuses_training_methods(method: str) -> None:
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="PruningCallback"):
        hf_prune.prune(model, PruningConfig(method=method, sparsity=0.5), verbose=False, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- masks


def test_gradual_nm_mask_reaches_exact_nm() -> None:
    scores = torch.randn(8, 32)
    final = nm_mask(scores, 2, 4)
    assert torch.equal(gradual_nm_mask(scores, 2, 4, 1.0), final)
    half = gradual_nm_mask(scores, 2, 4, 0.5)
    assert int((~half).sum()) == int((~final).sum()) // 2
    assert bool((half | ~final).all())  # only weights the final mask drops are dropped
    dropped = scores[~half]
    still_kept_candidates = scores[half & ~final]
    assert dropped.max() <= still_kept_candidates.min()  # the lowest candidates go first
    assert torch.equal(gradual_nm_mask(scores, 2, 4, 0.0), torch.ones_like(final))
    assert is_nm_sparse(scores * layer_mask(scores, 0.5, 0.5, (2, 4)), 2, 4)


def test_unstructured_layer_mask_counts() -> None:
    scores = torch.rand(16, 16)
    mask = layer_mask(scores, 0.3, 0.8, None, "layer")
    assert int((~mask).sum()) == int(256 * 0.3)
    assert scores[~mask].max() <= scores[mask].min()


# ---------------------------------------------------------------------------------------------- movement


def test_score_step_is_straight_through_estimator() -> None:
    torch.manual_seed(0)
    w, g = torch.randn(4, 6), torch.randn(4, 6)
    s = torch.zeros(4, 6)
    score_step(s, g, w, lr=0.1)
    assert torch.allclose(s, -0.1 * g * w)
    # STE reference by autograd: W' = W * S (S at 1 mimics the mask), dL/dS = dL/dW' * W
    s_ref = torch.ones(4, 6, requires_grad=True)
    (g * (w * s_ref)).sum().backward()
    assert torch.allclose(s_ref.grad, g * w)


def test_l1_penalty_lowers_scores_without_signal() -> None:
    s = torch.zeros(3)
    score_step(s, torch.zeros(3), torch.ones(3), lr=1.0, l1=0.4)
    assert torch.allclose(s, torch.full((3,), -0.1))  # sigmoid'(0) = 1/4
    assert soft_mask(torch.tensor([-1.0, 0.0, 1.0]), 0.5).tolist() == [False, False, True]
    assert soft_threshold(0.0, 0.5) == 0.0 and soft_threshold(0.5, 0.5) == 0.25 and soft_threshold(2, 0.5) == 0.5


def test_lottery_rewind() -> None:
    assert rewound(torch.tensor([5.0, -6.0]), torch.tensor([1.0, 2.0]), torch.tensor([False, True])).tolist() == [0.0, 2.0]

    class Entry:
        def __init__(self, value):
            self.param = torch.nn.Parameter(value)
            self.mask = torch.tensor([True, False, True])

    params = {"w": Entry(torch.tensor([1.0, 2.0, 3.0]))}
    snap = RewindSnapshot()
    snap.take(params, 4)
    params["w"].param.data += 10
    snap.rewind_(params)
    assert snap.step == 4 and params["w"].param.data.tolist() == [1.0, 0.0, 3.0]


@pytest.mark.parametrize("name", ["hf_prune.training.schedules", "hf_prune.training.state", "hf_prune.training.movement",
                                  "hf_prune.training.lottery", "hf_prune.registry"])
def test_doctests(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
