"""Sequence-first inputs ``(T, B, D)`` (PyTorch's ``batch_first=False`` layout) into
``nn.Linear`` layers, with ``batch_dim=1`` (issue 11, item 5): every structure against dense
float64 references from ``torch.func``, with ``B == T`` and ``B != T``; and a refusal, naming
the module, when the batch dimension does not match the data."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bayescurv import Laplace, compute
from bayescurv.errors import InvalidArgumentError, ShapeError
from bayescurv.likelihoods import get_likelihood
from bayescurv.params import select


class PerPosition(nn.Module):
    """``(T, B, D)`` -> Linear -> tanh -> Linear (per position) -> mean over ``T`` ->
    ``(B, C)``; with ``head=True`` the mean is taken after the first layer and a Linear head
    maps ``(B, H)`` to ``(B, C)`` (a 2-D layer input in a sequence-first model)."""

    def __init__(self, d: int = 3, h: int = 4, c: int = 2, head: bool = False,
                 linear: bool = False) -> None:
        super().__init__()
        self.l1 = nn.Linear(d, h)
        self.l2 = nn.Linear(h, c)
        self.head = head
        self.act = nn.Identity() if linear else nn.Tanh()

    def forward(self, x):
        z = self.act(self.l1(x))  # (T, B, H)
        if self.head:
            return self.l2(z.mean(0))
        return self.l2(z).mean(0)


class SeqFirst(Dataset):
    """Items ``x_n`` of shape ``(T, D)``, collated into ``(T, B, D)``."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return self.x.shape[1]

    def __getitem__(self, i):
        return self.x[:, i], self.y[i]


def _collate(items):
    return torch.stack([x for x, _ in items], 1), torch.stack([y for _, y in items])


