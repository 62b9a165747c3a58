"""One streaming pass per fit (issue 30): curvature, loss, data count and the Gaussian
residuals' sums of squares come from the same pass over the loader; EKFAC's eigenvalue
correction is the only second pass; a one-shot generator fits wherever one pass suffices."""

import pytest
import torch
from torch import nn

from bayescurv import Laplace
from bayescurv.curvature import compute
from bayescurv.curvature.compute import passes


class Counting:
    """A re-iterable loader that counts how often it is iterated."""

    def __init__(self, batches):
        self.batches, self.iterations = batches, 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.batches)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double().eval()


def _data(task):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 2, 5, 5, generator=g, dtype=torch.float64)
    y = (torch.randn(24, 3, generator=g, dtype=torch.float64) if task == "regression"
         else torch.randint(0, 3, (24,), generator=g))
    return [(x[:10], y[:10]), (x[10:], y[10:])]


@pytest.mark.parametrize("structure", ["kfac", "diag", "full"])
def test_regression_one_pass_matches_reference(structure):
    data = _data("regression")
    loader = Counting(data)
    la = Laplace(_net(), "regression", structure=structure, sigma_noise=0.7)
    assert la.passes == 1
    la.fit(loader)
    assert loader.iterations == 1
    f = torch.cat([_net()(x) for x, _ in data])
    y = torch.cat([y for _, y in data])
    torch.testing.assert_close(la._sse, (f - y).square().sum(0))  # dense reference
    la_gen = Laplace(_net(), "regression", structure=structure, sigma_noise=0.7)
    la_gen.fit(b for b in data)  # a one-shot generator
    for p in (0.1, 3.0):
        torch.testing.assert_close(la_gen.log_marginal_likelihood(torch.tensor(p)),
                                   la.log_marginal_likelihood(torch.tensor(p)))
    curv = compute(_net(), "regression", data, structure=structure)
    torch.testing.assert_close(curv.sum_of_squares, la._sse)
    assert compute(_net(), "classification", _data("cls"), structure="diag").sum_of_squares \
        is None


@pytest.mark.parametrize("structure,expected", [("kfac", 1), ("diag", 1), ("ekfac", 2)])
def test_classification_passes(structure, expected):
    loader = Counting(_data("cls"))
    la = Laplace(_net(), "classification", structure=structure)
    assert la.passes == expected
    la.fit(loader)
    assert loader.iterations == expected  # the kept inputs are tapped, not peeked
    assert la._kept_inputs.shape[0] == 10


def test_passes_table():
    assert passes("kfac") == passes("diag") == passes("full") == passes("lowrank") == 1
    assert passes("ekfac") == 2
    assert passes("lowrank", lowrank_method="lanczos") == 2
    assert passes("diag-hesscale", residuals=True) == 2
    assert passes("diag-hesscale") == 1
    la = Laplace(_net(), "regression", structure="diag", sigma_noise=torch.ones(3))
    assert la.passes == 4  # per-output noise: one curvature pass per output
