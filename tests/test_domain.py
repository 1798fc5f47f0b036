"""Domain-aware pruning: named calibration sources (mixtures), dual importance (general + λ · domain), multi-text
evaluation, the standard-library code corpus, and the errors for bad source settings."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import SAMPLE_TEXT, VOCAB, build, save_tiny, tiny_tokenizer

import hf_prune
from hf_prune import PruningConfig
from hf_prune.core.model import find_blocks, iter_prunable
from hf_prune.core.sources import (
    allocate_samples,
    build_mixture,
    combine_second_moments,
    normalised_weights,
)
from hf_prune.core.stats import InputStats, StatsCollector, combine_input_stats
from hf_prune.errors import CalibrationError, ConfigError
from hf_prune.structure.scores import RunningMoments, combine_moments

SEQ = 16


def sources(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two token sources with different statistics: 'general' over the whole vocabulary, 'domain' over a
    narrow band of it (a different activation profile)."""
    g = torch.Generator().manual_seed(seed)
    return {"general": torch.randint(0, VOCAB, (n, SEQ), generator=g),
            "domain": torch.randint(10, 40, (n, SEQ), generator=g)}


# ------------------------------------------------------------------------------------------ pure math
@pytest.mark.parametrize("shares, total, expected", [
    ({"a": 1, "b": 1}, 8, {"a": 4, "b": 4}),
    ({"a": 1, "b": 3}, 10, {"a": 3, "b": 7}),   # 2.5 / 7.5: the tie goes to the earlier name
    ({"a": 1, "b": 0}, 5, {"a": 5, "b": 0}),
    ({"a": 0.01, "b": 0.99}, 4, {"a": 1, "b": 3}),  # a positive share gets at least one sample
    ({"a": 1, "b": 1, "c": 1}, 4, {"a": 2, "b": 1, "c": 1}),
])
def test_allocate_samples(shares, total, expected) -> None:
    counts = allocate_samples(shares, total)
    assert counts == expected and sum(counts.values()) == total


def test_normalised_weights_and_errors() -> None:
    assert normalised_weights(["a", "b"], None) == {"a": 0.5, "b": 0.5}
    assert normalised_weights(["a", "b"], {"a": 3}) == {"a": 1.0, "b": 0.0}
    with pytest.raises(CalibrationError, match="not calibration sources"):
        normalised_weights(["a", "b"], {"c": 1})
    with pytest.raises(CalibrationError, match="positive"):
        normalised_weights(["a", "b"], {"a": 0, "b": 0})


def test_combine_second_moments_matches_a_naive_sum() -> None:
    torch.manual_seed(0)
    xg, xd = torch.randn(50, 6), 3 * torch.randn(30, 6) + 1
    lam = 0.7
    for stat in (lambda x: x.square().sum(0), lambda x: x.t() @ x):
        g, d = stat(xg), stat(xd)
        got = combine_second_moments(g, 50, d, 30, lam, 80)
        # naive: per-token means, each divided by the mean of its diagonal, general + λ domain, as a sum of 80
        mg, md = g / 50, d / 30
        diag = (lambda m: m if m.dim() == 1 else torch.diagonal(m))  # noqa: E731
        want = (mg / diag(mg).mean() + lam * md / diag(md).mean()) / (1 + lam) * 80
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_combine_input_stats_hessian_and_norms() -> None:
    torch.manual_seed(1)
    xg, xd = torch.randn(40, 8), torch.randn(20, 8) * 5
    g = InputStats(8, torch.device("cpu"), norms=True, hessian=True)
    d = InputStats(8, torch.device("cpu"), norms=True, hessian=True)
    g.add(xg)
    d.add(xd)
    out = combine_input_stats({"k": g}, {"k": d}, 2.0)["k"]
    assert out.n_tokens == 60
    want_h = combine_second_moments(xg.t() @ xg, 40, xd.t() @ xd, 20, 2.0, 60)
    torch.testing.assert_close(out.full_hessian(), want_h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.sum_sq, combine_second_moments(xg.square().sum(0), 40, xd.square().sum(0), 20,
                                                                  2.0, 60), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="different layers"):
        combine_input_stats({"k": g}, {"j": d}, 1.0)


