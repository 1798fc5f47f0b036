"""PruningCallback inside the real transformers Trainer on tiny models (CPU): methods, schedules, mask
integrity every optimizer step, logging, save/reload, bad input."""

from __future__ import annotations

import types

import pytest
import torch
from test_training_common import assert_masked_zero, make_trainer, masked_params, token_dataset, training_args
from tiny_models import calib_ids
from transformers import TrainerCallback

from hf_prune import ConfigError, PruningCallback, PruningConfig, UnsupportedModelError
from hf_prune.core.compat import activation_checkpointing_arg, is_activation_checkpointing
from hf_prune.core.masks import is_nm_sparse
from hf_prune.training.callback import (
    LOG_ACHIEVED,
    LOG_TARGET,
    UnsupportedTrainingSetupError,
    _check_supported,
)
from hf_prune.training.schedules import target_sparsity
from hf_prune.training.state import layer_mask, layer_view


def _cfg(method: str, structure: str = "unstructured", sparsity: float | None = 0.6, **kw) -> PruningConfig:
    base = dict(method=method, structure=structure, sparsity=None if structure != "unstructured" else sparsity,
                schedule="cubic", start_step=0, end_step=6, update_every=2, lottery_rounds=2)
    base.update(kw)
    return PruningConfig(**base)


def _check_structure(cb: PruningCallback, cfg: PruningConfig) -> None:
    for entry in cb.masks.params.values():
        for layer, w in entry.views(entry.param.detach()):
            if cfg.nm is not None:
                assert is_nm_sparse(w, *cfg.nm), f"{layer.name} is not {cfg.structure}"


@pytest.mark.parametrize(
    "arch, method, structure",
    [
        ("llama", "gmp", "unstructured"),
        ("gpt2", "gmp", "2:4"),  # Conv1D, transposed weights
        ("qwen3_moe", "gmp", "2:4"),  # fused 3-D expert tensors
        ("llama", "movement", "unstructured"),
        ("gpt2", "movement", "2:4"),
        ("llama", "soft_movement", "2:4"),  # N:M soft movement: top-N of S per group
        ("qwen3_moe", "movement", "unstructured"),
        ("llama", "lottery", "unstructured"),
        ("qwen3_moe", "lottery", "2:4"),
    ],
)
def test_methods_follow_the_schedule(tmp_path, arch: str, method: str, structure: str) -> None:
    cfg = _cfg(method, structure)
    cb = PruningCallback(cfg, verbose=False)
    trainer = make_trainer(arch, tmp_path, [cb])
    trainer.train()
    assert_masked_zero(cb)
    _check_structure(cb, cfg)
    final = float(cfg.sparsity)
    assert cb.masks.mask_sparsity() == pytest.approx(final, abs=2e-3)
    assert cb.masks.sparsity() >= cb.masks.mask_sparsity()  # zeros in the weights at least where masked
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert sorted(logged) == list(range(1, 9))
    for step, h in logged.items():
        if method == "lottery":
            expected = 0.0 if step < 3 else (1 - (1 - final) ** 0.5 if step < 6 else final)
        else:
            expected = target_sparsity(step, final, start=0, end=6, schedule="cubic", update_every=2)
        assert h[LOG_TARGET] == pytest.approx(expected, abs=1e-6), step
        assert h[LOG_ACHIEVED] == pytest.approx(expected, abs=3e-3), step
    assert trainer.model.config.pruning_config["method"] == method
    if method == "movement":  # the mask is the top-k of the learned scores, not of |W|
        scores = cb.scores.scores
        for name, entry in cb.masks.params.items():
            for layer, m in entry.views(entry.mask):
                ref = layer_mask(layer_view(layer, scores[name]), final, final, cfg.nm, cfg.magnitude_group)
                assert torch.equal(m, ref), layer.name
        assert any(bool((s != 0).any()) for s in scores.values())


def test_soft_movement_threshold_and_cap(tmp_path) -> None:
    cfg = _cfg("soft_movement", movement_l1=1e-3, movement_threshold=0.5)
    cb = PruningCallback(cfg, verbose=False)
    trainer = make_trainer("llama", tmp_path, [cb])
    trainer.train()
    assert_masked_zero(cb)
    assert cb.threshold == pytest.approx(0.5)
    assert 0 < cb.masks.mask_sparsity() <= 0.6 + 1e-3  # the scheduled sparsity caps soft movement
    for name, entry in cb.masks.params.items():  # everything above the threshold is kept
        assert bool(entry.mask[torch.sigmoid(cb.scores.scores[name]) > 0.5].all())
    assert trainer.state.log_history[-2]["prune/threshold"] == pytest.approx(0.5)


