"""LoRAPrune (``method="loraprune"``): LoRA-estimated importance, group-output masks during LoRA training, and
physical removal at the end with the adapters cut along; stock peft merges the result and the merged model reloads."""

from __future__ import annotations

import pytest
import torch
from test_training_common import token_dataset, training_args
from tiny_models import build

import hf_prune
from hf_prune.errors import ConfigError
from hf_prune.training.lora_importance import estimated_weight_grad, lora_importance

TrainerCallback = pytest.importorskip("transformers").TrainerCallback

peft = pytest.importorskip("peft")

TARGETS = {"llama": "all-linear", "qwen3": "all-linear", "gpt2": ["c_attn", "c_proj", "c_fc"],
           "phi3": "all-linear", "gpt_neox": "all-linear", "opt": "all-linear"}


def _lora(arch: str, r: int = 4, **kw):
    model = build(arch)
    kw = {"target_modules": TARGETS.get(arch, "all-linear"), **kw}
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, fan_in_fan_out=arch == "gpt2", **kw))


# the ways of ranking: the paper's averaged importance, averaged LoRA gradients, the output-gate Fisher
MODES = {"importance": {"loraprune_importance": "lora", "loraprune_average": "importance"},
         "gradient": {"loraprune_importance": "lora", "loraprune_average": "gradient"},
         "fisher": {"loraprune_importance": "fisher"}}


def _config(**kw) -> hf_prune.PruningConfig:
    base = {"method": "loraprune", "sparsity": 0.2, "start_step": 2, "end_step": 8, "update_every": 2}
    return hf_prune.PruningConfig(**{**base, **kw})


def _train(pm, tmp_path, config=None, max_steps: int = 10, **args):
    from transformers import Trainer

    cb = hf_prune.PruningCallback(config or _config(), verbose=False)
    trainer = Trainer(model=pm, args=training_args(tmp_path, max_steps=max_steps, **args),
                      train_dataset=token_dataset(32), callbacks=[cb])
    trainer.train()
    return cb, trainer


# --------------------------------------------------------------------------------------------- the estimate
def test_estimated_grad_is_the_change_of_ba_under_one_sgd_step() -> None:
    torch.manual_seed(0)
    a, b, ga, gb = torch.randn(3, 7), torch.randn(5, 3), torch.randn(3, 7), torch.randn(5, 3)
    step = (b - gb) @ (a - ga) - b @ a  # one SGD step with lr 1
    assert torch.allclose(estimated_weight_grad(a, b, ga, gb, 1.0), -step, atol=1e-5)
    assert torch.allclose(estimated_weight_grad(a, b, ga, gb, 2.0), -2 * step, atol=1e-5)
    w = torch.randn(5, 7)
    assert torch.allclose(lora_importance(w, a, b, ga, gb, 0.5),
                          (estimated_weight_grad(a, b, ga, gb, 0.5) * (w + 0.5 * b @ a)).abs(), atol=1e-5)


