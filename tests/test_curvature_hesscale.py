"""The approximate backpropagated diagonal (``structure="diag-hesscale"``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv.curvature import compute
from bayescurv.errors import InvalidArgumentError, UnsupportedLayerError

DT = torch.float64


def _data(model, x, lik, n_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randint(0, n_out, (len(x),), generator=g) if lik == "classification"
         else torch.randn(len(x), n_out, generator=g, dtype=DT))
    return [(x[:3], y[:3]), (x[3:], y[3:])]


@pytest.mark.parametrize("lik", ["classification", "regression"])
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU, nn.Sigmoid])
def test_exact_for_last_two_linear_layers(lik, act, dense_reference):
    """The GGN diagonal of the last two Linear layers only needs the exact curvature at
    their outputs, which HesScale propagates exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), act(), nn.Linear(5, 3), nn.Flatten()).to(DT)
    x = torch.randn(8, 4, dtype=DT)
    data = _data(model, x, lik, 3)
    ref = torch.diagonal(dense_reference(model, lik, data))
    got = compute(model, lik, data, structure="diag-hesscale")
    torch.testing.assert_close(got.matrix.diagonal(), ref)
    exact = compute(model, lik, data, structure="diag")
    torch.testing.assert_close(got.loss, exact.loss)
    assert got.num_data == 8


def test_deeper_nets_approximate(dense_reference):
    """Below the last two layers the diagonal is approximate: non-negative, exact on the top
    layers, and of the right size on the others."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(),
        nn.Sequential(nn.Linear(32, 6), nn.ReLU()), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3),
    ).to(DT)
    x = torch.randn(8, 1, 4, 4, dtype=DT)
    data = _data(model, x, "classification", 3)
    ref = torch.diagonal(dense_reference(model, "classification", data))
    got = compute(model, "classification", data, structure="diag-hesscale").matrix.diagonal()
    assert (got >= 0).all()
    top = sum(p.numel() for p in model[-3:].parameters())
    torch.testing.assert_close(got[-top:], ref[-top:])
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.5, rel
    assert not torch.allclose(got, ref)  # it is an approximation


def test_refuses_unknown_modules_and_kinds():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(DT)
    data = [(torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,)))]
    with pytest.raises(UnsupportedLayerError, match=r"'1'.*LayerNorm"):
        compute(model, "classification", data, structure="diag-hesscale")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x):
            return self.l(x)

    with pytest.raises(UnsupportedLayerError, match="Sequential"):
        compute(Net().to(DT), "classification", data, structure="diag-hesscale")
    with pytest.raises(InvalidArgumentError, match="ggn"):
        compute(model, "classification", data, structure="diag-hesscale", kind="ef")