def test_one_shot_start_mask_stays_constant(tmp_path) -> None:
    cfg = PruningConfig(method="wanda", structure="2:4", sparsity=None, num_calibration_samples=4, seqlen=16)
    cb = PruningCallback(cfg, calibration=calib_ids(4, 16), verbose=False)
    trainer = make_trainer("llama", tmp_path, [cb])
    weights0 = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            weights0.update({n: (w.clone(), m.clone()) for n, (w, m) in masked_params(cb).items()})

    trainer.add_callback(Probe())
    trainer.train()
    assert_masked_zero(cb)
    _check_structure(cb, cfg)
    for name, (w, m) in masked_params(cb).items():
        assert torch.equal(m, weights0[name][1]), f"{name}: the constant mask changed"
        assert torch.equal(m, weights0[name][0] != 0)
        assert not torch.equal(w, weights0[name][0]), f"{name}: not trained"


def test_one_shot_start_takes_named_sources_and_dual_importance(tmp_path) -> None:
    """PruningCallback's initial one-shot goes through hf_prune.prune: named sources and domain_weight work."""
    cfg = PruningConfig(method="wanda", sparsity=0.5, num_calibration_samples=8, seqlen=16, batch_size=4,
                        domain_weight=1.0)
    calibration = {"general": calib_ids(4, 16), "domain": calib_ids(4, 16, seed=1) % 40}
    cb = PruningCallback(cfg, calibration=calibration, verbose=False)
    trainer = make_trainer("llama", tmp_path, [cb])
    trainer.train()
    assert_masked_zero(cb)
    assert cb.masks.mask_sparsity() == pytest.approx(0.5, abs=1e-3)


class IntegrityProbe(TrainerCallback):
    """Runs after PruningCallback: masked weights zero after every optimizer step, AdamW moments zero."""

    def __init__(self, cb: PruningCallback, check_moments: bool = True) -> None:
        self.cb, self.check_moments, self.checks, self.leaks = cb, check_moments, 0, 0

    def _check(self, optimizer) -> None:
        opt = getattr(optimizer, "optimizer", optimizer)
        for name, entry in self.cb.masks.params.items():
            masked = ~entry.mask
            self.leaks += int(torch.count_nonzero(entry.param.detach()[masked]))
            if self.check_moments:
                st = opt.state.get(entry.param, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st:
                        assert torch.count_nonzero(st[key][masked]) == 0, f"{name}.{key} keeps masked momentum"
            self.checks += 1

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self._check(optimizer)

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        self._check(optimizer)


class GradProbe(TrainerCallback):
    """Runs before PruningCallback's hooks: the gradients that clipping and the optimizer saw."""

    def __init__(self, holder: dict) -> None:
        self.holder, self.masked_grad_nonzero, self.checked = holder, 0, 0

    def on_pre_optimizer_step(self, args, state, control, **kw):
        for entry in self.holder["cb"].masks.params.values():
            if entry.param.grad is not None:
                self.masked_grad_nonzero += int(torch.count_nonzero(entry.param.grad[~entry.mask]))
                self.checked += 1


@pytest.mark.parametrize("method, masked_before_step", [("gmp", True), ("movement", False)])
def test_gradients_masked_before_clipping(tmp_path, method: str, masked_before_step: bool) -> None:
    cb = PruningCallback(_cfg(method, sparsity=0.7, end_step=4, update_every=1), verbose=False)
    probe = GradProbe({"cb": cb})
    trainer = make_trainer("llama", tmp_path, [probe, cb], gradient_accumulation_steps=2, max_grad_norm=0.5)
    trainer.train()
    assert probe.checked > 0
    # gmp: masked by autograd hooks, so the clipping norm counts live weights only; movement needs dense gradients
    assert (probe.masked_grad_nonzero == 0) == masked_before_step
    assert_masked_zero(cb)


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("llama", dict(gradient_accumulation_steps=2, max_grad_norm=0.5, weight_decay=0.1)),
        ("llama", dict(bf16=True)),
        ("llama", {activation_checkpointing_arg(): True, "gradient_accumulation_steps": 2}),
        ("gpt2", dict(max_grad_norm=0.1, weight_decay=0.1)),
        ("qwen3_moe", dict(gradient_accumulation_steps=2)),
    ],
)
def test_masked_weights_exactly_zero_after_every_step(tmp_path, arch: str, overrides: dict) -> None:
    cb = PruningCallback(_cfg("gmp", sparsity=0.7, end_step=6, update_every=1), verbose=False)
    trainer = make_trainer(arch, tmp_path, [cb], **overrides)
    probe = IntegrityProbe(cb)
    trainer.add_callback(probe)
    trainer.train()
    if overrides.get("bf16"):
        assert trainer.accelerator.mixed_precision == "bf16"
    if overrides.get(activation_checkpointing_arg()):
        assert is_activation_checkpointing(trainer.model)
    assert probe.checks >= 16 * len(cb.masks.params) and probe.leaks == 0
    assert cb.masks.mask_sparsity() == pytest.approx(0.7, abs=2e-3)