def test_combine_moments_matches_a_naive_formula() -> None:
    torch.manual_seed(2)
    xg, xd = (torch.randn(64, 5) + 2).double(), (torch.randn(32, 5) * 4 - 1).double()
    g, d = RunningMoments(5), RunningMoments(5)
    g.add(xg)
    d.add(xd)
    lam = 0.5
    c = combine_moments(g, d, lam)
    # naive: scale each source to unit mean second moment, mix them 1 : λ, put back in the mixed units
    sg, sd = xg.square().mean(0).mean(), xd.square().mean(0).mean()
    second = (xg.square().mean(0) / sg + lam * xd.square().mean(0) / sd) / (1 + lam)
    mean = (xg.mean(0) / sg.sqrt() + lam * xd.mean(0) / sd.sqrt()) / (1 + lam)
    unit = (sg + lam * sd) / (1 + lam)
    torch.testing.assert_close(c.var.double(), (second - mean.square()) * unit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.sum_sq.double(), second * unit * 96, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(c.mean, (xg.mean(0) + lam * xd.mean(0)) / (1 + lam))
    assert c.n == 96
    # λ = 0 is the general side; a side without tokens contributes nothing
    zero = combine_moments(g, d, 0.0)
    torch.testing.assert_close(zero.var, g.var, rtol=1e-5, atol=1e-6)
    empty = combine_moments(g, RunningMoments(5), 3.0)
    torch.testing.assert_close(empty.var, g.var, rtol=1e-5, atol=1e-6)


def test_stats_collector_keeps_tagged_batches_apart() -> None:
    """Per-tag statistics equal those of separate collections over each side's batches."""
    model = build("llama")
    block = model.model.layers[0]
    layers = list(iter_prunable(block, "model.layers.0", None, []))
    x = [torch.randn(2, SEQ, 64) for _ in range(3)]
    pos = torch.arange(SEQ).unsqueeze(0)
    kwargs = {"position_embeddings": model.model.rotary_emb(x[0], pos), "attention_mask": None}

    def run(collector: StatsCollector, batches: list[torch.Tensor]) -> None:
        collector.attach()
        with torch.no_grad():
            for h in batches:
                block(h, **kwargs)
                collector.end_batch()
        collector.detach()

    tagged = StatsCollector(layers, torch.device("cpu"), norms=True, hessian=True,
                            tags=["general", "domain", "general"])
    run(tagged, x)
    plain_g = StatsCollector(list(iter_prunable(block, "model.layers.0", None, [])), torch.device("cpu"), True, True)
    run(plain_g, [x[0], x[2]])
    plain_d = StatsCollector(list(iter_prunable(block, "model.layers.0", None, [])), torch.device("cpu"), True, True)
    run(plain_d, [x[1]])
    assert sorted(tagged.by_tag["general"]) == sorted(plain_g.stats)
    for key in plain_g.stats:
        torch.testing.assert_close(tagged.by_tag["general"][key].hessian, plain_g.stats[key].hessian)
        torch.testing.assert_close(tagged.by_tag["domain"][key].sum_sq, plain_d.stats[key].sum_sq)
        assert tagged.by_tag["domain"][key].n_tokens == 2 * SEQ


# ------------------------------------------------------------------------------------------ mixtures
def test_build_mixture_rows_seeds_and_order() -> None:
    src = {"general": [SAMPLE_TEXT], "domain": [SAMPLE_TEXT.upper()]}
    tok = tiny_tokenizer()
    mix = build_mixture(src, tok, num_samples=6, seqlen=SEQ, seed=3, weights={"general": 2, "domain": 1})
    assert [(s.name, s.samples) for s in mix.sources] == [("general", 4), ("domain", 2)]
    alone = hf_prune.core.calibration.build_calibration(src["general"], tok, 4, SEQ, 3)
    assert torch.equal(mix.tokens[:4], alone)  # each source draws with its own seed (seed + position)
    # under dual importance the domain source goes last whatever the dict order
    dual = build_mixture({"domain": src["domain"], "general": src["general"]}, tok, 6, SEQ, 3,
                         domain_source="domain", domain_weight=1.0)
    assert [s.name for s in dual.sources] == ["general", "domain"] and dual.general_rows() == 3
    assert [dual.side(r) for r in range(6)] == ["general"] * 3 + ["domain"] * 3


@pytest.mark.parametrize("calibration, kwargs, error, match", [
    ({"general": torch.zeros(4, SEQ, dtype=torch.long), "domain": []}, {}, CalibrationError, "source 'domain'"),
    ({"general": torch.zeros(4, SEQ, dtype=torch.long), "domain": torch.zeros(4, 8, dtype=torch.long)}, {},
     CalibrationError, "different sequence lengths"),
    ({"general": torch.zeros(4, SEQ, dtype=torch.long)}, {"domain_weight": 1.0}, CalibrationError,
     "named 'domain'"),
    ({"domain": torch.zeros(4, SEQ, dtype=torch.long)}, {"domain_weight": 1.0}, CalibrationError,
     "general source"),
    ({"general": torch.zeros(4, SEQ, dtype=torch.long), "domain": torch.zeros(4, SEQ, dtype=torch.long)},
     {"calibration_weights": {"general": 1, "code": 1}}, CalibrationError, "not calibration sources"),
    ({"general": torch.zeros(4, SEQ, dtype=torch.long), "domain": torch.zeros(4, SEQ, dtype=torch.long)},
     {"domain_weight": 1.0, "calibration_weights": {"general": 1, "domain": 0}}, CalibrationError, "zero share"),
    ({}, {}, CalibrationError, "empty dict"),
    (torch.zeros(4, SEQ, dtype=torch.long), {"domain_weight": 1.0}, CalibrationError, "named 'domain'"),
    (torch.zeros(4, SEQ, dtype=torch.long), {"calibration_weights": {"a": 1}}, CalibrationError, "named"),
])
def test_bad_sources_are_refused_before_the_model_changes(calibration, kwargs, error, match) -> None:
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        hf_prune.prune(model, PruningConfig(method="wanda", num_calibration_samples=4, seqlen=SEQ, **kwargs),
                       calibration=calibration, show_progress=False, verbose=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, match", [
    ({"calibration_weights": {"general": -1}}, "numbers >= 0"),
    ({"calibration_weights": {"general": 0, "domain": 0}}, "sum to 0"),
    ({"calibration_weights": ["general"]}, "must map"),
    ({"domain_weight": -0.5}, "number >= 0"),
    ({"domain_weight": float("nan")}, "number >= 0"),
    ({"domain_weight": 1.0, "method": "magnitude"}, "does not apply to method='magnitude'"),
    ({"domain_weight": 1.0, "method": "taylor", "sparsity": 0.2}, "does not apply to method='taylor'"),
    ({"domain_weight": 1.0, "method": "reap", "sparsity": 0.25}, "calibration_weights instead"),
    ({"domain_source": ""}, "domain_source"),
])
def test_bad_source_config(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        PruningConfig(**{"method": "wanda", **kwargs})


# ------------------------------------------------------------------------------------------ end to end
def _masks(model) -> dict[str, torch.Tensor]:
    prefix, _ = find_blocks(model)
    return {n: (p == 0) for n, p in model.named_parameters() if p.dim() >= 2 and n.startswith(prefix + ".")}


def _prune(arch: str, method: str, calibration, **kw):
    model = build(arch)
    report = hf_prune.prune(model, PruningConfig(method=method, num_calibration_samples=8, seqlen=SEQ, batch_size=4,
                                                 **kw), calibration=calibration, show_progress=False, verbose=False)
    return model, report


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "qwen3_moe"])
def test_dual_wanda_is_general_at_lambda_zero_and_domain_at_large_lambda(arch) -> None:
    src = sources()
    # the mixture takes the first 4 rows of each source: the single-source runs get the same rows
    general, _ = _prune(arch, "wanda", src["general"][:4])
    domain, _ = _prune(arch, "wanda", src["domain"][:4])
    zero, report = _prune(arch, "wanda", src, domain_weight=0.0)
    large, _ = _prune(arch, "wanda", src, domain_weight=1e9)
    mixed, _ = _prune(arch, "wanda", src, domain_weight=1.0)
    mg, md, m0, ml, mm = (_masks(m) for m in (general, domain, zero, large, mixed))
    assert all(torch.equal(mg[k], m0[k]) for k in mg), "domain_weight=0 must give the general-only masks"
    same = sum(int((md[k] == ml[k]).sum()) for k in md) / sum(md[k].numel() for k in md)
    assert same > 0.999, f"a huge domain_weight must give the domain-only masks ({same:.4%} equal)"
    assert any(not torch.equal(mg[k], mm[k]) for k in mg) and any(not torch.equal(md[k], mm[k]) for k in md)
    assert report.calibration_sources == [
        {"name": "general", "samples": 4, "tokens": 4 * SEQ, "share": 0.5, "side": "general", "weight": 1.0},
        {"name": "domain", "samples": 4, "tokens": 4 * SEQ, "share": 0.5, "side": "domain", "weight": 0.0}]
    assert "dual importance general + 0 x domain" in report.table()


