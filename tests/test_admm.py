"""ADMM pruning (Boža 2024): exactness of the weight update, sparsity patterns, reconstruction error against
SparseGPT, composition with other mask sources, and the pipeline on tiny models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, calib_ids

import hf_prune
from hf_prune import ConfigError, PruningConfig
from hf_prune.config import DEFAULT_IGNORE
from hf_prune.core.masks import is_nm_sparse
from hf_prune.core.model import find_blocks, iter_prunable
from hf_prune.oneshot.admm import admm_prune, cubic_sparsity, masked_least_squares
from hf_prune.oneshot.functional import sparsegpt_prune


def _problem(seed: int, rows: int = 12, cols: int = 32, tokens: int = 400) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, correlated inputs X and ``H = 2/n X^T X``."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen)
    mix = torch.randn(cols, cols, generator=gen)
    X = torch.randn(tokens, cols, generator=gen) @ mix * 0.5 + 0.1 * torch.randn(tokens, cols, generator=gen)
    X = X * torch.rand(cols, generator=gen) * 3  # uneven input scales, as in LLM activations
    return W, X, 2 * X.T @ X / tokens


def _lstsq_reference(W: torch.Tensor, X: torch.Tensor, keep: torch.Tensor, dampening: float) -> torch.Tensor:
    """Per row: min ||A (w0 - w)|| over w supported on the kept columns, with ``A^T A = H + damp mean(diag H) I``
    (A = [sqrt(2/n) X; sqrt(damp mean diag) I]), by a dense least-squares solve on the kept columns (float64)."""
    n, cols = X.shape
    Xd = X.double() * (2.0 / n) ** 0.5
    lam = dampening * float((Xd.square().sum(0)).mean())
    A = torch.cat([Xd, lam**0.5 * torch.eye(cols, dtype=torch.float64)])
    out = torch.zeros(W.shape, dtype=torch.float64)
    for r in range(W.shape[0]):
        kept = keep[r]
        y = A @ W[r].double()
        out[r, kept] = torch.linalg.lstsq(A[:, kept], y.unsqueeze(1)).solution.squeeze(1)
    return out


def _err(W: torch.Tensor, X: torch.Tensor, V: torch.Tensor) -> float:
    return float((X.double() @ (W.double() - V.double()).T).norm())


# ------------------------------------------------------------------------------------------------ (a) exact update
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_mask_equals_dense_least_squares(seed: int) -> None:
    W, X, H = _problem(seed)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(seed + 10)) > 0.5
    ref = _lstsq_reference(W, X, keep, 0.01)
    scale = float(ref.abs().max())
    solved, got_keep, damp = admm_prune(W, H, 0.5, mask=keep, final="solve")
    assert damp == 0.01 and torch.equal(got_keep, keep)
    torch.testing.assert_close(solved.double(), ref, rtol=0, atol=1e-5 * scale)
    # the ADMM iterations themselves converge to the same solution
    iterated, _, _ = admm_prune(W, H, 0.5, mask=keep, iterations=600, final="projected")
    torch.testing.assert_close(iterated.double(), ref, rtol=0, atol=1e-4 * scale)
    assert torch.equal(solved[~keep], torch.zeros(int((~keep).sum())))


def test_masked_least_squares_pads_rows_with_different_counts() -> None:
    W, X, H = _problem(3, rows=9, cols=16)
    Hd = H + 0.01 * torch.diagonal(H).mean() * torch.eye(16)
    keep = torch.rand(9, 16, generator=torch.Generator().manual_seed(0)) > torch.linspace(0.05, 0.95, 9).unsqueeze(1)
    keep[0] = False  # an empty row
    keep[1] = True  # a dense row: unchanged
    got = masked_least_squares(W, Hd, keep)
    ref = _lstsq_reference(W, X, keep, 0.01)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    assert (got[0] == 0).all()
    torch.testing.assert_close(got[1], W[1], rtol=1e-4, atol=1e-4)


def test_cubic_schedule() -> None:
    values = [cubic_sparsity(t, 15, 0.7) for t in range(15)]
    assert values == sorted(values) and values[-1] == 0.7 and 0 < values[0] < 0.7 * 0.25
    assert cubic_sparsity(0, 0, 0.6) == 0.6


# ------------------------------------------------------------------------------------------------ (b) patterns
@pytest.mark.parametrize("final", ["solve", "projected"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_unstructured_sparsity_is_exact(sparsity: float, final: str) -> None:
    W, _, H = _problem(0, rows=10, cols=40)
    new, keep, _ = admm_prune(W, H, sparsity, group="row", final=final)
    assert ((~keep).sum(1) == int(40 * sparsity)).all()
    assert torch.equal(new == 0, ~keep)
    new, keep, _ = admm_prune(W, H, sparsity, group="layer", final=final)
    assert int((~keep).sum()) == int(400 * sparsity)
    assert torch.equal(new == 0, ~keep)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_pattern_is_exact(nm: tuple[int, int]) -> None:
    W, _, H = _problem(1, rows=10, cols=32)
    for final in ("solve", "projected"):
        new, keep, _ = admm_prune(W, H, 1 - nm[0] / nm[1], nm=nm, final=final)
        assert (keep.view(10, -1, nm[1]).sum(-1) == nm[0]).all()
        assert is_nm_sparse(new, *nm) and torch.equal(new == 0, ~keep)


def test_row_segments_keep_their_own_sparsity() -> None:
    W, _, H = _problem(2, rows=12, cols=32)
    W[:6] *= 20  # a loud matrix stacked on a quiet one: per-segment thresholds
    new, keep, _ = admm_prune(W, H, [0.25, 0.75], row_segments=[(0, 6), (6, 12)], group="layer")
    assert int((~keep[:6]).sum()) == int(6 * 32 * 0.25)
    assert int((~keep[6:]).sum()) == int(6 * 32 * 0.75)


# ------------------------------------------------------------------------------------------------ (c) vs SparseGPT
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("setting", ["50%", "70%", "2:4"])
def test_reconstruction_error_not_above_sparsegpt(setting: str, seed: int) -> None:
    W, X, H = _problem(seed, rows=32, cols=64, tokens=512)
    sparsity, nm = {"50%": (0.5, None), "70%": (0.7, None), "2:4": (0.5, (2, 4))}[setting]
    reference, _, _ = sparsegpt_prune(W, H, sparsity, nm=nm, blocksize=16)
    sgpt = _err(W, X, reference)
    for group in ("layer", "row"):
        for final in ("projected", "solve"):
            new, _, _ = admm_prune(W, H, sparsity, nm=nm, group=group, final=final)
            assert _err(W, X, new) <= sgpt, f"{group}/{final}: ADMM {_err(W, X, new):.4g} > SparseGPT {sgpt:.4g}"
    # the optimal update for SparseGPT's own mask is at least as good as SparseGPT's update
    _, sg_keep, _ = sparsegpt_prune(W, H, sparsity, nm=nm, blocksize=16)
    new, _, _ = admm_prune(W, H, sparsity, nm=nm, mask=sg_keep, final="solve")
    assert _err(W, X, new) <= sgpt * (1 + 1e-5)


def test_dead_inputs_are_pruned_to_zero() -> None:
    W, X, _ = _problem(0, rows=6, cols=16)
    X[:, 3] = 0
    new, _, _ = admm_prune(W, 2 * X.T @ X / X.shape[0], 0.25, group="row")
    assert (new[:, 3] == 0).all() and torch.isfinite(new).all()


# ------------------------------------------------------------------------------------------------ (d) pipeline
def _cfg(**kw) -> PruningConfig:
    base = {"method": "admm", "sparsity": 0.5, "num_calibration_samples": 8, "seqlen": 32, "batch_size": 4}
    return PruningConfig(**{**base, **kw})


def _block_layers(model, block: int = 0) -> list:
    prefix, blocks = find_blocks(model)
    return list(iter_prunable(blocks[block], f"{prefix}.{block}", None, list(DEFAULT_IGNORE)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_end_to_end(arch: str, structure: str) -> None:
    model = build(arch)
    report = hf_prune.prune(model, _cfg(structure=structure, sparsity=None if structure == "2:4" else 0.6),
                            calibration=calib_ids(), show_progress=False, verbose=False)
    assert abs(report.achieved_sparsity - (0.5 if structure == "2:4" else 0.6)) < 1e-3
    for i in range(2):
        for layer in _block_layers(model, i):
            w = layer.read_weight()
            if structure == "2:4":
                assert is_nm_sparse(w, 2, 4), layer.name
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids()[:2]).logits).all()
    assert model.config.pruning_config["method"] == "admm"
    assert model.config.pruning_config["mask_from"] == "admm"


def _block0_inputs(model, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module, args) -> None:  # returns None: the input is not replaced
            seen[name] = args[0].reshape(-1, args[0].shape[-1]).detach()

        return fn

    handles = [layer.module.register_forward_pre_hook(hook(layer.name)) for layer in _block_layers(model)]
    with torch.no_grad():
        model(calib)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("source", ["wanda", "ria", "magnitude", "sparsegpt"])
def test_external_mask_is_kept_and_weights_are_updated(source: str) -> None:
    """mask_from=<method>: block 0 has exactly that method's mask (its statistics are the same), with better
    reconstruction of each layer's output than the method's own weights."""
    calib = calib_ids()
    ours, theirs, dense = build("llama"), build("llama"), build("llama")
    x = _block0_inputs(dense, calib)
    ours.prune(_cfg(mask_from=source), calibration=calib, show_progress=False, verbose=False)
    theirs.prune(_cfg(method=source), calibration=calib, show_progress=False, verbose=False)
    pairs = zip(_block_layers(ours), _block_layers(theirs), _block_layers(dense))
    for a, b, d in pairs:
        wa, wb, wd = a.read_weight(), b.read_weight(), d.read_weight()
        assert torch.equal(wa == 0, wb == 0), a.name
        assert _err(wd, x[a.name], wa) <= _err(wd, x[a.name], wb) * (1 + 1e-4), a.name


def test_qkv_are_solved_together_with_their_own_sparsities() -> None:
    model = build("llama")
    report = model.prune(_cfg(layer_sparsity={r"q_proj$": 0.25}), calibration=calib_ids(), show_progress=False,
                         verbose=False)
    for r in report.layers:
        assert r.sparsity == pytest.approx(0.25 if r.name.endswith("q_proj") else 0.5, abs=1e-3), r.name


def test_owl_runs() -> None:
    model = build("llama")
    report = model.prune(_cfg(owl=True, owl_lambda=0.05, admm_group="row"), calibration=calib_ids(),
                         show_progress=False, verbose=False)
    assert report.achieved_sparsity == pytest.approx(0.5, abs=0.02)


def test_needs_the_hessian_and_norms_only_for_norm_based_sources() -> None:
    from hf_prune.oneshot.admm import ADMMPruning

    assert ADMMPruning(_cfg()).needs_hessian and not ADMMPruning(_cfg()).needs_norms
    assert ADMMPruning(_cfg(mask_from="wanda")).needs_norms


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask_from": "obc"}, r"mask_from='obc' is unknown; allowed: \['admm', 'wanda', 'ria', 'magnitude', 'sparsegpt'\]"),
        ({"admm_group": "column"}, r"admm_group='column' is unknown; allowed: \['row', 'layer'\]"),
        ({"admm_final": "exact"}, r"admm_final='exact' is unknown; allowed: \['projected', 'solve'\]"),
        ({"admm_rho": 0}, r"admm_rho=0 must be a number > 0"),
        ({"admm_iterations": -1}, r"admm_iterations=-1 must be an integer >= 0"),
        ({"admm_iterations": 2.5}, r"admm_iterations=2.5 must be an integer >= 0"),
        ({"admm_iterations": 10, "admm_prune_iterations": 15}, "admm_prune_iterations=15 exceeds admm_iterations=10"),
        ({"admm_iterations": 0, "admm_prune_iterations": 0}, "plain masking"),
        ({"mask_from": "wanda", "admm_iterations": 0}, "plain masking"),
        ({"dampening": 0}, "dampening=0 must be a number > 0"),
        ({"owl": True, "structure": "2:4", "sparsity": None}, "owl=True needs structure='unstructured'"),
    ],
)
def test_invalid_options_name_the_option(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _cfg(**kwargs)


def test_valid_edge_options() -> None:
    assert _cfg(mask_from="wanda", admm_iterations=0, admm_final="solve").options.admm_iterations == 0
    assert _cfg(admm_iterations=5, admm_prune_iterations=5).options.admm_prune_iterations == 5
    cfg = _cfg(mask_from="sparsegpt", blocksize=64, admm_rho=0.5)
    assert PruningConfig.from_json(cfg.to_json()) == cfg


def test_pure_function_rejects_bad_arguments() -> None:
    W, _, H = _problem(0, rows=4, cols=8)
    with pytest.raises(ValueError, match=r"group='col'; allowed: \['row', 'layer'\]"):
        admm_prune(W, H, 0.5, group="col")
    with pytest.raises(ValueError, match=r"final='x'; allowed"):
        admm_prune(W, H, 0.5, final="x")
    with pytest.raises(ValueError, match="prune_iterations=30 exceeds iterations=20"):
        admm_prune(W, H, 0.5, prune_iterations=30)
    with pytest.raises(ValueError, match="mask has shape"):
        admm_prune(W, H, 0.5, mask=torch.ones(3, 8, dtype=torch.bool))
    from hf_prune.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="not divisible by M=3"):
        admm_prune(W, H, 0.5, nm=(1, 3))
