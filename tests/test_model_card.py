"""Model cards (`hf_prune.card`): every save of a pruned model writes ``README.md`` (Hub metadata through
huggingface_hub's ModelCardData, what was done, the per-layer table, how to load) and ``sparsity.png``; a user's own
README.md is never replaced; evaluation results land in the report and the card."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_models import SAMPLE_TEXT, build, calib_ids, save_tiny
from transformers import AutoModelForCausalLM

import hf_prune
from hf_prune import PruningConfig
from hf_prune.card import PLOT_FILE, base_model_of, record_evaluation, write_model_card
from hf_prune.io.save import CARD_MARKER, REPORT_FILE
from hf_prune.report import load_report

PNG = b"\x89PNG\r\n\x1a\n"


def _pruned(method: str = "wanda", structure: str = "2:4", arch: str = "llama", **kw) -> torch.nn.Module:
    model = build(arch)
    sparsity = kw.pop("sparsity", 0.5)
    hf_prune.prune(model, PruningConfig(method=method, sparsity=sparsity, structure=structure,
                                        num_calibration_samples=4, seqlen=16, **kw), calib_ids(4, 16))
    return model


@pytest.fixture()
def base_in_hub_cache(tmp_path: Path) -> Path:
    """A dense model saved in the Hugging Face cache layout, with a base card that has license/language/datasets."""
    snap = tmp_path / "hub" / "models--acme--tiny-base" / "snapshots" / "0123abcd"
    build("llama").save_pretrained(snap)
    (snap / "README.md").write_text("---\nlicense: mit\nlanguage:\n- en\n- fr\ndatasets:\n- acme/corpus\n---\n# base\n")
    return snap


def test_save_writes_card_with_metadata_table_and_plot(base_in_hub_cache: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(base_in_hub_cache)
    report = hf_prune.prune(model, PruningConfig(method="wanda", sparsity=0.5, structure="2:4",
                                                 num_calibration_samples=4, seqlen=16), calib_ids(4, 16))
    model.save_pretrained(tmp_path / "out")
    out = tmp_path / "out"
    text = (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert CARD_MARKER in text
    assert meta["base_model"] == "acme/tiny-base" and meta["library_name"] == "transformers"
    assert meta["license"] == "mit" and meta["language"] == ["en", "fr"] and meta["datasets"] == ["acme/corpus"]
    assert {"hf_prune", "pruned", "wanda", "2:4"} <= set(meta["tags"])
    assert "base_model_relation" not in meta  # one-shot pruning fits none of the Hub's relations
    assert "4 samples × 16 tokens" in text and "| method | `wanda` |" in text
    rows = [line for line in text.splitlines() if line.startswith("| `model.layers.")]
    assert len(rows) == len(report.layers) == 14 and all(line.endswith("| 50.00% |") for line in rows)
    assert "\\|" in text  # the ignore regexes' "|" are escaped inside the options table
    assert f"![sparsity per layer]({PLOT_FILE})" in text and (out / PLOT_FILE).read_bytes().startswith(PNG)
    assert 'AutoModelForCausalLM.from_pretrained("out")' in text and "import hf_prune" not in text
    assert ".tmp-" not in text  # the card names the published folder, not the temporary one
    # the plain sparse checkpoint still loads with identical logits
    again = AutoModelForCausalLM.from_pretrained(out)
    ids = calib_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_structured_card_has_block_table_and_remote_code(tmp_path: Path) -> None:
    from test_structured_surgery import make_plan

    from hf_prune.report import BlockRow, StructuredReport, attach_report
    from hf_prune.structure.surgery import apply_plan

    model = build("llama")
    before = sum(p.numel() for p in model.parameters())
    apply_plan(model, make_plan(model, "mixed", seed=7))
    after = sum(p.numel() for p in model.parameters())
    report = StructuredReport(method="flap", structure="width", target_fraction=0.2, blocks=[
        BlockRow(0, 1000, 700, mlp=(128, 96), heads=(4, 3), kv_heads=(2, 2)), BlockRow(1, 1000, 900, mlp=(128, 112))],
        params_before=before, params_after=after, decoder_params_before=2000, reload_path="hf_prune", seconds=1.5)
    attach_report(model, PruningConfig(method="flap", sparsity=0.2), report)
    model.save_pretrained(tmp_path / "flap")
    text = (tmp_path / "flap" / "README.md").read_text()
    assert "| 0 | 128 → 96 | 4 → 3 | 2 → 2 | – | 1,000 → 700 | 30.0% |" in text
    assert "trust_remote_code=True" in text and "import hf_prune  # builds per-layer shapes" in text
    assert (tmp_path / "flap" / "modeling_hf_prune.py").is_file()
    assert (tmp_path / "flap" / PLOT_FILE).read_bytes().startswith(PNG)
    assert "1.5 s" in text and "structured" in text


def test_compressed_card_says_import_hf_prune(tmp_path: Path) -> None:
    model = _pruned()
    model.save_pretrained(tmp_path / "c", sparse_format="2:4")
    card = ModelCard.load(tmp_path / "c" / "README.md")
    assert "compressed" in card.data.tags and "import hf_prune  # registers the compressed format" in card.text
    assert (tmp_path / "c" / REPORT_FILE).is_file() and (tmp_path / "c" / PLOT_FILE).is_file()


def test_without_matplotlib_the_card_says_how_to_get_the_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    model = _pruned(method="magnitude", structure="unstructured")
    model.save_pretrained(tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    assert 'pip install "hf_prune[plot]"' in text and not (tmp_path / "out" / PLOT_FILE).exists()
    assert "| calibration data | none (data-free method) |" in text


def test_users_readme_is_kept_and_generated_card_is_refreshed(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# my own notes\n")
    model = _pruned(method="magnitude", structure="unstructured")
    with caplog.at_level(logging.WARNING, logger="hf_prune"):
        model.save_pretrained(out)
    assert (out / "README.md").read_text() == "# my own notes\n"
    assert "kept" in caplog.text and "README.md" in caplog.text
    (out / "README.md").unlink()
    model.save_pretrained(out)
    first = (out / "README.md").read_text()
    assert CARD_MARKER in first
    model.save_pretrained(out)  # a generated card is regenerated, not kept
    assert (out / "README.md").read_text() == first
    (out / "README.md").write_text("# mine again\n")
    assert write_model_card(out) is None and (out / "README.md").read_text() == "# mine again\n"


def test_record_evaluation_goes_to_report_and_card(tmp_path: Path) -> None:
    model = _pruned(method="magnitude", structure="unstructured")
    model.save_pretrained(tmp_path / "out")
    merged = record_evaluation(tmp_path / "out", {"perplexity": {"ppl": 12.5, "windows": 4, "seqlen": 64},
                                                  "lm_eval": {"toy": {"acc,none": 0.6, "acc_stderr,none": 0.1}}})
    assert merged["lm_eval"]["toy"]["acc,none"] == 0.6
    report = load_report(json.loads((tmp_path / "out" / REPORT_FILE).read_text()))
    assert report.evaluation["perplexity"]["ppl"] == 12.5 and report.method == "magnitude"
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "Perplexity **12.500**" in card.text and "| toy | acc,none | 0.6000 |" in card.text
    results = {(r.metric_type, r.metric_value) for r in card.data.eval_results}
    assert results == {("perplexity", 12.5), ("acc", 0.6)}
    assert card.data.model_name == "out" and "model-index" in card.content
    assert (tmp_path / "out" / PLOT_FILE).is_file()


def test_cli_prune_eval_rewrites_card_with_perplexity(tmp_path: Path) -> None:
    from hf_prune.cli import main

    src = tmp_path / "tiny"
    save_tiny(src)
    (tmp_path / "t.txt").write_text(SAMPLE_TEXT)
    out = tmp_path / "out"
    assert main(["prune", str(src), "--method", "magnitude", "--sparsity", "0.5", "--output", str(out),
                 "--dtype", "float32", "--calibration", str(tmp_path / "t.txt"), "--eval", "--eval-text",
                 str(tmp_path / "t.txt"), "--eval-seqlen", "64", "--eval-windows", "2"]) == 0
    ppl = json.loads((out / "eval_results.json").read_text())["pruned"]["ppl"]
    text = (out / "README.md").read_text()
    assert f"Perplexity **{ppl:.3f}**" in text
    assert json.loads((out / REPORT_FILE).read_text())["evaluation"]["perplexity"]["ppl"] == ppl


def test_base_model_of() -> None:
    assert base_model_of("acme/base") == ("acme/base", {})
    assert base_model_of("gpt2")[0] == "gpt2"
    assert base_model_of("./not a repo/")[0] is None and base_model_of("")[0] is None