def test_estimate_from_real_lora_gradients_matches_first_order_change() -> None:
    """With the LoRA gradients of a real layer, G_hat predicts how W' moves under one small SGD step on A, B."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6)
    layer = peft.get_peft_model(torch.nn.Sequential(lin), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    wrapper = layer.base_model.model[0]
    torch.nn.init.normal_(wrapper.lora_B["default"].weight, std=0.1)
    x = torch.randn(16, 8)
    layer(x).square().sum().backward()
    a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    s = wrapper.scaling["default"]
    lr = 1e-3
    before = s * (b @ a).detach()
    after = s * ((b - lr * b.grad) @ (a - lr * a.grad)).detach()
    g = estimated_weight_grad(a, b, lr * a.grad, lr * b.grad, s) / lr
    assert torch.allclose(after - before, -lr * g, atol=1e-7)


def test_gradient_average_ranks_by_the_averaged_lora_gradients() -> None:
    """loraprune_average="gradient": the adapters' gradients are averaged over steps, and a unit's importance is
    the Taylor importance of G_hat formed from the averages (the absolute value after the average)."""
    from hf_prune.structure.units import attention_group_terms, mlp_group_terms
    from hf_prune.training.loraprune import LoraGroupTerms, LoraPrune
    from hf_prune.training.state import MaskState

    torch.manual_seed(0)
    pm = _lora("llama")
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    cfg = _config(loraprune_importance="lora", loraprune_average="gradient", loraprune_beta=0.25)
    algo = LoraPrune(cfg, MaskState(pm, cfg, weight_masks=False), end_step=8)
    algo.attach(pm)
    seen: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for _ in range(2):
        pm.zero_grad(set_to_none=True)
        ids = torch.randint(0, 100, (2, 12))
        pm(input_ids=ids, labels=ids).loss.backward()
        seen.append({p: (w.lora_A["default"].weight.grad.clone(), w.lora_B["default"].weight.grad.clone())
                     for p, w in algo.wrappers.items()})
        algo.before_optimizer_step()
    path = next(p for p in algo.wrappers if "down_proj" in p)
    averaged = [0.25 * g1 + 0.75 * g2 for g1, g2 in zip(seen[0][path], seen[1][path])]
    for held, want in zip(algo.grad_ema[path]["default"], averaged):
        assert torch.allclose(held, want, atol=1e-7)
    w = algo.wrappers[path]
    a, b = w.lora_A["default"].weight, w.lora_B["default"].weight
    want = lora_importance(w.get_base_layer().weight, a, b, *averaged, float(w.scaling["default"]))
    got = LoraGroupTerms(algo.wrappers, grads=algo.grad_ema).importance(path)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-9)
    # averaging the signed gradient before the absolute value is not averaging the importance
    per_step = sum(c * lora_importance(w.get_base_layer().weight, a, b, *seen[i][path], float(w.scaling["default"]))
                   for i, c in ((0, 0.25), (1, 0.75)))
    assert not torch.allclose(got, per_step, rtol=1e-2)
    # a mask update ranks by the group sums of that importance
    terms = LoraGroupTerms(algo.wrappers, grads={p: dict(v) for p, v in algo.grad_ema.items()})
    assert algo.update(4, None) and algo.removed_fraction > 0
    for spec in algo.specs:
        held = algo.importance()[spec.index]
        assert torch.allclose(held["mlp"], mlp_group_terms(terms, spec.mlp)[1], rtol=1e-5)
        assert torch.allclose(held["head"], attention_group_terms(terms, spec.attention)[0][1], rtol=1e-5)
        terms.clear()
    algo.detach()


@pytest.mark.parametrize("arch, target", [("llama", "up_proj"), ("opt", "fc1")])
def test_fisher_is_the_per_sequence_gate_gradient_squared(arch: str, target: str) -> None:
    """loraprune_importance="fisher": a unit's score is sum over sequences of (dL/dm)^2 for a gate m on the unit's
    output, checked against explicit gate parameters and one backward pass per sequence. LoRA sits on the MLP's
    first projection only, so the first block's attention output needs no gradient of its own. OPT flattens the
    MLP input to [tokens, channels]: the sequences are still told apart."""
    from hf_prune.training.loraprune import LoraPrune
    from hf_prune.training.state import MaskState

    torch.manual_seed(0)
    pm = _lora(arch, target_modules=[target])
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    cfg = _config(loraprune_importance="fisher", loraprune_beta=0.5)
    algo = LoraPrune(cfg, MaskState(pm, cfg, weight_masks=False), end_step=8)
    algo.attach(pm)
    batches = [torch.randint(0, 100, (3, 10)) for _ in range(2)]
    for ids in batches:
        pm.zero_grad(set_to_none=True)
        pm(input_ids=ids, labels=ids).loss.backward()
        algo.before_optimizer_step()
    algo.detach()

    # the reference: gates as parameters, the batch loss's gradient split by sequence
    base = pm.get_base_model()
    spec = algo.specs[0]
    a = spec.attention
    gates = {spec.mlp.output: torch.ones(spec.mlp.intermediate, requires_grad=True),
             a.o: torch.ones(a.num_kv_heads, a.num_heads // a.num_kv_heads, requires_grad=True)}
    group = torch.ones(a.num_kv_heads, 1, requires_grad=True)

    def hook_for(path):
        def hook(module, args):
            x = args[0]
            if path == a.o:
                m = (gates[path] * group).reshape(-1).repeat_interleave(a.head_dim)
            else:
                m = gates[path]
            return (x * m, *args[1:])
        return hook

    handles = [base.get_submodule(p).register_forward_pre_hook(hook_for(p)) for p in gates]
    want: dict[str, torch.Tensor] = {}
    for step, ids in enumerate(batches):
        now = {"mlp": 0, "head": 0, "group": 0}
        for row in ids:  # equal lengths: the batch loss is the mean of the sequences' losses
            for t in (*gates.values(), group):
                t.grad = None
            (pm(input_ids=row[None], labels=row[None]).loss / len(ids)).backward()
            now["mlp"] = now["mlp"] + gates[spec.mlp.output].grad.square()
            now["head"] = now["head"] + gates[a.o].grad.reshape(-1).square()
            now["group"] = now["group"] + group.grad.reshape(-1).square()
        want = now if step == 0 else {k: 0.5 * want[k] + 0.5 * v for k, v in now.items()}
    for h in handles:
        h.remove()
    got = algo.importance()[spec.index]
    for kind in ("mlp", "head", "group"):
        assert got[kind].shape == want[kind].shape
        assert torch.allclose(got[kind], want[kind], rtol=1e-4, atol=1e-12), kind
        assert bool((got[kind] > 0).all())


@pytest.mark.parametrize("reentrant", [False, True])
def test_fisher_counts_each_sequence_once_under_gradient_checkpointing(tmp_path, reentrant: bool) -> None:
    """Gradient checkpointing runs each block's forward twice; the Fisher must still be counted once per step."""
    def run(out, **args):
        torch.manual_seed(0)
        pm = _lora("llama")
        calls = []
        o_proj = pm.get_base_model().model.layers[0].self_attn.o_proj  # where the Fisher hook sits
        handle = o_proj.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
        cb, _ = _train(pm, out, _config(loraprune_importance="fisher"), max_steps=6, **args)
        handle.remove()
        if args:  # checkpointing: the projection ran again in backward (reentrant: the first time without grad)
            assert pm.get_base_model().is_gradient_checkpointing and len(calls) == 2 * 6
            assert calls.count(False) == (6 if reentrant else 0)
        return cb.algorithm.importance()

    plain = run(tmp_path / "plain")
    ckpt = run(tmp_path / "ckpt", gradient_checkpointing=True,
               gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert plain and plain.keys() == ckpt.keys()
    for i, held in plain.items():
        for kind, value in held.items():
            assert torch.allclose(ckpt[i][kind], value, rtol=1e-3, atol=1e-12), (i, kind)


def test_fisher_is_unscaled_under_an_fp16_grad_scaler() -> None:
    """With accelerate's optimizer carrying a GradScaler, the gate gradients are of the scaled loss: the scores
    are divided by the scale squared, so steps at different scales average as they should."""
    from types import SimpleNamespace

    from hf_prune.training.loraprune import LoraPrune
    from hf_prune.training.state import MaskState

    def scores(scale: float | None):
        torch.manual_seed(0)
        pm = _lora("llama")
        cfg = _config(loraprune_importance="fisher")
        algo = LoraPrune(cfg, MaskState(pm, cfg, weight_masks=False), end_step=8)
        scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
        algo.set_trainer(None, SimpleNamespace(scaler=scaler))
        algo.attach(pm)
        ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(1))
        (pm(input_ids=ids, labels=ids).loss * (scale or 1.0)).backward()
        algo.before_optimizer_step()
        algo.detach()
        return algo.importance()

    plain, scaled = scores(None), scores(1024.0)
    for i, held in plain.items():
        for kind, value in held.items():
            assert torch.allclose(scaled[i][kind], value, rtol=1e-4, atol=0), (i, kind)


