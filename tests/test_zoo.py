"""Small versions of the networks of the scale benchmark (``bayescurv.zoo``): a ResNet with
BatchNorm and residuals, a ViT with ``nn.Linear`` attention and one with
``nn.MultiheadAttention``; K-FAC, diagonal and the GLM predictive against dense float64
references, and the quick configuration of ``benchmarks/scale.py`` end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bayescurv import Laplace, zoo

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def _net(name: str):
    torch.manual_seed(0)
    if name == "resnet":
        model = zoo.ResNet((1, 1), width=2, num_classes=3)
    else:
        model = zoo.vit(dim=4, depth=1, heads=2, mlp=6, image=4, patch=2, num_classes=3,
                        torch_attention=name == "vit-mha")
    model = model.double().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    return model, x, [(x[:5], y[:5]), (x[5:], y[5:])]


@pytest.mark.parametrize("structure", ["diag", "kfac", "ekfac"])
@pytest.mark.parametrize("name", ["resnet", "vit", "vit-mha"])
def test_zoo_networks_against_dense(name, structure):
    model, x, loader = _net(name)
    la = Laplace(model, "classification", structure=structure, prior_precision=0.3)
    la.fit(loader, progress=False)
    jac = torch.func.jacrev(lambda v: la.params.functional_call(v, x))(la.params.vector())
    with torch.no_grad():
        p = model(x).softmax(-1)
    hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn = torch.einsum("bcp,bcd,bdq->pq", jac, hess, jac)
    if structure == "diag":
        assert torch.allclose(la.curvature.diagonal(), ggn.diagonal(), rtol=1e-9, atol=1e-12)
    js = jac[:3].reshape(9, -1)
    ref = js @ torch.linalg.solve(la.posterior_precision.to_dense(), js.T)
    _, joint = la.functional(x[:3], joint=True)
    assert torch.allclose(joint, ref, rtol=1e-9, atol=1e-12)


def test_scale_benchmark_quick_configuration_runs():
    script = Path(__file__).parents[1] / "benchmarks" / "scale.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--n", "32", "--batch", "16",
         "--workloads", "resnet18-narrow", "--rows", "fit-kfac,predict-64"],
        capture_output=True, text=True, timeout=600, check=True).stdout
    rows = [line for line in out.splitlines() if line and not line.startswith(("#", "work"))]
    assert len(rows) == 2 and all("grad pass" in r for r in rows), out
