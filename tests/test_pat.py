"""Pruning-aware tuning (``method="pat"``): the HSM math against naive formulas, exact folding and hidden-dimension
removal over several architectures (tied and untied embeddings), stock reload in a subprocess without hf_prune,
the real Trainer / SFTTrainer / peft paths, resume, and bad input."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import transformers as tf
from test_training_common import token_dataset, training_args
from tiny_models import SAMPLE_TEXT, VOCAB, build, tiny_tokenizer

import hf_prune
from hf_prune.errors import ConfigError, UnsupportedModelError
from hf_prune.training import hsm as H
from hf_prune.training import pat as P
from hf_prune.training.checkpoint import MissingPruningStateError

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3")


def _model(arch: str, tied: bool = True) -> torch.nn.Module:
    if arch == "gemma":  # Gemma: (1 + w) norms and sqrt(hidden) embedding scale
        cfg = tf.GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                             tie_word_embeddings=tied)
        return tf.GemmaForCausalLM(cfg)
    model = build(arch)
    if model.config.tie_word_embeddings != tied:
        cfg = model.config
        cfg.tie_word_embeddings = tied
        model = type(model)(cfg)
    return model


def _cfg(**kw) -> hf_prune.PruningConfig:
    return hf_prune.PruningConfig(**{"method": "pat", "sparsity": 0.25, **kw})


def _randomise(pat: P.PatModules, seed: int = 0) -> None:
    """Trained-looking HSMs: scales away from 1, non-zero B, and a hard mask."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in pat.hsms.values():
            m.scale.copy_(0.5 + torch.rand(m.hidden, generator=g))
            if m.rank:
                m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))
        pat.logits.copy_(torch.randn(pat.hidden, generator=g))
    pat.freeze()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------- HSM math
def test_hsm_forward_and_transform_match_the_formula() -> None:
    torch.manual_seed(0)
    hsm = H.HybridSparsificationModule(8, rank=3)
    torch.nn.init.normal_(hsm.lora_B.weight)
    torch.nn.init.normal_(hsm.scale)
    x, mask = torch.randn(5, 8), (torch.rand(8) > 0.4).float()
    a, b = hsm.lora_A.weight, hsm.lora_B.weight
    naive = (hsm.scale * mask) * (x + (x @ a.t()) @ b.t())
    assert torch.allclose(hsm(x, mask), naive, atol=1e-5)
    assert torch.allclose(x @ hsm.transform(mask).t(), naive, atol=1e-5)
    diag = H.HybridSparsificationModule(8, rank=0)
    assert torch.equal(diag(x, mask), x * mask)


def test_kept_dims_rounding_and_schedules() -> None:
    assert H.kept_dims(576, 0.25, 8) == 432
    assert H.kept_dims(576, 0.25, 64) == 448  # 432 / 64 = 6.75 -> 7 x 64
    assert H.kept_dims(64, 0.95, 8) == 0
    assert H.temperature(1, 100) == 1.0 and H.temperature(100, 100) == H.MAX_TEMPERATURE
    temps = [H.temperature(s, 100) for s in range(1, 100)]
    assert temps == sorted(temps) and temps[-1] > 50
    assert H.mask_bias(0, 100) == 0.5 and H.mask_bias(25, 100) == 0.25 and H.mask_bias(60, 100) == 0.0


def test_mask_loss_matches_naive_and_straight_through_gradient() -> None:
    m = torch.tensor([0.7, 0.1, -0.2, 0.3, -0.9], requires_grad=True)
    loss = H.mask_loss(m, target=2)
    count = 3
    naive = 10 * abs(count - 2) / 2 + ((torch.tensor([0.7, 0.1, 0.3]) - 0.5) ** 2).mean() + (
        (torch.tensor([-0.2, -0.9]) + 0.5) ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(naive), rel=1e-6)
    loss.backward()
    # straight-through count: d/dm_j of 10 |sum(bin) - 2| / 2 = +5 for every j (too many kept) + polarisation
    polar = torch.tensor([2 * (0.7 - 0.5) / 3, 2 * (0.1 - 0.5) / 3, 2 * (-0.2 + 0.5) / 2, 2 * (0.3 - 0.5) / 3,
                          2 * (-0.9 + 0.5) / 2])
    assert torch.allclose(m.grad, 5 + polar, atol=1e-6)


