"""Observation-noise tuning with a K-FAC posterior against the dense evidence of the *same*
Kronecker matrix (issue 11, item 6).

K-FAC tunes a much larger noise than ``full`` on an over-parameterised regression MLP. That
is a property of the approximation, not a bug: ``G ⊗ A`` has far more non-negligible
eigenvalues than the GGN (whose rank is at most ``N·C``), so its Occam term
``-½ Σ log(λ/σ² + δ)`` pays for every small ``σ``. These tests pin down that our optimizer
finds the optimum of exactly that evidence, and that its gradient in ``σ`` is the true one
(laplace-torch 0.3's Kron drops the ``σ``-dependence of the log determinant from the
gradient and ends at the maximum-likelihood noise of the residuals; see docs/laplace.md).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescurv import Laplace


@pytest.fixture(scope="module")
def fitted():
    """A 1-16-16-2 tanh MLP trained to near interpolation on 40 points, noise 0.1 / 0.5."""
    g = torch.Generator().manual_seed(0)
    n = 40
    x = torch.rand(n, 1, generator=g, dtype=torch.float64) * 6 - 3
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([0.1, 0.5],
                                                                                 dtype=torch.float64)
    y = torch.cat([torch.sin(x), torch.cos(x)], 1) + noise
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 2)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2000):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    return model, loader


def _dense_evidence(la: Laplace, evals: torch.Tensor, sigma, delta) -> torch.Tensor:
    """log p(D|θ*) + log N(θ*; 0, δ⁻¹ I) + (P/2) log 2π − ½ log det(H/σ² + δ I), from the
    eigenvalues of the dense ``H``; ``sigma`` and ``delta`` broadcast (floats or tensors)."""
    theta, sse = la.mean, la._sse
    n, c, p = la.num_data, la.num_outputs, theta.numel()
    sigma = torch.as_tensor(sigma, dtype=evals.dtype)
    delta = torch.as_tensor(delta, dtype=evals.dtype)
    loglik = (-0.5 * sse.sum() / sigma**2 - n * c * torch.log(sigma)
              - 0.5 * n * c * math.log(2 * math.pi))
    logprior = -0.5 * delta * theta.square().sum() + 0.5 * p * torch.log(delta)
    logdet = torch.log(evals / sigma[..., None] ** 2 + delta[..., None]).sum(-1)
    return loglik + logprior - 0.5 * logdet


def _grid_optimum(la: Laplace, evals: torch.Tensor) -> tuple[float, float, float]:
    """Maximum of the dense evidence over a log grid in (σ, δ), refined twice around the
    best point (final spacing ~0.2 % in σ and δ)."""
    lo_s, hi_s, lo_d, hi_d = -3.0, 3.0, -4.0, 3.0
    for _ in range(3):
        ls = torch.linspace(lo_s, hi_s, 61, dtype=evals.dtype)[:, None]
        ld = torch.linspace(lo_d, hi_d, 61, dtype=evals.dtype)[None, :]
        v = _dense_evidence(la, evals, ls.exp().expand(61, 61), ld.exp().expand(61, 61))
        i, j = divmod(int(v.argmax()), 61)
        best = (float(v[i, j]), float(ls[i, 0]), float(ld[0, j]))
        ws, wd = (hi_s - lo_s) / 20, (hi_d - lo_d) / 20
        lo_s, hi_s, lo_d, hi_d = best[1] - ws, best[1] + ws, best[2] - wd, best[2] + wd
    return best[0], math.exp(best[1]), math.exp(best[2])


def test_kfac_tuned_noise_is_the_dense_kronecker_evidence_optimum(fitted):
    model, loader = fitted
    la = Laplace(model, "regression", structure="kfac")
    la.fit(loader, progress=False)
    h = la.curvature.to_dense()
    evals = torch.linalg.eigvalsh(0.5 * (h + h.T)).clamp_min(0)
    best, sigma_ref, delta_ref = _grid_optimum(la, evals)

    la.optimize_prior_precision(tune_sigma_noise=True, n_steps=400)
    sigma, delta = la.sigma_noise.item(), la.prior_precision.item()
    # our structured evidence is the dense evidence of the same matrix
    ours = la.log_marginal_likelihood().item()
    assert ours == pytest.approx(float(_dense_evidence(la, evals, sigma, delta)), rel=1e-10,
                                 abs=1e-8)
    # and the optimizer reaches its maximum
    assert ours >= best - 1e-3
    assert sigma == pytest.approx(sigma_ref, rel=0.01)
    assert delta == pytest.approx(delta_ref, rel=0.03)

    # the documented property: K-FAC's evidence prefers a much larger noise than the
    # dense GGN's on this over-parameterised fit (the residual RMS is far below both)
    full = Laplace(model, "regression", structure="full")
    full.fit(loader, progress=False)
    full.optimize_prior_precision(tune_sigma_noise=True, n_steps=400)
    rms = (la._sse.sum() / (la.num_data * la.num_outputs)).sqrt().item()
    print(f"kfac sigma {sigma:.4f} delta {delta:.4g} (dense grid {sigma_ref:.4f}, "
          f"{delta_ref:.4g}); full sigma {full.sigma_noise.item():.4f}; residual rms {rms:.4f}")
    assert sigma > 2 * full.sigma_noise.item() > 2 * rms


@pytest.mark.parametrize("sigma", [0.2, 1.0, 3.0])
def test_kfac_evidence_gradient_in_noise_matches_dense(fitted, sigma):
    model, loader = fitted
    la = Laplace(model, "regression", structure="kfac")
    la.fit(loader, progress=False)
    h = la.curvature.to_dense()
    evals = torch.linalg.eigvalsh(0.5 * (h + h.T)).clamp_min(0)
    delta = 0.1
    s = torch.tensor(sigma, dtype=torch.float64, requires_grad=True)
    d = torch.tensor(delta, dtype=torch.float64, requires_grad=True)
    gs, gd = torch.autograd.grad(la.log_marginal_likelihood(d, s), (s, d))
    eps = 1e-5
    fd_s = float(_dense_evidence(la, evals, sigma + eps, delta)
                 - _dense_evidence(la, evals, sigma - eps, delta)) / (2 * eps)
    fd_d = float(_dense_evidence(la, evals, sigma, delta + eps)
                 - _dense_evidence(la, evals, sigma, delta - eps)) / (2 * eps)
    assert gs.item() == pytest.approx(fd_s, rel=1e-6, abs=1e-6)
    assert gd.item() == pytest.approx(fd_d, rel=1e-6, abs=1e-6)
