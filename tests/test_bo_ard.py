"""ARD lengthscales of the default BO surrogate by the exact evidence (bayescurv.bo.ard)."""

from __future__ import annotations

import math

import pytest
import torch

from bayescurv.bo import LaplaceModel
from bayescurv.bo.ard import default_lengthscale_prior, fit_lengthscales, linear_model_log_evidence
from bayescurv.bo.features import FourierFeatures
from bayescurv.bo.hyperparameters import default_noise_prior, noise_log_prior

DT = torch.float64


def _dense_evidence(phi, y, delta, s2):
    n = phi.shape[0]
    cov = phi @ phi.T / delta + s2 * torch.eye(n, dtype=DT)
    mvn = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=DT), cov)
    return sum(mvn.log_prob(y[:, k]) for k in range(y.shape[1]))


@pytest.mark.parametrize("n, p", [(7, 20), (30, 9)])  # kernel form and weight-space form
def test_linear_model_evidence_matches_the_dense_gaussian(n, p):
    g = torch.Generator().manual_seed(n)
    phi = torch.randn(n, p, generator=g, dtype=DT)
    y = torch.randn(n, 3, generator=g, dtype=DT)
    delta = torch.tensor(0.6, dtype=DT, requires_grad=True)
    s2 = torch.tensor(0.2, dtype=DT, requires_grad=True)
    ours = linear_model_log_evidence(phi, y, delta, s2)
    ref = _dense_evidence(phi, y, delta, s2)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    g_ours = torch.autograd.grad(ours, [delta, s2])
    g_ref = torch.autograd.grad(ref, [delta, s2])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_singular_gram_matrix_gives_minus_infinity_not_a_number():
    phi = torch.ones(4, 6, dtype=DT)  # rank one, no noise: K is singular
    out = linear_model_log_evidence(phi, torch.randn(4, 1, dtype=DT), torch.tensor(1.0, dtype=DT),
                                    torch.tensor(0.0, dtype=DT))
    assert out.item() == -math.inf


def _aniso(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 2, generator=g, dtype=DT)
    Y = torch.sin(6 * X[:, :1]) + 0.3 * X[:, 1:]  # fast in x1, nearly linear in x2
    return X, Y


def test_ard_is_a_local_optimum_and_finds_the_anisotropy():
    X, Y = _aniso()
    ff = FourierFeatures(2, 128, generator=torch.Generator().manual_seed(0)).to(DT)
    noise_prior = default_noise_prior()
    fit = fit_lengthscales(ff, X, Y, noise_prior=noise_prior)
    assert fit.lengthscale[1] > 3 * fit.lengthscale[0]
    ones = torch.ones(X.shape[0], 1, dtype=DT)
    ls_prior = default_lengthscale_prior(2)

    def objective(ls, delta, sigma):
        phi = torch.cat([ff.features(X, ls), ones], 1)
        return (linear_model_log_evidence(phi, Y, delta, sigma**2)
                + noise_prior.log_prob(sigma**2) + ls_prior.log_prob(ls).sum()).item()

    best = objective(fit.lengthscale, fit.prior_precision, fit.sigma_noise)
    assert best == pytest.approx(fit.objective, rel=1e-10)
    for i in range(2):  # no coordinate move improves on the returned optimum
        for step in (0.97, 1.03):
            ls = fit.lengthscale.clone()
            ls[i] *= step
            assert objective(ls, fit.prior_precision, fit.sigma_noise) <= best + 1e-6
    for step in (0.97, 1.03):
        delta = fit.prior_precision * step
        assert objective(fit.lengthscale, delta, fit.sigma_noise) <= best + 1e-6
    # noiseless data: the noise sits on its floor min_noise = 1e-3 (only moves up are allowed)
    assert fit.sigma_noise.item() == pytest.approx(1e-3, rel=1e-3)
    assert objective(fit.lengthscale, fit.prior_precision, fit.sigma_noise * 1.03) <= best + 1e-6
    assert not any(b.requires_grad for b in ff.buffers())
    torch.testing.assert_close(ff.lengthscale, torch.ones(2, dtype=DT))  # not modified