def test_top_k_spread_is_local_to_the_threshold() -> None:
    m = torch.cat([torch.linspace(-1, 1, 100), torch.tensor([1000.0, -1000.0])])  # two far-out logits
    k = 51
    theta, spread = H.top_k_threshold(m, k), H.top_k_spread(m, k)
    z = (m - theta) / spread
    assert int((z > 0).sum()) == k
    assert spread < 0.25 < float(m.std())  # the tails do not widen it
    assert 15 <= int((z.abs() < 1).sum()) <= 25  # about 10% of the dimensions on each side within one unit


def test_distill_loss_matches_naive_kl() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), 3 * torch.randn(2, 5, 7, generator=g)
    valid = torch.rand(2, 5, generator=g) > 0.3
    naive = []
    for b in range(2):
        for i in range(5):
            if valid[b, i]:
                p, q = torch.softmax(t[b, i], -1), torch.softmax(s[b, i], -1)
                naive.append(sum(float(p[k]) * math.log(float(p[k]) / float(q[k])) for k in range(7)))
    assert abs(float(H.distill_loss(s, t, valid)) - sum(naive) / len(naive)) < 1e-5
    assert float(H.distill_loss(t, t)) < 1e-6 and float(H.distill_loss(s, t, torch.zeros(2, 5, dtype=torch.bool))) == 0
    s.requires_grad_(True)
    H.distill_loss(s, t).backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="differ"):
        H.distill_loss(s, t[:, :4])


def test_fill_map_is_least_squares_and_folds_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(200, 10, generator=g, dtype=torch.float64)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    m = H.fill_map(u.t() @ u, keep, ridge=0.0)
    ref = torch.linalg.lstsq(u[:, keep], u[:, ~keep]).solution
    assert m.shape == (7, 3) and torch.allclose(m, ref, atol=1e-8)
    # a ridge shrinks the map
    assert float(H.fill_map(u.t() @ u, keep, ridge=1.0).norm()) < float(m.norm())
    # a reader of the filled input == the folded reader of the input with the dropped dimensions at 0
    keep_idx, drop_idx = torch.nonzero(keep).flatten(), torch.nonzero(~keep).flatten()
    x = torch.randn(4, 6, 10, generator=g) * keep.float()
    w = torch.randn(5, 10, generator=g)
    mf = m.float()
    filled = H.fill_inputs(x, keep_idx, drop_idx, mf)
    assert torch.equal(filled[..., keep_idx], x[..., keep_idx])
    assert torch.allclose(filled[..., drop_idx], x[..., keep_idx] @ mf, atol=1e-6)
    assert torch.allclose(filled @ w.t(), x @ H.fold_fill(w, keep_idx, drop_idx, mf).t(), atol=1e-4)


def test_compensation_brings_the_readers_closer_to_the_dense_model(caplog) -> None:
    """Embedding dimensions 48.. are linear mixes of 0..47 plus noise: after the freeze the first block's q_proj,
    reading its input with the dropped dimensions filled in, is much closer to the dense model's q_proj than
    with them at 0; without warm-up statistics the fill is skipped with a warning."""
    torch.manual_seed(0)
    model = _model("llama", tied=False).train()
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        emb[:, 48:] = emb[:, :48] @ torch.randn(48, 16) / 7 + 0.01 * torch.randn(emb.shape[0], 16)
    ids = torch.randint(0, VOCAB, (8, 16))
    seen: dict[str, torch.Tensor] = {}
    q = model.model.layers[0].self_attn.q_proj
    q.register_forward_hook(lambda m, a, out: seen.__setitem__("q", out.detach().clone()))
    with torch.no_grad():
        model(ids)
    dense = seen["q"]
    errors = {}
    for compensate in (False, True):
        m = copy.deepcopy(model)
        pat = P.prepare(m, _cfg(pat_compensate=compensate))
        pat.start_warmup(m)
        with torch.no_grad():
            m(ids)
        pat.end_warmup()
        with torch.no_grad():
            pat.logits.copy_(torch.arange(64, 0, -1).float())  # keep dimensions 0..47
        pat.freeze()
        pat.set_fills()
        assert (pat.fills is not None) == compensate
        m.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda mod, a, out: seen.__setitem__("q", out.detach().clone()))
        with torch.no_grad():
            m(ids)
        errors[compensate] = _rel(seen["q"], dense)
    assert errors[True] < 0.6 * errors[False]  # 0.25 vs 0.54: the rest is the RMS over fewer dimensions
    m = copy.deepcopy(model)
    pat = P.prepare(m, _cfg())
    pat.freeze()
    with caplog.at_level("WARNING", logger="hf_prune"):
        pat.set_fills()
    assert pat.fills is None and "not compensated" in caplog.text