def test_each_defence_matters(tmp_path, monkeypatch) -> None:
    """Without the post-step W *= mask, gradient masking + moment zeroing still keep zeros; without the moment
    zeroing as well, AdamW momentum resurrects pruned weights (so the probe can see leaks)."""
    monkeypatch.setattr(PruningCallback, "on_optimizer_step", lambda self, *a, **k: None)
    cb = PruningCallback(_cfg("gmp", sparsity=0.7, end_step=6, update_every=1), verbose=False)
    trainer = make_trainer("llama", tmp_path / "a", [cb])
    probe = IntegrityProbe(cb)
    trainer.add_callback(probe)
    trainer.train()
    assert probe.leaks == 0

    from hf_prune.training.state import MaskState

    monkeypatch.setattr(MaskState, "mask_optimizer_state_", lambda self, *a, **k: None)
    cb = PruningCallback(_cfg("gmp", sparsity=0.7, end_step=6, update_every=1), verbose=False)
    trainer = make_trainer("llama", tmp_path / "b", [cb])
    probe = IntegrityProbe(cb, check_moments=False)
    trainer.add_callback(probe)
    trainer.train()
    assert probe.leaks > 0


def test_lottery_rewinds_survivors(tmp_path) -> None:
    cfg = _cfg("lottery", sparsity=0.75, start_step=2, end_step=8, lottery_rounds=2, lottery_rewind_step=2)
    cb = PruningCallback(cfg, verbose=False)
    trainer = make_trainer("llama", tmp_path, [cb], max_steps=10)
    seen = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (5, 8):
                seen[state.global_step] = {n: (w.clone(), m.clone()) for n, (w, m) in masked_params(cb).items()}

    trainer.add_callback(Probe())
    trainer.train()
    assert cb.rewind.step == 2 and cb.lottery_round == 2
    for step, target in ((5, 0.5), (8, 0.75)):
        kept = sum(int(m.sum()) for _, m in seen[step].values())
        total = sum(m.numel() for _, m in seen[step].values())
        assert 1 - kept / total == pytest.approx(target, abs=2e-3)
        for name, (w, m) in seen[step].items():  # right after a round: survivors hold their step-2 values
            assert torch.equal(w, cb.rewind.tensors[name] * m), name
    assert not torch.equal(masked_params(cb)[next(iter(seen[8]))][0], seen[8][next(iter(seen[8]))][0])


