"""Laplace posteriors against dense float64 references and exact Bayesian linear regression."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace, errors
from bayescurv.likelihoods import get_likelihood
from bayescurv.params import select

DT = torch.float64


def mlp(d_in=4, hidden=5, d_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(DT)


def data(n=23, d_in=4, d_out=3, task="classification", seed=1, batch_size=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=DT)
    if task == "classification":
        y = torch.randint(0, d_out, (n,), generator=g)
    elif task == "binary":
        y = torch.randint(0, 2, (n,), generator=g).to(DT)
    else:
        y = torch.randn(n, d_out, generator=g, dtype=DT)
    return x, y, DataLoader(TensorDataset(x, y), batch_size=batch_size)


def dense_ggn(model, likelihood, x, subset="all", sigma=1.0):
    ps = select(model, subset)
    lik = get_likelihood(likelihood, sigma)
    jac = torch.func.jacrev(lambda v: ps.functional_call(v, x))(ps.vector())  # (N, C, P)
    if jac.dim() == 2:
        jac = jac.unsqueeze(1)
    f = model(x).detach()
    h = lik.hessian(f if f.dim() == 2 else f.unsqueeze(-1))
    return torch.einsum("ncp,ncd,ndq->pq", jac, h, jac), jac


def dense_logml(model, likelihood, x, y, prior, subset="all", sigma=1.0):
    ggn, _ = dense_ggn(model, likelihood, x, subset, sigma)
    ps = select(model, subset)
    theta = ps.vector()
    lik = get_likelihood(likelihood, sigma)
    f = model(x).detach()
    loglik = -lik.nll(*lik.check(f, y))
    delta = torch.as_tensor(prior, dtype=DT).expand(theta.numel())
    lam = ggn + torch.diag(delta)
    return (loglik - 0.5 * (delta * theta**2).sum() + 0.5 * delta.log().sum()
            - 0.5 * torch.logdet(lam))


@pytest.mark.parametrize("likelihood,d_out", [("classification", 3), ("regression", 2),
                                              ("binary", 1)])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_log_marginal_likelihood_matches_dense_formula(likelihood, d_out, subset):
    model = mlp(d_out=d_out)
    x, y, dl = data(d_out=d_out, task=likelihood)
    sigma = 0.7 if likelihood == "regression" else 1.0
    la = Laplace(model, likelihood, subset=subset, structure="full", prior_precision=0.5,
                 sigma_noise=sigma).fit(dl, progress=False)
    ref = dense_logml(model, likelihood, x, y, 0.5, subset, sigma)
    torch.testing.assert_close(la.log_marginal_likelihood(), ref, rtol=1e-10, atol=1e-10)
    # at other hyperparameters, without refitting
    if likelihood == "regression":
        ref2 = dense_logml(model, likelihood, x, y, 2.0, subset, 0.3)
        got = la.log_marginal_likelihood(torch.tensor(2.0, dtype=DT), torch.tensor(0.3, dtype=DT))
        torch.testing.assert_close(got, ref2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("structure", ["diag", "kfac", "ekfac"])
def test_structured_logml_uses_its_own_precision(structure):
    model = mlp()
    x, y, dl = data()
    la = Laplace(model, "classification", structure=structure, prior_precision=0.3).fit(
        dl, progress=False)
    lam = la.posterior_precision.to_dense()
    theta = la.mean
    lik = get_likelihood("classification")
    loglik = -lik.nll(model(x).detach(), y)
    ref = loglik - 0.5 * 0.3 * (theta**2).sum() + 0.5 * theta.numel() * math.log(0.3) \
        - 0.5 * torch.logdet(lam)
    torch.testing.assert_close(la.log_marginal_likelihood(), ref, rtol=1e-10, atol=1e-10)


def test_logml_differentiable_in_prior_and_noise():
    model = mlp(d_out=2)
    x, y, dl = data(d_out=2, task="regression")
    la = Laplace(model, "regression", structure="kfac").fit(dl, progress=False)
    prior = torch.tensor([0.5, 2.0], dtype=DT, requires_grad=True)  # per layer
    sigma = torch.tensor(0.8, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p, s: la.log_marginal_likelihood(p, s), (prior, sigma))


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "kfac-reduce", "ekfac", "lowrank",
                                       "diag+lowrank"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_functional_covariance_matches_dense_jacobian(structure, subset):
    model = mlp()
    x, y, dl = data()
    la = Laplace(model, "classification", subset=subset, structure=structure,
                 prior_precision=0.7).fit(dl, progress=False)
    ps = select(model, subset)
    xt = torch.randn(5, 4, dtype=DT)
    jac = torch.func.jacrev(lambda v: ps.functional_call(v, xt))(ps.vector())
    sigma = torch.linalg.inv(la.posterior_precision.to_dense())
    ref = torch.einsum("ncp,pq,mdq->ncmd", jac, sigma, jac)
    mean, cov = la.functional(xt)
    torch.testing.assert_close(mean, model(xt))
    torch.testing.assert_close(cov, torch.diagonal(ref, dim1=0, dim2=2).permute(2, 0, 1))
    _, joint = la.functional(xt, joint=True)
    torch.testing.assert_close(joint, ref.reshape(15, 15))


def test_kfac_exact_for_deep_linear_gaussian():
    """K-FAC expand equals the GGN's layer blocks for a deep linear net with Gaussian
    likelihood (the backpropagated vectors do not depend on the data point)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(DT)
    x, y, dl = data(n=17, d_in=3, d_out=2, task="regression")
    la = Laplace(model, "regression", structure="kfac").fit(dl, progress=False)
    ggn, _ = dense_ggn(model, "regression", x)
    h = la.curvature.to_dense()
    for sl in (slice(0, 16), slice(16, 26)):
        torch.testing.assert_close(h[sl, sl], ggn[sl, sl])


