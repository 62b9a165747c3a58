"""Spectral tools against torch.linalg.eigh on random matrices and a small net's GGN."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bayescurv.curvature.eigen import (
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_topk,
    randomized_eigh,
    spectral_density,
)
from bayescurv.curvature.matfree import CurvatureLinearOperator
from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.likelihoods import get_likelihood
from bayescurv.params import select

DT = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_sym(eigvals: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``U diag(eigvals) Uᵀ`` with a random orthogonal ``U``; returns ``(A, U)``."""
    n = eigvals.shape[0]
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=DT))
    return (U * eigvals) @ U.T, U


def decaying(n: int = 80, rate: float = 0.7) -> torch.Tensor:
    return 10.0 * rate ** torch.arange(n, dtype=DT)


def subspace_gap(U: torch.Tensor, V: torch.Tensor) -> float:
    """``||(I - V Vᵀ) U||``: zero when span(U) lies in span(V) (V orthonormal)."""
    return float(torch.linalg.matrix_norm(U - V @ (V.T @ U), ord=2))


# ------------------------------------------------------------------------------------------
# eigensolvers
# ------------------------------------------------------------------------------------------
def test_lanczos_topk_decaying_psd():
    lam = decaying()
    A, U = random_sym(lam)
    vals, vecs = lanczos_topk(A, None, k=5, generator=gen(1))
    torch.testing.assert_close(vals, lam[:5], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(5, dtype=DT), rtol=0, atol=1e-10)
    assert subspace_gap(U[:, :5], vecs) < 1e-6
    # a callable with explicit size / dtype works the same
    vals2, _ = lanczos_topk(lambda V: A @ V, 80, 5, generator=gen(1), dtype=DT)
    torch.testing.assert_close(vals2, vals, rtol=1e-12, atol=1e-12)