def _data(t: int, n: int, d: int, likelihood: str, c: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, d, generator=g, dtype=torch.float64)
    if likelihood == "regression":
        y = torch.randn(n, c, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(c, (n,), generator=g)
    return x, y


def _loader(x, y, batch_size):
    return DataLoader(SeqFirst(x, y), batch_size=batch_size, collate_fn=_collate)


def _model(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return PerPosition(**kw).double()


def _dense_ggn(model, likelihood, x, y) -> torch.Tensor:
    """``Σ_n J_nᵀ H_n J_n`` with ``J`` from ``jacrev`` of the whole ``(T, N, D)`` batch."""
    pset = select(model, "all")
    lik = get_likelihood(likelihood)
    theta = pset.vector()
    jac = torch.func.jacrev(lambda v: pset.functional_call(v, x))(theta)  # (N, C, P)
    f = model(x).detach()
    return torch.einsum("ncp,ncd,ndq->pq", jac, lik.hessian(f), jac)


def _dense_jacobian(model, x) -> torch.Tensor:
    pset = select(model, "all")
    return torch.func.jacrev(lambda v: pset.functional_call(v, x))(pset.vector())


CASES = [(5, 5, 2), (3, 7, 3), (6, 4, 4)]  # (T, N, batch size): B == T and B != T


@pytest.mark.parametrize("t,n,bs", CASES)
@pytest.mark.parametrize("likelihood", ["regression", "classification"])
@pytest.mark.parametrize("head", [False, True])
def test_full_and_diag_match_dense_ggn(t, n, bs, likelihood, head):
    x, y = _data(t, n, 3, likelihood)
    model = _model(head=head)
    ref = _dense_ggn(model, likelihood, x, y)
    loader = _loader(x, y, bs)
    full = compute(model, likelihood, loader, structure="full", batch_dim=1)
    assert full.num_data == n
    torch.testing.assert_close(full.matrix.to_dense(), ref, rtol=1e-10, atol=1e-12)
    diag = compute(model, likelihood, loader, structure="diag", batch_dim=1)
    torch.testing.assert_close(diag.matrix.diagonal(), torch.diagonal(ref), rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("t,n,bs", CASES)
def test_kfac_reduce_exact_for_deep_linear_pooled(t, n, bs):
    """K-FAC-reduce is exact per layer for a deep linear network applied per position,
    mean-pooled over ``T``, with a Gaussian likelihood (the backpropagated vectors do not
    depend on the position or the data point)."""
    x, y = _data(t, n, 3, "regression")
    model = _model(linear=True)
    ref = _dense_ggn(model, "regression", x, y)
    curv = compute(model, "regression", _loader(x, y, bs), structure="kfac-reduce",
                   batch_dim=1)
    dense = curv.matrix.to_dense()
    pset = curv.params
    # the diagonal blocks of the two layers (weight and bias of a module together)
    for mod in ("l1", "l2"):
        idx = torch.cat([torch.arange(pset.slice_of(i).start, pset.slice_of(i).stop)
                         for i, name in enumerate(pset.names) if name.startswith(mod + ".")])
        torch.testing.assert_close(dense[idx][:, idx], ref[idx][:, idx], rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("t,n,bs", CASES)
@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "kfac-reduce", "ekfac"])
@pytest.mark.parametrize("head", [False, True])
def test_glm_predictive_matches_dense(t, n, bs, structure, head):
    x, y = _data(t, n, 3, "classification")
    model = _model(head=head)
    la = Laplace(model, "classification", structure=structure, prior_precision=0.5,
                 batch_dim=1)
    la.fit(_loader(x, y, bs), progress=False)
    xt, _ = _data(t, 6 if t != 6 else 5, 3, "classification", seed=1)
    mean, cov = la.functional(xt)
    jac = _dense_jacobian(model, xt)  # (B, C, P)
    sigma = torch.linalg.inv(la.posterior_precision.to_dense())
    ref = torch.einsum("bcp,pq,bdq->bcd", jac, sigma, jac)
    torch.testing.assert_close(mean, model(xt).detach())
    torch.testing.assert_close(cov, ref, rtol=1e-8, atol=1e-10)
    _, joint = la.functional(xt, joint=True)
    flat = jac.reshape(-1, jac.shape[-1])
    torch.testing.assert_close(joint, flat @ sigma @ flat.T, rtol=1e-8, atol=1e-10)


def test_full_posterior_curvature_matches_dense_and_evidence_runs():
    t, n = 4, 9
    x, y = _data(t, n, 3, "regression")
    model = _model()
    la = Laplace(model, "regression", structure="full", batch_dim=1)
    la.fit(_loader(x, y, 4), progress=False)
    assert la.num_data == n
    torch.testing.assert_close(la.curvature.to_dense(), _dense_ggn(model, "regression", x, y),
                               rtol=1e-10, atol=1e-12)
    la.optimize_prior_precision(tune_sigma_noise=True, n_steps=5)
    assert torch.isfinite(la.log_marginal_likelihood())


def test_batch_dim_mismatch_is_refused_naming_the_module():
    """B != T with the default ``batch_dim=0``: an error that names the module, the shapes
    and the argument, never a silently wrong answer."""
    t, n = 5, 3
    x, y = _data(t, n, 3, "classification")
    model = _model()
    with pytest.raises(ShapeError, match="batch_dim"):
        compute(model, "classification", _loader(x, y, n), structure="diag")
    la = Laplace(model, "classification", structure="diag", batch_dim=1)
    la.fit(_loader(x, y, n), progress=False)
    la.batch_dim = 0  # a posterior asked to predict with the wrong layout
    with pytest.raises(ShapeError, match=r"'l1'.*\(5, 3, 3\).*batch_dim=0"):
        la.functional(x)


def test_wrong_batch_dim_for_batch_first_data_is_refused():
    x = torch.randn(4, 6, 3, dtype=torch.float64)  # (B, T, D), batch first
    y = torch.randint(2, (4,))
    model = _model()
    with pytest.raises(ShapeError, match="batch_dim=1"):
        compute(model, "classification", [(x, y)], structure="kfac", batch_dim=1)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_batch_dim_validated(bad):
    x, y = _data(3, 4, 3, "regression")
    with pytest.raises(InvalidArgumentError, match="batch_dim"):
        compute(_model(), "regression", _loader(x, y, 2), structure="diag", batch_dim=bad)