def test_linear_gaussian_model_is_exact_bayesian_linear_regression():
    """For f(x) = w·x + b with Gaussian noise, the Laplace posterior, evidence and
    predictive are the exact conjugate ones."""
    g = torch.Generator().manual_seed(3)
    n, d, sigma, delta = 40, 3, 0.4, 2.0
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=DT) + 0.3 + sigma * torch.randn(
        n, generator=g, dtype=DT)
    phi = torch.cat([x, torch.ones(n, 1, dtype=DT)], 1)  # weight then bias: flat order
    precision = phi.T @ phi / sigma**2 + delta * torch.eye(d + 1, dtype=DT)
    post_mean = torch.linalg.solve(precision, phi.T @ y / sigma**2)
    model = nn.Linear(d, 1).to(DT)
    with torch.no_grad():
        model.weight.copy_(post_mean[:d].unsqueeze(0))
        model.bias.copy_(post_mean[d:])
    dl = DataLoader(TensorDataset(x, y.unsqueeze(-1)), batch_size=16)
    evidence = torch.distributions.MultivariateNormal(
        torch.zeros(n, dtype=DT), sigma**2 * torch.eye(n, dtype=DT) + phi @ phi.T / delta
    ).log_prob(y)
    xt = torch.randn(6, d, dtype=DT)
    phit = torch.cat([xt, torch.ones(6, 1, dtype=DT)], 1)
    pred_var = (phit @ torch.linalg.solve(precision, phit.T)).diagonal() + sigma**2
    for structure in ("full", "kfac", "ekfac"):
        la = Laplace(model, "regression", structure=structure, prior_precision=delta,
                     sigma_noise=sigma).fit(dl, progress=False)
        torch.testing.assert_close(la.posterior_precision.to_dense(), precision)
        torch.testing.assert_close(la.log_marginal_likelihood(), evidence)
        mean, var = la.predict(xt)
        torch.testing.assert_close(mean.squeeze(-1), phit @ post_mean)
        torch.testing.assert_close(var.squeeze(-1), pred_var)
    la = Laplace(model, "regression", structure="diag", prior_precision=delta,
                 sigma_noise=sigma).fit(dl, progress=False)
    torch.testing.assert_close(la.posterior_precision.diagonal(), precision.diagonal())


