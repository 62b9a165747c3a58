"""Tests of the predictive approximations in :mod:`bayescurv.links`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bayescurv import links
from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.likelihoods import Bernoulli, Categorical

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_problem(B: int = 6, C: int = 4, scale: float = 0.5, seed: int = 0):
    g = _gen(seed)
    mean = 2.0 * torch.randn(B, C, generator=g, dtype=DT)
    A = torch.randn(B, C, C, generator=g, dtype=DT)
    cov = scale * A @ A.transpose(-1, -2) + 0.05 * torch.eye(C, dtype=DT)
    return mean, cov


def _gauss_hermite_sigmoid(mean: torch.Tensor, var: torch.Tensor, deg: int = 150):
    """E[σ(f)], f ~ N(mean, var), by Gauss-Hermite quadrature (ground truth)."""
    x, w = np.polynomial.hermite.hermgauss(deg)
    x, w = torch.tensor(x, dtype=DT), torch.tensor(w, dtype=DT)
    f = mean.unsqueeze(-1) + torch.sqrt(2 * var).unsqueeze(-1) * x
    return (torch.sigmoid(f) * w).sum(-1) / math.sqrt(math.pi)


# ---------------------------------------------------------------------------------------
# probit
# ---------------------------------------------------------------------------------------
def test_probit_sigmoid_close_to_exact_expectation():
    m, v = torch.meshgrid(
        torch.linspace(-5, 5, 21, dtype=DT),
        torch.tensor([0.01, 0.3, 1.0, 3.0, 10.0, 100.0], dtype=DT),
        indexing="ij",
    )
    m, v = m.reshape(-1, 1), v.reshape(-1, 1)
    exact = _gauss_hermite_sigmoid(m, v)
    approx = links.probit_sigmoid(m, v.unsqueeze(-1))
    assert approx.shape == (m.shape[0], 1)
    # The probit approximation is known to be within ~0.011 of the exact expectation;
    # ignoring the variance would be off by > 0.3 on this grid, so the test discriminates.
    assert (approx - exact).abs().max() < 0.015
    assert (torch.sigmoid(m) - exact).abs().max() > 0.1


def test_probit_sigmoid_against_monte_carlo():
    m = torch.tensor([[-1.5], [0.3], [2.0]], dtype=DT)
    v = torch.tensor([[[4.0]], [[0.5]], [[9.0]]], dtype=DT)
    mc = links.mc_expectation(m, v, torch.sigmoid, 200_000, _gen(3))
    # MC standard error <= 0.5 / sqrt(2e5) ~ 1e-3; probit error <= 0.011.
    assert (links.probit_sigmoid(m, v) - mc).abs().max() < 0.015
    assert (mc - _gauss_hermite_sigmoid(m, v.squeeze(-1))).abs().max() < 5e-3


def test_probit_softmax_two_independent_classes_with_one_fixed_logit():
    # variances only (independent logits, no projection): with f1 deterministic the class-2
    # probability is exactly the binary probit of f2 - f1
    m = torch.tensor([[0.0, 1.2], [0.0, -0.7]], dtype=DT)
    var = torch.tensor([[0.0, 2.0], [0.0, 5.0]], dtype=DT)
    p = links.probit_softmax(m, var)
    q = links.probit_sigmoid(m[:, 1:], var[:, 1:])
    torch.testing.assert_close(p[:, 1:], q)


def test_probit_softmax_multiclass_against_monte_carlo():
    # For C > 2 probit is a heuristic (~0.1 off at worst here); a wrong scaling, e.g.
    # multiplying by sqrt(1 + πv/8), would be off by far more.
    g = _gen(0)
    mean = 2 * torch.randn(8, 3, generator=g, dtype=DT)
    var = 2 * torch.rand(8, 3, generator=g, dtype=DT)
    mc = links.mc_expectation(mean, var, lambda f: torch.softmax(f, -1), 100_000, _gen(0))
    probit = links.probit_softmax(mean, var)
    wrong = torch.softmax(mean * torch.sqrt(1 + math.pi / 8 * var), -1)
    assert (probit - mc).abs().max() < 0.12
    assert (probit - mc).abs().mean() < 0.03
    assert (wrong - mc).abs().mean() > 0.05


def test_zero_covariance_gives_softmax_and_sigmoid_exactly():
    mean, _ = _random_problem()
    zero = torch.zeros(mean.shape[0], mean.shape[1], mean.shape[1], dtype=DT)
    torch.testing.assert_close(links.probit_softmax(mean, zero), torch.softmax(mean, -1))
    m1 = mean[:, :1]
    assert torch.equal(links.probit_sigmoid(m1, zero[:, :1, :1]), torch.sigmoid(m1))
    assert torch.equal(links.probit_sigmoid(m1.squeeze(-1), zero[:, 0, 0]), torch.sigmoid(m1))


def test_variances_equal_full_diagonal_covariance():
    mean, cov = _random_problem()
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    diag_cov = torch.diag_embed(var)
    # probit: bare variances mean independent logits and are not projected (by design), so
    # only the bridge is compared here
    torch.testing.assert_close(
        links.laplace_bridge(mean, var), links.laplace_bridge(mean, diag_cov)
    )


# ---------------------------------------------------------------------------------------
# Laplace bridge
# ---------------------------------------------------------------------------------------
def _naive_bridge_alpha(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """The formula of Hobbhahn et al. (2022), written out loop by loop."""
    B, K = mean.shape
    out = torch.empty_like(mean)
    one = torch.ones(K, dtype=mean.dtype)
    for b in range(B):
        S, m = cov[b], mean[b]
        m = m - S @ one * (one @ m) / (one @ S @ one)
        S = S - torch.outer(S @ one, one @ S) / (one @ S @ one)
        for k in range(K):
            out[b, k] = (1 - 2 / K + torch.exp(m[k]) / K**2 * torch.exp(-m).sum()) / S[k, k]
    return out


def test_bridge_alpha_matches_formula():
    mean, cov = _random_problem(seed=2)
    torch.testing.assert_close(
        links.laplace_bridge_alpha(mean, cov), _naive_bridge_alpha(mean, cov)
    )


def test_bridge_inverts_the_laplace_approximation_of_a_dirichlet():
    # Dirichlet(α) in the softmax basis has Laplace approximation
    #   μ_k = log α_k - mean_l log α_l,
    #   Σ_kl = δ_kl/α_k - (1/α_k + 1/α_l)/K + Σ_j (1/α_j)/K²;
    # the bridge maps it back to α exactly.
    alpha = torch.tensor([[0.7, 2.0, 5.0, 11.0], [3.0, 3.0, 0.4, 1.5]], dtype=DT)
    K = alpha.shape[-1]
    la = alpha.log()
    mu = la - la.mean(-1, keepdim=True)
    inv = 1.0 / alpha
    cov = (
        torch.diag_embed(inv)
        - (inv.unsqueeze(-1) + inv.unsqueeze(-2)) / K
        + inv.sum(-1)[:, None, None] / K**2
    )
    torch.testing.assert_close(links.laplace_bridge_alpha(mu, cov), alpha)
    torch.testing.assert_close(links.laplace_bridge(mu, cov), alpha / alpha.sum(-1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bridge_is_a_distribution(dtype):
    mean, cov = _random_problem(B=10, C=5, seed=3)
    p = links.laplace_bridge(mean.to(dtype), cov.to(dtype))
    assert p.dtype == dtype and p.shape == (10, 5)
    assert ((p > 0) & (p < 1)).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(10, dtype=dtype))


def test_bridge_degenerate_covariances_stay_finite():
    mean, _ = _random_problem(B=3, C=3)
    zero = torch.zeros(3, 3, 3, dtype=DT)
    p = links.laplace_bridge(mean, zero)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(3, dtype=DT))
    # Vanishing isotropic covariance: the limit is the bracket normalised.
    iso = links.laplace_bridge(mean, 1e-30 * torch.eye(3, dtype=DT).expand(3, 3, 3))
    torch.testing.assert_close(p, iso)
    with pytest.raises(ShapeError):
        links.laplace_bridge(mean[:, :1], zero[:, :1, :1])


def test_bridge_does_not_modify_inputs():
    mean, cov = _random_problem()
    m0, c0 = mean.clone(), cov.clone()
    links.laplace_bridge(mean, cov)
    assert torch.equal(mean, m0) and torch.equal(cov, c0)


@pytest.mark.reference
def test_bridge_matches_laplace_torch():
    pytest.importorskip("laplace")
    from laplace.baselaplace import BaseLaplace

    class _Fixed:
        """Stands in for a fitted laplace-torch posterior with a given GLM predictive."""

        def __init__(self, mean, cov):
            self.mean, self.cov = mean, cov

        def _glm_predictive_distribution(self, x, joint=False):
            return self.mean.clone(), self.cov.clone()

    for seed, C in [(0, 2), (1, 4), (2, 10)]:
        mean, cov = _random_problem(B=7, C=C, seed=seed)
        ref = BaseLaplace._glm_forward_call(
            _Fixed(mean, cov), None, likelihood="classification", link_approx="bridge"
        )
        torch.testing.assert_close(links.laplace_bridge(mean, cov), ref)


# ---------------------------------------------------------------------------------------
# Monte Carlo
# ---------------------------------------------------------------------------------------
def test_mc_reproducible_with_generator():
    mean, cov = _random_problem()
    fn = lambda f: torch.softmax(f, -1)  # noqa: E731
    a = links.mc_expectation(mean, cov, fn, 50, _gen(7))
    b = links.mc_expectation(mean, cov, fn, 50, _gen(7))
    c = links.mc_expectation(mean, cov, fn, 50, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_mc_moments_match_full_rank_and_rank_deficient_covariances():
    g = _gen(4)
    C = 4
    v = torch.randn(2, C, 1, generator=g, dtype=DT)
    A = torch.randn(2, C, C, generator=g, dtype=DT)
    covs = {
        "full": A @ A.transpose(-1, -2),
        "rank1": v @ v.transpose(-1, -2),
        "rank2_psd": torch.cat([v, 2 * v], -1) @ torch.cat([v, 2 * v], -1).transpose(-1, -2),
    }
    mean = torch.randn(2, C, generator=g, dtype=DT)
    second = lambda f: f.unsqueeze(-1) * f.unsqueeze(-2)  # noqa: E731
    for name, cov in covs.items():
        m1 = links.mc_expectation(mean, cov, lambda f: f, 100_000, _gen(5))
        m2 = links.mc_expectation(mean, cov, second, 100_000, _gen(5))
        emp_cov = m2 - m1.unsqueeze(-1) * m1.unsqueeze(-2)
        scale = cov.diagonal(dim1=-2, dim2=-1).amax()
        assert (m1 - mean).abs().max() < 0.05 * scale.sqrt(), name
        assert (emp_cov - cov).abs().max() < 0.05 * scale, name


def test_mc_zero_covariance_is_exact():
    mean, _ = _random_problem()
    zero = torch.zeros(*mean.shape, mean.shape[-1], dtype=DT)
    out = links.mc_expectation(mean, zero, lambda f: torch.softmax(f, -1), 5, _gen(0))
    torch.testing.assert_close(out, torch.softmax(mean, -1), rtol=0, atol=1e-15)


def test_psd_sqrt_reconstructs_psd_matrices():
    g = _gen(6)
    v = torch.randn(3, 5, 2, generator=g, dtype=DT)
    cov = torch.cat(
        [v @ v.transpose(-1, -2), torch.zeros(1, 5, 5, dtype=DT), torch.eye(5, dtype=DT)[None]]
    )
    L = links.psd_sqrt(cov)
    torch.testing.assert_close(L @ L.transpose(-1, -2), cov, rtol=0, atol=1e-12)
    # Positive-definite entries keep their Cholesky factor.
    torch.testing.assert_close(L[-1], torch.eye(5, dtype=DT))


def test_mc_diagonal_variances_input():
    mean = torch.tensor([[0.5, -1.0]], dtype=DT)
    var = torch.tensor([[2.0, 0.0]], dtype=DT)
    m2 = links.mc_expectation(mean, var, lambda f: f**2, 100_000, _gen(9))
    torch.testing.assert_close(m2, mean**2 + var, rtol=0, atol=0.05)


def test_invalid_arguments():
    mean, cov = _random_problem()
    with pytest.raises(InvalidArgumentError):
        links.mc_expectation(mean, cov, torch.sigmoid, 0, None)
    with pytest.raises(ShapeError):
        links.probit_softmax(mean, cov[:, :2, :2])
    with pytest.raises(ShapeError):
        links.probit_sigmoid(mean, cov)
    with pytest.raises(ShapeError):
        links.probit_softmax(mean[None], cov)


# ---------------------------------------------------------------------------------------
# through the likelihoods
# ---------------------------------------------------------------------------------------
def test_likelihood_predictives_use_links():
    mean, cov = _random_problem(B=5, C=3)
    lik = Categorical()
    for link in ("probit", "bridge", "mc"):
        p = lik.predictive(mean, cov, link=link, num_samples=20, generator=_gen(0))
        assert p.shape == (5, 3)
        torch.testing.assert_close(p.sum(-1), torch.ones(5, dtype=DT))
    b = Bernoulli()
    p1 = b.predictive(mean[:, :1], cov[:, :1, :1], link="probit")
    p2 = b.predictive(mean[:, :1], cov[:, :1, :1], link="mc", num_samples=20, generator=_gen(0))
    assert p1.shape == p2.shape == (5,)


def test_probit_softmax_ignores_the_softmax_invariant_direction():
    """softmax(f + c 1) = softmax(f): variance along 1 must not change the probit output."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 5, generator=g, dtype=torch.float64)
    a = torch.randn(4, 5, 5, generator=g, dtype=torch.float64)
    cov = a @ a.mT / 5
    ones = torch.ones(5, 5, dtype=torch.float64)
    p1 = links.probit_softmax(mean, cov)
    p2 = links.probit_softmax(mean + 3.0, cov + 50.0 * ones)
    torch.testing.assert_close(p1, p2)
    # and it is closer to Monte Carlo than the uncentred approximation
    mc = links.mc_expectation(mean, cov + 50.0 * ones, lambda f: torch.softmax(f, -1), 20000,
                        torch.Generator().manual_seed(1))
    err_centred = (p2 - mc).abs().max()
    var = torch.diagonal(cov + 50.0 * ones, dim1=-2, dim2=-1)
    err_plain = (torch.softmax(mean * links.probit_scale(var), -1) - mc).abs().max()
    assert err_centred < 0.1 and err_centred < err_plain / 2