def test_dual_sparsegpt_at_lambda_zero_matches_general_only() -> None:
    src = sources()
    general, _ = _prune("llama", "sparsegpt", src["general"][:4])
    zero, _ = _prune("llama", "sparsegpt", src, domain_weight=0.0)
    mg, m0 = _masks(general), _masks(zero)
    same = sum(int((mg[k] == m0[k]).sum()) for k in mg) / sum(mg[k].numel() for k in mg)
    assert same > 0.995  # the Hessian is only rescaled; float32 rounding may flip near-ties
    for (n, a), b in zip(general.named_parameters(), zero.parameters()):
        if "layers" in n and a.dim() == 2:
            assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_dual_nm_and_batch_size_fallback_warns() -> None:
    model = build("llama")
    with pytest.warns(UserWarning, match="batch_size 4 -> 2"):  # 6 general rows: batches of 4 would mix sides
        report = hf_prune.prune(model, PruningConfig(method="wanda", structure="2:4", num_calibration_samples=12,
                                                     seqlen=SEQ, batch_size=4, domain_weight=1.0),
                                calibration=sources(n=12), show_progress=False, verbose=False)
    assert report.config["batch_size"] == 2
    w = model.model.layers[0].mlp.up_proj.weight.view(-1, 4)
    assert bool(((w != 0).sum(-1) <= 2).all())


