"""reconstruct=True: the least-squares refit of pruned output projections (hf_prune.structure.reconstruct) against
naive references, its path through the plan and surgery (Linear and GPT-2 Conv1D), and end to end on tiny
models: closer to the dense model than FLAP's bias compensation, and identical after save/reload."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, build, calib_ids
from transformers import AutoModelForCausalLM

import hf_prune
from hf_prune import ConfigError, NumericalError, PruningConfig
from hf_prune.structure.arch import block_specs
from hf_prune.structure.plan import LayerPlan, StructuredPlan
from hf_prune.structure.reconstruct import PairedMoments, SecondMoments, refit_projection
from hf_prune.structure.scores import bias_compensation
from hf_prune.structure.surgery import apply_plan


def _data(tokens: int = 400, features: int = 10, out: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5 + torch.eye(features)
    x = (torch.randn(tokens, features, generator=g) @ mix + torch.linspace(-1, 2, features)).double()
    return x, torch.randn(out, features, generator=g, dtype=torch.float64)


def _moments(x: torch.Tensor) -> SecondMoments:
    m = SecondMoments(x.shape[1])
    for chunk in x.split([1, 150, 249]):
        m.add(chunk)
    return m


def test_second_moments_match_batch() -> None:
    x, _ = _data()
    m = _moments(x)
    assert m.n == 400
    torch.testing.assert_close(m.hessian, x.T @ x / 400, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.mean, x.mean(0), rtol=1e-6, atol=1e-6)


def test_refit_matches_lstsq_with_intercept() -> None:
    x, w = _data()
    keep = [0, 2, 3, 5, 6, 9]
    m = _moments(x)
    new_w, b, damp = refit_projection(w.float(), m.hessian, m.mean, keep, dampening=1e-10)
    assert damp == 1e-10 and new_w.shape == (5, 6) and b.shape == (5,)
    design = torch.cat([x[:, keep], torch.ones(400, 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(design, x @ w.T).solution  # [k + 1, out]
    torch.testing.assert_close(new_w.double(), ref[:-1].T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.double(), ref[-1], rtol=1e-4, atol=1e-4)


def test_paired_refit_fits_pruned_inputs_to_dense_outputs() -> None:
    x, w = _data(seed=2)
    noisy = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = [0, 1, 4, 5, 8]
    m = PairedMoments(x.shape[1])
    for a, b in zip(noisy.split([7, 393]), x.split([7, 393])):
        m.add_pair(a, b)
    new_w, b, _ = refit_projection(w, m.hessian, m.mean, keep, dampening=1e-10, cross=m.cross,
                                   dense_mean=m.dense_mean)
    design = torch.cat([noisy[:, keep], torch.ones(400, 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(design, x @ w.T).solution  # inputs of the pruned model, outputs of the dense one
    torch.testing.assert_close(new_w.double(), ref[:-1].T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.double(), ref[-1], rtol=1e-4, atol=1e-4)
    # equal streams: exactly the plain refit
    same = PairedMoments(x.shape[1])
    same.add_pair(x, x)
    plain = refit_projection(w, same.hessian, same.mean, keep)
    paired = refit_projection(w, same.hessian, same.mean, keep, cross=same.cross, dense_mean=same.dense_mean)
    torch.testing.assert_close(paired[0], plain[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="go together"):
        refit_projection(w, same.hessian, same.mean, keep, cross=same.cross)


def test_refit_beats_bias_compensation_and_tends_to_it() -> None:
    x, w = _data(seed=1)
    keep, pruned = [1, 2, 4, 7, 8], [0, 3, 5, 6, 9]
    m = _moments(x)
    comp = bias_compensation(w, m.mean, pruned).double()
    err_comp = (x[:, keep] @ w[:, keep].T + comp - x @ w.T).square().mean()
    new_w, b, _ = refit_projection(w, m.hessian, m.mean, keep, dampening=0.01)
    err_refit = (x[:, keep] @ new_w.double().T + b.double() - x @ w.T).square().mean()
    assert err_refit < 0.8 * err_comp
    # An enormous ridge towards the kept weights leaves them alone: the intercept is then FLAP's compensation.
    stiff_w, stiff_b, _ = refit_projection(w, m.hessian, m.mean, keep, dampening=1e9)
    torch.testing.assert_close(stiff_w.double(), w[:, keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stiff_b.double(), comp, rtol=1e-4, atol=1e-4)


def test_refit_nothing_kept_is_the_mean_output() -> None:
    x, w = _data()
    m = _moments(x)
    new_w, b, _ = refit_projection(w, m.hessian, m.mean, [])
    assert new_w.shape == (5, 0)
    torch.testing.assert_close(b.double(), (x @ w.T).mean(0), rtol=1e-5, atol=1e-5)


def test_refit_errors_name_the_layer() -> None:
    x, w = _data()
    m = _moments(x)
    bad = m.hessian.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="model.layers.3.mlp.down_proj"):
        refit_projection(w, bad, m.mean, [0, 1], name="model.layers.3.mlp.down_proj")
    with pytest.raises(ValueError, match="input channels"):
        refit_projection(w, m.hessian[:5, :5], m.mean, [0, 1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_surgery_writes_refit_weights(arch: str) -> None:
    model = build(arch).eval()
    spec = block_specs(model)[0]
    a, hidden = spec.attention, model.config.get_text_config().hidden_size
    heads = [0, 2]  # with GQA (2 kv heads of 2 query heads each): one query head per kv group
    kv = None if a.num_kv_heads == a.num_heads else [0, 1]
    mlp_keep = list(range(0, spec.mlp.intermediate, 3))
    w_mlp = torch.randn(hidden, len(mlp_keep))
    w_attn = torch.randn(hidden, len(heads) * a.head_dim)
    bias = torch.randn(hidden)
    plan = StructuredPlan(layers={0: LayerPlan(mlp_keep=mlp_keep, heads_keep=heads, kv_heads_keep=kv,
                                               mlp_out_weight=w_mlp, attn_out_weight=w_attn, mlp_bias=bias)})
    old_bias = model.get_submodule(spec.mlp.output).bias
    old_bias = None if old_bias is None else old_bias.detach().clone()
    apply_plan(model, plan)
    down, o = model.get_submodule(spec.mlp.output), model.get_submodule(a.o)
    read = (lambda m: m.weight.t()) if arch == "gpt2" else (lambda m: m.weight)
    assert torch.equal(read(down), w_mlp) and torch.equal(read(o), w_attn)
    torch.testing.assert_close(down.bias.detach(), bias + (0 if old_bias is None else old_bias))
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, VOCAB)


def test_refit_weight_of_wrong_shape_changes_nothing() -> None:
    model = build("llama").eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = StructuredPlan(layers={0: LayerPlan(mlp_keep=[0, 1, 2], mlp_out_weight=torch.zeros(64, 4))})
    with pytest.raises(ConfigError, match="mlp_out_weight must have shape"):
        apply_plan(model, plan)
    plan = StructuredPlan(layers={1: LayerPlan(remove_attention=True, attn_out_weight=torch.zeros(64, 16))})
    with pytest.raises(ConfigError, match="attn_out_weight"):
        apply_plan(model, plan)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _output_error(arch: str, method: str, n: int = 16, **kw) -> float:
    torch.manual_seed(0)
    model = build(arch).eval()
    calib = calib_ids(n, 64)
    with torch.no_grad():
        dense = model(calib).logits
    cfg = PruningConfig(method=method, sparsity=0.3, num_calibration_samples=n, seqlen=64, **kw)
    model.prune(cfg, calibration=calib, verbose=False, show_progress=False)
    with torch.no_grad():
        return float((model(calib).logits - dense).square().mean())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reconstruct_is_closer_to_dense_than_bias_compensation(arch: str) -> None:
    compensated = _output_error(arch, "flap")
    refit = _output_error(arch, "flap", reconstruct=True)
    assert refit < compensated


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_last_mlp_refit_is_least_squares_on_the_pruned_models_inputs(arch: str) -> None:
    """Sequential refit: the last block's MLP output projection, fed what the *pruned* model feeds it (all
    earlier blocks pruned and refit), is the least-squares fit of the *dense* projection's output."""
    torch.manual_seed(0)
    model = build(arch).eval()
    calib = calib_ids(16, 64)
    path = block_specs(model)[-1].mlp.output

    def io(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        handle = m.get_submodule(path).register_forward_hook(lambda mod, a, o: seen.append((a[0], o)))
        with torch.no_grad():
            m(calib)
        handle.remove()
        return seen[0][0].reshape(-1, seen[0][0].shape[-1]).double(), seen[0][1].reshape(-1, seen[0][1].shape[-1]).double()

    dense_in, dense_out = io(model)
    cfg = PruningConfig(method="flap", sparsity=0.3, num_calibration_samples=16, seqlen=64, reconstruct=True,
                        dampening=1e-9, batch_size=16, allocation="uniform")
    model.prune(cfg, calibration=calib, verbose=False, show_progress=False)
    pruned_in, pruned_out = io(model)
    assert pruned_in.shape[1] < dense_in.shape[1]  # the channels really went
    design = torch.cat([pruned_in, torch.ones(pruned_in.shape[0], 1, dtype=torch.float64)], 1)
    best = design @ torch.linalg.lstsq(design, dense_out).solution
    torch.testing.assert_close(pruned_out, best, rtol=2e-3, atol=2e-3)


def test_reconstruct_taylor_runs_and_helps() -> None:
    assert _output_error("llama", "taylor", 8, reconstruct=True) < _output_error("llama", "taylor", 8)


def test_reconstruct_save_reload(tmp_path) -> None:
    model = build("llama").eval()
    report = model.prune(PruningConfig(method="flap", sparsity=0.3, num_calibration_samples=8, seqlen=32,
                                       reconstruct=True), calibration=calib_ids(8, 32), verbose=False,
                         show_progress=False)
    assert report.config["plan_info"]["reconstruct"]["max_dampening"] == 0.01
    assert report.config["reconstruct"] is True
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
    assert PruningConfig.from_model(reloaded).reconstruct is True
    assert hf_prune.PruningConfig(method="flap", sparsity=0.2, reconstruct=True).reconstruct
