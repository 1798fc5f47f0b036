"""Pure math against naive reference implementations on small matrices."""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_prune.core.masks import (
    BRACKET_MIN_NUMEL,
    is_nm_sparse,
    kth_smallest,
    mask_from_scores,
    nm_mask,
    unstructured_mask,
)
from hf_prune.errors import NumericalError
from hf_prune.oneshot.functional import (
    damped_inverse_cholesky,
    sparsegpt_prune,
    wanda_scores,
)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask_keeps_n_largest_per_group(n: int, m: int) -> None:
    scores = torch.randn(6, 4 * m)
    mask = nm_mask(scores, n, m)
    groups = scores.view(6, 4, m)
    for r in range(6):
        for g in range(4):
            kept = set(torch.nonzero(mask.view(6, 4, m)[r, g]).flatten().tolist())
            expect = set(torch.topk(groups[r, g], n).indices.tolist())
            assert kept == expect
    assert is_nm_sparse(torch.randn(6, 4 * m) * mask, n, m)


@pytest.mark.parametrize("group", ["row", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_mask_counts(group: str, sparsity: float) -> None:
    scores = torch.rand(10, 33)
    mask = unstructured_mask(scores, sparsity, group)
    if group == "row":
        assert ((~mask).sum(1) == int(33 * sparsity)).all()
        # every pruned score in a row is <= every kept score of that row
        for r in range(10):
            if (~mask[r]).any() and mask[r].any():
                assert scores[r][~mask[r]].max() <= scores[r][mask[r]].min()
    else:
        assert int((~mask).sum()) == int(330 * sparsity)
        if 0 < sparsity:
            assert scores[~mask].max() <= scores[mask].min()


@pytest.mark.parametrize("kind", ["normal", "ties", "skewed", "nan"])
@pytest.mark.parametrize("q", [1e-6, 0.01, 0.5, 0.7, 0.99, 1.0])
def test_kth_smallest_matches_kthvalue(kind: str, q: float) -> None:
    gen = torch.Generator().manual_seed(1)
    n = BRACKET_MIN_NUMEL + 12345  # long enough for the sampled bracket
    x = {"normal": lambda: torch.randn(n, generator=gen),
         "ties": lambda: torch.randint(0, 7, (n,), generator=gen).float(),  # every bracket edge is a tie
         "skewed": lambda: torch.randn(n, generator=gen).exp() ** 8,
         "nan": lambda: torch.where(torch.rand(n, generator=gen) < 0.1, float("nan"), torch.rand(n, generator=gen))}[kind]()
    k = max(1, int(q * n))
    got, want = kth_smallest(x, k), torch.kthvalue(x, k).values
    assert torch.equal(got, want) or (got.isnan() and want.isnan())


def test_layer_mask_exact_count_with_ties_on_large_matrix() -> None:
    scores = torch.randint(0, 3, (600, 700), generator=torch.Generator().manual_seed(0)).float()
    mask = unstructured_mask(scores, 0.5, "layer")
    assert int((~mask).sum()) == int(600 * 700 * 0.5)
    assert scores[~mask].max() <= scores[mask].min()


def test_wanda_scores_match_naive() -> None:
    w = torch.randn(5, 7)
    x = torch.randn(100, 7)
    scores = wanda_scores(w, x.square().sum(0))
    naive = torch.tensor([[abs(w[i, j]) * x[:, j].norm() for j in range(7)] for i in range(5)])
    torch.testing.assert_close(scores, naive.float(), rtol=1e-5, atol=1e-6)
    # Wanda compares within a row: equal-magnitude weights on a loud input survive
    keep = mask_from_scores(scores, 0.5, None, "row")
    assert ((~keep).sum(1) == 3).all()


def _naive_sparsegpt(W, H, sparsity, nm, blocksize, damp):
    """Explicit OBS, column by column, with explicit inverses of the remaining-columns Hessian (float64)."""
    W = W.double().clone()
    H = H.double().clone()
    cols = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H = H + damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=torch.float64)
    pruned = torch.zeros_like(W, dtype=torch.bool)

    def inv_rest(j):  # inverse of H restricted to columns j.. (the OBS "remaining weights" Hessian)
        return torch.linalg.inv(H[j:, j:])

    d = torch.tensor([inv_rest(j)[0, 0].sqrt() for j in range(cols)], dtype=torch.float64)
    if nm is not None:
        blocksize = max(nm[1], blocksize - blocksize % nm[1])
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if nm is None:
            tmp = W[:, i1:i2].square() / d[i1:i2].square()
            k = int(tmp.numel() * sparsity)
            if k:
                idx = torch.topk(tmp.flatten(), k, largest=False).indices
                sel = torch.zeros(tmp.numel(), dtype=torch.bool)
                sel[idx] = True
                pruned[:, i1:i2] = sel.view_as(tmp)
        for j in range(i1, i2):
            if nm is not None and (j - i1) % nm[1] == 0:
                tmp = W[:, j : j + nm[1]].square() / d[j : j + nm[1]].square()
                idx = torch.topk(tmp, nm[1] - nm[0], dim=1, largest=False).indices
                pruned[:, j : j + nm[1]].scatter_(1, idx, True)
            hinv = inv_rest(j)
            for r in range(W.shape[0]):
                if pruned[r, j]:
                    # OBS: remove w_rj and optimally update the remaining weights of row r
                    W[r, j:] -= W[r, j] / hinv[0, 0] * hinv[0, :]
                    W[r, j] = 0.0
    return W, ~pruned


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("blocksize", [8, 128])
def test_sparsegpt_matches_explicit_obs(nm, blocksize) -> None:
    torch.manual_seed(1)
    W = torch.randn(6, 24)
    X = torch.randn(200, 24) @ torch.randn(24, 24) * 0.5  # correlated inputs
    H = _hessian(X)
    new, keep, damp = sparsegpt_prune(W, H, 0.5, nm=nm, blocksize=blocksize, dampening=0.01)
    ref, ref_keep = _naive_sparsegpt(W, H, 0.5, nm, blocksize, 0.01)
    assert damp == 0.01
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new.double(), ref, rtol=1e-3, atol=1e-4)
    assert torch.equal(new == 0, ~keep)
    if nm:
        assert is_nm_sparse(new, *nm)


