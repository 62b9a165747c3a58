"""The linearized predictive on weight-sharing layers with a bias (convolutions, ``nn.Linear``
on sequences, attention projections): ``Laplace.functional`` against ``J Λ⁻¹ Jᵀ`` with the
dense posterior precision of the same posterior and ``J`` from ``torch.func.jacrev``.

Before the fix the Kronecker structures paired the ``[vec W, b]`` columns of the layer
Jacobian with the row-major ``[W | b]`` layout of the block (relative errors 1e-3 to 1e-1
on these tiny random nets)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv import Laplace
from bayescurv.curvature import layers


class LinearAttention(nn.Module):
    """Self-attention from ``nn.Linear`` projections, residual + LayerNorm, mean pooling."""

    def __init__(self, d: int = 6, c: int = 3) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, c)

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5, -1)
        return self.head(self.norm(x + self.o(att @ self.v(x))).mean(1))


def _case(name: str):
    torch.manual_seed(0)
    if name == "conv1d":
        model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
        x = torch.randn(12, 2, 8, dtype=torch.float64)
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                              nn.MaxPool2d(2), nn.Conv2d(3, 4, 3), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        x = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    else:
        model = LinearAttention()
        x = torch.randn(12, 4, 6, dtype=torch.float64)
    model = model.double().eval()
    y = torch.randint(0, 3, (12,))
    return model, x, [(x[:7], y[:7]), (x[7:], y[7:])]


def _dense_jacobian(la: Laplace, model: nn.Module, x) -> torch.Tensor:
    """``(B * C, P)`` Jacobian of the outputs at ``x`` w.r.t. the posterior's parameters."""
    jac = torch.func.jacrev(lambda v: la.params.functional_call(v, x))(la.params.vector())
    return jac.reshape(-1, la.params.numel)


@pytest.mark.parametrize("name", ["conv1d", "cnn", "attention"])
@pytest.mark.parametrize("structure", ["kfac", "kfac-reduce", "ekfac", "diag", "full"])
def test_functional_on_weight_sharing_layers_with_bias(name, structure):
    model, x, loader = _case(name)
    la = Laplace(model, "classification", structure=structure, prior_precision=0.5)
    la.fit(loader, progress=False)
    xs = x[:5]
    jac = _dense_jacobian(la, model, xs)
    ref = jac @ torch.linalg.solve(la.posterior_precision.to_dense(), jac.T)  # (B*C, B*C)
    _, joint = la.functional(xs, joint=True)
    _, marg = la.functional(xs)
    ref_marg = torch.stack([ref.reshape(5, 3, 5, 3)[b, :, b] for b in range(5)])
    assert torch.allclose(joint, ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(marg, ref_marg, rtol=1e-9, atol=1e-12)


def test_marginal_covariance_never_forms_the_joint(monkeypatch):
    """Per-input blocks by chunks, independent of the chunk size (one input per chunk)."""
    model, x, loader = _case("conv1d")
    la = Laplace(model, "classification", structure="kfac").fit(loader, progress=False)
    _, full_chunks = la.functional(x)
    monkeypatch.setattr(layers, "CHUNK_ELEMENTS", 1)
    _, one_by_one = la.functional(x)
    assert torch.allclose(full_chunks, one_by_one, rtol=1e-12, atol=1e-14)


def test_full_posterior_with_per_layer_prior_is_factorized_once(monkeypatch):
    """Repeated predictions reuse the Cholesky of ``Λ`` until a hyperparameter changes."""
    from bayescurv.linalg import dense

    model, x, loader = _case("conv1d")
    la = Laplace(model, "classification", structure="full",
                 prior_precision=torch.tensor([0.5, 2.0])).fit(loader, progress=False)
    calls = []
    real = dense.jittered_cholesky
    monkeypatch.setattr(dense, "jittered_cholesky", lambda m, **kw: calls.append(1) or real(m))
    first = la.functional(x)[1]
    la.functional(x)
    la.predict(x)
    assert len(calls) == 1
    la.prior_precision = torch.tensor([0.5, 3.0])
    second = la.functional(x)[1]
    assert len(calls) == 2 and not torch.allclose(first, second)
