"""Saved pruned models reload with stock transformers (no hf_prune import): same logits, same zeros."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import build, calib_ids

from hf_prune import IncompletePruningError, NumericalError, PruningConfig
from hf_prune.report import REPORT_FILE

STOCK_LOADER = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    assert "hf_prune" not in sys.modules
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(ids).logits
    zeros = {n: (p == 0) for n, p in model.named_parameters()}
    assert "hf_prune" not in sys.modules
    torch.save({"logits": logits, "zeros": zeros, "pruning_config": model.config.pruning_config}, sys.argv[3])
    """
)


@pytest.mark.parametrize("arch,method,structure", [
    ("llama", "sparsegpt", "2:4"),
    ("gpt2", "wanda", "unstructured"),
    ("qwen3_moe", "wanda", "2:4"),
    ("gemma3", "magnitude", "unstructured"),
])
def test_reload_with_stock_transformers(tmp_path, arch: str, method: str, structure: str) -> None:
    model = build(arch)
    calib = calib_ids()
    cfg = PruningConfig(method=method, sparsity=0.5, structure=structure, num_calibration_samples=8, seqlen=32)
    model.prune(cfg, calibration=calib, show_progress=False, verbose=False)
    out = tmp_path / "pruned"
    model.save_pretrained(out)
    assert (out / REPORT_FILE).is_file()
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["method"] == method and abs(report["achieved_sparsity"] - 0.5) < 1e-3
    assert json.loads((out / "config.json").read_text())["pruning_config"]["structure"] == structure

    ids = calib[:2]
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(STOCK_LOADER)
    subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "ids.pt"), str(tmp_path / "res.pt")],
                   check=True, capture_output=True, text=True)
    res = torch.load(tmp_path / "res.pt")
    with torch.no_grad():
        expected = model(ids).logits
    assert torch.equal(res["logits"], expected)
    for name, p in model.named_parameters():
        if name in res["zeros"]:
            assert torch.equal(res["zeros"][name], p == 0), name
    assert PruningConfig.from_dict({k: v for k, v in res["pruning_config"].items()
                                    if k not in ("achieved_sparsity", "hf_prune_version")}) == cfg


def test_from_model_restores_config(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = build("llama")
    cfg = PruningConfig(method="magnitude", sparsity=0.3)
    model.prune(cfg, show_progress=False, verbose=False)
    model.save_pretrained(tmp_path)
    assert PruningConfig.from_model(AutoModelForCausalLM.from_pretrained(tmp_path)) == cfg


def test_save_replaces_stale_weight_files(tmp_path) -> None:
    model = build("llama")
    model.prune(PruningConfig(method="magnitude", sparsity=0.5), show_progress=False, verbose=False)
    (tmp_path / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    (tmp_path / "notes.txt").write_text("user file")
    model.save_pretrained(tmp_path)
    names = set(os.listdir(tmp_path))
    assert "model-00001-of-00009.safetensors" not in names
    assert "notes.txt" in names and "model.safetensors" in names
    assert not [n for n in names if n.startswith(".hf_prune-save-")]


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    import hf_prune.integrations.transformers as patches

    model = build("llama")
    model.prune(PruningConfig(method="magnitude", sparsity=0.5), show_progress=False, verbose=False)
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken_save(self, save_directory, *a, **k):
        (open(os.path.join(save_directory, "model.safetensors"), "wb")).write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(patches, "_ORIGINAL_SAVE", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_failed_run_restores_weights_and_nan_is_reported() -> None:
    model = build("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NumericalError, match="NaN/Inf"):
        model.prune(PruningConfig(method="wanda", sparsity=0.5, num_calibration_samples=4, seqlen=16),
                    calibration=calib_ids(4, 16), show_progress=False, verbose=False)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) or (torch.isnan(p) == torch.isnan(before[name])).all(), name
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])
    assert not getattr(model.config, "pruning_config", None)


def test_failed_run_without_backup_refuses_save(tmp_path) -> None:
    model = build("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError):
        model.prune(PruningConfig(method="wanda", sparsity=0.5, num_calibration_samples=4, seqlen=16,
                                  restore_on_error=False), calibration=calib_ids(4, 16), show_progress=False,
                    verbose=False)
    with pytest.raises(IncompletePruningError):
        model.save_pretrained(tmp_path)
    with pytest.raises(IncompletePruningError):
        model.prune(PruningConfig(method="magnitude"), show_progress=False, verbose=False)


def test_compressed_save_of_pruned_model_uses_one_temp_folder(tmp_path, monkeypatch) -> None:
    import tempfile

    from transformers import AutoModelForCausalLM

    from hf_prune.nn import SparseLinear

    model = build("llama")
    model.prune(PruningConfig(method="magnitude", sparsity=0.5, structure="2:4"), show_progress=False,
                verbose=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("user file")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    model.save_pretrained(out, sparse_format="2:4")
    assert len(made) == 1 and not os.path.exists(made[0])  # one temporary folder, published once
    assert sorted(os.listdir(tmp_path)) == ["out"]
    names = set(os.listdir(out))
    assert {"notes.txt", REPORT_FILE, "model.safetensors"} <= names and "model-00001-of-00002.safetensors" not in names
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["sparse_format"] == "2:4" and config["pruning_config"]["structure"] == "2:4"
    assert isinstance(AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.up_proj, SparseLinear)


def test_atomic_writers_leave_old_content_on_failure(tmp_path) -> None:
    from hf_prune.io import atomic_directory, atomic_write, atomic_write_bytes, atomic_write_text

    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_bytes(target, b"two")
    assert target.read_text() == "two"

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "two" and os.listdir(target.parent) == ["f.txt"]

    folder = tmp_path / "ckpt"
    with atomic_directory(folder) as tmp:
        (tmp / "a").write_text("a")
        with atomic_directory(tmp) as inner:  # nested: writes in place, publishes nothing
            assert inner == tmp
            (inner / "b").write_text("b")
    assert sorted(os.listdir(folder)) == ["a", "b"]
    with pytest.raises(OSError, match="disk full"), atomic_directory(folder) as tmp:
        (tmp / "c").write_text("c")
        raise OSError("disk full")
    assert sorted(os.listdir(folder)) == ["a", "b"] and sorted(os.listdir(tmp_path)) == ["ckpt", "sub"]
