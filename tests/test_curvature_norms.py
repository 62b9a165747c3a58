"""Closed-form per-sample gradients of norm layers' affine parameters
(:mod:`bayescurv.curvature.norms`) against the generic ``torch.func`` route, float64."""

import pytest
import torch
from torch import nn

from bayescurv.curvature import layers, norms


def _bn(cls, c):
    m = cls(c)
    m.running_mean.normal_()
    m.running_var.uniform_(0.5, 2.0)
    return m.eval()


CASES = [
    ("bn1d-flat", lambda: _bn(nn.BatchNorm1d, 4), (4,)),
    ("bn1d-seq", lambda: _bn(nn.BatchNorm1d, 4), (4, 5)),
    ("bn2d", lambda: _bn(nn.BatchNorm2d, 3), (3, 4, 5)),
    ("bn3d", lambda: _bn(nn.BatchNorm3d, 2), (2, 3, 2, 3)),
    ("layernorm", lambda: nn.LayerNorm(6), (5, 6)),
    ("layernorm-2d", lambda: nn.LayerNorm((3, 4)), (2, 3, 4)),
    ("layernorm-nobias", lambda: nn.LayerNorm(6, bias=False), (6,)),
    ("groupnorm", lambda: nn.GroupNorm(2, 4), (4, 3, 3)),
]


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_closed_form_matches_generic(name, make, shape):
    torch.manual_seed(0)
    m = make().double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = torch.randn(3, *shape, dtype=torch.float64)
    g = torch.randn(2, *m(x).shape, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    got = norms.per_sample(m, names, x, g)
    ref = layers.generic_per_sample(m, names, x, g)
    assert got is not None and set(got) == set(ref)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)


def test_not_covered_falls_back():
    bn = nn.BatchNorm2d(3, track_running_stats=False).eval()  # batch statistics
    x = torch.randn(2, 3, 4, 4)
    assert norms.per_sample(bn, ["weight", "bias"], x, torch.randn(1, *x.shape)) is None
    inorm = nn.InstanceNorm2d(3, affine=True)
    assert norms.per_sample(inorm, ["weight", "bias"], x, torch.randn(1, *x.shape)) is None