def test_dual_flap_at_lambda_zero_matches_general_only() -> None:
    src = sources()
    general, rg = _prune("llama", "flap", src["general"][:4], sparsity=0.3)
    zero, r0 = _prune("llama", "flap", src, sparsity=0.3, domain_weight=0.0)
    mixed, rm = _prune("llama", "flap", src, sparsity=0.3, domain_weight=1.0)
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(general) == shapes(zero)
    for a, b in zip(general.parameters(), zero.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the bias compensation's mean is the general one
    assert rm.calibration_sources[1]["side"] == "domain"


def test_mixture_feeds_structured_and_expert_methods() -> None:
    """Named sources without dual importance are one calibration set for every family."""
    from tiny_models import build_moe

    src = sources()
    _, report = _prune("llama", "taylor", src, sparsity=0.2, calibration_weights={"general": 3, "domain": 1})
    assert [(s["name"], s["samples"]) for s in report.calibration_sources] == [("general", 6), ("domain", 2)]
    moe = build_moe("mixtral")
    r = hf_prune.prune(moe, PruningConfig(method="reap", sparsity=0.25, num_calibration_samples=8, seqlen=SEQ),
                       calibration=src, show_progress=False, verbose=False)
    assert r.calibration_sources[0]["name"] == "general"


def test_report_and_card_name_the_sources(tmp_path) -> None:
    model, report = _prune("llama", "wanda", sources(), domain_weight=0.5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "pruning_report.json").read_text())
    assert [s["name"] for s in saved["calibration_sources"]] == ["general", "domain"]
    card = (tmp_path / "README.md").read_text()
    assert "general 4, domain 4 (dual importance: general + 0.5 × domain)" in card
    cfg = PruningConfig.from_model(model)
    assert cfg.domain_weight == 0.5 and cfg.domain_source == "domain"


