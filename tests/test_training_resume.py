"""Pruning state in Trainer checkpoints: a resumed run has the same masks and sparsity trajectory as an
uninterrupted one; checkpoints without mask state fail clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_training_common import assert_masked_zero, make_trainer, masked_params

from hf_prune import PruningCallback, PruningConfig
from hf_prune.training.checkpoint import MASKS_FILE, STATE_FILE, MissingPruningStateError


def _cfg(method: str, structure: str = "unstructured") -> PruningConfig:
    return PruningConfig(method=method, structure=structure, sparsity=None if structure != "unstructured" else 0.7,
                         schedule="cubic", start_step=1, end_step=9, update_every=2, lottery_rounds=2,
                         lottery_rewind_step=1, movement_l1=1e-3)


def _run(out, cfg, resume=None, **overrides):
    cb = PruningCallback(cfg, verbose=False)
    trainer = make_trainer("llama", out, [cb], max_steps=12, save_strategy="steps", save_steps=5, **overrides)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, cb


@pytest.mark.parametrize("method, structure, mode", [
    ("gmp", "unstructured", "path"),
    ("gmp", "2:4", "latest"),
    ("movement", "unstructured", "path"),
    ("soft_movement", "unstructured", "latest"),
    ("lottery", "unstructured", "path"),
    ("magnitude", "2:4", "path"),  # one-shot start mask, constant; checkpoints go through hf_prune's atomic save
])
def test_resume_matches_uninterrupted_run(tmp_path, method: str, structure: str, mode: str) -> None:
    cfg = _cfg(method, structure)
    full, cb_full = _run(tmp_path / "full", cfg)
    ckpt = tmp_path / "full" / "checkpoint-5"
    assert (ckpt / MASKS_FILE).is_file() and (ckpt / STATE_FILE).is_file()
    meta = json.loads((ckpt / STATE_FILE).read_text())
    assert meta["step"] == 5 and meta["method"] == method
    assert not list(ckpt.glob(".tmp-*"))  # atomic writes leave no temporary files
    if mode == "path":  # resume from a checkpoint folder outside this run's output_dir
        _, cb = _run(tmp_path / "resumed", cfg, resume=str(ckpt))
    else:  # resume_from_checkpoint=True: latest checkpoint in output_dir
        shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoint-5")
        _, cb = _run(tmp_path / "resumed", cfg, resume=True)
    assert cb.history == cb_full.history  # same (step, target, achieved) at every mask update
    if method != "magnitude":
        assert len(cb.history) >= 2 and cb.history[-1][0] > 5  # updates happened after the resume point
    full_params = masked_params(cb_full)
    for name, (w, m) in masked_params(cb).items():
        assert torch.equal(m, full_params[name][1]), f"{name}: mask differs from the uninterrupted run"
        torch.testing.assert_close(w, full_params[name][0], rtol=1e-4, atol=1e-5)
    assert_masked_zero(cb)
    if cb.scores is not None:
        for name, s in cb.scores.scores.items():
            torch.testing.assert_close(s, cb_full.scores.scores[name], rtol=1e-4, atol=1e-7)


def test_resume_without_mask_state_is_a_clear_error(tmp_path) -> None:
    trainer = make_trainer("llama", tmp_path / "plain", [], max_steps=5, save_strategy="steps", save_steps=5)
    trainer.train()
    ckpt = str(tmp_path / "plain" / "checkpoint-5")
    cb = PruningCallback(_cfg("gmp"), verbose=False)
    trainer = make_trainer("llama", tmp_path / "b", [cb], max_steps=8)
    with pytest.raises(MissingPruningStateError, match="holds no pruning state"):
        trainer.train(resume_from_checkpoint=ckpt)

    cb = PruningCallback(_cfg("gmp"), on_missing_state="from_weights", verbose=False)
    trainer = make_trainer("llama", tmp_path / "c", [cb], max_steps=10)
    trainer.train(resume_from_checkpoint=ckpt)
    assert_masked_zero(cb)
    assert cb.masks.mask_sparsity() == pytest.approx(0.7, abs=2e-3)  # the schedule goes on from step 5 to 9
    assert [h[0] for h in cb.history] == [7, 9]


def test_resume_with_a_different_config_is_refused(tmp_path) -> None:
    _run(tmp_path / "a", _cfg("gmp"))
    cb = PruningCallback(_cfg("movement"), verbose=False)
    trainer = make_trainer("llama", tmp_path / "b", [cb], max_steps=8)
    with pytest.raises(MissingPruningStateError, match="method='gmp'"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