def test_optimized_prior_matches_dense_grid_search():
    model = mlp()
    x, y, dl = data(n=40)
    la = Laplace(model, "classification", structure="full").fit(dl, progress=False)
    tuned = la.optimize_prior_precision(n_steps=300)
    grid = torch.logspace(-3, 3, 2001, dtype=DT)
    values = torch.stack([dense_logml(model, "classification", x, y, float(p)) for p in grid])
    best = grid[values.argmax()]
    assert abs(math.log(float(tuned)) - math.log(float(best))) < 0.02
    torch.testing.assert_close(la.log_marginal_likelihood(), values.max(), rtol=1e-6, atol=1e-6)


def test_layerwise_prior_improves_evidence():
    model = mlp()
    _, _, dl = data(n=40)
    la = Laplace(model, "classification", structure="kfac").fit(dl, progress=False)
    la.optimize_prior_precision(granularity="scalar", n_steps=200)
    scalar = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(granularity="layer", n_steps=200)
    assert la.prior_precision.shape == (2,)
    assert la.log_marginal_likelihood().item() >= scalar - 1e-6


def test_sigma_noise_tuning_recovers_noise():
    g = torch.Generator().manual_seed(0)
    n = 400
    x = torch.randn(n, 2, generator=g, dtype=DT)
    y = (x @ torch.tensor([[1.5], [-1.0]], dtype=DT)) + 0.25 * torch.randn(n, 1, generator=g,
                                                                          dtype=DT)
    model = nn.Linear(2, 1).to(DT)
    with torch.no_grad():
        sol = torch.linalg.lstsq(torch.cat([x, torch.ones(n, 1, dtype=DT)], 1), y).solution
        model.weight.copy_(sol[:2].T)
        model.bias.copy_(sol[2])
    la = Laplace(model, "regression", structure="full").fit(
        DataLoader(TensorDataset(x, y), batch_size=100), progress=False)
    la.optimize_prior_precision(tune_sigma_noise=True, n_steps=500)
    assert abs(float(la.sigma_noise) - 0.25) < 0.03