def test_identity_loss_and_top_k() -> None:
    q, _ = torch.linalg.qr(torch.randn(16, 4))
    assert float(H.identity_loss(q.t())) < 1e-10
    a = torch.randn(4, 16)
    assert float(H.identity_loss(a)) == pytest.approx(float(((a @ a.t() - torch.eye(4)) ** 2).mean()), rel=1e-5)
    keep = H.top_k_mask(torch.tensor([0.3, -1.0, 0.3, 2.0, 0.0]), 3)
    assert keep.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]


# ------------------------------------------------------------------------------------------ folding is exact
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fold_and_cut_is_exact(arch: str, tied: bool) -> None:
    torch.manual_seed(0)
    model = _model(arch, tied).float().eval()
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else 16
    pat = P.prepare(model, _cfg())
    assert pat.target == 48 and len(pat.hsms) == 1 + 2 * model.config.num_hidden_layers
    assert pat.hsms["embed"].rank == (0 if tied else 8)
    _randomise(pat)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    before = sum(p.numel() for n, p in model.named_parameters() if "hf_prune_pat" not in n)
    info = P.fold(model)
    with torch.no_grad():
        out = model(ids).logits
    assert _rel(out, ref) <= 1e-4
    assert model.config.hidden_size == 48 and model.config.head_dim == head_dim
    assert info["tied"] is tied and (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tied
    assert P.installed(model) is None and not any("hf_prune_pat" in n for n, _ in model.named_parameters())
    after = sum(p.numel() for p in model.parameters())
    assert after < 0.8 * before
    layer = model.model.layers[0]
    assert model.get_input_embeddings().weight.shape == (VOCAB, 48) and model.model.norm.weight.shape == (48,)
    assert layer.self_attn.o_proj.weight.shape[0] == 48 and layer.mlp.down_proj.weight.shape[0] == 48
    reader = layer.self_attn.qkv_proj if arch == "phi3" else layer.self_attn.q_proj
    assert reader.weight.shape[1] == 48 and layer.input_layernorm.weight.shape == (48,)


def test_untie_when_asked_or_when_a_gate_is_zero() -> None:
    torch.manual_seed(0)
    model = _model("llama").eval()
    pat = P.prepare(model, _cfg(pat_untie=True))
    assert pat.hsms["embed"].rank == 8
    _randomise(pat)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    info = P.fold(model, untie=True)
    assert not info["tied"] and info["was_tied"] and model.config.tie_word_embeddings is False
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) <= 1e-4
    model = _model("llama").eval()
    pat = P.prepare(model, _cfg())
    _randomise(pat)
    with torch.no_grad():
        pat.hsms["embed"].scale[torch.nonzero(pat.keep).flatten()[0]] = 0.0
        ref = model(ids).logits
    info = P.fold(model)
    assert not info["tied"] and "~0" in info["untied_reason"]
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) <= 1e-4


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    out = m(torch.load(sys.argv[2])).logits
torch.save(out, sys.argv[3])
print(json.dumps({"hf_prune": "hf_prune" in sys.modules, "hidden": m.config.hidden_size,
                  "tied": m.lm_head.weight is m.model.embed_tokens.weight}))