def test_default_model_uses_the_ard_fit_and_its_evidence_agrees_with_the_laplace_glm():
    """The model's evidence (GaussianGLM on the Laplace curvature, checked against jacrev in
    test_glm) equals the closed-form evidence of Bayesian linear regression on the fitted
    ARD features: two independent computations of one number."""
    X, Y = _aniso(30)
    model = LaplaceModel(X, Y, seed=0, num_features=64)
    feats = model.net[0]
    torch.testing.assert_close(feats.lengthscale, model.ard.lengthscale)
    assert feats.lengthscale[1] > feats.lengthscale[0]
    phi = torch.cat([feats(X), torch.ones(30, 1, dtype=DT)], 1)
    delta, sigma = model.la.prior_precision.reshape(()), model.la.sigma_noise.reshape(())
    ev = linear_model_log_evidence(phi, Y, delta, sigma**2)
    expected = ev + noise_log_prior(default_noise_prior(), sigma)
    assert model.log_evidence == pytest.approx(expected.item(), rel=1e-8)
    # the Laplace-side tuning starts from the ARD optimum and keeps the best iterate
    lp = default_lengthscale_prior(2).log_prob(model.ard.lengthscale).sum().item()
    assert model.log_evidence >= model.ard.objective - lp - 1e-6


def test_ard_on_a_subsample_and_with_fixed_noise():
    X, Y = _aniso(60)
    model = LaplaceModel(X, Y, seed=0, num_features=32, ard_points=25, noise=0.05)
    assert model.la.sigma_noise.item() == pytest.approx(0.05)
    assert model.ard.sigma_noise.item() == pytest.approx(0.05)
    assert torch.isfinite(model.posterior(X[:3, None]).mean).all()


def test_bad_lengthscales_option():
    X, Y = _aniso(10)
    with pytest.raises(ValueError, match="lengthscales"):
        LaplaceModel(X, Y, lengthscales="auto")
    ff = FourierFeatures(2, 4)
    with pytest.raises(ValueError, match="lengthscale"):
        ff.set_lengthscale([1.0, -1.0])


def test_bo_example_loop_runs_and_regret_is_monotone():
    """Smoke test of ``examples/bo_branin_hartmann.py`` (the loop users copy)."""
    import importlib.util
    from pathlib import Path

    from botorch.test_functions import Branin

    path = Path(__file__).resolve().parents[1] / "examples" / "bo_branin_hartmann.py"
    spec = importlib.util.spec_from_file_location("bo_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    regret = example.optimize(Branin(negate=True).to(DT), n_init=5, n_evals=3, seed=0)
    assert regret.shape == (3,) and torch.isfinite(regret).all() and (regret >= 0).all()
    assert (regret[1:] <= regret[:-1]).all()


def test_fit_lengthscales_validates_its_inputs():
    from bayescurv.errors import NonFiniteError, ShapeError

    ff = FourierFeatures(2, 8).to(DT)
    X, Y = _aniso(10)
    with pytest.raises(ShapeError):
        fit_lengthscales(ff, X[:, :1], Y)
    with pytest.raises(ShapeError):
        fit_lengthscales(ff, X, Y[:5])
    Y[0] = math.nan
    with pytest.raises(NonFiniteError):
        fit_lengthscales(ff, X, Y)


def test_refined_model_keeps_the_ard_lengthscales():
    X, Y = _aniso(30)
    model = LaplaceModel(X, Y, seed=0, num_features=32)
    new = model.condition_on_observations(X[:3] * 0.5, Y[:3])
    assert new.ard is model.ard
    torch.testing.assert_close(new.net[0].lengthscale, model.net[0].lengthscale)
    assert LaplaceModel(X, Y, seed=0, num_features=32, lengthscales=(0.3,)).ard is None