def test_logs_summary_and_save_reload(tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    cb = PruningCallback(_cfg("gmp", structure="2:4"))
    trainer = make_trainer("gpt2", tmp_path / "run", [cb])
    trainer.train()
    out = capsys.readouterr().out
    assert "hf_prune gmp 2:4" in out and "transformer.h.1.mlp.c_proj.weight" in out
    assert "'prune/sparsity': '0.5'" in out  # the Trainer's own log line carries the sparsity
    trainer.model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.config.pruning_config["method"] == "gmp"
    assert reloaded.config.pruning_config["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    state = reloaded.state_dict()
    for name, (w, m) in masked_params(cb).items():
        assert torch.equal(state[name] == 0, w == 0) and torch.count_nonzero(state[name][~m]) == 0


def test_sft_trainer(tmp_path) -> None:
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tiny_models import SAMPLE_TEXT, build, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    texts = [SAMPLE_TEXT[i * 97:(i * 97) + 160] for i in range(16)]
    cb = PruningCallback(_cfg("gmp", sparsity=0.5, end_step=4, update_every=2), verbose=False)
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=6, per_device_train_batch_size=4,
                         learning_rate=5e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, max_length=32,
                         dataset_text_field="text", packing=False)
    trainer = trl.SFTTrainer(model=build("llama").train(), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tok, callbacks=[cb])
    trainer.train()
    assert_masked_zero(cb)
    assert cb.masks.mask_sparsity() == pytest.approx(0.5, abs=2e-3)
    assert trainer.state.log_history[-2][LOG_ACHIEVED] == pytest.approx(0.5, abs=2e-3)


# ---------------------------------------------------------------------------------------------- bad input


def test_no_prunable_modules(tmp_path) -> None:
    cb = PruningCallback(_cfg("gmp", targets=["does_not_exist"]), verbose=False)
    with pytest.raises(UnsupportedModelError, match="no prunable modules"):
        make_trainer("llama", tmp_path, [cb]).train()

    class NoBlocks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(320, 8)

        def forward(self, input_ids=None, labels=None, **kw):
            return {"loss": self.emb(input_ids).pow(2).mean()}

    from transformers import Trainer

    cb = PruningCallback(_cfg("gmp"), verbose=False)
    trainer = Trainer(model=NoBlocks(), args=training_args(tmp_path), train_dataset=token_dataset(), callbacks=[cb])
    with pytest.raises(UnsupportedModelError, match="no prunable modules"):
        trainer.train()


def test_schedule_ending_before_start_against_max_steps(tmp_path) -> None:
    cb = PruningCallback(PruningConfig(method="gmp", sparsity=0.5, start_step=20), verbose=False)
    with pytest.raises(ConfigError, match=r"end before it starts.*max_steps=8"):
        make_trainer("llama", tmp_path, [cb]).train()


def test_schedule_longer_than_training_warns(tmp_path, caplog) -> None:
    cb = PruningCallback(_cfg("gmp", end_step=100, update_every=4), verbose=False)
    with caplog.at_level("WARNING", logger="hf_prune"):
        make_trainer("llama", tmp_path, [cb]).train()
    assert "end_step=100 is after the Trainer's max_steps=8" in caplog.text
    assert cb.masks.mask_sparsity() < 0.6


def test_callback_reused_for_a_second_run(tmp_path) -> None:
    cb = PruningCallback(_cfg("lottery"), verbose=False)
    first = make_trainer("llama", tmp_path / "a", [cb])
    first.train()
    first_params = [e.param for e in cb.masks.params.values()]
    assert not any(p._backward_hooks for p in first_params)  # gradient hooks are removed at the end of training
    snapshot_shapes = {n: t.shape for n, t in cb.rewind.tensors.items()}
    second = make_trainer("gpt2", tmp_path / "b", [cb])
    second.train()
    assert_masked_zero(cb)
    assert all(n.startswith("transformer.h.") for n in cb.masks.params)
    assert set(cb.rewind.tensors) != set(snapshot_shapes)  # fresh snapshot of the new model
    assert cb.lottery_round == 2 and cb.masks.mask_sparsity() == pytest.approx(0.6, abs=2e-3)


def test_bad_callback_arguments() -> None:
    with pytest.raises(ConfigError, match="sparsity"):
        PruningCallback(method="gmp", sparsity=1.2)
    with pytest.raises(ConfigError, match="on_missing_state"):
        PruningCallback(method="gmp", on_missing_state="ignore")


@pytest.mark.parametrize("field", ["fsdp", "deepspeed"])
def test_fsdp_and_deepspeed_refused(field: str) -> None:
    args = types.SimpleNamespace(fsdp=None, deepspeed=None)
    setattr(args, field, "full_shard" if field == "fsdp" else "ds.json")
    with pytest.raises(UnsupportedTrainingSetupError, match=field.replace("fsdp", "FSDP").replace("deepspeed", "DeepSpeed")):
        _check_supported(args, torch.nn.Linear(2, 2))


@pytest.mark.parametrize("method", ["gmp", "movement"])
def test_pruned_model_still_learns(tmp_path, method: str) -> None:
    """Masks must not break learning: on a predictable token pattern the loss falls while sparsity rises to 50%."""
    from datasets import Dataset

    ids = [[(start + 3 * i) % 60 for i in range(16)] for start in range(32)]
    cb = PruningCallback(_cfg(method, sparsity=0.5, end_step=12, update_every=4, lottery_rounds=2), verbose=False)
    trainer = make_trainer("llama", tmp_path, [cb], dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
                           max_steps=20, learning_rate=3e-3, per_device_train_batch_size=4)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert cb.masks.mask_sparsity() == pytest.approx(0.5, abs=2e-3)
    assert_masked_zero(cb)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3, losses


def test_training_report_is_saved_like_every_other_report(tmp_path) -> None:
    import json

    from hf_prune.report import REPORT_FILE, PruningReport, load_report

    cb = PruningCallback(_cfg("gmp", sparsity=0.5, end_step=4, update_every=2), verbose=False)
    trainer = make_trainer("llama", tmp_path / "run", [cb])
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "saved")
    report = load_report(json.loads((tmp_path / "saved" / REPORT_FILE).read_text()))
    assert isinstance(report, PruningReport) and report.kind == "training" and report.method == "gmp"
    assert report.achieved_sparsity == pytest.approx(cb.masks.sparsity(), abs=1e-6)
    assert report.history and report.history[-1][1] == pytest.approx(0.5)
    assert {r.name for r in report.layers} == set(cb.masks.params)
    assert "hf_prune gmp unstructured" in cb.summary()
