"""Bad input gets a clear error naming the parameter, before the model is touched."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, calib_ids, tiny_tokenizer

from hf_prune import CalibrationError, PruningConfig, UnsupportedModelError, prune


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, snap) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    "config, calibration, error, match",
    [
        (PruningConfig(method="wanda"), None, CalibrationError, "method='wanda' needs calibration data"),
        (PruningConfig(method="sparsegpt"), None, CalibrationError, "needs calibration"),
        (PruningConfig(method="magnitude", owl=True), None, CalibrationError, "owl=True"),
        (PruningConfig(method="wanda", structure="2:3", sparsity=None), "calib", UnsupportedModelError,
         "in_features=64 is not divisible by M=3"),
        (PruningConfig(method="magnitude", targets=[r"nothing_matches"]), None, UnsupportedModelError,
         "no prunable layers"),
        (PruningConfig(method="wanda", seqlen=32), [""], CalibrationError, "empty"),
        (PruningConfig(method="wanda", seqlen=10_000), ["a short text"], CalibrationError, "fewer than seqlen=10000"),
        (PruningConfig(method="wanda", seqlen=32), torch.full((4, 32), 10_000), CalibrationError,
         "outside the model's vocabulary"),
        (PruningConfig(method="wanda", seqlen=32), torch.randn(4, 32), CalibrationError, "token ids"),
        (PruningConfig(method="wanda", seqlen=32), 3.14, CalibrationError, "not supported"),
        (PruningConfig(method="wanda", seqlen=32), "/no/such/file.txt", CalibrationError, "not an existing file"),
        (PruningConfig(method="wanda", seqlen=32), [], CalibrationError, "list is empty"),
    ],
)
def test_errors_before_touching_model(config, calibration, error, match) -> None:
    model = build("llama")
    snap = _snapshot(model)
    if calibration == "calib":
        calibration = calib_ids(4, 32)
    with pytest.raises(error, match=match):
        prune(model, config, calibration, tokenizer=tiny_tokenizer(), show_progress=False, verbose=False)
    assert _unchanged(model, snap)
    assert not getattr(model.config, "pruning_config", None)


def test_model_without_blocks() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(UnsupportedModelError, match="could not find the decoder blocks"):
        prune(model, PruningConfig(method="magnitude"), verbose=False)


def test_not_a_module() -> None:
    with pytest.raises(UnsupportedModelError, match="torch.nn.Module"):
        prune("gpt2", PruningConfig(method="magnitude"), verbose=False)


def test_nan_embeddings_are_reported_and_nothing_changes() -> None:
    model = build("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("inf")
    snap = _snapshot(model)
    calib = calib_ids(4, 32)
    calib[0, 0] = 5
    from hf_prune import NumericalError

    with pytest.raises(NumericalError, match="NaN/Inf activations entering block 0"):
        prune(model, PruningConfig(method="wanda", seqlen=32, num_calibration_samples=4), calib,
              show_progress=False, verbose=False)
    for n, p in model.named_parameters():
        assert torch.equal(torch.nan_to_num(p), torch.nan_to_num(snap[n]))