def test_resume_with_the_other_ranking_is_refused(tmp_path) -> None:
    from transformers import Trainer

    def trainer(score, max_steps):
        torch.manual_seed(0)
        cb = hf_prune.PruningCallback(_config(loraprune_importance=score), verbose=False)
        args = training_args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=4)
        return Trainer(model=_lora("llama"), args=args, train_dataset=token_dataset(32), callbacks=[cb])

    trainer("lora", 4).train()
    with pytest.raises(ConfigError, match="Resume with loraprune_importance='lora'"):
        trainer("fisher", 8).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_configs_saved_before_the_option_keep_the_papers_ranking() -> None:
    saved = {**_config(loraprune_importance="lora", loraprune_average="gradient").to_dict()}
    del saved["loraprune_importance"]
    cfg = hf_prune.PruningConfig.from_dict(saved)
    assert (cfg.loraprune_importance, cfg.loraprune_average) == ("lora", "gradient")


def test_fisher_with_gradient_average_is_refused() -> None:
    with pytest.raises(ConfigError, match="set loraprune_importance='lora'"):
        _config(loraprune_average="gradient")  # the default ranking is the Fisher


# ------------------------------------------------------------------------------------------ the training run
@pytest.mark.parametrize("arch, average", [("llama", "importance"), ("qwen3", "importance"), ("gpt2", "gradient"),
                                           ("phi3", "importance"), ("gpt_neox", "gradient"), ("opt", "importance"),
                                           ("mistral", "fisher"), ("gpt2", "fisher")])
