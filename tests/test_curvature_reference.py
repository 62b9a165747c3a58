"""Side-by-side checks against curvlinops (K-FAC) and BackPACK (exact GGN diagonal)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescurv.curvature import compute

pytestmark = pytest.mark.reference
DT = torch.float64


def _net(conv: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(12, 4))
        x = torch.randn(10, 2, 4, 4)
    else:
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
        x = torch.randn(10, 5)
    return model.to(DT).eval(), x.to(DT), torch.randint(0, 4, (10,))


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_matches_curvlinops(conv, approx):
    curvlinops = pytest.importorskip("curvlinops")
    model, x, y = _net(conv)
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    params = list(model.parameters())
    op = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(reduction="sum"), params, data, fisher_type="type-2",
        kfac_approx=approx, check_deterministic=False, separate_weight_and_bias=False,
    )
    n = sum(p.numel() for p in params)
    ref = op @ torch.eye(n, dtype=DT)
    structure = "kfac" if approx == "expand" else "kfac-reduce"
    ours = compute(model, "classification", data, structure=structure).matrix.to_dense()
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=1e-7)


def test_diag_matches_backpack():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagGGNExact

    model, x, y = _net(conv=True)
    bmodel = backpack.extend(model)
    loss = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))
    with backpack.backpack(DiagGGNExact()):
        loss(bmodel(x), y).backward()
    ref = torch.cat([p.diag_ggn_exact.reshape(-1) for p in model.parameters()])
    ours = compute(model, "classification", [(x, y)], structure="diag").matrix.diagonal()
    torch.testing.assert_close(ours, ref)