def test_samples_have_posterior_moments():
    model = mlp(d_in=2, hidden=3, d_out=2)
    _, _, dl = data(d_in=2, d_out=2)
    la = Laplace(model, "classification", structure="kfac", prior_precision=1.0).fit(
        dl, progress=False)
    s = la.sample(20000, generator=torch.Generator().manual_seed(0))
    cov = torch.linalg.inv(la.posterior_precision.to_dense())
    torch.testing.assert_close(s.mean(0), la.mean, atol=4 * cov.diagonal().sqrt().max() / 100,
                               rtol=0)
    torch.testing.assert_close(torch.cov(s.T), cov, atol=0.05 * cov.abs().max(), rtol=0)
    s2 = la.sample(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s2, la.sample(3, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("link", ["probit", "bridge", "mc"])
def test_predict_classification_probabilities(link):
    model = mlp()
    x, _, dl = data()
    la = Laplace(model, "classification", structure="kfac").fit(dl, progress=False)
    p = la.predict(x[:6], link=link, generator=torch.Generator().manual_seed(0))
    assert p.shape == (6, 3)
    torch.testing.assert_close(p.sum(-1), torch.ones(6, dtype=DT))
    # the predictive is less confident than the MAP on average
    assert p.max(-1).values.mean() <= torch.softmax(model(x[:6]), -1).max(-1).values.mean()


def test_predict_nn_sampling_close_to_glm_for_small_variance():
    model = mlp()
    x, _, dl = data()
    la = Laplace(model, "classification", structure="diag", prior_precision=1e4).fit(
        dl, progress=False)
    p_nn = la.predict(x[:5], pred_type="nn", num_samples=200,
                      generator=torch.Generator().manual_seed(0))
    p_glm = la.predict(x[:5])
    torch.testing.assert_close(p_nn, p_glm, atol=5e-3, rtol=0)
    torch.testing.assert_close(la.params.vector(), la.mean)  # weights restored


def test_binary_predict_shape():
    model = mlp(d_out=1)
    x, _, dl = data(d_out=1, task="binary")
    la = Laplace(model, "binary", structure="kfac").fit(dl, progress=False)
    p = la.predict(x[:4])
    assert p.shape == (4,) and ((p > 0) & (p < 1)).all()


# ---------------------------------------------------------------- bad input


def test_unknown_likelihood_and_structure():
    with pytest.raises(errors.InvalidArgumentError, match="unknown likelihood"):
        Laplace(mlp(), "poissonish")
    with pytest.raises(errors.InvalidArgumentError, match="unknown structure"):
        Laplace(mlp(), "classification", structure="kronecker")
    with pytest.raises(errors.InvalidArgumentError, match="unknown subset"):
        Laplace(mlp(), "classification", subset="first_layer")


def test_targets_that_do_not_fit_the_likelihood():
    x = torch.randn(8, 4, dtype=DT)
    dl = DataLoader(TensorDataset(x, torch.randn(8, 3, dtype=DT)), batch_size=4)
    with pytest.raises(errors.ShapeError, match="class indices"):
        Laplace(mlp(), "classification").fit(dl, progress=False)
    dl = DataLoader(TensorDataset(x, torch.randint(0, 7, (8,))), batch_size=4)
    with pytest.raises(errors.ShapeError, match=r"\[0, 2\]"):
        Laplace(mlp(), "classification").fit(dl, progress=False)
    dl = DataLoader(TensorDataset(x, torch.randn(8, 2, dtype=DT)), batch_size=4)
    with pytest.raises(errors.ShapeError, match="regression targets"):
        Laplace(mlp(), "regression").fit(dl, progress=False)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(3, dtype=DT))

    def forward(self, x):
        return x * self.alpha


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Linear(4, 3), Scale()).to(DT)
    _, _, dl = data()
    with pytest.raises(errors.UnsupportedLayerError, match="'1'.*Scale"):
        Laplace(model, "classification", structure="kfac",
                unknown_layers="error").fit(dl, progress=False)
    # by default (and opting in) per-sample gradients of that module: exact
    x = torch.cat([b[0] for b in dl])
    ggn, _ = dense_ggn(model, "classification", x)
    for option in ("auto", "per_sample"):
        la = Laplace(model, "classification", structure="full",
                     unknown_layers=option).fit(dl, progress=False)
        torch.testing.assert_close(la.curvature.to_dense(), ggn)


def test_non_finite_data():
    x = torch.randn(8, 4, dtype=DT)
    x[3, 1] = float("nan")
    dl = DataLoader(TensorDataset(x, torch.randint(0, 3, (8,))), batch_size=4)
    with pytest.raises(errors.NonFiniteError, match="NaN or Inf"):
        Laplace(mlp(), "classification").fit(dl, progress=False)
    la = Laplace(mlp(), "classification").fit(data()[2], progress=False)
    with pytest.raises(errors.NonFiniteError):
        la.predict(x)


def test_predict_before_fit():
    la = Laplace(mlp(), "classification")
    with pytest.raises(errors.NotFittedError, match="fit"):
        la.predict(torch.randn(2, 4, dtype=DT))
    with pytest.raises(errors.NotFittedError):
        la.log_marginal_likelihood()
    with pytest.raises(errors.NotFittedError):
        la.sample(3)


