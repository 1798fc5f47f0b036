"""The speed harness of benchmarks/ (`speed.measure_interleaved`) on tiny real models: structure, not timings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from speed import measure_interleaved, measure_speed  # noqa: E402
from tiny_models import build  # noqa: E402

KW = {"prefill_tokens": 16, "decode_tokens": 4, "decode_prompt_tokens": 4}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    deep = build("llama").eval()
    shallow = build("llama").eval()
    shallow.model.layers = shallow.model.layers[:1]  # fewer blocks: a "depth-pruned" twin
    shallow.config.num_hidden_layers = 1
    return {"dense": deep, "pruned": shallow}


def test_interleaved_rounds_and_ratios(models: dict[str, torch.nn.Module]) -> None:
    out = measure_interleaved(models, "dense", rounds=3, warmup=0, show_progress=False, **KW)
    assert set(out) == {"dense", "pruned"}
    for res in out.values():
        for key in ("prefill_tok_s", "decode_tok_s", "decode_loop_tok_s"):
            assert len(res[f"{key}_runs"]) == 3 and res[key] > 0
            assert len(res[f"{key}_x_runs"]) == 3
        assert res["settings"]["runs"] == 3
    # the reference against itself is exactly 1 in every round; the other model's ratio is reference time / its time
    assert out["dense"]["decode_tok_s_x_runs"] == [1.0, 1.0, 1.0]
    d, p = out["dense"]["decode_s_runs"], out["pruned"]["decode_s_runs"]
    assert out["pruned"]["decode_tok_s_x_runs"] == pytest.approx([a / b for a, b in zip(d, p)])
    assert out["pruned"]["params"] < out["dense"]["params"]


def test_interleaved_rejects_unknown_reference(models: dict[str, torch.nn.Module]) -> None:
    with pytest.raises(ValueError, match="reference='nope'"):
        measure_interleaved(models, "nope", rounds=1, **KW)


def test_measure_speed_single_model(models: dict[str, torch.nn.Module]) -> None:
    res = measure_speed(models["pruned"], runs=2, warmup=0, **KW)
    assert len(res["decode_tok_s_runs"]) == 2 and res["settings"]["statistic"] == "median"
    assert res["decode_tok_s"] > 0 and res["prefill_tok_s"] > 0