"""


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen3"])
def test_folded_model_reloads_with_stock_transformers_in_a_subprocess(arch: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = _model(arch).eval()
    pat = P.prepare(model, _cfg())
    _randomise(pat)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    P.fold(model)
    model.save_pretrained(tmp_path / "m")
    torch.save(ids, tmp_path / "ids.pt")
    res = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "m"), str(tmp_path / "ids.pt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True, check=True, timeout=300)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {"hf_prune": False, "hidden": 48, "tied": True}
    assert _rel(torch.load(tmp_path / "out.pt"), ref) <= 1e-4


# --------------------------------------------------------------------------------------------- in training
class _Capture(tf.TrainerCallback):
    """Placed before PruningCallback: records the trained model's logits (hard mask, eval) before the fold."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids, self.logits, self.filled = ids, None, False

    def on_train_end(self, args, state, control, model=None, **kwargs):
        pat = P.installed(model)
        assert pat is not None and pat.keep is not None  # frozen before the end
        self.filled = pat.fills is not None
        model = _bare(model).eval()  # without the Trainer's autocast wrapper (bf16=True): fp32 logits
        with torch.no_grad():
            self.logits = model(self.ids).logits
        return control


def _train(model, tmp_path, config=None, max_steps: int = 10, capture: _Capture | None = None, **args):
    from transformers import Trainer

    cb = hf_prune.PruningCallback(config or _cfg(), verbose=False)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=max_steps, **args),
                      train_dataset=token_dataset(32), callbacks=[c for c in (capture, cb) if c is not None])
    trainer.train()
    return cb, trainer


def _bare(model):
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=False)


def test_trainer_learns_mask_then_folds_plain_model(tmp_path) -> None:
    model = _model("llama")
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, VOCAB, (2, 12))
    cap = _Capture(ids)
    cb, trainer = _train(model, tmp_path, _cfg(pat_compensate=False), capture=cap)
    assert all(not p.requires_grad for p in model.parameters())  # pat_train_base=False: only the HSMs trained
    assert model.config.hidden_size == 48 and model.config.tie_word_embeddings
    report = cb.report
    assert report.structure == "hidden" and report.params_after < report.params_before
    assert "hidden size 64 -> 48" in report.table() and "tied embeddings kept" in report.table()
    info = report.config["plan_info"]
    assert len(info["kept_dims"]) == 48 and info["freeze_step"] == 8
    # the folded model computes what the trained model with its hard mask computed
    with torch.no_grad():
        assert _rel(_bare(model).eval()(ids).logits, cap.logits) <= 1e-4
    # the mask and losses reached the Trainer's logs, the mask loss through outputs.loss
    logged = [h for h in trainer.state.log_history if P.LOG_KEPT in h]
    assert logged and any(P.LOG_IDENTITY in h for h in logged) and not any(P.LOG_MASK_LOSS in h for h in logged)
    assert logged[-1][P.LOG_KEPT] == 48
    # the base weights were not trained: a reader keeps exactly its original kept columns
    kept = torch.tensor(info["kept_dims"])
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, base_before["model.layers.0.mlp.up_proj.weight"][:, kept])
    model.save_pretrained(tmp_path / "out")
    re = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert re.config.hidden_size == 48 and re.config.pruning_config["method"] == "pat"


def test_paper_count_rule_trains_and_folds(tmp_path) -> None:
    model = _model("mistral")
    ids = torch.randint(0, VOCAB, (2, 12))
    cap = _Capture(ids)
    cb, trainer = _train(model, tmp_path, _cfg(pat_mask_rule="count_loss"), capture=cap, max_steps=10)
    assert cap.filled  # pat_compensate (default): the readers' fill maps are folded too
    assert model.config.hidden_size == 48 and len(cb.report.config["plan_info"]["kept_dims"]) == 48
    with torch.no_grad():
        assert _rel(_bare(model).eval()(ids).logits, cap.logits) <= 1e-4
    logged = [h for h in trainer.state.log_history if P.LOG_KEPT in h and "loss" in h]
    assert any(P.LOG_MASK_LOSS in h for h in logged if h["step"] < 8)
    assert not any(P.LOG_MASK_LOSS in h for h in logged if h["step"] > 8)  # frozen at step 8: no mask loss after


def test_train_base_option_trains_the_base(tmp_path) -> None:
    model = _model("qwen2")
    w0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    cb, _ = _train(model, tmp_path, _cfg(pat_train_base=True), max_steps=6)
    up = model.model.layers[0].mlp.up_proj.weight
    kept = torch.tensor(cb.report.config["plan_info"]["kept_dims"])
    assert up.shape == (128, 48) and up.requires_grad
    assert not torch.equal(up.detach(), w0[:, kept])  # trained (a frozen base keeps exactly these columns)