def test_lanczos_full_iterations_exact_and_indefinite():
    lam = torch.linspace(-3.0, 2.0, 25, dtype=DT)
    A, _ = random_sym(lam, seed=2)
    vals, vecs = lanczos_topk(A, 25, k=25, num_iter=25, generator=gen(0))
    torch.testing.assert_close(vals, lam.flip(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(A @ vecs, vecs * vals, rtol=1e-8, atol=1e-8)


def test_lanczos_breakdown_low_rank():
    """rank 3 < k: the Krylov space is exhausted after 3 steps and Lanczos restarts."""
    lam = torch.zeros(30, dtype=DT)
    lam[:3] = torch.tensor([5.0, 2.0, 1.0], dtype=DT)
    A, U = random_sym(lam, seed=3)
    vals, vecs = lanczos_topk(A, 30, k=5, num_iter=12, generator=gen(0))
    torch.testing.assert_close(vals, lam[:5], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(5, dtype=DT), rtol=0, atol=1e-9)
    assert subspace_gap(U[:, :3], vecs) < 1e-8


def test_randomized_eigh_decaying_psd():
    lam = decaying()
    A, U = random_sym(lam)
    vals, vecs = randomized_eigh(A, None, k=5, oversample=10, power_iters=2, generator=gen(1))
    torch.testing.assert_close(vals, lam[:5], rtol=1e-6, atol=0)
    assert subspace_gap(U[:, :5], vecs) < 1e-3
    # without power iterations it is visibly worse: the test can tell the two apart
    v0, _ = randomized_eigh(A, None, k=5, oversample=2, power_iters=0, generator=gen(1))
    assert (v0 - lam[:5]).abs().max() > (vals - lam[:5]).abs().max()


# ------------------------------------------------------------------------------------------
# trace / diagonal estimators
# ------------------------------------------------------------------------------------------
def test_hutchinson_trace_within_its_standard_deviation():
    A, _ = random_sym(decaying(60, 0.9), seed=4)
    s = 3000
    est = hutchinson_trace(A, None, s, gen(5))
    sd = math.sqrt(2.0 / s * float((A**2).sum() - (A.diagonal() ** 2).sum()))
    assert abs(float(est) - float(A.trace())) < 4 * sd
    assert sd < 0.05 * float(A.trace())  # the bound above is meaningful


def test_hutchinson_exact_on_diagonal_matrices():
    D = torch.diag(torch.arange(1.0, 11.0, dtype=DT))
    torch.testing.assert_close(hutchinson_trace(D, None, 1, gen()), D.trace())
    torch.testing.assert_close(hutchinson_diagonal(D, None, 1, gen()), D.diagonal())


def test_hutchinson_diagonal_within_its_standard_deviation():
    A, _ = random_sym(decaying(40, 0.9), seed=6)
    s = 2000
    est = hutchinson_diagonal(A, None, s, gen(7))
    off = (A**2).sum(1) - A.diagonal() ** 2
    sd = (off / s).sqrt()
    assert ((est - A.diagonal()).abs() < 4.5 * sd).all()


def test_hutchpp_exact_for_low_rank_and_accurate_for_decaying():
    lam = torch.zeros(50, dtype=DT)
    lam[:4] = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=DT)
    A, _ = random_sym(lam, seed=8)
    torch.testing.assert_close(hutchpp_trace(A, None, 12, gen(0)), A.trace())
    # full rank, fast decay: with the same 30 products, Hutch++ beats Hutchinson by far
    B, _ = random_sym(decaying(50, 0.6), seed=9)
    err_pp = [abs(float(hutchpp_trace(B, None, 30, gen(s)) - B.trace())) for s in range(20)]
    err_h = [abs(float(hutchinson_trace(B, None, 30, gen(s)) - B.trace())) for s in range(20)]
    assert sum(err_pp) < 0.1 * sum(err_h)
    assert sum(err_pp) / 20 < 0.01 * float(B.trace())


def test_estimators_reproducible_with_seed():
    A, _ = random_sym(decaying(30, 0.8), seed=10)
    for fn, arg in [
        (hutchinson_trace, 5),
        (hutchpp_trace, 9),
        (hutchinson_diagonal, 5),
        (lambda *a: lanczos_topk(*a[:2], k=3, num_iter=a[2], generator=a[3])[1], 6),
        (lambda *a: randomized_eigh(*a[:2], k=3, power_iters=0, generator=a[3])[1], 0),
        (lambda *a: spectral_density(*a[:2], num_iter=a[2], generator=a[3])[1], 6),
    ]:
        a = fn(A, None, arg, gen(11))
        b = fn(A, None, arg, gen(11))
        c = fn(A, None, arg, gen(12))
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


# ------------------------------------------------------------------------------------------
# spectral density
# ------------------------------------------------------------------------------------------
def test_spectral_density_integrates_to_one_and_finds_clusters():
    lam = torch.cat([torch.full((40,), 1.0), torch.full((40,), 5.0)]).to(DT)
    lam = lam + 0.01 * torch.randn(80, generator=gen(0), dtype=DT)
    A, _ = random_sym(lam, seed=11)
    probes = 30
    grid, dens = spectral_density(A, None, num_iter=20, num_probes=probes, generator=gen(2))
    assert grid.shape == dens.shape == (1000,)
    assert (dens >= 0).all()
    assert abs(float(torch.trapezoid(dens, grid)) - 1.0) < 1e-3
    low = grid < 3.0
    assert abs(float(torch.trapezoid(dens[low], grid[low])) - 0.5) < 0.2
    # the first moment is the mean of v^T A v / n over Rademacher probes: unbiased for tr(A)/n
    mean = float(torch.trapezoid(grid * dens, grid))
    sd = math.sqrt(2.0 * float((A**2).sum() - (A.diagonal() ** 2).sum()) / probes) / 80
    assert abs(mean - float(lam.mean())) < 4 * sd


def test_spectral_density_moments_exact_for_diagonal_matrix():
    """For diagonal A, Rademacher probes give v^T p(A) v / n = mean p(lambda) exactly, and
    Gauss quadrature with m nodes is exact for degree <= 2m - 1; the Gaussian kernel adds
    sigma^2 to the second moment."""
    lam = torch.cat([torch.full((40,), 1.0), torch.full((40,), 5.0)]).to(DT)
    lam = lam + 0.01 * torch.randn(80, generator=gen(0), dtype=DT)
    grid, dens = spectral_density(
        torch.diag(lam),
        None,
        num_iter=10,
        num_probes=2,
        grid=20001,
        sigma=0.05,
        generator=gen(4),
    )
    m0 = torch.trapezoid(dens, grid)
    m1 = torch.trapezoid(grid * dens, grid)
    m2 = torch.trapezoid(grid**2 * dens, grid)
    torch.testing.assert_close(m0, torch.tensor(1.0, dtype=DT), rtol=0, atol=1e-8)
    torch.testing.assert_close(m1, lam.mean(), rtol=1e-8, atol=0)
    torch.testing.assert_close(m2, (lam**2).mean() + 0.05**2, rtol=1e-7, atol=0)
    low = grid < 3.0
    torch.testing.assert_close(
        torch.trapezoid(dens[low], grid[low]), torch.tensor(0.5, dtype=DT), rtol=0, atol=1e-6
    )


def test_spectral_density_custom_grid_and_sigma():
    A, _ = random_sym(decaying(40, 0.8), seed=12)
    grid = torch.linspace(-2.0, 12.0, 3001, dtype=DT)
    g, dens = spectral_density(A, None, num_iter=15, grid=grid, sigma=0.2, generator=gen(3))
    assert torch.equal(g, grid)
    assert abs(float(torch.trapezoid(dens, g)) - 1.0) < 1e-3
    with pytest.raises(InvalidArgumentError):
        spectral_density(A, None, sigma=-1.0)


# ------------------------------------------------------------------------------------------
# on a small network's curvature through the matrix-free operator
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def net_ggn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    model = model.to(DT).eval()
    g = gen(1)
    data = [
        (torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
        for n in (3, 4)
    ]
    X, Y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    ps = select(model)
    lik = get_likelihood("classification")
    theta = ps.vector()
    F = ps.functional_call(theta, X)
    J = torch.func.jacrev(lambda t: ps.functional_call(t, X))(theta).reshape(F.numel(), -1)
    H = torch.func.hessian(lambda f: lik.nll(f, Y))(F).reshape(F.numel(), F.numel())
    op = CurvatureLinearOperator(model, lik, data)
    return op, J.T @ H @ J, model, data


def test_eigensolvers_on_network_ggn(net_ggn):
    op, G, _, _ = net_ggn
    lam, U = torch.linalg.eigh(G)
    lam, U = lam.flip(0), U.flip(1)
    vals, vecs = lanczos_topk(op, None, k=4, num_iter=20, generator=gen(0))
    torch.testing.assert_close(vals, lam[:4], rtol=1e-8, atol=1e-10)
    assert subspace_gap(U[:, :4], vecs) < 1e-6
    rv, rvecs = randomized_eigh(op, None, k=4, oversample=6, power_iters=2, generator=gen(0))
    # GGN rank <= 7 points x 2 = 14 = k + oversample: the sketch captures the range exactly
    torch.testing.assert_close(rv, lam[:4], rtol=1e-8, atol=1e-10)
    assert subspace_gap(U[:, :4], rvecs) < 1e-6


def test_trace_estimators_on_network_ggn(net_ggn):
    op, G, _, _ = net_ggn
    assert torch.linalg.matrix_rank(G) <= 14
    # rank(G) <= 14 = num_matvecs // 3: Hutch++ is exact
    torch.testing.assert_close(hutchpp_trace(op, None, 42, gen(0)), G.trace())
    s = 400
    est = hutchinson_trace(op, None, s, gen(1))
    sd = math.sqrt(2.0 / s * float((G**2).sum() - (G.diagonal() ** 2).sum()))
    assert abs(float(est - G.trace())) < 4 * sd


def test_matvec_only_objects_and_hessian_top_eigs(net_ggn):
    _, _, model, data = net_ggn
    op = CurvatureLinearOperator(model, "classification", data, kind="hessian")
    Hd = op.to_dense()

    class MatvecOnly:
        shape, dtype, device = op.shape, op.dtype, op.device

        def matvec(self, v):
            return op.matvec(v)

    lam = torch.linalg.eigvalsh(Hd).flip(0)
    vals, _ = lanczos_topk(MatvecOnly(), None, k=3, num_iter=40, generator=gen(0))
    torch.testing.assert_close(vals, lam[:3], rtol=1e-7, atol=1e-9)


def test_validation_errors():
    A = torch.eye(5, dtype=DT)
    with pytest.raises(InvalidArgumentError):
        lanczos_topk(A, None, k=6)
    with pytest.raises(InvalidArgumentError):
        lanczos_topk(A, None, k=3, num_iter=2)
    with pytest.raises(InvalidArgumentError):
        lanczos_topk(lambda V: V, None, k=1)  # no size and no .shape
    with pytest.raises(ShapeError):
        hutchinson_trace(torch.zeros(3, 4), None, 2)
    with pytest.raises(InvalidArgumentError):
        hutchpp_trace(A, None, 2)
    with pytest.raises(ShapeError):
        hutchinson_trace(lambda V: V[:-1], 5, 2)
    with pytest.raises(InvalidArgumentError):
        randomized_eigh(A, None, k=0)
