"""Low-rank structures (``"lowrank"``, ``"diag+lowrank"``) against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv.curvature import compute
from bayescurv.errors import InvalidArgumentError
from bayescurv.linalg import LowRank, LowRankPlusDiagonal

DT = torch.float64
SIZES = (3, 1, 4)


def _problem(lik: str = "classification"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)).to(DT)
    x = torch.randn(sum(SIZES), 1, 5, dtype=DT)
    y = torch.randint(0, 3, (len(x),)) if lik == "classification" else torch.randn(len(x), 3,
                                                                                     dtype=DT)
    return model, x, y


def _top(ref: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    lam, q = torch.linalg.eigh(ref)
    return lam.flip(0)[:k], q.flip(1)[:, :k]


@pytest.mark.parametrize("kind", ["ggn", "ef", "mc"])
def test_sqrt_exact_when_rank_covers_data(kind, dense_reference, batches_of):
    """``N K <= rank``: the streamed root is the whole curvature (ViViT exactness)."""
    model, x, y = _problem()
    data = batches_of(x, y, SIZES)
    k = 3 if kind == "ggn" else 1
    curv = compute(model, "classification", data, structure="lowrank", kind=kind,
                   rank=len(x) * k, generator=torch.Generator().manual_seed(0))
    assert isinstance(curv.matrix, LowRank)
    if kind == "mc":  # the same samples as the full structure with the same seed
        ref = compute(model, "classification", data, structure="full", kind="mc",
                      generator=torch.Generator().manual_seed(0)).matrix.to_dense()
    else:
        ref = dense_reference(model, "classification", data, kind=kind)
    torch.testing.assert_close(curv.matrix.to_dense(), ref, atol=1e-10, rtol=1e-8)
    u = curv.matrix.U
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=DT), atol=1e-8, rtol=0)


def test_sqrt_truncation_one_batch_is_top_k(dense_reference):
    model, x, y = _problem()
    ref = dense_reference(model, "classification", [(x, y)])
    curv = compute(model, "classification", [(x, y)], structure="lowrank", rank=4)
    lam, q = _top(ref, 4)
    torch.testing.assert_close(curv.matrix.s, lam)
    torch.testing.assert_close(curv.matrix.to_dense(), (q * lam) @ q.T)


def test_sqrt_streamed_truncation_is_below_curvature(dense_reference, batches_of):
    """Folding batches in and truncating drops PSD pieces: ``0 ⪯ U S Uᵀ ⪯ G``."""
    model, x, y = _problem()
    data = batches_of(x, y, SIZES)
    ref = dense_reference(model, "classification", data)
    low = compute(model, "classification", data, structure="lowrank", rank=4).matrix
    gap = torch.linalg.eigvalsh(ref - low.to_dense())
    assert gap.min() > -1e-10
    lam, _ = _top(ref, 4)
    assert (low.s <= lam + 1e-10).all() and low.s[0] > 0.9 * lam[0]


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
@pytest.mark.parametrize("kind", ["ggn", "ef", "hessian"])
def test_matrix_free_top_k(method, kind, dense_reference, batches_of):
    model, x, y = _problem("regression")
    data = batches_of(x, y, SIZES)
    ref = dense_reference(model, "regression", data, kind=kind)
    k = 3
    curv = compute(model, "regression", data, structure="lowrank", kind=kind, rank=k,
                   lowrank_method=method, generator=torch.Generator().manual_seed(0))
    lam, q = _top(ref, k)
    # randomized subspace iteration is approximate for the indefinite Hessian
    tol = 5e-2 if (method, kind) == ("randomized", "hessian") else 1e-5
    torch.testing.assert_close(curv.matrix.s, lam.clamp_min(0), atol=tol, rtol=tol)
    if tol < 1e-3:  # same subspace
        proj = (curv.matrix.U.T @ q).square().sum(0)
        torch.testing.assert_close(proj, torch.ones(k, dtype=DT), atol=1e-4, rtol=0)
    full = compute(model, "regression", data, structure="full")
    assert torch.isclose(curv.loss, full.loss) and curv.num_data == full.num_data


@pytest.mark.parametrize("method", ["sqrt", "lanczos"])
def test_diag_plus_lowrank_keeps_exact_diagonal(method, dense_reference, batches_of):
    model, x, y = _problem()
    data = batches_of(x, y, SIZES)
    ref = dense_reference(model, "classification", data)
    curv = compute(model, "classification", data, structure="diag+lowrank", rank=5,
                   lowrank_method=method, generator=torch.Generator().manual_seed(0))
    assert isinstance(curv.matrix, LowRankPlusDiagonal)
    torch.testing.assert_close(curv.matrix.diagonal(), torch.diagonal(ref))
    low = compute(model, "classification", data, structure="lowrank", rank=5,
                  lowrank_method=method, generator=torch.Generator().manual_seed(0)).matrix
    torch.testing.assert_close(curv.matrix.s, low.s)
    err_lr = (ref - low.to_dense()).norm()
    assert (ref - curv.matrix.to_dense()).norm() < err_lr


def test_lowrank_mean_reduction_and_options(batches_of):
    model, x, y = _problem()
    data = batches_of(x, y, SIZES)
    s = compute(model, "classification", data, structure="lowrank", rank=30).matrix
    m = compute(model, "classification", data, structure="lowrank", rank=30,
                reduction="mean").matrix
    torch.testing.assert_close(m.to_dense(), s.to_dense() / len(x))
    with pytest.raises(InvalidArgumentError, match="rank"):
        compute(model, "classification", data, structure="lowrank", rank=0)
    with pytest.raises(InvalidArgumentError, match="lowrank_method"):
        compute(model, "classification", data, structure="lowrank", lowrank_method="svd")
    with pytest.raises(InvalidArgumentError, match="mc"):
        compute(model, "classification", data, structure="lowrank", kind="mc",
                lowrank_method="lanczos")
    with pytest.raises(InvalidArgumentError, match="square root"):
        compute(model, "classification", data, structure="lowrank", kind="hessian")


def test_matrix_free_lowrank_accepts_any_layer(dense_reference):
    """Lanczos needs only products, so modules the hooks do not know are fine."""

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=DT))

        def forward(self, x):
            return x * self.w

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    data = [(torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,)))]
    ref = dense_reference(model, "classification", data)
    curv = compute(model, "classification", data, structure="lowrank", rank=2,
                   lowrank_method="lanczos", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(curv.matrix.s, _top(ref, 2)[0], atol=1e-6, rtol=1e-5)
