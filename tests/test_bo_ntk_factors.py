"""The NTK from per-layer factors (:mod:`bayescurv.bo.ntk_factors`) against the dense
``torch.func`` Jacobian on the architecture matrix, and the linearized GP built on it."""

from __future__ import annotations

import pytest
import torch
from architectures import ARCHS, case, jacobian
from torch import nn

from bayescurv.bo.ntk import LinearizedGP, prior_groups
from bayescurv.bo.ntk_factors import FactoredJacobian
from bayescurv.params import select

DT = torch.float64


def _dense(name: str, granularity: str = "layer"):
    c = case(name)
    ps = select(c.model, "all")
    input_dim = c.x.shape[-1] if c.x.dim() == 2 else 0
    groups = prior_groups(ps, input_dim, granularity)
    return c, ps, groups, int(groups.max()) + 1


# the Linear layers each network applies once to a per-sample vector (the rest is explicit)
FACTORED = {"mlp": 3, "mlp-reg": 3, "cnn": 1, "cnn-reg": 1, "conv1d": 1, "conv3d": 1,
            "attention": 1, "attention-reg": 1, "embedding": 1, "mha": 1}


@pytest.mark.parametrize("name", list(ARCHS))
def test_kernel_grams_and_products_match_the_dense_jacobian(name):
    c, ps, groups, G = _dense(name)
    jac = FactoredJacobian(ps, groups, c.x)
    assert len(jac.layers) == FACTORED[name]
    f1, f2 = jac.factors(c.x), jac.factors(c.x_test)
    J1 = jacobian(ps, c.x).reshape(-1, ps.numel)
    J2 = jacobian(ps, c.x_test).reshape(-1, ps.numel)
    with torch.no_grad():
        torch.testing.assert_close(f1.f, c.model(c.x).reshape(-1))
    g = torch.Generator().manual_seed(0)
    delta = 0.5 + torch.rand(G, generator=g, dtype=DT)
    dinv = 1 / delta[groups]
    torch.testing.assert_close(jac.kernel(f1, f2, delta), (J1 * dinv) @ J2.T)
    grams = torch.stack([J1[:, groups == k] @ J1[:, groups == k].T for k in range(G)])
    torch.testing.assert_close(jac.grams(f1, G), grams)
    v = torch.randn(ps.numel, generator=g, dtype=DT)
    u = torch.randn(J1.shape[0], generator=g, dtype=DT)
    torch.testing.assert_close(jac.jvp(f1, v), J1 @ v)
    torch.testing.assert_close(jac.vjp(f1, u), J1.T @ u)
    # t-batches: the diagonal blocks of the test kernel
    t = c.x_test.shape[0] // 2
    blocks = jac.kernel(f2.batched(t), f2.batched(t), delta)
    Jb = J2.reshape(t, -1, ps.numel)
    torch.testing.assert_close(blocks, (Jb * dinv) @ Jb.transpose(-1, -2))


def test_ard_groups_per_input_column():
    c, ps, groups, G = _dense("mlp-reg", "ard")
    assert G == 5 + 5  # 5 input columns of the first weight, then one per other tensor
    jac = FactoredJacobian(ps, groups, c.x)
    assert len(jac.layers) == 3 and not jac.rest_params
    f1 = jac.factors(c.x)
    J1 = jacobian(ps, c.x).reshape(-1, ps.numel)
    delta = torch.linspace(0.3, 3.0, G, dtype=DT)
    torch.testing.assert_close(jac.kernel(f1, f1, delta), (J1 / delta[groups]) @ J1.T)
    grams = torch.stack([J1[:, groups == k] @ J1[:, groups == k].T for k in range(G)])
    torch.testing.assert_close(jac.grams(f1, G), grams)