def test_peft_lora_model_folds_with_its_adapters(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = _model("llama")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids = torch.randint(0, VOCAB, (2, 12))
    cap = _Capture(ids)
    cb, _ = _train(pm, tmp_path, capture=cap, max_steps=10)
    base = pm.get_base_model()
    assert base.config.hidden_size == 48
    assert base.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (4, 48)
    assert base.model.layers[0].self_attn.o_proj.lora_B["default"].weight.shape == (48, 4)
    with torch.no_grad():
        unmerged = _bare(pm).eval()(ids).logits
    merged = pm.merge_and_unload().eval()
    with torch.no_grad():
        out = merged(ids).logits
    assert cap.filled  # the readers were compensated (pat_compensate, default), LoRA A folded with them
    assert _rel(unmerged, cap.logits) <= 1e-4 and _rel(out, cap.logits) <= 1e-4
    merged.save_pretrained(tmp_path / "merged")
    assert tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.hidden_size == 48


@pytest.mark.parametrize("use_peft", [True, False], ids=["peft", "plain"])
def test_distillation_teacher_is_the_model_pat_started_from(tmp_path, monkeypatch, use_peft: bool) -> None:
    """pat_distill: every step's teacher logits are the untouched starting model's on that step's batch, even after
    the HSMs and LoRA adapters have trained (so they really were bypassed and switched off), the student moves
    away from it, the KL reaches the Trainer's loss and logs, and the adapters stay trainable."""
    model = _model("llama")
    start = copy.deepcopy(model).eval()
    if use_peft:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    base = model.get_base_model() if use_peft else model
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    batches: list[torch.Tensor] = []
    teachers: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    kls: list[float] = []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():  # the student's forward; the teacher's runs under no_grad
            batches.append(kwargs["input_ids"].detach().clone())

    real = H.distill_loss

    def spy(student, teacher, valid=None):
        teachers.append((teacher.detach().clone(), valid))
        out = real(student, teacher, valid)
        kls.append(float(out))
        return out

    frozen = [p for n, p in model.named_parameters() if "lora_A" in n][:1]
    for p in frozen:  # a LoRA weight the user froze stays frozen after the teacher's passes
        p.requires_grad_(False)
    lora = [p for p in lora if all(p is not f for f in frozen)]
    base.register_forward_pre_hook(record, with_kwargs=True)
    monkeypatch.setattr(H, "distill_loss", spy)
    _, trainer = _train(model, tmp_path, _cfg(pat_distill=0.5), max_steps=8)
    assert len(batches) == len(teachers) == 8
    for ids, (teacher, valid) in zip(batches, teachers, strict=True):
        with torch.no_grad():
            assert _rel(teacher, start(ids).logits) <= 1e-5
        assert valid is not None and not bool(valid[:, -1].any())  # the last token predicts no label
    assert kls[0] < 1e-8 < kls[-1]  # identical at the start (warm-up mask 1, B = 0), apart by the end
    assert any(P.LOG_DISTILL in h for h in trainer.state.log_history)
    assert all(p.requires_grad for p in lora) and base.training
    assert all(not p.requires_grad for p in frozen)


def test_distillation_refuses_trainable_base_parameters(tmp_path) -> None:
    """bias='all' makes Qwen2's q/k/v biases trainable: the teacher would drift, so training is refused."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(_model("qwen2"), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                bias="all"))
    with pytest.raises(ConfigError, match="pat_distill.*bias"):
        _train(pm, tmp_path, _cfg(pat_distill=1.0), max_steps=4)


def test_compensation_under_bf16_autocast_folds_exactly(tmp_path) -> None:
    model = _model("qwen3")
    ids = torch.randint(0, VOCAB, (2, 12))
    cap = _Capture(ids)
    _train(model, tmp_path, capture=cap, max_steps=10, bf16=True)
    assert cap.filled
    with torch.no_grad():
        assert _rel(_bare(model).eval()(ids).logits, cap.logits) <= 1e-4


def test_fold_checks_everything_before_the_readers_change() -> None:
    model = _model("llama")
    pat = P.prepare(model, _cfg())
    pat.start_warmup(model)
    model.train()
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 12)))
    pat.end_warmup()
    pat.freeze()
    pat.set_fills()
    assert pat.fills is not None
    q = model.model.layers[0].self_attn.q_proj.weight
    before = q.detach().clone()
    del model.model.layers[1].input_layernorm.variance_epsilon  # the cut cannot find this norm's eps
    with pytest.raises(UnsupportedModelError, match="eps"):
        P.fold(model)
    assert torch.equal(q, before) and pat.fills is not None and P.installed(model) is pat


def test_sft_trainer(tmp_path) -> None:
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    texts = [SAMPLE_TEXT[i * 97:(i * 97) + 160] for i in range(16)]
    cb = hf_prune.PruningCallback(_cfg(), verbose=False)
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=6, per_device_train_batch_size=4,
                         learning_rate=5e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, max_length=32,
                         dataset_text_field="text", packing=False)
    model = _model("qwen3").train()
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tok, callbacks=[cb])
    trainer.train()
    assert model.config.hidden_size == 48
    assert any(P.LOG_IDENTITY in h for h in trainer.state.log_history)


def test_mask_loss_enters_the_loss_and_gradient_accumulation_divides_it(tmp_path) -> None:
    """The Trainer's loss includes the PAT mask loss (the paper's count rule): the logged loss of step 1 differs
    from a run with pat_mask_weight=0 by exactly the mask loss, with and without gradient accumulation (the model
    normalises by num_items_in_batch there, so the Trainer does not divide and hf_prune must). At step 1 every
    logit is 0: 10 |64 - 48| / 48 + polarisation 0.25."""
    expected = 10 * 16 / 48 + 0.25
    for ga in (1, 2):
        logged = {}
        for weight in (1.0, 0.0):
            torch.manual_seed(0)
            model = _model("llama")
            cfg = _cfg(pat_mask_rule="count_loss", pat_warmup=0.0, pat_mask_weight=weight)
            _, trainer = _train(model, tmp_path / f"{ga}-{weight}", cfg, max_steps=2, gradient_accumulation_steps=ga,
                                per_device_train_batch_size=4 // ga, logging_steps=1)
            logged[weight] = trainer.state.log_history[0]
        assert logged[1.0][P.LOG_MASK_LOSS] == pytest.approx(expected, rel=1e-3)
        assert logged[1.0]["loss"] - logged[0.0]["loss"] == pytest.approx(expected, rel=1e-3), ga


def test_top_k_rule_keeps_exactly_k_leading_and_eval_uses_top_k() -> None:
    model = _model("llama")
    pat = P.prepare(model, _cfg())
    with torch.no_grad():
        pat.logits.copy_(torch.randn(64))
    centred = pat.centred()
    assert int((centred > 0).sum()) == 48
    pat.eval()
    assert torch.equal(pat.mask(torch.device("cpu")), H.top_k_mask(pat.logits, 48))
    pat.train()
    soft = pat.mask(torch.device("cpu"))
    assert soft.requires_grad and int((soft > pat.bias + 0.5).sum()) == 48


@pytest.mark.parametrize("save", [5, 9], ids=["before-freeze", "after-freeze"])
def test_resume_continues_exactly(tmp_path, save: int) -> None:
    """Resume between the warm-up and the freeze (the Gram matrices travel) and after it (the fill maps do)."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 12))
    full = _model("llama")
    state = {k: v.clone() for k, v in full.state_dict().items()}
    full_cb, _ = _train(full, tmp_path / "full", max_steps=10)
    part = _model("llama")
    part.load_state_dict(state)
    _train(part, tmp_path / "part", max_steps=10, save_strategy="steps", save_steps=save)
    resumed = _model("llama")
    resumed.load_state_dict(state)
    from transformers import Trainer

    cb = hf_prune.PruningCallback(_cfg(), verbose=False)
    Trainer(model=resumed, args=training_args(tmp_path / "part", max_steps=10, save_strategy="steps", save_steps=save),
            train_dataset=token_dataset(32), callbacks=[cb]).train(resume_from_checkpoint=str(tmp_path / "part" /
                                                                                              f"checkpoint-{save}"))
    assert cb.report.config["plan_info"]["kept_dims"] == full_cb.report.config["plan_info"]["kept_dims"]
    with torch.no_grad():
        assert _rel(_bare(resumed).eval()(ids).logits, _bare(full).eval()(ids).logits) <= 1e-4
    # a checkpoint without PAT state is refused
    for f in (tmp_path / "part" / f"checkpoint-{save}").glob("hf_prune_*"):
        f.unlink()
    again = _model("llama")
    cb = hf_prune.PruningCallback(_cfg(), verbose=False)
    trainer = Trainer(model=again, args=training_args(tmp_path / "part", max_steps=10), train_dataset=token_dataset(32),
                      callbacks=[cb])
    with pytest.raises(MissingPruningStateError):
        trainer.train(resume_from_checkpoint=str(tmp_path / "part" / f"checkpoint-{save}"))