def test_loraprune_removes_units_and_merged_model_reloads(tmp_path, arch: str, average: str) -> None:
    from transformers import AutoModelForCausalLM

    pm = _lora(arch)
    before = sum(p.numel() for n, p in pm.get_base_model().named_parameters() if "lora_" not in n)
    cb, _ = _train(pm, tmp_path, _config(**MODES[average]))
    report = cb.report
    assert report.kind == "structured" and report.method == "loraprune"
    assert report.achieved_fraction == pytest.approx(0.2, abs=0.06)
    after = sum(p.numel() for n, p in pm.get_base_model().named_parameters() if "lora_" not in n)
    assert after == report.params_after < before
    ids = torch.randint(0, 100, (2, 12))
    pm.eval()
    with torch.no_grad():
        unmerged = pm(ids).logits
    merged = pm.merge_and_unload()  # stock peft on the cut adapters
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, unmerged, atol=1e-5)
    merged.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, unmerged, atol=1e-5)
    assert (tmp_path / "out" / "pruning_report.json").exists()


def test_masks_during_training_follow_the_schedule_and_never_come_back(tmp_path) -> None:
    pm = _lora("llama")
    cb, trainer = _train(pm, tmp_path, _config(sparsity=0.3, start_step=2, end_step=8, update_every=2), max_steps=10)
    history = cb.history
    targets = [t for _, t, _ in history]
    assert targets == sorted(targets) and targets[-1] == pytest.approx(0.3)
    removed = [a for _, _, a in history]
    assert removed == sorted(removed) and removed[-1] > 0.2
    logged = [h["prune/sparsity"] for h in trainer.state.log_history if "prune/sparsity" in h]
    assert logged and logged[-1] == pytest.approx(removed[-1], abs=1e-6)


class _Watch(TrainerCallback):
    """Runs before the pruning callback: records the kept units after every step and, at the end of training, the
    logits of the gated (not yet cut) model."""

    def __init__(self, cb, ids) -> None:
        self.cb, self.ids, self.plans, self.logits = cb, ids, [], None

    def on_step_end(self, args, state, control, **kwargs):
        self.plans.append({i: (p.mlp_keep, p.heads_keep, p.kv_heads_keep) for i, p in self.cb.algorithm.plans.items()})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            self.logits = model(self.ids).logits


@pytest.mark.parametrize("arch, kw, lora_kw", [
    ("llama", {"gqa_mode": "group"}, {"lora_bias": True}),
    ("llama", {"allocation": "uniform", "width_units": "heads", "sparsity": 0.1}, {}),
    ("gpt2", {}, {}),
    ("gpt_neox", {"width_units": "heads", "sparsity": 0.1}, {}),
    ("phi3", {"allocation": "uniform"}, {}),
    ("qwen3_moe", {"sparsity": 0.05}, {}),
    ("llama", {"gqa_mode": "group", "loraprune_importance": "fisher"}, {}),
    ("phi3", {"loraprune_importance": "fisher"}, {}),
])
def test_cut_model_equals_the_gated_model_and_units_never_come_back(tmp_path, arch: str, kw: dict,
                                                                     lora_kw: dict) -> None:
    """The physical cut (base and adapters) computes exactly what the gated model computed just before it; the
    keep lists only ever shrink."""
    from transformers import Trainer

    pm = _lora(arch, **lora_kw)
    if arch == "llama" and lora_kw:
        pm.add_adapter("other", peft.LoraConfig(r=2, target_modules="all-linear"))  # inactive: cut along
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # so that wrongly cut adapters would change the logits
    ids = torch.randint(0, 100, (2, 12))
    cb = hf_prune.PruningCallback(_config(**kw), verbose=False)
    watch = _Watch(cb, ids)
    Trainer(model=pm, args=training_args(tmp_path, max_steps=10), train_dataset=token_dataset(32),
            callbacks=[watch, cb]).train()
    assert cb.report.achieved_fraction > 0.03
    pm.eval()
    with torch.no_grad():
        cut = pm(ids).logits
    assert torch.allclose(cut, watch.logits, atol=1e-5), (cut - watch.logits).abs().max()
    for before, after in zip(watch.plans, watch.plans[1:]):
        for i, (mlp, heads, kv) in before.items():
            for old, new in zip((mlp, heads, kv), after[i]):
                assert old is None or set(new) <= set(old), f"block {i}: a removed unit came back"
    assert not any(getattr(fn, "_hf_prune_gate", False) for m in pm.modules() for fn in m._forward_pre_hooks.values())
    if "width_units" in kw and kw["width_units"] == "heads":
        assert all(r.mlp is None for r in cb.report.blocks)
    if arch == "qwen3_moe":
        assert all(r.mlp is None for r in cb.report.blocks)  # fused experts: not width-pruned