def test_sparsegpt_reduces_reconstruction_error_vs_masking() -> None:
    torch.manual_seed(2)
    W = torch.randn(16, 32)
    X = torch.randn(512, 32) @ torch.randn(32, 32)
    new, keep, _ = sparsegpt_prune(W, _hessian(X), 0.5)
    masked_only = W * keep
    err_obs = (X @ (W - new).T).square().sum()
    err_mask = (X @ (W - masked_only).T).square().sum()
    assert err_obs < 0.7 * err_mask


def test_sparsegpt_row_segments_keep_per_matrix_sparsity() -> None:
    W = torch.cat([torch.randn(4, 16) * 10, torch.randn(4, 16) * 0.1])  # very different scales
    X = torch.randn(100, 16)
    new, _, _ = sparsegpt_prune(W, _hessian(X), [0.5, 0.25], row_segments=[(0, 4), (4, 8)])
    assert int((new[:4] == 0).sum()) == 32
    assert int((new[4:] == 0).sum()) == 16


def test_sparsegpt_dead_inputs_are_zeroed() -> None:
    X = torch.randn(64, 8)
    X[:, 3] = 0
    new, _, _ = sparsegpt_prune(torch.randn(4, 8), _hessian(X), 0.25)
    assert (new[:, 3] == 0).all()


def test_cholesky_retry_then_error() -> None:
    h = torch.eye(6)
    h[0, 0] = -0.01  # slightly indefinite: more dampening fixes it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, damp = damped_inverse_cholesky(h, 0.01, 3, "toy")
    assert damp > 0.01 and any("succeeded with dampening" in str(w.message) for w in caught)
    with pytest.raises(NumericalError, match="dampening"):
        damped_inverse_cholesky(-torch.eye(4), 0.01, 2, "toy")


def test_input_stats_symmetric_hessian_equals_xtx() -> None:
    from hf_prune.core.stats import InputStats

    stats = InputStats(300, torch.device("cpu"), norms=True, hessian=True)
    xs = [torch.randn(2, 50, 300).bfloat16() for _ in range(3)]
    for x in xs:
        stats.add(x)
    full = torch.cat([x.reshape(-1, 300).float() for x in xs])
    torch.testing.assert_close(stats.full_hessian(), full.T @ full, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(stats.sum_sq, full.square().sum(0))
    assert stats.n_tokens == 300
