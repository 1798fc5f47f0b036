"""Structured pruning through the user-facing surface: model.prune / hf_prune.prune, the report, save/reload and
the CLI, on tiny random models (real transformers classes, real files, real from_pretrained)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import SAMPLE_TEXT, VOCAB, build, save_tiny
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM

import hf_prune
from hf_prune import ConfigError, PruningConfig, UnsupportedModelError
from hf_prune.cli import main
from hf_prune.report import StructuredReport, load_report


def _calib(n: int = 4, seqlen: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _cfg(method: str, sparsity: float = 0.3, **kw) -> PruningConfig:
    return PruningConfig(method=method, sparsity=sparsity, num_calibration_samples=4, seqlen=24, **kw)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(("arch", "method"), [
    ("llama", "flap"), ("qwen3", "wanda-sp"), ("phi3", "taylor"), ("gpt2", "flap"), ("mistral", "block-influence"),
    ("gemma3", "angular"), ("qwen2", "finercut"), ("opt", "wanda-sp"), ("gpt_neox", "flap"),
])
def test_prune_save_reload(arch: str, method: str, tmp_path) -> None:
    model = build(arch).eval()
    before = sum(p.numel() for p in model.parameters())
    report = model.prune(_cfg(method), calibration=_calib(), verbose=False, show_progress=False)
    assert isinstance(report, StructuredReport)
    after = sum(p.numel() for p in model.parameters())
    assert after == report.params_after < before == report.params_before
    assert report.params_removed == sum(b.params_before - b.params_after for b in report.blocks)
    assert report.achieved_fraction > 0.2  # two-block models are coarse for depth; never a no-op
    assert model.config.pruning_config["method"] == method
    ids = torch.randint(0, VOCAB, (2, 10))
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    saved = load_report(json.loads((tmp_path / "pruning_report.json").read_text()))
    assert isinstance(saved, StructuredReport) and saved.params_after == after
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == after
    assert torch.equal(_logits(reloaded, ids), expected)
    assert PruningConfig.from_model(reloaded).method == method


def test_uniform_allocation_reloads_with_stock_fields(tmp_path) -> None:
    model = build("llama").eval()
    report = model.prune(_cfg("flap", allocation="uniform", width_units="mlp", bias_compensation=False),
                         calibration=_calib(), verbose=False, show_progress=False)
    assert report.reload_path == "stock"
    widths = {b.mlp for b in report.blocks}
    assert len(widths) == 1 and next(iter(widths))[1] < 128
    assert model.config.intermediate_size == next(iter(widths))[1]


def test_function_and_method_agree() -> None:
    a, b = build("llama").eval(), build("llama").eval()
    ra = hf_prune.prune(a, _cfg("wanda-sp"), _calib(), verbose=False, show_progress=False)
    rb = b.prune(_cfg("wanda-sp"), calibration=_calib(), verbose=False, show_progress=False)
    assert ra.params_after == rb.params_after
    ids = torch.randint(0, VOCAB, (1, 8))
    assert torch.equal(_logits(a, ids), _logits(b, ids))


def test_report_table_printed(capsys) -> None:
    model = build("llama").eval()
    model.prune(_cfg("flap"), calibration=_calib(), show_progress=False)
    out = capsys.readouterr().out
    assert "mlp channels" in out and "decoder-block parameters" in out and "peak RSS" in out


def test_bad_input_leaves_model_untouched() -> None:
    model = build("llama").eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(hf_prune.CalibrationError, match="needs calibration data"):
        model.prune(_cfg("flap"), verbose=False)
    with pytest.raises(ConfigError, match="structure='2:4' does not fit"):
        _cfg("flap", structure="2:4")
    with pytest.raises(ConfigError, match="owl"):
        _cfg("flap", owl=True)
    with pytest.raises(ConfigError, match="fraction of decoder"):
        _cfg("angular", sparsity=0.0)
    with pytest.raises(ConfigError, match="allocation"):
        _cfg("flap", allocation="adaptive")
    with pytest.raises(ConfigError, match="width method"):
        PruningConfig(method="wanda", structure="width")
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="Bert"):
        bert.prune(_cfg("flap"), calibration=_calib(), verbose=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_removing_everything_is_refused_before_mutation() -> None:
    model = build("llama").eval()
    params = sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError):
        model.prune(_cfg("block-influence", sparsity=0.99), calibration=_calib(), verbose=False, show_progress=False)
    assert sum(p.numel() for p in model.parameters()) == params


def test_cli_structured(tmp_path, capsys) -> None:
    src = tmp_path / "tiny"
    save_tiny(src)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    out = tmp_path / "out"
    rc = main(["prune", str(src), "--method", "flap", "--sparsity", "0.25", "--calibration", str(tmp_path / "calib.txt"),
               "--num-samples", "4", "--seqlen", "32", "--dtype", "float32", "--allocation", "uniform",
               "--output", str(out), "--eval", "--eval-text", str(tmp_path / "calib.txt"), "--eval-seqlen", "64"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "flap (width)" in printed and "pruned perplexity" in printed
    assert json.loads((out / "config.json").read_text())["pruning_config"]["allocation"] == "uniform"
    assert main(["inspect", str(out)]) == 0
    assert "mlp channels" in capsys.readouterr().out
