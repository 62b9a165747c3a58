"""The closed-form output-layer predictive (:mod:`bayescurv.laplace.moments`): probit and
bridge from the diagonal and row sums of J Σ Jᵀ equal the links applied to the full
``(B, C, C)`` covariance of the general path."""

import pytest
import torch
from torch import nn

from bayescurv import Laplace, links
from bayescurv.errors import ShapeError


def _model(bias: bool, dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6, bias=bias)).to(dtype)


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64).to(dtype)
    return [(x[:20], torch.randint(0, 6, (20,), generator=g)),
            (x[20:], torch.randint(0, 6, (20,), generator=g))]


@pytest.mark.parametrize("structure", ["kfac", "diag", "ekfac"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("link", ["probit", "bridge"])
def test_moments_equal_full_covariance(structure, bias, link):
    model = _model(bias)
    la = Laplace(model, "classification", subset="last_layer", structure=structure)
    la.fit(_data())
    la.prior_precision = 0.7
    x = torch.randn(9, 5, dtype=torch.float64)
    parts = la._chunks(la._inputs(x), 4)
    got = la._head_predictive(parts, link)
    assert got is not None  # the closed form applies
    mean, cov = la._functional(la._inputs(x))  # the general path: (B, C, C)
    ref = la.likelihood.predictive(mean, cov, link)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(la.predict(x, link=link, chunk_size=4), ref)
    d, s = torch.diagonal(cov, dim1=-2, dim2=-1), cov.sum(-1)
    torch.testing.assert_close(links.laplace_bridge_moments(mean, d, s),
                               links.laplace_bridge(mean, cov))


def test_float32_matches_float64():
    la64 = Laplace(_model(True), "classification", subset="last_layer").fit(_data())
    la32 = Laplace(_model(True, torch.float32), "classification", subset="last_layer")
    la32.fit(_data(torch.float32))
    x = torch.randn(7, 5, dtype=torch.float64)
    p64 = la64.predict(x)
    p32 = la32.predict(x.float())
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32.double(), p64, rtol=1e-4, atol=1e-5)


def test_falls_back_when_not_output_layer():
    model = _model(True)
    la = Laplace(model, "classification", subset="all", structure="kfac").fit(_data())
    x = la._inputs(torch.randn(3, 5, dtype=torch.float64))
    assert la._head_predictive([x], "probit") is None  # two layers: the general path
    la_ll = Laplace(model, "classification", subset="last_layer", structure="kfac",
                    factor_rank=3).fit(_data())
    assert la_ll._head_predictive([x], "probit") is None  # truncated: the general path
    assert la_ll._head_predictive([x], "mc") is None  # MC reads the whole covariance
    with pytest.raises(ShapeError):
        links.laplace_bridge_moments(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