class _Tied(nn.Module):
    """One Linear called twice, one tied to another module, one without bias, one frozen, one
    applied to a sequence folded into the batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3, bias=False)
        self.c = nn.Linear(3, 3)
        self.c.weight = self.b.weight
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(3, 2)

        self.folded = nn.Linear(1, 1)  # sees (B * 3, 1): the sequence folded into the batch

    def forward(self, x):
        h = torch.tanh(self.a(torch.tanh(self.a(x))))
        h = torch.tanh(self.b(h)) + self.c(h) + self.frozen(h)
        h = h + self.folded(h.reshape(-1, 1)).reshape(h.shape)
        return self.head(h)


def test_reused_tied_bias_free_and_frozen_layers():
    torch.manual_seed(0)
    net = _Tied().to(DT)
    ps = select(net, "all")
    groups = prior_groups(ps, 3, "layer")
    G = int(groups.max()) + 1
    x = torch.randn(6, 3, dtype=DT)
    jac = FactoredJacobian(ps, groups, x)
    assert [layer.module for layer in jac.layers] == [net.head]  # a reused, b/c tied, folded
    # groups that vary along a weight's rows cannot be factored: that weight goes explicit
    rows = groups.clone()
    sl = ps.slice_of(ps.index_of(net.head.weight))
    rows[sl] = torch.arange(2).repeat_interleave(3) + G
    assert not FactoredJacobian(ps, rows, x).layers
    f = jac.factors(x)
    J = torch.func.jacrev(lambda v: ps.functional_call(v, x))(ps.vector()).reshape(-1, ps.numel)
    delta = torch.linspace(0.5, 2.0, G, dtype=DT)
    torch.testing.assert_close(jac.kernel(f, f, delta), (J / delta[groups]) @ J.T)


def _dense_moments(ps, theta0, groups, delta, sigma, X, Y, Xs):
    """Mean and covariance of the linearized GP from dense Jacobians (differentiable in Xs)."""
    theta = ps.vector()

    def jac(x):
        def f(v):
            return ps.functional_call(v, x).reshape(-1)
        return f(theta), torch.func.jacrev(f)(theta)

    f, J = jac(X)
    dinv = 1 / delta[groups]
    K = (J * dinv) @ J.T + sigma**2 * torch.eye(J.shape[0], dtype=DT)
    r = Y.reshape(-1) - f + J @ (theta - theta0)
    theta_bar = theta0 + dinv * (J.T @ torch.linalg.solve(K, r))
    fs, Js = jac(Xs)
    mean = fs + Js @ (theta_bar - theta)
    A = Js * dinv
    cov = A @ Js.T - A @ J.T @ torch.linalg.solve(K, J @ A.T)
    return mean, cov


@pytest.mark.parametrize("name", ["mlp-reg", "attention-reg", "cnn-reg"])
def test_linearized_gp_moments_and_their_input_gradients(name):
    c, ps, groups, G = _dense(name)
    g = torch.Generator().manual_seed(3)
    theta0 = ps.vector() + 0.1 * torch.randn(ps.numel, generator=g, dtype=DT)
    delta = 0.5 + torch.rand(G, generator=g, dtype=DT)
    sigma = torch.tensor(0.3, dtype=DT)
    X, Y = c.x[:10], c.y[:10]
    gp = LinearizedGP(ps, theta0, groups, delta, sigma, X, Y, space="data")
    Xs = c.x_test[:2].clone().requires_grad_(True)
    mean, cov = gp.moments(Xs.unsqueeze(0))
    Xr = c.x_test[:2].clone().requires_grad_(True)
    mean_ref, cov_ref = _dense_moments(ps, theta0, groups, delta, sigma, X, Y, Xr)
    torch.testing.assert_close(mean.reshape(-1), mean_ref)
    torch.testing.assert_close(cov[0], cov_ref)
    w = torch.randn(cov_ref.shape, generator=g, dtype=DT)
    grad, = torch.autograd.grad(mean.sum() + (cov[0] * w).sum(), Xs)
    grad_ref, = torch.autograd.grad(mean_ref.sum() + (cov_ref * w).sum(), Xr)
    torch.testing.assert_close(grad, grad_ref)