def test_gates_zero_the_removed_units_output(tmp_path) -> None:
    """While training, a removed MLP channel contributes nothing: its down_proj input is zero."""
    from transformers import Trainer

    pm = _lora("llama")
    cb = hf_prune.PruningCallback(_config(sparsity=0.3, end_step=20), verbose=False)
    seen = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                algo = cb.algorithm
                path, gate = next((p, g) for p, g in algo.gates.items() if "down_proj" in p)
                x = torch.randn(1, 3, gate.numel())
                module = algo.model.get_submodule(path)
                captured = []
                h = module.register_forward_pre_hook(lambda m, a: captured.append(a[0]))  # after the gate hook
                module(x)
                h.remove()
                seen["zero"] = bool((captured[0][..., gate == 0] == 0).all())
                seen["some"] = bool((gate == 0).any())
            return control

    with pytest.warns(UserWarning, match="the rest is removed now"):  # end_step=20 is after max_steps
        Trainer(model=pm, args=training_args(tmp_path, max_steps=8), train_dataset=token_dataset(32),
                callbacks=[cb, Probe()]).train()
    assert seen == {"zero": True, "some": True}


@pytest.mark.parametrize("average", list(MODES))
def test_end_step_after_max_steps_prunes_the_rest_with_a_warning(tmp_path, average: str) -> None:
    pm = _lora("llama")
    with pytest.warns(UserWarning, match="the rest is removed now"):
        cb, _ = _train(pm, tmp_path, _config(end_step=40, **MODES[average]), max_steps=6)
    assert cb.report.achieved_fraction == pytest.approx(0.2, abs=0.06)
    assert cb.algorithm.importance()  # the final allocation ranked by measured scores


@pytest.mark.parametrize("average", list(MODES))
def test_resume_restores_importance_and_masks(tmp_path, average: str) -> None:
    from transformers import Trainer

    def run(out, resume=None, max_steps=10):
        torch.manual_seed(0)
        pm = _lora("llama")
        cb = hf_prune.PruningCallback(_config(**MODES[average]), verbose=False)
        trainer = Trainer(model=pm, args=training_args(out, max_steps=max_steps, save_strategy="steps", save_steps=5),
                          train_dataset=token_dataset(32), callbacks=[cb])
        trainer.train(resume_from_checkpoint=resume)
        return cb

    full = run(tmp_path / "a")
    run(tmp_path / "b", max_steps=10)
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-5"))
    assert resumed.history[-1] == full.history[-1]
    assert resumed.report.blocks == full.report.blocks
    kept = lambda cb: {i: (p.mlp_keep, p.heads_keep) for i, p in cb.algorithm.plans.items()}  # noqa: E731
    assert kept(resumed) == kept(full)
    assert full.algorithm.importance()
    for i, ema in full.algorithm.importance().items():
        for kind, value in ema.items():
            assert torch.allclose(resumed.algorithm.importance()[i][kind], value, rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------------------------------------------ bad input
def test_loraprune_without_lora_is_refused(tmp_path) -> None:
    from transformers import Trainer

    model = build("llama").train()
    with pytest.raises(ConfigError, match="peft.get_peft_model"):
        Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=token_dataset(),
                callbacks=[hf_prune.PruningCallback(_config(), verbose=False)]).train()