@pytest.mark.parametrize("c", [2, 7, 50])
def test_probit_projection_in_quadratic_time_equals_the_matrix_products(c):
    """``projected_variance`` (O(C²)) is the diagonal of ``P Σ P`` formed explicitly, and
    ``probit_softmax`` with it matches the probit of the explicitly projected covariance."""
    g = torch.Generator().manual_seed(c)
    a = torch.randn(4, c, c + 3, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2) + 0.3 * torch.ones(c, c, dtype=torch.float64)
    mean = torch.randn(4, c, generator=g, dtype=torch.float64)
    proj = torch.eye(c, dtype=torch.float64) - 1.0 / c
    explicit = torch.diagonal(proj @ cov @ proj, dim1=-2, dim2=-1)
    torch.testing.assert_close(links.projected_variance(cov), explicit, rtol=1e-12, atol=1e-12)
    centred = mean - mean.mean(-1, keepdim=True)
    expected = torch.softmax(centred * links.probit_scale(explicit), -1)
    torch.testing.assert_close(links.probit_softmax(mean, cov), expected, rtol=1e-12, atol=0)


def test_projected_variance_in_float32_matches_float64_under_a_large_common_shift():
    """The case the projection exists for — a large variance along ``1`` (the softmax-invariant
    direction) on top of O(1) variances — loses no more in float32 than the entries' own
    rounding, ``shift * eps`` (an uncentred formula lost 3x that here)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 10, 13, generator=g, dtype=torch.float64)
    cov64 = a @ a.transpose(-1, -2) / 13 + 1e3 * torch.ones(10, 10, dtype=torch.float64)
    ref = links.projected_variance(cov64)
    got = links.projected_variance(cov64.float()).double()
    floor = 1e3 * torch.finfo(torch.float32).eps / ref.min()
    assert ((got - ref).abs() / ref).max() < 2 * floor
