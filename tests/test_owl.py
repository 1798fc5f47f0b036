"""OWL's allocation functions and the self-tuned search (`hf_prune.oneshot.owl`)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, build, calib_ids

import hf_prune
from hf_prune.core.blocks import loss_from_last_hidden, record_block_inputs, run_block
from hf_prune.core.model import find_blocks
from hf_prune.errors import ConfigError
from hf_prune.oneshot.owl import (
    candidates,
    depth_ramp,
    keep_mask,
    owl_block_sparsities,
    owl_outlier_ratio,
)


def test_owl_sparsities_mean_and_order() -> None:
    ratios = [0.01, 0.05, 0.02, 0.08]
    s = owl_block_sparsities(ratios, 0.7, 0.08)
    assert abs(sum(s) / len(s) - 0.7) < 1e-9
    assert max(s) - min(s) == pytest.approx(0.16)
    order = sorted(range(4), key=lambda i: ratios[i])
    assert [s[i] for i in order] == sorted(s, reverse=True)  # more outliers -> lower sparsity
    inverted = owl_block_sparsities(ratios, 0.7, -0.08)
    assert [inverted[i] for i in order] == sorted(inverted)  # more outliers -> higher sparsity
    assert abs(sum(inverted) / 4 - 0.7) < 1e-9
    assert owl_block_sparsities([0.1, 0.1], 0.5, 0.08) == [0.5, 0.5]
    scores = [torch.tensor([1.0, 1.0, 1.0, 100.0])]
    assert owl_outlier_ratio(scores, 2.0) == pytest.approx(0.25)


def test_depth_ramp_and_candidates() -> None:
    r = depth_ramp(5, 0.6, 0.1)
    assert r[0] == pytest.approx(0.5) and r[-1] == pytest.approx(0.7) and sum(r) / 5 == pytest.approx(0.6)
    cands = candidates({3.0: [0.1, 0.2, 0.3], 5.0: [0.05, 0.05, 0.2]}, 0.9)
    assert cands[0].label == {"kind": "uniform"} and cands[0].block_sparsity == [0.9] * 3
    for c in cands:  # every allocation keeps the mean and stays in [0, 1)
        assert sum(c.block_sparsity) / 3 == pytest.approx(0.9) and all(0 <= s < 1 for s in c.block_sparsity)
    assert all(abs(c.label.get("lambda", 0)) < 0.1 and c.label.get("spread", 0) < 0.1 for c in cands)
    assert len({tuple(c.block_sparsity) for c in cands}) == len(cands)  # no duplicates


def test_keep_mask_prunes_lowest_per_row() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0, 4.0], [0.5, 0.1, 0.9, 0.2]])
    keep = keep_mask(scores, 0.5)
    assert keep.tolist() == [[True, False, False, True], [True, False, True, False]]
    assert keep_mask(scores, 0.0).all()
    assert keep_mask(scores.reshape(1, -1), 0.25).sum() == 6  # whole-matrix comparison


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gpt_neox"])
def test_search_handles_every_block_output_kind(arch: str) -> None:
    model = build(arch)
    report = model.prune(hf_prune.PruningConfig(method="wanda", sparsity=0.5, owl=True), calibration=calib_ids(),
                         verbose=False, show_progress=False)
    assert "search_failed" not in report.owl_choice and report.owl_choice["search_loss"] is not None


def test_fixed_lambda_outside_the_grid_is_searched_over_thresholds() -> None:
    model = build("llama")
    report = model.prune(hf_prune.PruningConfig(method="wanda", sparsity=0.5, owl=True, owl_lambda=0.1),
                         calibration=calib_ids(), verbose=False, show_progress=False)
    assert report.owl_choice["candidates"] > 1  # uniform + OWL at lambda 0.1 for each threshold


def test_search_failure_falls_back_to_uniform_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_prune.oneshot import pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("the forward does not take labels")

    monkeypatch.setattr(pipeline, "loss_from_last_hidden", boom)
    model = build("llama")
    with pytest.warns(UserWarning, match="search failed"):
        report = model.prune(hf_prune.PruningConfig(method="wanda", sparsity=0.5, owl=True),
                             calibration=calib_ids(), verbose=False, show_progress=False)
    assert report.owl_choice["kind"] == "uniform" and report.block_sparsity == [0.5] * len(report.block_sparsity)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma3", "gpt_neox", "qwen3_moe"])
def test_loss_from_last_hidden_equals_model_loss(arch: str) -> None:
    model = build(arch).eval()
    _, blocks = find_blocks(model)
    ids = calib_ids(n=4, seqlen=16)
    hidden, calls = record_block_inputs(model, blocks, ids, batch_size=2)
    for i, blk in enumerate(blocks):
        hidden = run_block(blk, hidden, calls[i], torch.device("cpu"))
    got = loss_from_last_hidden(model, blocks, hidden, list(ids.split(2)))
    with torch.no_grad():
        want = sum(float(model(b, labels=b).loss) for b in ids.split(2)) / 2
    assert got == pytest.approx(want, rel=1e-4)
    assert "forward" not in blocks[0].__dict__  # stubs removed


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_auto_owl_search_never_worse_than_uniform(arch: str) -> None:
    model = build(arch)
    calib = calib_ids(n=8, seqlen=16)
    report = model.prune(hf_prune.PruningConfig(method="wanda", sparsity=0.6, owl=True, batch_size=4),
                         calibration=calib, verbose=False, show_progress=False)
    choice = report.owl_choice
    assert choice is not None and choice["candidates"] > 5
    assert choice["search_loss"] <= choice["uniform_loss"]
    assert abs(sum(report.block_sparsity) / len(report.block_sparsity) - 0.6) < 1e-6
    assert abs(report.achieved_sparsity - 0.6) < 0.02
    assert "OWL:" in report.table()
    assert report.to_dict()["owl_choice"]["kind"] in ("uniform", "owl", "depth_ramp")


def test_min_gain_keeps_uniform_unless_the_gain_is_large_enough() -> None:
    calib = calib_ids(n=8, seqlen=16)
    choices = {}
    for gain in (0.0, 0.99):
        report = build("llama").prune(hf_prune.PruningConfig(method="wanda", sparsity=0.5, owl=True, batch_size=4,
                                                             owl_min_gain=gain),
                                      calibration=calib, verbose=False, show_progress=False)
        choices[gain] = (report.owl_choice, report.block_sparsity)
    free, _ = choices[0.0]
    strict, blocks = choices[0.99]
    assert free["search_loss"] <= free["uniform_loss"] and "kept_uniform" not in free
    assert free["kind"] != "uniform"  # on this model and data a non-uniform allocation wins by a hair (~0.1%) ...
    assert strict["kind"] == "uniform" and blocks == [pytest.approx(0.5)] * len(blocks)  # ... which 99% rejects
    assert "owl_min_gain=0.99" in strict["kept_uniform"] and strict["search_loss"] == strict["uniform_loss"]


def test_fixed_owl_hyperparameters_are_the_paper_formula() -> None:
    model = build("llama")
    report = model.prune(hf_prune.PruningConfig(method="wanda", sparsity=0.5, owl=True, owl_lambda=0.1,
                                                owl_threshold=5.0), calibration=calib_ids(), verbose=False,
                         show_progress=False)
    assert report.owl_choice == {"kind": "owl", "threshold": 5.0, "lambda": 0.1}
    assert max(report.block_sparsity) - min(report.block_sparsity) == pytest.approx(0.2)


def test_owl_search_restores_weights_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_prune.oneshot import owl as owl_module

    class Stop(BaseException):  # not an Exception: the search's uniform fallback must not swallow it
        pass

    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real, calls = owl_module.keep_mask, []

    def boom(scores, sparsity):
        calls.append(1)
        if len(calls) > 3:  # after some weights of block 0 were masked
            raise Stop("boom")
        return real(scores, sparsity)

    monkeypatch.setattr(owl_module, "keep_mask", boom)
    with pytest.raises(Stop, match="boom"):
        model.prune(hf_prune.PruningConfig(method="wanda", sparsity=0.5, owl=True), calibration=calib_ids(),
                    verbose=False, show_progress=False)
    assert len(calls) > 3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"owl_lambda": "big"}, "owl_lambda"),
        ({"owl_lambda": 1.5}, "owl_lambda"),
        ({"owl_threshold": 0}, "owl_threshold"),
        ({"owl_threshold": "x"}, "owl_threshold"),
        ({"owl_search_samples": 0}, "owl_search_samples"),
        ({"owl_min_gain": 1.0}, "owl_min_gain"),
        ({"owl_lambda": -0.6, "sparsity": 0.5}, "owl_lambda"),
    ],
)
def test_owl_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        hf_prune.PruningConfig(**{"method": "wanda", "sparsity": 0.5, "owl": True, **kwargs})


def test_cli_parses_auto_and_numbers() -> None:
    from hf_prune.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["prune", "m", "--method", "wanda", "--owl", "--owl-lambda", "auto",
                                      "--owl-threshold", "7", "-o", "o"])
    cfg = _config_from_args(args)
    assert (cfg.options.owl_lambda, cfg.options.owl_threshold) == ("auto", 7.0)


def test_archs_table_covers_search() -> None:
    assert {"llama", "qwen3", "gpt2"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("method, proxy", [("magnitude", "magnitude"), ("ria", "ria"), ("sparsegpt", "wanda"),
                                           ("admm", "wanda")])
def test_search_proxy_is_the_method_where_it_only_ranks(method: str, proxy: str) -> None:
    model = build("llama")
    report = model.prune(hf_prune.PruningConfig(method=method, sparsity=0.5, owl=True), calibration=calib_ids(),
                         verbose=False, show_progress=False)
    assert report.owl_choice["proxy"] == proxy
    assert report.owl_choice["search_loss"] <= report.owl_choice["uniform_loss"]


def test_model_card_says_what_owl_chose(tmp_path) -> None:
    model = build("llama")
    model.prune(hf_prune.PruningConfig(method="wanda", sparsity=0.5, owl=True), calibration=calib_ids(),
                verbose=False, show_progress=False)
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "OWL:" in card and "search loss" in card and "block sparsity" in card