# ------------------------------------------------------------------------------------------ corpus and CLI
def test_code_splits_are_disjoint_files_and_deterministic() -> None:
    from hf_prune.assets import code_splits

    calib, held = code_splits(max_chars=(300_000, 100_000))
    files = lambda text: {line[len("# file: "):] for line in text.splitlines() if line.startswith("# file: ")}  # noqa: E731
    assert files(calib) and files(held) and not files(calib) & files(held)
    assert code_splits(max_chars=(300_000, 100_000)) == (calib, held)
    assert "def " in calib and "def " in held


def test_cli_named_calibration_and_multi_text_eval(tmp_path, capsys) -> None:
    from hf_prune.cli import main

    src = tmp_path / "tiny"
    save_tiny(src)
    (tmp_path / "g.txt").write_text(SAMPLE_TEXT)
    (tmp_path / "d.txt").write_text(SAMPLE_TEXT.upper())
    out = tmp_path / "out"
    assert main(["prune", str(src), "--method", "wanda", "--sparsity", "0.5", "--output", str(out),
                 "--calibration", f"general={tmp_path / 'g.txt'}", "--calibration", f"domain={tmp_path / 'd.txt'}",
                 "--calibration-weights", "general=1,domain=1", "--domain-weight", "2", "--num-samples", "4",
                 "--seqlen", str(SEQ), "--batch-size", "2", "--dtype", "float32"]) == 0
    assert "dual importance general + 2 x domain" in capsys.readouterr().out
    assert main(["eval", str(out), "--text", f"general={tmp_path / 'g.txt'}", "--text",
                 f"domain={tmp_path / 'd.txt'}", "--seqlen", "32", "--dtype", "float32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"general", "domain"} and all(r["ppl"] > 0 for r in res.values())
    saved = json.loads((out / "pruning_report.json").read_text())
    assert set(saved["evaluation"]["perplexity_by_source"]) == {"general", "domain"}
    assert "Perplexity per held-out text" in (out / "README.md").read_text()
    with pytest.raises(SystemExit, match="need a name each"):
        main(["eval", str(out), "--text", str(tmp_path / "g.txt"), "--text", str(tmp_path / "d.txt")])
    with pytest.raises(SystemExit, match="NAME=NUMBER"):
        main(["prune", str(src), "--output", str(tmp_path / "x"), "--calibration-weights", "general"])
    with pytest.raises(SystemExit, match="twice"):
        main(["prune", str(src), "--output", str(tmp_path / "x"), "--calibration-weights", "general=1,general=2"])
    # a source-name mistake is refused before the model is loaded (the model path does not even exist)
    with pytest.raises(SystemExit, match="named 'domain'"):
        main(["prune", str(tmp_path / "missing"), "--output", str(tmp_path / "x"), "--domain-weight", "1",
              "--calibration", f"general={tmp_path / 'g.txt'}", "--calibration", f"code={tmp_path / 'd.txt'}"])


def test_first_rows_take_every_source() -> None:
    from hf_prune.core.sources import first_rows, use_mix

    mix = build_mixture({"a": torch.zeros(8, 4, dtype=torch.long), "b": torch.ones(8, 4, dtype=torch.long)}, None,
                        num_samples=8, seqlen=4, seed=0, weights={"a": 3, "b": 1})
    assert first_rows(mix.tokens, 4)[:, 0].tolist() == [0, 0, 0, 0]  # no mixture active: the first rows
    with use_mix(mix):
        assert first_rows(mix.tokens, 4)[:, 0].tolist() == [0, 0, 0, 1]  # 3 : 1, as the shares


def test_dual_needs_a_sample_on_each_side_and_warns_about_reconstruct() -> None:
    with pytest.raises(CalibrationError, match="too few for domain_weight"):
        hf_prune.prune(build("llama"), PruningConfig(method="wanda", num_calibration_samples=1, seqlen=SEQ,
                                                     domain_weight=1.0),
                       calibration=sources(), show_progress=False, verbose=False)
    with pytest.warns(UserWarning, match="reconstruct=True refits"):
        _prune("llama", "flap", sources(), sparsity=0.2, reconstruct=True, domain_weight=1.0)
    # OWL reads the per-source norms, so magnitude + OWL takes domain_weight
    assert PruningConfig(method="magnitude", owl=True, domain_weight=1.0).domain_weight == 1.0
