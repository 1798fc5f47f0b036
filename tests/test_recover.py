"""PERP recovery (`hf_prune.recover`): what trains, zeros kept, trainable fraction, bad input."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, calib_ids, save_tiny

import hf_prune
from hf_prune import ConfigError


def _pruned(arch: str = "llama", structure: str = "unstructured"):
    model = build(arch)
    cfg = (hf_prune.PruningConfig(method="wanda", sparsity=0.5) if structure == "unstructured"
           else hf_prune.PruningConfig(method="wanda", structure=structure))
    model.prune(cfg, calibration=calib_ids(), verbose=False, show_progress=False)
    return model


@pytest.mark.parametrize("arch, structure", [("llama", "unstructured"), ("gpt2", "2:4"), ("qwen3", "2:4")])
def test_norms_mode_trains_only_norms_and_biases(arch: str, structure: str) -> None:
    model = _pruned(arch, structure)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zeros = {n: p == 0 for n, p in model.named_parameters() if p.dim() == 2}
    report = hf_prune.recover(model, calib_ids(n=16, seqlen=16, seed=1), steps=3, batch_size=4, seqlen=16,
                              show_progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "nothing trained"
    for n in changed:
        assert "norm" in n or n.endswith("bias") or "ln_" in n, f"{n} trained but is neither a norm nor a bias"
    for n, z in zeros.items():
        assert torch.equal(dict(model.named_parameters())[n] == 0, z)
    assert report.zeros_kept and report.trainable_fraction < 0.05 and report.trainable_params > 0
    assert report.to_dict()["trainable_fraction"] == pytest.approx(report.trainable_params / report.total_params)


def test_all_mode_keeps_the_oneshot_mask() -> None:
    model = _pruned("llama", "2:4")
    from hf_prune.core.masks import is_nm_sparse

    report = hf_prune.recover(model, calib_ids(n=16, seqlen=16, seed=1), train="all", steps=3, batch_size=4,
                              seqlen=16, show_progress=False)
    assert report.trainable_fraction == 1.0 and report.zeros_kept
    for layer in model.model.layers:
        assert is_nm_sparse(layer.mlp.down_proj.weight.detach(), 2, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"train": "everything"}, "train="),
        ({"steps": 0}, "steps"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"lora_r": 0}, "lora_r"),
    ],
)
def test_bad_input(kwargs: dict, match: str) -> None:
    model = _pruned()
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=match):
        hf_prune.recover(model, calib_ids(), **kwargs)
    assert all(torch.equal(p, state[n]) for n, p in model.named_parameters())  # untouched


def test_all_mode_needs_an_hf_prune_model() -> None:
    model = build("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :4] = 0
    with pytest.raises(ConfigError, match="pruning_config"):
        hf_prune.recover(model, calib_ids(), train="all", steps=1, batch_size=2, seqlen=16, show_progress=False)


def test_dense_model_warns() -> None:
    model = build("llama")
    with pytest.warns(UserWarning, match="no zero weights"):
        hf_prune.recover(model, calib_ids(), steps=1, batch_size=2, seqlen=16, show_progress=False)


def test_cli_recover(tmp_path, capsys) -> None:
    import json

    from tiny_models import SAMPLE_TEXT

    from hf_prune.cli import main

    src, pruned, out = tmp_path / "tiny", tmp_path / "pruned", tmp_path / "recovered"
    save_tiny(src)
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT)
    assert main(["prune", str(src), "--method", "wanda", "--sparsity", "0.5", "--calibration",
                 str(tmp_path / "text.txt"), "-o", str(pruned), "--num-samples", "4", "--seqlen", "32",
                 "--dtype", "float32"]) == 0
    assert main(["recover", str(pruned), "-o", str(out), "--data", str(tmp_path / "text.txt"), "--steps", "2",
                 "--batch-size", "2", "--seqlen", "32", "--dtype", "float32", "--eval", "--eval-text",
                 str(tmp_path / "text.txt"), "--eval-seqlen", "64"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity after recovery" in printed and "trained (" in printed
    result = json.loads((out / "recovery.json").read_text())
    assert result["recovery"]["zeros_kept"] and result["after"]["ppl"] > 0
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(pruned)
    w, w0 = reloaded.model.layers[0].mlp.down_proj.weight, original.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w == 0, w0 == 0)


@pytest.mark.parametrize("arch, structure", [("llama", "2:4"), ("gpt2", "unstructured")])
def test_lora_mode_merges_with_exact_zeros(arch: str, structure: str) -> None:
    pytest.importorskip("peft")
    model = _pruned(arch, structure)
    zeros = {n: p == 0 for n, p in model.named_parameters() if p.dim() == 2 and bool((p == 0).any())}
    report = hf_prune.recover(model, calib_ids(n=16, seqlen=16, seed=1), train="lora", lora_r=4, steps=3,
                              batch_size=4, seqlen=16, learning_rate=1e-2, show_progress=False)
    assert report.lora_r == 4 and report.zeros_kept
    assert not any("lora" in n for n, _ in model.named_parameters()), "the adapter was not merged"
    params = dict(model.named_parameters())
    changed = 0
    for n, z in zeros.items():
        assert torch.equal(params[n] == 0, z), f"{n}: zeros changed"
        changed += 1
    assert changed and report.trainable_fraction < 0.2


@pytest.mark.parametrize("train", ["norms", "lora"])
def test_failure_leaves_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch, train: str) -> None:
    if train == "lora":
        pytest.importorskip("peft")
    from transformers import Trainer

    model = _pruned("llama")
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    modules = [type(m) for m in model.modules()]

    def boom(self, *args, **kwargs):
        for p in self.model.parameters():  # simulate a partial step, then a crash
            if p.requires_grad:
                with torch.no_grad():
                    p.add_(1.0)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Trainer, "train", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        hf_prune.recover(model, calib_ids(), train=train, steps=1, batch_size=2, seqlen=16, show_progress=False)
    assert [type(m) for m in model.modules()] == modules, "the adapter was left in the model"
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), state[n]), f"{n} changed"
        assert p.requires_grad


def test_bf16_model_trains_in_float32_and_stays_bf16() -> None:
    model = _pruned("llama").to(torch.bfloat16)
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    # each step (3e-3) is below half a bf16 ulp at 1.0 (3.9e-3): pure bf16 Adam would not move them at all;
    # accumulated in float32 over 8 steps they move by more than one ulp
    hf_prune.recover(model, calib_ids(n=32, seqlen=16, seed=1), steps=8, batch_size=4, seqlen=16,
                     learning_rate=3e-3, show_progress=False)
    moved = [n for n, p in model.named_parameters() if n in norms and not torch.equal(p.detach(), norms[n])]
    assert len(moved) == len(norms), f"only {len(moved)} of {len(norms)} norm weights moved in bf16"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_all_mode_keeps_the_pruning_record() -> None:
    model = _pruned("llama", "2:4")
    record = dict(model.config.pruning_config)
    report = model._hf_prune_report
    hf_prune.recover(model, calib_ids(n=16, seqlen=16, seed=1), train="all", steps=2, batch_size=4, seqlen=16,
                     show_progress=False)
    assert model.config.pruning_config == record and model._hf_prune_report is report
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters()
                   if getattr(p, "_post_accumulate_grad_hooks", None)), "gradient hooks left behind"
