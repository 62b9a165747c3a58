"""``granularity="tensor"``: one prior precision per parameter tensor (weights and biases
apart), exact for every structure — for Kronecker blocks through
:class:`~bayescurv.linalg.kronecker_column.KroneckerColumnShift`."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bayescurv import Laplace
from bayescurv.errors import ShapeError
from bayescurv.linalg import KroneckerEigen
from bayescurv.linalg.kronecker_column import KroneckerColumnShift


def _psd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    return x @ x.T / n


@pytest.mark.parametrize("delta", [2.5, -0.3])
def test_column_shift_operator_matches_dense(delta):
    p, q, j = 3, 4, 3
    base = KroneckerEigen.from_factors(_psd(p, 0), _psd(q, 1)).scale(0.7).add_diagonal(0.5)
    op = KroneckerColumnShift(base, j, torch.tensor(delta, dtype=torch.float64))
    shift = torch.zeros(p, q, dtype=torch.float64)
    shift[:, j] = delta
    dense = base.to_dense() + torch.diag(shift.reshape(-1))
    v = torch.randn(p * q, 2, dtype=torch.float64)
    assert torch.allclose(op.to_dense(), dense)
    assert torch.allclose(op.matvec(v), dense @ v)
    assert torch.allclose(op.solve(v), torch.linalg.solve(dense, v))
    assert torch.allclose(op.logdet(), torch.logdet(dense))
    assert torch.allclose(op.diagonal(), dense.diagonal())
    assert torch.allclose(op.inv_diagonal(), torch.linalg.inv(dense).diagonal())
    r = torch.stack([op.inv_sqrt_matvec(e) for e in torch.eye(p * q, dtype=torch.float64)], 1)
    assert torch.allclose(r @ r.T, torch.linalg.inv(dense))
    r = torch.stack([op.sqrt_matvec(e) for e in torch.eye(p * q, dtype=torch.float64)], 1)
    assert torch.allclose(r @ r.T, dense)
    assert torch.allclose(op.scale(2.0).add_diagonal(0.1).to_dense(),
                          2 * dense + 0.1 * torch.eye(p * q, dtype=torch.float64))


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3),
                          nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(20, 2, 8, dtype=torch.float64)
    y = torch.randint(0, 2, (20,))
    return model, x, [(x[:9], y[:9]), (x[9:], y[9:])]


@pytest.mark.parametrize("structure", ["diag", "full", "kfac", "kfac-reduce", "ekfac"])
def test_per_tensor_prior_evidence_and_predictive_match_dense(structure):
    model, x, loader = _model_and_data()
    la = Laplace(model, "classification", structure=structure).fit(loader, progress=False)
    assert la.num_tensors == 6 and la.num_layers == 3
    prior = torch.tensor([0.3, 2.0, 0.7, 5.0, 1.1, 0.2], dtype=torch.float64,
                         requires_grad=True)
    lml = la.log_marginal_likelihood(prior)
    (grad,) = torch.autograd.grad(lml, prior)

    h = la.curvature.to_dense()
    theta = la.mean

    def dense_lml(pr):
        d = pr[la.tensor_index]
        return (-la.loss - 0.5 * (d * theta**2).sum() + 0.5 * d.log().sum()
                - 0.5 * torch.logdet(h + torch.diag(d)))

    pr = prior.detach().clone().requires_grad_(True)
    ref = dense_lml(pr)
    (ref_grad,) = torch.autograd.grad(ref, pr)
    assert torch.allclose(lml, ref, rtol=1e-10)
    assert torch.allclose(grad, ref_grad, rtol=1e-8, atol=1e-10)

    la.prior_precision = prior.detach()
    lam = h + torch.diag(prior.detach()[la.tensor_index])
    assert torch.allclose(la.posterior_precision.to_dense(), lam)
    jac = torch.func.jacrev(lambda v: la.params.functional_call(v, x[:4]))(la.params.vector())
    jac = jac.reshape(8, -1)
    _, cov = la.functional(x[:4], joint=True)
    assert torch.allclose(cov, jac @ torch.linalg.solve(lam, jac.T), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("structure", ["diag", "kfac"])
def test_optimize_tensor_granularity_is_at_least_as_good_as_layer(structure):
    model, _, loader = _model_and_data()
    la = Laplace(model, "classification", structure=structure).fit(loader, progress=False)
    la.optimize_prior_precision(granularity="layer", n_steps=300)
    by_layer = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(granularity="tensor", n_steps=300)
    assert la.prior_precision.shape == (la.num_tensors,)
    assert la.log_marginal_likelihood().item() >= by_layer - 1e-6
    assert math.isfinite(la.log_marginal_likelihood().item())


def test_per_tensor_prior_shape_is_validated():
    model, _, _ = _model_and_data()
    la = Laplace(model, "classification", structure="kfac")
    with pytest.raises(ShapeError, match="one per tensor \\(6\\)"):
        la.prior_precision = torch.ones(5)