def test_lora_outside_the_groups_is_refused(tmp_path) -> None:
    model = build("llama")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ConfigError, match="none on the projections of its decoder blocks"):
        _train(pm, tmp_path, max_steps=2)
    pm = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ConfigError, match="no LoRA adapter sits on a projection of the MLP channels"):
        _train(pm, tmp_path, _config(loraprune_importance="lora"), max_steps=2)
    pm = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cb, _ = _train(pm, tmp_path, _config(width_units="heads", sparsity=0.1, loraprune_importance="lora"),
                   max_steps=10)  # what LoRA covers
    assert cb.report.achieved_fraction > 0.05
    # the Fisher needs no adapter on the pruned projections: LoRA on q/v, MLP channels ranked and cut as well
    pm = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cb, _ = _train(pm, tmp_path, _config(width_units="mlp"), max_steps=10)
    assert cb.report.achieved_fraction == pytest.approx(0.2, abs=0.06)
    assert all(bool((v["mlp"] > 0).all()) for v in cb.algorithm.importance().values())


def test_dora_is_refused(tmp_path) -> None:
    pm = _lora("llama", use_dora=True)
    with pytest.raises(ConfigError, match="DoRA|variant"):
        _train(pm, tmp_path, max_steps=2)


def test_loraprune_one_shot_and_n_m_are_refused() -> None:
    model = build("llama")
    with pytest.raises(ConfigError, match="PruningCallback"):
        hf_prune.prune(model, _config(), calibration=torch.randint(0, 100, (4, 16)), verbose=False,
                       show_progress=False)
    with pytest.raises(ConfigError, match="structure"):
        hf_prune.PruningConfig(method="loraprune", structure="2:4")
    with pytest.raises(ConfigError, match="loraprune_beta"):
        _config(loraprune_beta=1.0)


def test_an_interrupted_run_leaves_no_gate_behind(tmp_path) -> None:
    from transformers import Trainer, TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise KeyboardInterrupt

    pm = _lora("llama")
    cb = hf_prune.PruningCallback(_config(sparsity=0.3), verbose=False)
    with pytest.raises(KeyboardInterrupt):
        Trainer(model=pm, args=training_args(tmp_path, max_steps=10), train_dataset=token_dataset(32),
                callbacks=[cb, Boom()]).train()
    assert cb.algorithm.gates  # masked units at the interruption
    cb2 = hf_prune.PruningCallback(_config(sparsity=0.3), verbose=False)  # a fresh run on the same model
    seen = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            hooks = [fn for m in pm.modules() for fn in m._forward_pre_hooks.values()
                     if getattr(fn, "_hf_prune_gate", False)]
            seen.append((len(hooks), len(cb2.algorithm.hooks), len(cb2.algorithm.gates)))

    Trainer(model=pm, args=training_args(tmp_path, max_steps=1), train_dataset=token_dataset(32),
            callbacks=[cb2, Count()]).train()
    hooks, own, gates = seen[0]
    assert hooks == own > 0 and gates == 0  # the interrupted run's hooks are gone; nothing is masked yet


def test_unreachable_sparsity_fails_before_training(tmp_path) -> None:
    pm = _lora("llama")
    with pytest.raises(ConfigError, match="budget|cannot"):
        _train(pm, tmp_path, _config(sparsity=0.9, width_units="heads"), max_steps=2)


def test_resume_without_state_is_refused_even_from_weights(tmp_path) -> None:
    from transformers import Trainer

    from hf_prune.training.checkpoint import MissingPruningStateError

    def trainer(cb):
        torch.manual_seed(0)
        return Trainer(model=_lora("llama"), args=training_args(tmp_path, max_steps=6, save_strategy="steps",
                                                                save_steps=3),
                       train_dataset=token_dataset(32), callbacks=[cb])

    trainer(hf_prune.PruningCallback(_config(end_step=4), verbose=False)).train()
    for f in (tmp_path / "checkpoint-3").glob("hf_prune_*"):
        f.unlink()
    cb = hf_prune.PruningCallback(_config(end_step=4), on_missing_state="from_weights", verbose=False)
    with pytest.raises(MissingPruningStateError, match="cannot be read off the weights"):
        trainer(cb).train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