def test_empty_loader():
    with pytest.raises(errors.EmptyDataError, match="no data"):
        Laplace(mlp(), "classification").fit([], progress=False)
    empty = DataLoader(TensorDataset(torch.zeros(0, 4, dtype=DT),
                                     torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(errors.EmptyDataError):
        Laplace(mlp(), "classification").fit(empty, progress=False)


def test_bad_hyperparameters():
    with pytest.raises(errors.InvalidArgumentError, match="positive"):
        Laplace(mlp(), "classification", prior_precision=-1.0)
    with pytest.raises(errors.ShapeError, match="per layer"):
        Laplace(mlp(), "classification", prior_precision=torch.ones(5))
    with pytest.raises(errors.InvalidArgumentError, match="sigma_noise"):
        Laplace(mlp(), "regression", sigma_noise=0.0)
    la = Laplace(mlp(), "classification").fit(data()[2], progress=False)
    with pytest.raises(errors.InvalidArgumentError, match="granularity"):
        la.optimize_prior_precision(granularity="block")
    with pytest.raises(errors.InvalidArgumentError, match="link"):
        la.predict(torch.randn(2, 4, dtype=DT), link="logit")


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_per_output_noise_matches_dense(structure):
    model = mlp(d_out=2)
    x, y, dl = data(d_out=2, task="regression")
    sigma = torch.tensor([0.5, 2.0], dtype=DT)
    la = Laplace(model, "regression", structure=structure, prior_precision=0.7,
                 sigma_noise=sigma).fit(dl, progress=False)
    ps = select(model, "all")
    jac = torch.func.jacrev(lambda v: ps.functional_call(v, x))(ps.vector())
    ggn = torch.einsum("ncp,c,ncq->pq", jac, 1 / sigma**2, jac)
    if structure == "diag":
        ggn = torch.diag(ggn.diagonal())
    lam = ggn + 0.7 * torch.eye(ggn.shape[0], dtype=DT)
    torch.testing.assert_close(la.posterior_precision.to_dense(), lam)
    theta = ps.vector()
    loglik = torch.distributions.Normal(model(x), sigma).log_prob(y).sum()
    ref = (loglik - 0.35 * (theta**2).sum() + 0.5 * theta.numel() * math.log(0.7)
           - 0.5 * torch.logdet(lam))
    torch.testing.assert_close(la.log_marginal_likelihood(), ref)
    s = torch.tensor([0.8, 1.3], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: la.log_marginal_likelihood(sigma_noise=s), (s,))
    mean, var = la.predict(x[:3])
    assert var.shape == (3, 2)
    la.optimize_prior_precision(tune_sigma_noise=True, n_steps=20)
    assert la.sigma_noise.shape == (2,)


def test_per_output_noise_refused_for_kronecker():
    with pytest.raises(errors.InvalidArgumentError, match="per-output"):
        Laplace(mlp(d_out=2), "regression", structure="kfac",
                sigma_noise=torch.tensor([0.5, 1.0]))


def test_per_output_noise_must_fit_the_outputs():
    _, _, dl = data(d_out=2, task="regression")
    with pytest.raises(errors.ShapeError, match="3 entries"):
        Laplace(mlp(d_out=2), "regression", structure="full",
                sigma_noise=torch.tensor([0.5, 1.0, 2.0], dtype=DT)).fit(dl, progress=False)


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_regression_curvature_scales_correctly_with_noise(kind):
    """Fitted at unit noise and rescaled: GGN by 1/σ², empirical Fisher by 1/σ⁴."""
    from bayescurv import compute
    from bayescurv.likelihoods import Gaussian

    model = mlp(d_out=2)
    _, _, dl = data(d_out=2, task="regression")
    la = Laplace(model, "regression", structure="full", kind=kind, sigma_noise=0.5,
                 prior_precision=1.0).fit(dl, progress=False)
    ref = compute(model, Gaussian(0.5), dl, structure="full", kind=kind).matrix.to_dense()
    torch.testing.assert_close(la.posterior_precision.to_dense(),
                               ref + torch.eye(ref.shape[0], dtype=DT))


@pytest.mark.parametrize("cliff", [0.5, 1.5])
def test_lbfgs_tuner_never_evaluates_nan_variables(cliff):
    """A non-finite trial value makes the strong-Wolfe line search step to NaN; the tuner
    treats that point as a failed step instead of handing it to the objective, whose
    hyperprior would raise (the ARD fit of the BO surrogate failed on Branin this way)."""
    from bayescurv.laplace.marglik import maximize_lbfgs

    prior = torch.distributions.LogNormal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    seen = []

    def objective():
        seen.append(z.detach().clone())
        value = -(z[0] - 3) ** 2 + prior.log_prob(z[0].exp())  # raises on NaN
        return torch.where(z[0] > cliff, torch.full_like(value, math.inf), value)

    value, _, _ = maximize_lbfgs(objective, [z], 50, keep_best=True)
    assert all(torch.isfinite(s).all() for s in seen)
    # the best finite iterate below the cliff is kept
    assert math.isfinite(value) and z.item() <= cliff
    assert value == pytest.approx(objective().item())
