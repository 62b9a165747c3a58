"""float32 fidelity: bayescurv's float32 evidence and functional variance against its own
float64 truth, beside laplace-torch 0.3's (issue 11, item 2), measured in one run.

Case: regression with sigma_noise = 0.1, an MLP 1-50-50-1 (tanh, 2,701 parameters) fitted
in float64 to sin(2x) + 0.1 noise on N = 500 points in [-3, 3] (1,000 Adam steps); the
*same* weights are then evaluated in float64 and float32 (data in batches of 100). For each
structure:

- ``evidence err``: the worst ``|log p(D)_32 - log p(D)_64|`` (nats) over prior precisions
  0.01, 0.1 and 1;
- ``var rel err``: the worst relative error of the functional (linearized) variance
  ``J Σ Jᵀ`` at 41 test points in [-4, 4], over the same priors.

``lowrank`` and ``diag+lowrank`` use ``rank=30`` (``lowrank_method="sqrt"``). laplace-torch
0.3 runs ``full``, ``kron`` and ``diag`` on the same float32 and float64 models (its default
backend), each compared with its own float64 result. The last row is the exact linearized
evidence :class:`~bayescurv.laplace.GaussianGLM` (the BO surrogate's) at sigma = 1e-2.

    OMP_NUM_THREADS=2 python benchmarks/float32.py
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# keep this folder off the path so `import laplace` finds laplace-torch, not
# benchmarks/laplace.py
_here = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _here]

from bayescurv import Laplace  # noqa: E402
from bayescurv.laplace import GaussianGLM  # noqa: E402

DT = torch.float64
PRIORS = (0.01, 0.1, 1.0)
STRUCTURES = ["full", "diag", "kfac", "kfac-reduce", "ekfac", "lowrank", "diag+lowrank"]


def sine_case(n: int = 500, steps: int = 1000):
    torch.manual_seed(0)
    x = torch.linspace(-3, 3, n, dtype=DT).unsqueeze(-1)
    y = torch.sin(2 * x) + 0.1 * torch.randn(n, 1, dtype=DT)
    model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(),
                          nn.Linear(50, 1)).to(DT)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model, x, y


def loader(x, y, dtype):
    return DataLoader(TensorDataset(x.to(dtype), y.to(dtype)), batch_size=100)


def ours(model, x, y, xt, structure):
    """``({prior: evidence}, {prior: variances})`` per dtype."""
    out = {}
    for dt in (DT, torch.float32):
        extra = {"rank": 30} if "lowrank" in structure else {}
        la = Laplace(copy.deepcopy(model).to(dt), "regression", structure=structure,
                     sigma_noise=0.1, **extra).fit(loader(x, y, dt), progress=False)
        ev, var = {}, {}
        for p in PRIORS:
            ev[p] = float(la.log_marginal_likelihood(torch.tensor(p, dtype=dt)))
            la.prior_precision = p
            var[p] = la.functional(xt.to(dt))[1].reshape(-1).double()
        out[dt] = (ev, var)
    return out


def theirs(model, x, y, xt, structure):
    from laplace import Laplace as LT

    out = {}
    for dt in (DT, torch.float32):
        la = LT(copy.deepcopy(model).to(dt), "regression", subset_of_weights="all",
                hessian_structure=structure, sigma_noise=0.1, prior_precision=1.0)
        la.fit(loader(x, y, dt))
        ev, var = {}, {}
        for p in PRIORS:
            ev[p] = float(la.log_marginal_likelihood(prior_precision=torch.tensor(p, dtype=dt),
                                                     sigma_noise=torch.tensor(0.1, dtype=dt)))
            la.prior_precision = torch.tensor(p, dtype=dt)
            var[p] = la._glm_predictive_distribution(xt.to(dt))[1].reshape(-1).double()
        out[dt] = (ev, var)
    return out


def errors(out):
    (e64, v64), (e32, v32) = out[DT], out[torch.float32]
    ev = max(abs(e32[p] - e64[p]) for p in PRIORS)
    var = max(float(((v32[p] - v64[p]).abs() / v64[p].abs()).max()) for p in PRIORS)
    return ev, var


def fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.2g}"


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, x, y = sine_case()
    xt = torch.linspace(-4, 4, 41, dtype=DT).unsqueeze(-1)
    print("float32 vs float64 on the same weights (MLP 1-50-50-1, sigma 0.1, N 500), "
          "worst over prior precision 0.01, 0.1, 1")
    print(f"{'library':14s} {'structure':14s} {'evidence err (nats)':>20s} "
          f"{'var rel err':>12s}")
    for s in STRUCTURES:
        ev, var = errors(ours(model, x, y, xt, s))
        print(f"{'bayescurv':14s} {s:14s} {fmt(ev):>20s} {fmt(var):>12s}")
    try:
        import laplace  # noqa: F401
    except ImportError:
        print("laplace-torch not installed: its rows are skipped")
    else:
        for s in ("full", "kron", "diag"):
            try:
                ev, var = errors(theirs(model, x, y, xt, s))
                print(f"{'laplace-torch':14s} {s:14s} {fmt(ev):>20s} {fmt(var):>12s}")
            except Exception as e:  # noqa: BLE001 - a peer's failure is a row, not a crash
                print(f"{'laplace-torch':14s} {s:14s} {'failed: ' + type(e).__name__:>33s}")
    # the BO surrogate's exact linearized evidence at a small noise
    res = {}
    for dt in (DT, torch.float32):
        data = loader(x, y, dt)
        la = Laplace(copy.deepcopy(model).to(dt), "regression", structure="full").fit(
            data, progress=False)
        glm = GaussianGLM(la, data)
        res[dt] = [float(glm.log_marginal_likelihood(torch.tensor(p, dtype=dt),
                                                     torch.tensor(1e-2, dtype=dt)))
                   for p in PRIORS]
    worst = max(abs(a - b) for a, b in zip(res[torch.float32], res[DT]))
    print(f"{'bayescurv':14s} {'GaussianGLM':14s} {fmt(worst):>20s} {'-':>12s}"
          "   (sigma = 1e-2)")


if __name__ == "__main__":
    main()