class _StopAt(tf.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_training_ended_before_freeze_warns_and_still_folds(tmp_path) -> None:
    from transformers import Trainer

    model = _model("llama")
    cb = hf_prune.PruningCallback(_cfg(), verbose=False)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=20), train_dataset=token_dataset(64),
                      callbacks=[cb, _StopAt(5)])
    with pytest.warns(UserWarning, match="before the mask was frozen"):
        trainer.train()
    assert model.config.hidden_size == 48 and cb.report.config["plan_info"]["hidden_after"] == 48


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, match", [
    ({"sparsity": 0.95}, "too few"),
    ({"sparsity": 0.02}, "removes no hidden dimension"),
    ({"sparsity": 0.25, "pat_multiple": 64}, "too few|removes no"),
])
def test_bad_targets_refused_before_anything_changes(kw, match) -> None:
    model = _model("llama")
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=match):
        P.prepare(model, _cfg(**kw))
    assert P.installed(model) is None
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]


@pytest.mark.parametrize("arch, match", [("gpt2", "LayerNorm"), ("opt", "LayerNorm"), ("qwen3_moe", "model types")])
def test_architectures_whose_hidden_dim_cannot_be_cut(arch: str, match: str) -> None:
    model = build(arch)
    with pytest.raises(UnsupportedModelError, match=match):
        P.prepare(model, _cfg())
    assert P.installed(model) is None and all(p.requires_grad for p in model.parameters())


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="structure"):
        _cfg(structure="2:4")
    with pytest.raises(ConfigError, match="pat_freeze"):
        _cfg(pat_freeze=0.0)
    with pytest.raises(ConfigError, match="pat_train_base=False"):
        _cfg(pat_distill=1.0, pat_train_base=True)
    with pytest.raises(ConfigError, match="pat_distill"):
        _cfg(pat_distill=-1.0)
    with pytest.raises(ConfigError, match="cannot run one-shot|prunes during training"):
        hf_prune.prune(_model("llama"), _cfg())


