"""Exact linearized Gaussian model (:mod:`bayescurv.laplace.glm`) against dense float64
references built from whole-net Jacobians."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import Laplace
from bayescurv.errors import InvalidArgumentError
from bayescurv.laplace.glm import GaussianGLM

DT = torch.float64


def _setup(subset="all", outputs=2, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, outputs)).to(DT)
    X = torch.randn(20, 3, dtype=DT)
    Y = torch.sin(X[:, :1]) + 0.3 * torch.randn(20, outputs, dtype=DT)
    data = [(X[:12], Y[:12]), (X[12:], Y[12:])]
    prior = torch.tensor([0.7, 1.3] if subset == "all" else [0.7], dtype=DT)
    la = Laplace(net, "regression", subset=subset, structure="full",
                 prior_precision=prior, sigma_noise=0.4)
    la.fit(data, progress=False)
    return net, la, data, X, Y


def _dense(la, X, Y, prior, sigma):
    """J, r~, the exact evidence and posterior mean of the linear model, densely."""
    params = la.params
    theta = params.vector()
    J = torch.func.jacrev(lambda v: params.functional_call(v, X).reshape(-1))(theta)
    J = la.posterior_entries(J.T).T
    r = (Y - params.model(X)).reshape(-1).detach() + J @ la.mean
    D = torch.diag(la.prior_diagonal(prior))
    cov = J @ torch.linalg.inv(D) @ J.T + sigma**2 * torch.eye(J.shape[0], dtype=DT)
    ev = torch.distributions.MultivariateNormal(torch.zeros_like(r), cov).log_prob(r)
    mean = torch.linalg.solve(J.T @ J / sigma**2 + D, J.T @ r / sigma**2)
    return J, ev, mean


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("sigma", [0.4, 0.01])
def test_evidence_and_mean_match_dense_linear_gaussian(subset, sigma):
    net, la, data, X, Y = _setup(subset)
    glm = GaussianGLM(la, data)
    prior = torch.tensor([0.3, 2.0] if subset == "all" else [0.3], dtype=DT)
    s = torch.tensor(sigma, dtype=DT)
    _, ev, mean = _dense(la, X, Y, prior, s)
    torch.testing.assert_close(glm.log_marginal_likelihood(prior, s), ev, rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(glm.posterior_mean(prior, s), mean, rtol=1e-8, atol=1e-9)


def test_evidence_is_differentiable_and_gradient_matches_dense():
    net, la, data, X, Y = _setup()
    glm = GaussianGLM(la, data)
    lp = torch.tensor([0.1, -0.4], dtype=DT, requires_grad=True)
    ls = torch.tensor(-1.0, dtype=DT, requires_grad=True)
    g1 = torch.autograd.grad(glm.log_marginal_likelihood(lp.exp(), ls.exp()), (lp, ls))
    lp2, ls2 = lp.detach().clone().requires_grad_(), ls.detach().clone().requires_grad_()
    g2 = torch.autograd.grad(_dense(la, X, Y, lp2.exp(), ls2.exp())[1], (lp2, ls2))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_laplace_evidence_at_the_linear_posterior_mean_is_exact():
    """Theorem: for a linear-Gaussian model the Laplace approximation is exact. With only the
    (linear) last layer in the posterior, moving its weights to the linear model's posterior
    mean and refitting makes the ordinary Laplace evidence equal the exact one."""
    net, la, data, X, Y = _setup("last_layer")
    glm = GaussianGLM(la, data)
    theta_bar = glm.posterior_mean()
    exact = glm.log_marginal_likelihood()
    offset = glm.mean_offset(X, theta_bar)
    la.params.assign(la.with_posterior_entries(theta_bar, la.params.vector()))
    la.fit(data, progress=False)
    torch.testing.assert_close(la.log_marginal_likelihood(), exact, rtol=1e-10, atol=1e-9)
    # the linearization of a linear layer is exact: f(x; θ̄) = f(x; θ*) + J(x)(θ̄ - θ*)
    before = la.params.functional_call(la.with_posterior_entries(glm.theta, la.params.vector()), X)
    torch.testing.assert_close(net(X), before + offset, rtol=1e-10, atol=1e-10)


def test_mean_offset_matches_jacobian_product():
    net, la, data, X, Y = _setup("all")
    glm = GaussianGLM(la, data)
    theta_bar = glm.posterior_mean(sigma_noise=torch.tensor(0.05, dtype=DT))
    J, _, _ = _dense(la, X, Y, la.prior_precision, la.sigma_noise)
    want = (J @ (theta_bar - la.mean)).reshape(X.shape[0], -1)
    torch.testing.assert_close(glm.mean_offset(X, theta_bar), want, rtol=1e-9, atol=1e-10)


def test_refuses_approximate_structures():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    X, Y = torch.randn(8, 3, dtype=DT), torch.randn(8, 1, dtype=DT)
    la = Laplace(net, "regression", structure="kfac").fit([(X, Y)], progress=False)
    with pytest.raises(InvalidArgumentError, match="structure='full'"):
        GaussianGLM(la, [(X, Y)])
    la = Laplace(net, "classification", structure="full").fit(
        [(X, torch.zeros(8, dtype=torch.long))], progress=False)
    with pytest.raises(InvalidArgumentError, match="regression"):
        GaussianGLM(la, [(X, torch.zeros(8, dtype=torch.long))])