def test_training_ended_during_warmup_starts_from_the_energy(tmp_path) -> None:
    from transformers import Trainer

    model = _model("llama")
    cb = hf_prune.PruningCallback(_cfg(pat_warmup=0.5), verbose=False)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=20), train_dataset=token_dataset(64),
                      callbacks=[cb, _StopAt(2)])
    with pytest.warns(UserWarning, match="before the mask was frozen"):
        trainer.train()
    # the warm-up's energy decided, not the all-zero logits' tie-break (which keeps dimensions 0..47)
    assert cb.report.config["plan_info"]["kept_dims"] != list(range(48))


def test_user_optimizer_without_the_hsms_is_refused(tmp_path) -> None:
    from transformers import Trainer

    model = _model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=token_dataset(8),
                      optimizers=(opt, None), callbacks=[hf_prune.PruningCallback(_cfg(), verbose=False)])
    with pytest.raises(ConfigError, match="does not train the HSMs"):
        trainer.train()
    with pytest.raises(ConfigError, match="label_smoothing_factor"):
        Trainer(model=_model("llama"), args=training_args(tmp_path, max_steps=4, label_smoothing_factor=0.1),
                train_dataset=token_dataset(8), callbacks=[hf_prune.PruningCallback(_cfg(), verbose=False)]).train()


def test_callback_added_after_the_trainer_was_built(tmp_path) -> None:
    from transformers import Trainer

    trainer = Trainer(model=_model("llama"), args=training_args(tmp_path, max_steps=4), train_dataset=token_dataset(8))
    trainer.add_callback(hf_prune.PruningCallback(_cfg(), verbose=False))
    with pytest.raises(ConfigError, match="before the Trainer builds its optimizer"):
        trainer.train()
